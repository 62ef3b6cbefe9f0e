"""How far an atom's readout features lie from those of the atoms a ``lastlayer`` model has seen:
the misfit term of its energy variance (``rarefly fit --misfit-variance``).

Why: a readout posterior knows only the uncertainty of its readout weights. With thousands of
force components for a few dozen weights, that uncertainty is small in every direction, and
after a backbone refinement it was the same on basin, transition-state and far frames of
alanine dipeptide (raw sigma_E 0.0066 +- 0.0006 eV on 201 frames of a biased trajectory),
while the errors there differed two- to three-fold. One Student-t scale then either trusted
the far frames and was wrong on them, or trusted nothing (``benchmarks/bench_onthefly.out``,
runs 28-29). What the weight posterior misses is the model's *misfit*, and the misfit grows
where the features leave the region the model was fitted on; descriptor distance as a cheap
epistemic proxy is one of the seed documents' suggestions (PCA reconstruction error,
``../shared/docs/METHOD.md`` §2).

The density: per element, the mean ``m`` and covariance ``C`` of the live readout features
(without the element one-hot) over the fitted atoms, with a ridge of ``ridge`` times the mean
eigenvalue. Atom ``i``'s squared distance is ``d_i^2 = (phi_i - m)^T C^-1 (phi_i - m) / F``
(about 1 for a fitted atom, F the number of features), and the misfit variance of a structure

    v_misfit = s_E^2 (1 + sum_i h(d_i^2 - 1)),

``s_E`` the fit's energy residual (``fit_noise``) and ``h`` a ramp smoothed below 1
(``h(x) = 0`` for x <= 0, ``x^2 / 2`` up to 1, ``x - 1/2`` above): a fitted structure gets the
fit's misfit, each atom further out than a typical fitted atom adds to it, and the variance
stays continuously differentiable, so that d sigma_E / dR is exact for a collective variable.

Measured offline (``benchmarks/check_misfit_variance.out``, the final model of bench_onthefly's
thirty-first run, biased scheme; 371 frames: its 201 trajectory frames, xTB-labelled, and
three held-out sets): without the term the raw sigma_E is 0.0057-0.0061 eV on every set (log spread
0.08) and a scale taken from the 30 % most uncertain frames trusts none; with it sigma_E is
0.035 eV on basin frames and 0.062-0.079 eV on transition-state and trajectory frames (log
spread 0.59), and the same recipe trusts 40 % of the frames, 98 % of them within epsilon.
In the run itself (``bench_onthefly.out``) the biased scheme's final model trusted 20 of 60
trajectory frames, 19 within epsilon; in the thirtieth run (same command, no refinement
finished in time) it trusted none. Opt-in until more runs agree.

The statistics are sums (count, sum, sum of outer products), so new frames are added exactly;
after a backbone refinement the features change and the trainer rebuilds the density from the
replay frames and the labels.
"""

from __future__ import annotations

import torch

#: ridge added to each element's feature covariance, relative to its mean eigenvalue
DEFAULT_RIDGE = 1e-3


def smooth_ramp(x: torch.Tensor) -> torch.Tensor:
    """0 below 0, x^2/2 on [0, 1], x - 1/2 above: a ramp with a continuous derivative."""
    return torch.where(x <= 0, torch.zeros_like(x),
                       torch.where(x < 1, 0.5 * x * x, x - 0.5))


class FeatureDensity:
    """Per-element Gaussian of the readout features of the atoms a model has seen."""

    def __init__(self, num_elements: int, num_features: int, count=None, total=None, outer=None,
                 ridge: float = DEFAULT_RIDGE):
        E, F = int(num_elements), int(num_features)
        f64 = torch.float64
        self.count = torch.zeros(E, dtype=f64) if count is None else torch.as_tensor(count, dtype=f64).clone()
        self.total = torch.zeros(E, F, dtype=f64) if total is None else torch.as_tensor(total, dtype=f64).clone()
        self.outer = torch.zeros(E, F, F, dtype=f64) if outer is None else torch.as_tensor(outer, dtype=f64).clone()
        self.ridge = float(ridge)
        self._finalise()

    @property
    def num_features(self) -> int:
        return self.total.shape[1]

    @torch.no_grad()
    def add(self, features: torch.Tensor, element: torch.Tensor) -> None:
        """Accumulate atoms: ``features`` (n, F) live readout features, ``element`` (n,) indices."""
        x = features.detach().to(torch.float64).cpu()
        el = element.detach().cpu().long()
        E = self.count.shape[0]
        self.count += torch.bincount(el, minlength=E).to(torch.float64)
        self.total.index_add_(0, el, x)
        self.outer.index_add_(0, el, x[:, :, None] * x[:, None, :])
        self._finalise()

    def _finalise(self) -> None:
        E, F = self.total.shape
        n = self.count.clamp_min(1.0)
        mean = self.total / n[:, None]
        cov = self.outer / n[:, None, None] - mean[:, :, None] * mean[:, None, :]
        prec = torch.zeros_like(cov)
        for e in range(E):
            if self.count[e] < 2:   # an element never seen: no distance (the species check
                continue            # refuses elements the model does not know)
            c = 0.5 * (cov[e] + cov[e].T)
            lam = float(torch.trace(c)) / F
            prec[e] = torch.linalg.inv(c + max(self.ridge * lam, 1e-12) * torch.eye(F, dtype=c.dtype))
        self.mean, self.prec = mean, prec
        self._cache: dict = {}

    def squared_distance(self, features: torch.Tensor, element: torch.Tensor) -> torch.Tensor:
        """``d_i^2`` of every atom (differentiable in ``features``)."""
        key = (features.dtype, features.device)
        if key not in self._cache:
            self._cache[key] = (self.mean.to(*key[::-1]), self.prec.to(*key[::-1]))
        mean, prec = self._cache[key]
        y = features - mean[element]
        return torch.einsum("ni,nij,nj->n", y, prec[element], y) / self.num_features

    def excess(self, features: torch.Tensor, element: torch.Tensor) -> torch.Tensor:
        """``h(d_i^2 - 1)`` of every atom: how much further out than a typical fitted atom."""
        return smooth_ramp(self.squared_distance(features, element) - 1.0)

    def to_dict(self) -> dict:
        return {"count": self.count.clone(), "total": self.total.clone(), "outer": self.outer.clone(),
                "ridge": self.ridge}

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureDensity":
        total = torch.as_tensor(d["total"])
        return cls(total.shape[0], total.shape[1], d["count"], total, d["outer"],
                   ridge=float(d.get("ridge", DEFAULT_RIDGE)))
