"""The offline calibration replay (benchmarks/replay_calibration.py): the located
(Normal-Inverse-Gamma) confidence against an independent integration, its conjugate update,
and the replay of a synthetic run folder whose events the real calibration wrote."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import integrate, stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

# replay_calibration imports bench_onthefly (through pool_onthefly), which sets thread counts
# and silences warnings for its own runs on import: keep both out of the other tests
_environ = dict(os.environ)
with warnings.catch_warnings():
    import replay_calibration as rc  # noqa: E402
os.environ.clear()
os.environ.update(_environ)
from rarefly.calibration import Calibration  # noqa: E402


def _numerical(eps, sigma, a, b, m, kappa):
    # given s^2, r = e / sigma ~ N(m, s^2 (1 + 1/kappa)); integrate s^2 ~ InvGamma(a, b)
    x = eps / sigma

    def f(s2):
        sd = np.sqrt(s2 * (1.0 + 1.0 / kappa))
        return stats.invgamma.pdf(s2, a, scale=b) * (stats.norm.cdf((x - m) / sd) - stats.norm.cdf((-x - m) / sd))

    return integrate.quad(f, 0, np.inf, limit=400)[0]


@pytest.mark.parametrize("a,b,m,kappa", [(1.5, 10.0, 0.0, 1.0), (8.0, 12.0, 2.0, 9.0),
                                         (20.0, 25.0, -1.3, 30.0)])
@pytest.mark.parametrize("ratio", [0.5, 2.0, 6.0])
def test_located_confidence_matches_integration(a, b, m, kappa, ratio):
    s = rc.LocatedScale(a, b)
    s.m, s.kappa = m, kappa
    assert s.confidence(0.05, ratio * 0.05) == pytest.approx(_numerical(ratio * 0.05, 0.05, a, b, m, kappa), abs=2e-6)


def test_located_update_is_conjugate_and_finds_the_bias():
    rng = np.random.default_rng(0)
    sig = np.full(3000, 0.1)
    err = rng.normal(0.25, 0.1, 3000)               # biased by 2.5 sigma, spread 1 sigma
    batch, one_by_one = rc.LocatedScale(1.5, 10.0), rc.LocatedScale(1.5, 10.0)
    batch.update(err, sig)
    for e in err:
        one_by_one.update([e], [0.1])
    assert (batch.a, batch.b, batch.m, batch.kappa) == pytest.approx(
        (one_by_one.a, one_by_one.b, one_by_one.m, one_by_one.kappa), rel=1e-9)
    assert batch.m == pytest.approx(2.5, abs=0.05)
    assert batch.b / (batch.a - 1) == pytest.approx(1.0, rel=0.1)
    # the zero-mean scale takes the bias as spread: wider, and centred wrongly
    fresh = rng.normal(0.25, 0.1, 20000)
    observed = np.mean(np.abs(fresh) < 0.2)
    assert batch.confidence(0.1, 0.2) == pytest.approx(observed, abs=0.02)
    zero = Calibration.prior().energy
    zero.update(err, sig)
    assert abs(zero.confidence(0.1, 0.2) - observed) > 0.1
    # forgetting discounts the evidence and keeps the location
    m = batch.m
    batch.forget(1000, 10)
    assert batch.m == m and batch.kappa == pytest.approx(rc.PRIOR_KAPPA, abs=1e-6)


LABELS = [("flagged", -0.10, 0.05), ("audit", -0.30, 0.02), ("flagged", 0.05, 0.06),
          ("audit", 0.01, 0.02), ("audit", -0.05, 0.03)]


def _run_folder(tmp_path: Path, tamper: bool = False, scheme: str = "a_paper",
                config: str = 'epsilon = "0.2 eV"\nlevel = 0.95\ncalibration_memory = 3\n',
                memory: int = 3, tilt_kT: float | None = None, labels=LABELS):
    """A bench_onthefly-shaped folder whose events the real Calibration wrote."""
    folder = tmp_path / "run"
    (folder / scheme).mkdir(parents=True)
    (folder / f"{scheme}.toml").write_text('[system]\ntemperature = "300 K"\n[learning]\n' + config)
    start = Calibration.prior()
    cal = Calibration.from_dict(start.to_dict())
    cal.set_tilt(tilt_kT)
    events, version, ipi = [], 1, []
    for i, (origin, err, sr) in enumerate(labels):
        ipi.append((sr * np.sqrt(cal.energy.variance_factor), cal.energy.confidence(sr, 0.2), version))
        conf = cal.energy.confidence(sr, 0.2)
        events.append({"event": "label", "row": i + 1, "origin": origin, "model_version": version,
                       "error": err, "sigma_raw": sr, "confidence": conf,
                       # served by the version that learned nothing since (no refinement here)
                       "served_error": err, "served_version": version, "served_confidence": conf,
                       "served_sigma_raw": sr})
        cal.forget(1, memory)
        cal.energy.update(np.array([-err]), np.array([sr]))
        version += 1
        logged = cal.to_dict()
        if tamper and version == 3:
            logged["energy"]["b"] += 1.0
        events.append({"event": "publish", "model_version": version, "calibration": logged})
    with open(folder / scheme / "frames.jsonl", "w") as fh:
        fh.writelines(json.dumps(e) + "\n" for e in events)
    with open(folder / scheme / "simulation.uncertainty_0", "w") as fh:
        for step, (sig, conf, v) in enumerate(ipi + [(0.01 * np.sqrt(cal.energy.variance_factor),
                                                      cal.energy.confidence(0.01, 0.2), version)] * 3):
            fh.write(f" #EXTRAS(energy_uncertainty,confidence,model_version,flagged)# Step: {step}\n")
            fh.write(f" {sig:.10e} {conf:.10e} {float(v):.1f} {float(conf < 0.95):.1f}\n")
    return folder, start


def test_replay_reproduces_the_logged_calibration_and_counts_audits(tmp_path, monkeypatch, capsys):
    folder, start = _run_folder(tmp_path)
    r = rc.replay(str(folder), "a_paper", start)
    assert r["deviation"] < 1e-12 and r["conf_deviation"] < 1e-12 and r["step_deviation"] < 1e-9
    assert r["audits"] == 3 and r["steps"] == 8
    audits = [json.loads(line) for line in open(folder / "a_paper" / "frames.jsonl")]
    audits = [e for e in audits if e.get("origin") == "audit" and e["confidence"] >= 0.95]
    within = sum(abs(e["error"]) < 0.2 for e in audits)
    assert (r["paper"]["trusted"], r["paper"]["within"]) == (len(audits), within)
    assert audits[0]["error"] == -0.30 and within == len(audits) - 1   # trusted, outside epsilon
    # the command prints the pooled line and passes its replay check
    monkeypatch.setattr(rc, "start_calibration", lambda model: start)
    assert rc.main([str(folder), "--schemes", "a_paper"]) == 0
    out = capsys.readouterr().out
    assert f"a_paper pooled, zero-mean (the seed paper's): audit coverage {within}/{r['paper']['trusted']}" in out


def test_replay_refuses_a_log_it_does_not_reproduce(tmp_path, monkeypatch, capsys):
    folder, start = _run_folder(tmp_path, tamper=True)
    monkeypatch.setattr(rc, "start_calibration", lambda model: start)
    assert rc.main([str(folder), "--schemes", "a_paper"]) == 1
    assert "does not reproduce" in capsys.readouterr().err


def test_replay_of_a_tilted_run_reproduces_its_calibration(tmp_path):
    """A run made with calibration_tilt is replayed with the tilted calibration as its own."""
    from ase.units import kB

    labels = [("audit", -0.2, 0.05), ("audit", -0.1, 0.04), ("audit", 0.02, 0.03)]
    folder, start = _run_folder(tmp_path, scheme="c_ts", memory=0, tilt_kT=kB * 300, labels=labels,
                                config='epsilon = "0.2 eV"\ncalibration_tilt = true\n')
    r = rc.replay(str(folder), "c_ts", start)
    assert r["own"] == "tilted" and r["deviation"] < 1e-12 and r["conf_deviation"] < 1e-12
    assert r["served_deviation"] < 1e-12 and r["step_deviation"] < 1e-9
    # the zero-mean replay of the same labels is a different calibration
    zero, tilted = Calibration.prior(), Calibration.prior()
    tilted.set_tilt(kB * 300)
    for _, err, sr in labels:
        zero.energy.update(np.array([-err]), np.array([sr]))
        tilted.energy.update(np.array([-err]), np.array([sr]))
    assert abs(zero.energy.b - tilted.energy.b) > 1e-3
