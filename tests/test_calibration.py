"""Student-t confidence against an independent numerical integration over s^2."""

import numpy as np
import pytest
from scipy import integrate, stats

from rarefly.calibration import PRIOR_A, PRIOR_B, Calibration, ScaleCalibration, confidence


def _numerical(epsilon, sigma, a, b):
    # P(|e|<eps) = int p(s2) * erf(eps / (sqrt(2 s2) sigma)) ds2, s2 ~ InvGamma(a, scale=b)
    from scipy.special import erf

    f = lambda s2: stats.invgamma.pdf(s2, a, scale=b) * erf(epsilon / (np.sqrt(2 * s2) * sigma))
    val, _ = integrate.quad(f, 0, np.inf, limit=400)
    return val


@pytest.mark.parametrize("a,b", [(1.5, 10.0), (4.0, 3.0), (20.5, 25.0)])
@pytest.mark.parametrize("ratio", [0.05, 0.5, 1.0, 3.0, 20.0])
def test_confidence_matches_integration(a, b, ratio):
    sigma = 0.02
    eps = ratio * sigma
    assert confidence(eps, sigma, a, b) == pytest.approx(_numerical(eps, sigma, a, b), abs=2e-6)


def test_update_is_conjugate_and_calibrates():
    rng = np.random.default_rng(0)
    cal = ScaleCalibration()
    sig = np.full(4000, 0.1)
    err = rng.normal(0, 3.0 * sig)  # model under-estimates its error by a factor 3
    cal.update(err, sig)
    assert cal.a == pytest.approx(1.5 + 2000)
    assert cal.variance_factor == pytest.approx(9.0, rel=0.08)
    # coverage of the calibrated confidence on fresh errors
    eps = 0.3
    pred = cal.confidence(0.1, eps)
    observed = np.mean(np.abs(rng.normal(0, 0.3, 20000)) < eps)
    assert pred == pytest.approx(observed, abs=0.02)


def _stream(cal, memory, factors, rng, per_label=1):
    """Labels whose errors are ``factor`` x the raw sigma, one update per label."""
    for f in factors:
        sig = np.full(per_label, 0.1)
        cal.forget(1, memory)
        cal.energy.update(rng.normal(0, f * sig), sig)
        cal.forces.update(rng.normal(0, f * sig), sig)


def test_forgetting_follows_the_recent_errors_and_memory_0_is_the_paper_update():
    rng = np.random.default_rng(1)
    early, late = [6.0] * 40, [1.0] * 200      # the first model misses by 6 sigma, then learns
    keep_all, forget = Calibration.prior(), Calibration.prior()
    _stream(keep_all, 0, early + late, np.random.default_rng(2), per_label=30)
    _stream(forget, 20, early + late, np.random.default_rng(2), per_label=30)
    # without forgetting the early misses still widen the scale (36*40 + 200) / 240 ~ 6.8x
    assert keep_all.forces.variance_factor == pytest.approx((36 * 40 + 200) / 240, rel=0.1)
    assert keep_all.forces.a == pytest.approx(PRIOR_A + 0.5 * 30 * 240)
    # with a 20-label memory, the scale is that of the late errors (factor 1)
    assert forget.forces.variance_factor == pytest.approx(1.0, rel=0.1)
    # the evidence it keeps is ~ memory labels' worth: a - a0 = 0.5 * 30 * sum(keep^k) ~ 15 * 20
    assert forget.forces.a - PRIOR_A == pytest.approx(15 * 20, rel=0.05)
    # one residual per label (energies): the prior still weighs in, but much less than 40 misses
    assert forget.energy.variance_factor < 0.5 * keep_all.energy.variance_factor
    # memory 0 (or None) is exactly the never-forgetting update
    a, b = Calibration.prior(), Calibration.prior()
    _stream(a, 0, early, np.random.default_rng(3))
    _stream(b, None, early, np.random.default_rng(3))
    assert a.to_dict() == b.to_dict()
    # discounting keeps the prior and refuses nonsense
    c = ScaleCalibration(a=PRIOR_A + 10, b=PRIOR_B + 40)
    c.discount(0.5)
    assert (c.a, c.b) == pytest.approx((PRIOR_A + 5, PRIOR_B + 20))
    with pytest.raises(ValueError, match="discount"):
        c.discount(0.0)


# ------------------------------------------------------------------ the Boltzmann tilt

def _numerical_tilted(epsilon, sigma, a, b, kT):
    # e = -sigma^2/kT + sigma s z: integrate the normal's mass in (-eps, eps) over s^2
    loc = -sigma * sigma / kT

    def f(s2):
        sd = np.sqrt(s2) * sigma
        return stats.invgamma.pdf(s2, a, scale=b) * (stats.norm.cdf((epsilon - loc) / sd)
                                                      - stats.norm.cdf((-epsilon - loc) / sd))

    return integrate.quad(f, 0, np.inf, limit=400)[0]


@pytest.mark.parametrize("a,b", [(1.5, 10.0), (12.0, 20.0)])
@pytest.mark.parametrize("sigma", [0.01, 0.05, 0.12])
def test_tilted_confidence_matches_integration(a, b, sigma):
    kT, eps = 0.02585, 0.17
    cal = ScaleCalibration(a, b, tilt_kT=kT)
    assert cal.confidence(sigma, eps) == pytest.approx(_numerical_tilted(eps, sigma, a, b, kT), abs=2e-6)
    # the tilt only takes confidence away, and more where sigma is large
    assert cal.confidence(sigma, eps) <= confidence(eps, sigma, a, b) + 1e-12


def test_tilted_update_centres_the_residuals_and_round_trips():
    rng = np.random.default_rng(5)
    kT = 0.02585
    sig = rng.uniform(0.02, 0.08, 4000)
    err = -sig ** 2 / kT + rng.normal(0, 2.0 * sig)       # visited frames: tilted, spread 2 sigma
    tilted, zero = ScaleCalibration(tilt_kT=kT), ScaleCalibration()
    tilted.update(-err, sig)                               # residuals are reference - prediction
    zero.update(-err, sig)
    assert tilted.variance_factor == pytest.approx(4.0, rel=0.08)
    assert zero.variance_factor > 1.2 * tilted.variance_factor     # the bias taken as spread
    # coverage of fresh errors at one sigma
    s = 0.06
    fresh = -s ** 2 / kT + rng.normal(0, 2.0 * s, 20000)
    assert tilted.confidence(s, 0.17) == pytest.approx(np.mean(np.abs(fresh) < 0.17), abs=0.02)
    # the model file keeps the tilt, and omits it when there is none (files as before)
    cal = Calibration.prior()
    assert "tilt_kT" not in cal.to_dict()["energy"]
    cal.set_tilt(kT)
    back = Calibration.from_dict(cal.to_dict())
    assert back.energy.tilt_kT == kT and back.forces.tilt_kT is None
    back.restart()
    assert back.energy.tilt_kT == kT
    with pytest.raises(ValueError, match="kT > 0"):
        cal.set_tilt(0.0)


def test_learn_discounts_the_evidence_then_takes_the_residuals():
    from rarefly.calibration import ScaleCalibration, keep_fraction

    a, b = ScaleCalibration(12.0, 30.0), ScaleCalibration(12.0, 30.0)
    a.learn(np.array([0.3, -0.1]), np.array([0.1, 0.05]), memory=10)
    b.discount(keep_fraction(2, 10))
    b.update(np.array([0.3, -0.1]), np.array([0.1, 0.05]))
    assert (a.a, a.b, a.n) == (b.a, b.b, b.n) and a.a < 12.0 + 1.0
    c = ScaleCalibration(12.0, 30.0)
    c.learn(np.array([0.3]), np.array([0.1]))          # no memory: nothing forgotten
    assert (c.a, c.b) == pytest.approx((12.5, 30.0 + 0.5 * 9.0))
