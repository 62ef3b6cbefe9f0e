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

The Boltzmann tilt (optional, ``tilt_kT`` in eV; ``[learning] calibration_tilt``): MD on the
model visits a configuration x with a weight exp(-E_model(x)/kT). Given that x was visited,
the model's error there is its prior N(0, sigma^2) reweighted by exp(-error/kT), which is
N(-sigma^2/kT, sigma^2): the frames an on-the-fly run meets are over-sampled where the model's
energy is too low. With ``tilt_kT`` the error model is centred there (sigma the raw posterior
sigma_E): residuals are standardized about the tilt before they update the scale,
``r = (y - mu - sigma^2/kT) / sigma``, and

    confidence = T_nu((epsilon - t) / c) - T_nu((-epsilon - t) / c),
    t = -sigma^2 / kT,  c = sigma sqrt(b / a).

Measured (``benchmarks/replay_calibration.out``): the start model of bench_onthefly was
-0.007 eV off on average on frames a GFN2-xTB MD sampled and -0.178 eV on the audit frames
its own MD met; with the tilt, the running models trusted fewer frames but were no more
often right on them (bench_onthefly's runs 65-72), so it is off by default. With
path-integral beads each bead's energy enters the weight as exp(-E/(P kT)), so kT is k_B T
times the number of beads. The reported sigma stays
sigma sqrt(b / (a - 1)); the tilt enters the confidence and the calibration only.
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
    #: Boltzmann tilt kT (eV) of the error model, None: zero-mean (the seed paper's)
    tilt_kT: float | None = None

    def tilt(self, raw_sigma):
        """The expected error (prediction - reference) of a visited frame: -sigma^2/kT."""
        if not self.tilt_kT:
            return 0.0 * np.asarray(raw_sigma, dtype=float)
        return -np.asarray(raw_sigma, dtype=float) ** 2 / self.tilt_kT

    @property
    def variance_factor(self) -> float:
        """E[s^2] = b / (a - 1): multiply a raw variance by this to calibrate it."""
        return self.b / (self.a - 1.0) if self.a > 1.0 else float("inf")

    @property
    def dof(self) -> float:
        return 2.0 * self.a

    def update(self, residuals: np.ndarray, sigmas: np.ndarray) -> None:
        """Conjugate update with errors ``residuals`` (reference - prediction) and *raw*
        predictive ``sigmas``; with a tilt, about its expected residual sigma^2/kT."""
        sigmas = np.asarray(sigmas, dtype=float).ravel()
        r = (np.asarray(residuals, dtype=float).ravel() + self.tilt(sigmas)) / sigmas
        r = r[np.isfinite(r)]
        self.a += 0.5 * r.size
        self.b += 0.5 * float(np.sum(r * r))
        self.n += int(r.size)

    def learn(self, residuals, sigmas, memory: int | None = None) -> None:
        """:meth:`update` with residuals of new labels, after discounting the evidence so far
        so that about the last ``memory`` labels count (None or 0: remember everything)."""
        if memory:
            self.discount(keep_fraction(np.size(residuals), memory))
        self.update(residuals, sigmas)

    def discount(self, keep: float) -> None:
        """Keep the fraction ``keep`` (0..1] of the evidence gathered beyond the prior."""
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"calibration discount must be in (0, 1], got {keep}")
        self.a = PRIOR_A + keep * (self.a - PRIOR_A)
        self.b = PRIOR_B + keep * (self.b - PRIOR_B)

    def confidence(self, raw_sigma, epsilon: float):
        """P(|error| < epsilon) for predictions with raw standard deviation ``raw_sigma``."""
        if self.tilt_kT:
            return tilted_confidence(epsilon, raw_sigma, self.a, self.b, self.tilt_kT)
        return confidence(epsilon, raw_sigma, self.a, self.b)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["tilt_kT"] is None:       # zero-mean: the model file as before the tilt existed
            del d["tilt_kT"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ScaleCalibration":
        kT = d.get("tilt_kT")
        return cls(float(d["a"]), float(d["b"]), int(d.get("n", 0)), None if kT is None else float(kT))


def confidence(epsilon: float, sigma, a: float, b: float):
    """P(|e| < epsilon) where e ~ N(0, s^2 sigma^2), s^2 ~ InvGamma(a, b) (2F1 form)."""
    sigma = np.asarray(sigma, dtype=float)
    nu = 2.0 * a
    x = epsilon / (np.maximum(sigma, 1e-300) * np.sqrt(b / a))
    log_c = gammaln((nu + 1.0) / 2.0) - gammaln(nu / 2.0) - 0.5 * np.log(nu * np.pi)
    p = 2.0 * x * np.exp(log_c) * hyp2f1(0.5, (nu + 1.0) / 2.0, 1.5, -x * x / nu)
    p = np.clip(p, 0.0, 1.0)
    return float(p) if p.ndim == 0 else p


def tilted_confidence(epsilon: float, sigma, a: float, b: float, kT: float):
    """P(|e| < epsilon) where e = -sigma^2/kT + sigma s z, z ~ N(0, 1), s^2 ~ InvGamma(a, b):
    a Student-t with 2a degrees of freedom, location -sigma^2/kT and scale sigma sqrt(b/a)."""
    from scipy.stats import t as student_t

    sigma = np.maximum(np.asarray(sigma, dtype=float), 1e-300)
    loc, c = -sigma * sigma / kT, sigma * np.sqrt(b / a)
    p = student_t.cdf((epsilon - loc) / c, 2.0 * a) - student_t.cdf((-epsilon - loc) / c, 2.0 * a)
    p = np.clip(p, 0.0, 1.0)
    return float(p) if np.ndim(p) == 0 else p


def keep_fraction(labels: int, memory: int) -> float:
    """The share of the evidence beyond the prior kept before ``labels`` new labels, so that
    about the last ``memory`` labels count: (1 - 1/memory) ** labels."""
    return max((1.0 - 1.0 / max(int(memory), 1)) ** max(int(labels), 0), 1e-12)


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
            keep = keep_fraction(labels, memory)
            self.energy.discount(keep)
            self.forces.discount(keep)

    def restart(self) -> None:
        """Back to the prior for both scales (the residual counts ``n`` stay as a record):
        the evidence described a model that a backbone refinement has just replaced."""
        for s in (self.energy, self.forces):
            s.a, s.b = PRIOR_A, PRIOR_B

    def set_tilt(self, kT: float | None) -> None:
        """Centre the energy error model on the Boltzmann tilt at ``kT`` (eV), None: off."""
        if kT is not None and not kT > 0:
            raise ValueError(f"the calibration's tilt needs kT > 0, got {kT}")
        self.energy.tilt_kT = None if kT is None else float(kT)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(ScaleCalibration.from_dict(d["energy"]), ScaleCalibration.from_dict(d["forces"]))
