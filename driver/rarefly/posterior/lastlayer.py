"""``lastlayer``: a Bayesian linear (Laplace-exact) posterior over MACE's readout weights.

With the readout linearisation of :mod:`rarefly.posterior.backbone`, the total energy is
``E(R) = a(R) + Phi(R) . theta`` where ``Phi`` is the sum over atoms of the (scaled) readout
features. A Gaussian prior ``theta ~ N(theta_foundation, s_p^2 I)`` and a Gaussian likelihood
on energies and force components give a Gaussian posterior ``N(mu, Sigma)`` in closed form
(this is exact Bayesian linear regression, so "Laplace" and "Bayesian-linear" coincide).

Prediction, one forward pass and two backward passes (one when ``sigma_gradient`` is off):

- energy ``a + Phi.mu``; epistemic variance ``Phi^T Sigma Phi``, plus the energy noise;
- ``d var/dR = 2 (Sigma Phi)^T dPhi/dR``: one vector-Jacobian product;
- per-atom force variance: by default (``rank = 0``) without another backward pass, from the
  epistemic variance of each atom's energy contribution relative to the fitted atoms (see
  :meth:`LastLayerPosterior._local_force_variance`); with ``rank = K`` the exact force variance
  in the K leading eigen-directions of ``Sigma``, at K more backward passes (measured in
  ``benchmarks/bench_driver.out``: 8 passes made a call ~3-7x a plain MACE call).

Noise levels: the seed paper fixes the energy noise at 0.1 epsilon and learns per-atom force
noise. A linear readout cannot absorb all of a foundation model's error, so for the
*likelihood* ``fit`` sets both noise levels to the root-mean-square residuals of the fit
(``fit_noise``; floors: the settings' values) and refits, twice, so that energies and forces
are weighted by how well they can be fitted. The *predictive* energy variance adds only the
paper's aleatoric 0.1 epsilon: the misfit is a scale the Student-t calibration learns, and
sigma_E keeps the epistemic variation that makes it useful as a collective variable (with
the misfit inside it, sigma_E would be nearly constant). The predictive force variance adds
the fitted force noise (the paper's aleatoric force term).

Misfit variance (``rarefly fit --misfit-variance``): with a :class:`FeatureDensity` of the
fitted atoms' readout features, the energy variance also holds the fit's misfit, scaled by how
far each atom's features lie from the fitted ones (see :mod:`rarefly.posterior.feature_density`
for the form, and why: after a backbone refinement the weight variance alone was the same on
every frame). Its gradient goes into the same backward pass as the epistemic variance's.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from rarefly.posterior.backbone import Backbone
from rarefly.posterior.base import LabelledFrame, Moments, Posterior, PosteriorSettings
from rarefly.posterior.feature_density import FeatureDensity


#: learning-rate schedules of :meth:`LastLayerPosterior.refine_backbone`: ``constant``, or
#: ``cosine`` from ``lr`` to 0 over the refinement (as each of the seed paper's SGHMC cycles)
LR_SCHEDULES = ("constant", "cosine")


def _graph_sum(x: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
    out = torch.zeros((num_graphs,) + x.shape[1:], dtype=x.dtype, device=x.device)
    return out.index_add(0, batch, x)


class LastLayerPosterior(Posterior):
    kind = "lastlayer"

    def __init__(self, backbone: Backbone, settings: PosteriorSettings, mean: torch.Tensor,
                 cov: torch.Tensor, rank: int = 0, fit_noise: tuple[float, float] | None = None,
                 local_reference: float = 0.0, density: FeatureDensity | None = None, **kw):
        super().__init__(backbone, settings, **kw)
        #: readout-feature density of the fitted atoms: the misfit term of the energy variance
        self.density = density
        #: mean phi_i^T Sigma phi_i over the fitted atoms (rank-0 force variance)
        self.local_reference = float(local_reference)
        #: (energy eV, force eV/A) noise of the likelihood
        self.fit_noise = tuple(fit_noise) if fit_noise else (settings.energy_noise, settings.force_noise)
        #: (mean, cov) the trainer conditions on all its labels after a backbone refinement
        self.base_posterior: tuple[torch.Tensor, torch.Tensor] | None = None
        self.set_posterior(mean, cov, rank)

    def set_posterior(self, mean: torch.Tensor, cov: torch.Tensor, rank: int | None = None) -> None:
        dt, dev = self.dtype, self.device
        self.mean = mean.to(dtype=dt, device=dev)
        self.cov = 0.5 * (cov + cov.T).to(dtype=dt, device=dev)
        self.rank = int(rank if rank is not None else self.rank)
        lam, vec = torch.linalg.eigh(self.cov)
        k = min(self.rank, lam.numel())
        self._lowrank = (vec[:, -k:] * lam[-k:].clamp_min(0).sqrt()).T.contiguous()  # (k, D)

    @classmethod
    def from_foundation(cls, backbone: Backbone, settings: PosteriorSettings, rank: int = 0, **kw):
        theta0 = backbone.readout_weights()
        cov = settings.prior_sigma ** 2 * torch.eye(theta0.numel(), dtype=theta0.dtype)
        return cls(backbone, settings, theta0, cov, rank=rank, **kw)

    # ------------------------------------------------------------------ prediction
    def _moments(self, data, positions, strain) -> Moments:
        G = int(data["ptr"].numel() - 1)
        out = self.backbone(data, positions, strain)
        phi = out["phi"]
        Phi = _graph_sum(phi, data["batch"], G)                   # (G, D)
        fixed = _graph_sum(out["fixed"], data["batch"], G)        # (G,)
        energy = fixed + Phi @ self.mean
        c = (Phi @ self.cov).detach()                             # Sigma Phi, (G, D)
        var_epi = (Phi.detach() * c).sum(-1)
        want_gv = self.sigma_gradient
        misfit = self._misfit_variance(phi, data["batch"], G) if self.density is not None else None
        inputs = [positions] + ([strain] if strain is not None else [])
        # plain backward passes: faster than one vmapped (is_grads_batched) pass on CPU
        g_e = torch.autograd.grad(energy.sum(), inputs, retain_graph=want_gv or self.rank > 0)
        if want_gv:
            target = 2.0 * (Phi * c).sum() + (0.0 if misfit is None else misfit.sum())
            g_v = torch.autograd.grad(target, inputs, retain_graph=self.rank > 0, allow_unused=True)
            g_v = tuple(torch.zeros_like(x) if g is None else g for g, x in zip(g_v, inputs))
            if strain is None:
                g_v = (g_v[0], None)
        else:
            g_v = (None, None)
        if misfit is not None:
            var_epi = var_epi + misfit.detach()
        if self.rank > 0:
            var_f = torch.zeros_like(positions)
            for j, r in enumerate(self._lowrank):
                (g,) = torch.autograd.grad((Phi @ r).sum(), [positions],
                                           retain_graph=j < len(self._lowrank) - 1)
                var_f = var_f + g ** 2
            var_f = var_f + self.fit_noise[1] ** 2
        else:
            var_f = self._local_force_variance(phi.detach())
        return Moments(
            energy=energy.detach(),
            forces=-g_e[0],
            dE_dstrain=None if strain is None else g_e[1],
            var_energy=var_epi + self.settings.energy_noise ** 2,
            grad_var_energy=g_v[0],
            strain_grad_var_energy=None if strain is None else g_v[1],
            var_forces=var_f,
        )

    def _misfit_variance(self, phi: torch.Tensor, batch: torch.Tensor, G: int) -> torch.Tensor:
        """``s_E^2 (1 + sum_i h(d_i^2 - 1))`` per graph (see :mod:`~rarefly.posterior.feature_density`)."""
        F = self.density.num_features
        excess = self.density.excess(phi[:, :F], phi[:, F:].argmax(-1))
        return self.fit_noise[0] ** 2 * (1.0 + _graph_sum(excess, batch, G))

    @torch.no_grad()
    def fit_density(self, frames: Sequence[LabelledFrame], add: bool = False) -> int:
        """The readout-feature density of the atoms of ``frames`` (forward passes only), which
        switches the misfit term of the energy variance on; ``add``: added to the density this
        model has. Returns the number of atoms added."""
        from rarefly.graph import build_graph

        F = self.backbone.num_features - self.backbone.num_elements
        dens = self.density if (add and self.density is not None) else \
            FeatureDensity(self.backbone.num_elements, F)
        n = 0
        for i in range(0, len(frames), 16):
            sub = frames[i:i + 16]
            data = build_graph([f.structure for f in sub], self.r_max, self.atomic_numbers,
                               self.dtype, self.device)
            phi = self.backbone(data, data["positions"], None)["phi"]
            dens.add(phi[:, :F], phi[:, F:].argmax(-1))
            n += phi.shape[0]
        self.density = dens
        return n

    def _local_force_variance(self, phi: torch.Tensor) -> torch.Tensor:
        """rank 0: per-atom force variance without extra backward passes,
        ``noise_F^2 (1 + u_i / u_ref)`` with ``u_i = phi_i^T Sigma phi_i`` the epistemic variance of
        atom i's energy contribution and ``u_ref`` its mean over the fitted atoms: the fitted force
        noise in familiar environments, growing with how unfamiliar atom i's environment is. The
        force calibration rescales it against observed force errors."""
        u = ((phi @ self.cov) * phi).sum(-1)
        u_ref = self.local_reference if self.local_reference > 0 else float(u.mean().clamp_min(1e-30))
        v = self.fit_noise[1] ** 2 * (1.0 + u / u_ref)
        return v[:, None].expand(-1, 3)

    # ------------------------------------------------------------------ fitting
    def design(self, frames: Sequence[LabelledFrame], chunk: int = 8, progress: bool = False,
               forces: bool = True):
        """Normal-equation blocks for energies and forces (offsets applied to references).
        ``forces=False``: energies only, one forward pass per chunk and no backward pass
        (175 alanine-dipeptide frames: 2.4 s on a CPU, against ~1 s per frame with forces)."""
        D = self.mean.numel()
        dt, dev = self.dtype, self.device
        GE = torch.zeros(D, D, dtype=dt, device=dev)
        hE = torch.zeros(D, dtype=dt, device=dev)
        GF = torch.zeros(D, D, dtype=dt, device=dev)
        hF = torch.zeros(D, dtype=dt, device=dev)
        yy = [0.0, 0.0]
        counts = [0, 0]
        it = range(0, len(frames), chunk)
        for i in tqdm(it, desc="features", unit="chunk", disable=not progress):
            sub = frames[i:i + chunk]
            from rarefly.graph import build_graph

            data = build_graph([f.structure for f in sub], self.r_max, self.atomic_numbers, dt, dev)
            G = len(sub)
            pos = data["positions"].detach().clone().requires_grad_(forces)
            with torch.set_grad_enabled(forces):
                out = self.backbone(data, pos, None)
            Phi = _graph_sum(out["phi"], data["batch"], G)
            fixed = _graph_sum(out["fixed"], data["batch"], G)
            ref_e = torch.tensor([self.offset_energy(f.structure.numbers, f.energy) for f in sub],
                                 dtype=dt, device=dev)
            yE = ref_e - fixed.detach()
            GE += Phi.detach().T @ Phi.detach()
            hE += Phi.detach().T @ yE
            yy[0] += float(yE @ yE)
            counts[0] += G
            if not forces:
                continue
            Q = torch.cat([fixed[:, None], Phi], dim=-1)          # (G, 1+D)
            J = self._jacobian(Q, pos)
            dfixed, dPhi = J[0], J[1:]                            # (n,3), (D,n,3)
            ref_f = torch.as_tensor(np.concatenate([f.forces for f in sub]), dtype=dt, device=dev)
            yF = (ref_f + dfixed).reshape(-1)                     # = -dPhi . theta
            A = -dPhi.reshape(D, -1).T                            # (3n, D)
            GF += A.T @ A
            hF += A.T @ yF
            yy[1] += float(yF @ yF)
            counts[1] += yF.numel()
        return GE, hE, GF, hF, yy, counts

    def _jacobian(self, Q: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """d Q[g, k] / d pos for every column k of Q = [fixed, Phi], as (K, n, 3).

        Graphs are disjoint, so one backward pass of a column summed over graphs gives it for
        all graphs. Plain passes, one per column, measured 2.6x faster on a CPU than one
        vmapped (``is_grads_batched``) pass. The element one-hot columns (the last ones) do not
        depend on the positions and are skipped, and so is ``fixed`` without a pair term."""
        J = torch.zeros((Q.shape[1],) + pos.shape, dtype=pos.dtype, device=pos.device)
        live = Q.shape[1] - self.backbone.num_elements
        first = 0 if self.backbone.has_pair_term else 1
        cols = range(first, live) if Q.requires_grad else range(0)
        for j, k in enumerate(cols):
            (g,) = torch.autograd.grad(Q[:, k].sum(), [pos], retain_graph=j < len(cols) - 1,
                                       allow_unused=True)  # unused: no atom has a neighbour
            if g is not None:
                J[k] = g
        return J

    def fit(self, frames: Sequence[LabelledFrame], progress: bool = False, noise_iterations: int = 2,
            prior_mean: torch.Tensor | None = None) -> dict:
        """Posterior from the prior around the foundation readout and ``frames``; the noise
        levels are re-estimated from the residuals (see the module docstring)."""
        theta0 = self.backbone.readout_weights() if prior_mean is None else prior_mean
        blocks = self.design(frames, progress=progress)
        s = self.settings
        floor_e, floor_f = s.energy_noise, s.force_noise
        se, sf = floor_e, floor_f
        prior_prec = torch.eye(theta0.numel(), dtype=theta0.dtype) / s.prior_sigma ** 2
        for _ in range(noise_iterations + 1):
            mu, cov, (rms_e, rms_f) = self._solve(blocks, theta0, prior_prec, se, sf)
            se, sf = max(rms_e, floor_e), max(rms_f, floor_f)
        self.fit_noise = (se, sf)
        self.set_posterior(mu, cov)
        self.local_reference = self._mean_local_variance(frames)
        return {"energy_rmse": rms_e, "force_rmse": rms_f, "energy_noise": se, "force_noise": sf,
                "n_frames": blocks[5][0]}

    def condition(self, blocks, prior_mean: torch.Tensor, prior_cov: torch.Tensor) -> dict:
        """Exact sequential update: the posterior given ``prior`` (an earlier posterior) and the
        design ``blocks`` (summed :meth:`design` outputs of new frames), noise levels fixed."""
        prior_prec = torch.linalg.inv(prior_cov)
        mu, cov, (rms_e, rms_f) = self._solve(blocks, prior_mean, prior_prec,
                                              self.fit_noise[0], self.fit_noise[1],
                                              prior_prec_mean=prior_prec @ prior_mean)
        self.set_posterior(mu, cov)
        return {"energy_rmse": rms_e, "force_rmse": rms_f, "n_frames": blocks[5][0],
                "gradient_steps": 0}

    def refine_backbone(self, frames: Sequence[LabelledFrame], steps: int, lr: float = 1e-3,
                        batch_size: int = 4, anchor: dict | None = None, seed: int = 0,
                        progress: bool = False, replay: Sequence[LabelledFrame] = (),
                        between_steps: Callable[[], bool | None] | None = None,
                        lr_schedule: str = "constant", train_readout: bool = False) -> dict:
        """Adam steps on *all* MACE weights (the readout's energy given by the posterior mean)
        against the energies and forces of ``frames``, weighted by the fit's noise levels, with
        a Gaussian anchor of width ``settings.prior_sigma`` around ``anchor`` (name -> tensor;
        default: the weights before this call). ``replay``: frames the model already knows
        (its fit data), half of every mini-batch, so that the new frames do not undo the old
        fit. The readout features change, so the caller conditions the posterior again on the
        design of every frame (see the trainer).

        Why: a readout-only posterior cannot absorb what a foundation model gets wrong in a new
        region; conditioning it on such frames trades accuracy elsewhere for them
        (``benchmarks/bench_onthefly.out``). ``between_steps``: called after every step (the
        trainer keeps its reference workers busy meanwhile); when it returns True the
        refinement ends after that step (a trainer asked to stop: every Adam step leaves a
        valid model). ``train_readout``: the readout's posterior mean is trained with the other
        weights (same anchor width around its value before this call) and becomes the
        posterior mean; otherwise it stays fixed, and so does the energy's constant for a fixed
        composition (the element one-hot features do not depend on the weights). Returns the
        gradient steps taken, whether it stopped early, and the last loss per frame.
        """
        from rarefly.graph import build_graph

        if not frames:
            raise ValueError("no labelled frames to refine the backbone on")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown refinement learning-rate schedule {lr_schedule!r}; "
                             f"choose one of {', '.join(LR_SCHEDULES)}")
        model = self.backbone.model
        named = [(k, p) for k, p in model.named_parameters() if p.is_floating_point()]
        center = {k: (anchor[k] if anchor and k in anchor else p.detach().clone()) for k, p in named}
        params = [p for _, p in named]
        for p in params:
            p.requires_grad_(True)
        se, sf = self.fit_noise
        rng = np.random.default_rng(seed + self.model_version)
        mean = self.mean.detach().clone()
        mean_center = mean.clone()
        if train_readout:
            mean.requires_grad_(True)
            params = params + [mean]
        dt, dev = self.dtype, self.device
        opt = torch.optim.Adam(params, lr=lr)
        replay = list(replay)
        pool = list(frames) + replay
        N, R = len(frames), len(replay)
        B_new = min(batch_size if not R else max(1, batch_size - batch_size // 2), N)
        B_old = min(batch_size - B_new, R) if R else 0
        B = B_new + B_old
        ref_e_all = [self.offset_energy(f.structure.numbers, f.energy) for f in pool]
        prior_w = 1.0 / (2 * self.settings.prior_sigma ** 2 * len(pool))
        loss_val = float("nan")
        done = 0
        try:
            for step in tqdm(range(steps), desc="backbone", unit="step", disable=not progress):
                if lr_schedule == "cosine":
                    for g in opt.param_groups:
                        g["lr"] = 0.5 * lr * (1.0 + np.cos(np.pi * step / steps))
                idx = rng.choice(N, size=B_new, replace=False)
                if B_old:
                    idx = np.concatenate([idx, N + rng.choice(R, size=B_old, replace=False)])
                sub = [pool[i] for i in idx]
                data = build_graph([f.structure for f in sub], self.r_max, self.atomic_numbers, dt, dev)
                pos = data["positions"].detach().clone().requires_grad_(True)
                out = self.backbone(data, pos, None)
                e = _graph_sum(out["fixed"] + out["phi"] @ mean, data["batch"], B)
                (dE,) = torch.autograd.grad(e.sum(), pos, create_graph=True)
                ref_e = torch.tensor([ref_e_all[i] for i in idx], dtype=dt, device=dev)
                ref_f = torch.as_tensor(np.concatenate([f.forces for f in sub]), dtype=dt, device=dev)
                loss = ((((e - ref_e) / se) ** 2).sum() + (((-dE - ref_f) / sf) ** 2).sum()) / B
                loss = loss + prior_w * sum(((p - center[k]) ** 2).sum() for k, p in named)
                if train_readout:
                    loss = loss + prior_w * ((mean - mean_center) ** 2).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_val = float(loss.detach())
                done += 1
                if between_steps is not None and between_steps():
                    break
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
            if train_readout and done:
                self.set_posterior(mean.detach(), self.cov)
        return {"gradient_steps": done, "stopped_early": done < steps,
                "backbone_loss_per_frame": loss_val}

    @torch.no_grad()
    def _mean_local_variance(self, frames) -> float:
        from rarefly.graph import build_graph

        tot, n = 0.0, 0
        for i in range(0, len(frames), 16):
            sub = frames[i:i + 16]
            data = build_graph([f.structure for f in sub], self.r_max, self.atomic_numbers,
                               self.dtype, self.device)
            phi = self.backbone(data, data["positions"], None)["phi"]
            tot += float(((phi @ self.cov) * phi).sum())
            n += phi.shape[0]
        return tot / max(n, 1)

    @staticmethod
    def _solve(blocks, prior_mean, prior_prec, se, sf, prior_prec_mean=None):
        GE, hE, GF, hF, yy, counts = blocks
        prec = prior_prec + GE / se ** 2 + GF / sf ** 2
        pm = prior_prec @ prior_mean if prior_prec_mean is None else prior_prec_mean
        rhs = pm + hE / se ** 2 + hF / sf ** 2
        cov = torch.linalg.inv(prec)
        mu = cov @ rhs
        rms_e = float(((mu @ GE @ mu - 2 * mu @ hE + yy[0]) / max(counts[0], 1)).clamp_min(0).sqrt())
        rms_f = float(((mu @ GF @ mu - 2 * mu @ hF + yy[1]) / max(counts[1], 1)).clamp_min(0).sqrt())
        return mu, cov, (rms_e, rms_f)

    @staticmethod
    def add_blocks(a, b):
        """Sum of two :meth:`design` results (``a`` may be None)."""
        if a is None:
            return b
        return (a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3],
                [a[4][0] + b[4][0], a[4][1] + b[4][1]], [a[5][0] + b[5][0], a[5][1] + b[5][1]])

    # ------------------------------------------------------------------ model file
    def payload(self) -> dict:
        out = {"mean": self.mean.detach().cpu(), "cov": self.cov.detach().cpu(), "rank": self.rank,
               "fit_noise": list(self.fit_noise), "local_reference": self.local_reference}
        if self.density is not None:
            out["density"] = self.density.to_dict()
        if self.base_posterior is not None:
            out["base_mean"], out["base_cov"] = (t.detach().cpu() for t in self.base_posterior)
        return out

    @classmethod
    def from_payload(cls, backbone: Backbone, settings: PosteriorSettings, post: dict, **kw):
        obj = cls(backbone, settings, post["mean"], post["cov"], rank=int(post.get("rank", 0)),
                  fit_noise=post.get("fit_noise"), local_reference=post.get("local_reference", 0.0),
                  density=FeatureDensity.from_dict(post["density"]) if "density" in post else None, **kw)
        if "base_mean" in post:
            obj.base_posterior = tuple(post[k].to(dtype=obj.dtype, device=obj.device)
                                       for k in ("base_mean", "base_cov"))
        return obj
