"""Student-t calibration of predicted uncertainties (METHOD.md §1).

The true error of a prediction with raw predictive standard deviation ``sigma`` is modelled
as ``N(0, s^2 sigma^2)`` with an unknown scale ``s^2 ~ InvGamma(a, b)``. Integrating ``s^2``
out gives a Student-t predictive error with ``nu = 2a`` degrees of freedom and scale
``sigma * sqrt(b / a)``, so

    confidence = P(|error| < epsilon) = 2 T_nu(epsilon / (sigma sqrt(b/a))) - 1
               = (2 x / sqrt(nu pi)) Gamma((nu+1)/2) / Gamma(nu/2) 2F1(1/2, (nu+1)/2; 3/2; -x^2/nu),
      x = epsilon / (sigma sqrt(b/a)).

The seed paper writes it with the hypergeometric 2F1; :func:`confidence` uses that form,
and ``tests/test_calibration.py`` checks it against a numerical integration over ``s^2``.

After a reference calculation with standardized residuals ``r = (y - mu) / sigma`` (of the
prediction made *before* the model learned from that point), the conjugate update is
``a -> a + n/2``, ``b -> b + sum(r^2)/2``. The reported (calibrated) standard deviation is
``sigma * sqrt(E[s^2]) = sigma * sqrt(b / (a - 1))``.

Prior a = 1.5, b = 10 as in the seed paper's implementation.

The paper's update never forgets: residuals of an early, bad model keep the scale wide after
the model has learned (on-the-fly runs then flag nearly every step). :meth:`ScaleCalibration.discount`
is the optional forgetting of a discounted conjugate model (exponential forgetting, as in
West & Harrison's dynamic linear models): before the residuals of ``n`` new labels are added,
the evidence gathered so far (``a - a0``, ``b - b0``, where ``a0``, ``b0`` is the prior) is
multiplied by ``(1 - 1/memory) ** n``, so about the last ``memory`` labels decide the scale.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import gammaln, hyp2f1

PRIOR_A = 1.5
PRIOR_B = 10.0


@dataclass
class ScaleCalibration:
    """Posterior InvGamma(a, b) over the squared scale ``s^2`` of one kind of prediction."""

    a: float = PRIOR_A
    b: float = PRIOR_B
    n: int = 0  # number of residuals seen

    @property
    def variance_factor(self) -> float:
        """E[s^2] = b / (a - 1): multiply a raw variance by this to calibrate it."""
        return self.b / (self.a - 1.0) if self.a > 1.0 else float("inf")

    @property
    def dof(self) -> float:
        return 2.0 * self.a

    def update(self, residuals: np.ndarray, sigmas: np.ndarray) -> None:
        """Conjugate update with errors ``residuals`` and *raw* predictive ``sigmas``."""
        r = np.asarray(residuals, dtype=float).ravel() / np.asarray(sigmas, dtype=float).ravel()
        r = r[np.isfinite(r)]
        self.a += 0.5 * r.size
        self.b += 0.5 * float(np.sum(r * r))
        self.n += int(r.size)

    def discount(self, keep: float) -> None:
        """Keep the fraction ``keep`` (0..1] of the evidence gathered beyond the prior."""
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"calibration discount must be in (0, 1], got {keep}")
        self.a = PRIOR_A + keep * (self.a - PRIOR_A)
        self.b = PRIOR_B + keep * (self.b - PRIOR_B)

    def confidence(self, raw_sigma, epsilon: float):
        """P(|error| < epsilon) for predictions with raw standard deviation ``raw_sigma``."""
        return confidence(epsilon, raw_sigma, self.a, self.b)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ScaleCalibration":
        return cls(float(d["a"]), float(d["b"]), int(d.get("n", 0)))


def confidence(epsilon: float, sigma, a: float, b: float):
    """P(|e| < epsilon) where e ~ N(0, s^2 sigma^2), s^2 ~ InvGamma(a, b) (2F1 form)."""
    sigma = np.asarray(sigma, dtype=float)
    nu = 2.0 * a
    x = epsilon / (np.maximum(sigma, 1e-300) * np.sqrt(b / a))
    log_c = gammaln((nu + 1.0) / 2.0) - gammaln(nu / 2.0) - 0.5 * np.log(nu * np.pi)
    p = 2.0 * x * np.exp(log_c) * hyp2f1(0.5, (nu + 1.0) / 2.0, 1.5, -x * x / nu)
    p = np.clip(p, 0.0, 1.0)
    return float(p) if p.ndim == 0 else p


@dataclass
class Calibration:
    """Calibration state stored in a model file: one scale for energies, one for forces."""

    energy: ScaleCalibration
    forces: ScaleCalibration

    @classmethod
    def prior(cls) -> "Calibration":
        return cls(ScaleCalibration(), ScaleCalibration())

    def to_dict(self) -> dict:
        return {"energy": self.energy.to_dict(), "forces": self.forces.to_dict()}

    def forget(self, labels: int, memory: int | None) -> None:
        """Before the residuals of ``labels`` new labels: discount both scales so that about
        the last ``memory`` labels count (``memory`` None or 0: remember everything)."""
        if memory:
            keep = (1.0 - 1.0 / max(int(memory), 1)) ** max(int(labels), 0)
            keep = max(keep, 1e-12)
            self.energy.discount(keep)
            self.forces.discount(keep)

    def restart(self) -> None:
        """Back to the prior for both scales (the residual counts ``n`` stay as a record):
        the evidence described a model that a backbone refinement has just replaced."""
        for s in (self.energy, self.forces):
            s.a, s.b = PRIOR_A, PRIOR_B

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(ScaleCalibration.from_dict(d["energy"]), ScaleCalibration.from_dict(d["forces"]))
