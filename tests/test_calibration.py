"""Student-t confidence against an independent numerical integration over s^2."""

import numpy as np
import pytest
from scipy import integrate, stats

from rarefly.calibration import ScaleCalibration, confidence


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
