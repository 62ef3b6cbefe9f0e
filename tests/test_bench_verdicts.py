"""Unit tests of the benchmarks' verdict logic (pure functions, no models): the line that
says whether issue 4's target 1 is met must not call a run met, missed or open wrongly."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
# the benchmark modules set thread counts and silence warnings for their own runs on import:
# keep both out of the other tests (and of the processes they start)
_environ = dict(os.environ)
with warnings.catch_warnings():
    import bench_label_value
    import bench_onthefly
os.environ.clear()
os.environ.update(_environ)


def _verdict(line: str) -> str:
    return line.split("): ", 1)[1].split(":", 1)[0]


@pytest.mark.parametrize("nc, na, c_calls, a_calls, expected", [
    (10, 20, 12, 26, "met"),            # both reached it: 10 <= 20 / 2
    (11, 20, 12, 26, "missed"),         # both reached it: 11 > 10
    (12, None, 12, 26, "met"),          # a_paper never did in 26 > 2 * 12
    (12, None, 12, 20, "not resolved"), # a_paper might have reached it at 21..24
    (None, 15, 12, 20, "missed"),       # c_ts did not within 12 >= 15 / 2
    (None, 30, 12, 40, "not resolved"), # c_ts stopped at 12 < 15: it might have made it
    (None, None, 12, 26, "not resolved"),
])
def test_target1_verdicts(nc, na, c_calls, a_calls, expected):
    line = bench_onthefly.target1("c_ts", nc, na, c_calls, a_calls, 0.17, 0.171, 0.172)
    assert _verdict(line) == expected, line


def test_target1_names_the_unit_and_how():
    line = bench_onthefly.target1("c_ts", 7, 22, 12, 26, 0.1694, 0.155, 0.165,
                                  unit="labels", how="replayed")
    assert line.startswith("TARGET 1 (c_ts <= half the labels of a_paper to reach 0.1694 eV/A, "
                           "replayed): met: 7 vs 22 labels")


def test_reached_counts_flagged_labels_only_when_asked():
    curve = [{"origin": o, "f": f} for o, f in
             [("audit", 0.19), ("flagged", 0.18), ("audit", 0.175), ("flagged", 0.16)]]
    assert bench_label_value.reached(curve, 0.17) == 4
    assert bench_label_value.reached(curve, 0.17, flagged_only=True) == 2
    assert bench_label_value.reached(curve, 0.15) is None


# --------------------------------------------------------------- pool_label_value.py
with warnings.catch_warnings():
    import pool_label_value
os.environ.clear()
os.environ.update(_environ)


def _section(folder: str, curves: dict[str, list[tuple[str, float]]], target: float) -> str:
    """A bench_label_value.out section in the script's own format (the lines the pool reads)."""
    lines = [f"===== python benchmarks/bench_label_value.py {folder} --control 20",
             f"TS frames: 15; start 0.1865 eV/A, lastlayer floor 0.1523; TARGET {target:.4f} eV/A"]
    for name, c in curves.items():
        lines.append(f"  {name}: {len(c)} " + ("of the start model's fit frames as labels"
                                              if name == "control" else "labels (0 audit)"))
        lines += [f"    {n:3d} {o:8s} TS F {f:.4f} eV/A  E 0.131 eV" for n, (o, f) in enumerate(c, 1)]
        lines.append(f"  {name}: replayed in 100 s")
    lines.append("scheme      labels audit  N@tgt flagged@tgt  F best  F last")
    for name, c in curves.items():
        n = pool_label_value.first_at([f for _, f in c], target)
        nf = None if n is None else sum(o != "audit" for o, _ in c[:n])
        audit = sum(o == "audit" for o, _ in c)
        lines.append(f"{name:11s} {len(c):6d} {audit:5d} {n or '-':>6} {nf or '-':>11} "
                     f"{min(f for _, f in c):7.4f} {c[-1][1]:7.4f}")
    return "\n".join(lines) + "\n"


def test_pool_label_value_mean_curves_and_verdicts(tmp_path, capsys):
    fl = "flagged"
    run1 = {"a_paper": [("audit", 0.186), (fl, 0.18), (fl, 0.175), (fl, 0.168)],
            "c_ts": [(fl, 0.17), (fl, 0.165)]}
    run2 = {"a_paper": [(fl, 0.186), ("audit", 0.185), ("audit", 0.18), (fl, 0.178), (fl, 0.172)],
            "c_ts": [(fl, 0.185), (fl, 0.172), (fl, 0.17)]}
    out = tmp_path / "bench_label_value.out"
    out.write_text(_section("/tmp/r1", run1, 0.1694) + _section("/tmp/r2", run2, 0.1694))
    assert pool_label_value.main(["/tmp/r1", "/tmp/r2/", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    # per run: r1 c_ts 2 vs a_paper 4 -> met; r2 c_ts not within 3, a_paper not within 5
    assert "/tmp/r1: a_paper 4, c_ts 2" in text
    assert "met: 2 vs 4 labels   [labels]" in text
    assert "missed: 2 vs 3 flagged labels   [flagged labels]" in text
    assert "target 1 per run, labels: met 1, not resolved 1" in text
    # means: a_paper over 4 labels, c_ts over 2; paired difference at N=2 (0.18+0.185)/2 -
    # (0.165+0.172)/2 = +0.0140, positive in both runs
    assert "   2     0.1825     0.1685   +0.0140" in text
    assert "2/2" in text
    # c_ts's mean (0.1685) reaches 0.1694 after 2, a_paper's (best (0.168 + 0.178) / 2) not within 4
    assert ("TARGET 1 (c_ts <= half the labels of a_paper to reach 0.1694 eV/A, mean curves of 2 "
            "replays): met: c_ts reached the target after 2 labels; a_paper did not within its 4 "
            "(best 0.1730 eV/A)") in text
    # by flagged labels (an audit counts with the flagged label before it): a_paper
    # [0.18, 0.175, 0.168] and [0.18, 0.178, 0.172] -> mean best 0.170 within 3; c_ts after 2:
    # 2 > 3 / 2, so a_paper might still reach it at 4
    assert text.rstrip().endswith("not resolved: c_ts reached the target after 2 flagged labels; "
                                  "a_paper did not within its 3 (best 0.1700 eV/A)")


def test_pool_label_value_by_flagged():
    curve = [("audit", 0.19), ("flagged", 0.18), ("audit", 0.17), ("audit", 0.175), ("flagged", 0.16)]
    assert pool_label_value.by_flagged(curve) == [0.175, 0.16]
    assert pool_label_value.by_flagged([("audit", 0.19)]) == []


def test_pool_label_value_refuses_what_it_cannot_pool(tmp_path):
    out = tmp_path / "bench_label_value.out"
    run = {"a_paper": [("flagged", 0.18)], "c_ts": [("flagged", 0.17)]}
    out.write_text(_section("/tmp/r1", run, 0.1694) + _section("/tmp/r2", run, 0.1600))
    with pytest.raises(SystemExit, match="no replay of /tmp/r3"):
        pool_label_value.main(["/tmp/r3", "--out", str(out)])
    with pytest.raises(SystemExit, match="target 0.16 eV/A, the others 0.1694: not pooled"):
        pool_label_value.main(["/tmp/r1", "/tmp/r2", "--out", str(out)])
    out.write_text(_section("/tmp/r1", run, 0.1694).replace("c_ts: 1 labels", "c_ts: 2 labels"))
    with pytest.raises(SystemExit, match=r"labels missing: c_ts \(1 of 2\)"):
        pool_label_value.main(["/tmp/r1", "--out", str(out)])


def test_pool_label_value_reads_the_committed_replays():
    """Every committed replay parses, and its rounded per-label figures give the counts its own
    full-precision table gives (or lie within rounding of the target)."""
    text = pool_label_value.HERE.joinpath("bench_label_value.out").read_text()
    secs = pool_label_value.sections(text)
    assert len(secs) >= 5
    for folder, body in secs.items():
        curves, tab = pool_label_value.curves(body), pool_label_value.table(body)
        target = float(pool_label_value.TARGET_RE.search(body).group(1))
        assert "a_paper" in curves and tab, folder
        for name, c in curves.items():
            n = pool_label_value.first_at([f for _, f in c], target)
            if name in tab and tab[name][0] != n:
                k = (tab[name][0] or len(c) + 1) - 1 if n is None else n - 1
                assert abs(c[min(k, len(c) - 1)][1] - target) <= 1e-4, (folder, name)


def test_km_median_censors_the_runs_that_ended_first():
    # 7 runs: reached after 5, 15, 15, 22; ended without it after 10, 18, 19.
    # S: 6/7 after 5; 6/7 * 3/5 = 0.51 after 15 (10 censored before); 0 after 22 (1 at risk)
    counts = [(5, True), (10, False), (15, True), (15, True), (18, False), (19, False), (22, True)]
    surv, median = pool_label_value.km_median(counts)
    assert median == 22 and surv == 0.0
    surv, median = pool_label_value.km_median([(5, True), (5, True), (9, False)])
    assert median == 5 and abs(surv - 1 / 3) < 1e-12     # 2 of 3 at risk reached it at 5
    surv, median = pool_label_value.km_median([(8, False), (9, False), (4, True)])
    assert median is None and abs(surv - 2 / 3) < 1e-12


# --------------------------------------------------------------- pool_onthefly.py
with warnings.catch_warnings():
    import pool_onthefly
os.environ.clear()
os.environ.update(_environ)


def _live_section(folder: str, seed: int, rows: dict[str, tuple], target: float = 0.1694) -> str:
    """A bench_onthefly.out section: rows are scheme -> (steps, calls, flagged, audit, N@tgt, best)."""
    lines = [f"===== RAREFLY_BENCH_DIR={folder} python benchmarks/bench_onthefly.py --seed {seed}",
             f"model: m.rfly; reference GFN2-xTB (tblite); i-PI NVT (SVR) at 300 K, dt 1 fs, seed {seed}",
             "epsilon = 4 kcal/mol = 173.5 meV; starting model's confidence: ...",
             f"TARGET force RMSE on the TS frames: {target:.4f} eV/A (half-way)",
             "scheme      steps  wall calls flag/aud N@tgt F start  F best F final    cov aud"]
    for name, (steps, calls, fl, au, n, best) in rows.items():
        cov = "nan" if au == 0 else f"{(au - 1) / au:.2f}"     # one audit frame off
        lines.append(f"{name:11s} {steps:5d} {200:5d} {calls:5d} {f'{fl}/{au}':>6s} {n or '-':>8} "
                     f" 0.1865  {best:.4f}  {best:.4f}  {cov} n={au:<3d} 1.00 n=7   60 30.00")
    return "\n".join(lines) + "\n"


def test_pool_onthefly_pairs_seeds_and_censors(tmp_path, capsys):
    out = tmp_path / "bench_onthefly.out"
    out.write_text(
        _live_section("/tmp/s1", 1, {"a_paper": (2000, 10, 5, 5, None, 0.18),
                                     "c_ts": (2000, 6, 5, 1, 6, 0.15)})
        + _live_section("/tmp/s1long", 1, {"a_paper": (6000, 30, 20, 10, None, 0.175)})
        + _live_section("/tmp/s2", 2, {"a_paper": (2000, 12, 9, 3, 12, 0.16),
                                       "c_ts": (2000, 8, 8, 0, 8, 0.15)}))
    assert pool_onthefly.main(["--baseline-runs", "/tmp/s1long", "/tmp/s2", "--biased-runs",
                               "/tmp/s1", "/tmp/s2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    # seed 1: c_ts 6, a_paper not within 30 (its 6000-step run) -> met; seed 2: 8 vs 12 -> missed
    assert "met: c_ts reached the target after 6 calls; a_paper did not within its 30" in text
    assert "missed: 8 vs 12 calls" in text
    assert "target 1 per seed: met 1, missed 1" in text
    # a_paper: reached after 12, censored at 30 -> S = 1/2 after 12: median 12; c_ts: 6, 8 -> 6
    assert "TARGET 1 on the median calls (live): met: 6 vs 12" in text
    # audit coverage pooled over each scheme's runs: a_paper 9/10 + 2/3, c_ts 0/1 + none
    assert "a_paper  the runs' audit frames as bench_onthefly printed it: 11/13 = 0.85" in text
    assert "c_ts     the runs' audit frames as bench_onthefly printed it: 0/1 = 0.00" in text
    # the serving models' coverage needs the run folders, which are not here: said, not guessed
    assert "a_paper  none  (per run ); folders not found: /tmp/s1long, /tmp/s2" in text
    assert "c_ts     offline frames the final model trusts: 14/14 = 1.00" in text
    with pytest.raises(SystemExit, match="two a_paper runs of seed 1"):
        pool_onthefly.main(["--baseline-runs", "/tmp/s1", "/tmp/s1long", "--biased-runs", "/tmp/s1",
                            "--out", str(out)])
    with pytest.raises(SystemExit, match="has no c_ts row"):
        pool_onthefly.main(["--baseline-runs", "/tmp/s1", "--biased-runs", "/tmp/s1long",
                            "--out", str(out)])
    # the baseline runs alone (the paper scheme's long runs): no target 1, their coverage
    assert pool_onthefly.main(["--baseline-runs", "/tmp/s1long", "/tmp/s2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "target 1 per seed: no seed with both schemes" in text
    assert "2 a_paper runs, 0 c_ts runs" in text and "TARGET 1" not in text
    assert "c_ts     " not in text
    assert "a_paper  the runs' audit frames as bench_onthefly printed it: 11/13 = 0.85" in text


def test_pool_onthefly_reads_the_committed_runs():
    """Every committed run with both schemes parses, and bench_onthefly's rule on the parsed
    rows gives the verdict the run printed (older runs' headers lack the target, not the
    verdict)."""
    import re

    text = pool_onthefly.HERE.joinpath("bench_onthefly.out").read_text()
    checked = 0
    for folder, body in pool_onthefly.sections(text).items():
        rows = pool_onthefly.run_rows(body)
        t = pool_onthefly.TARGET_RE.search(body)
        line = re.search(r"^TARGET 1 \(c_ts <= half the calls of a_paper.*$", body, re.M)
        if not (t and line and "a_paper" in rows and "c_ts" in rows):
            continue
        a, c = rows["a_paper"], rows["c_ts"]
        v = bench_onthefly.target1("c_ts", c["n"], a["n"], c["calls"], a["calls"],
                                   float(t.group(1)), c["best"], a["best"])
        assert v.split("): ", 1)[1] == line.group(0).split("): ", 1)[1], folder
        checked += 1
    assert checked >= 20


def test_pool_onthefly_audit_details_split_at_the_first_refined_version(tmp_path, capsys):
    import json

    run = tmp_path / "r1"
    (run / "a_paper").mkdir(parents=True)
    def audit(err, version, conf=None, served=None, **kw):
        # served: the driver's error (the model that served it) when it is not the logged one
        e = {"event": "label", "origin": "audit", "error": err, "model_version": version, **kw}
        return {**e, "served_error": err if served is None else served, "served_version": version,
                "served_confidence": conf}

    events = [audit(-0.30, 1, 0.99),
              {"event": "label", "origin": "flagged", "error": -0.50, "model_version": 1},
              {"event": "publish", "model_version": 2, "gradient_steps": 0},
              audit(0.10, 2),
              # finished during the refinement: logged by the refined model, served by version 2
              audit(0.05, 2, 0.98, served=-0.25, refined=True),
              {"event": "publish", "model_version": 3, "gradient_steps": 300},
              audit(0.20, 3, 0.97)]
    (run / "a_paper" / "frames.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    out = tmp_path / "bench_onthefly.out"
    out.write_text(_live_section(str(run), 1, {"a_paper": (2000, 4, 1, 3, None, 0.18),
                                               "c_ts": (2000, 6, 5, 1, 6, 0.15)}))
    assert pool_onthefly.main(["--baseline-runs", str(run), "--biased-runs", str(run),
                               "--out", str(out), "--audit-details"]) == 0
    text = capsys.readouterr().out
    # epsilon 0.1735 eV: -0.30 (version 1), -0.25 as served by version 2 (logged +0.05 by the
    # refined model) and +0.20 (version 3, refined) are outside
    assert ("a_paper: within epsilon 1/3 served before the first refined version, 0/1 from it "
            "on; as the trainer logged them (the refined model's error for labels that finished "
            "during a refinement) 2/4") in text
    assert "-0.300 eV at confidence 0.990 (version 1" in text
    assert "-0.250 eV at confidence 0.980 (version 2" in text
    assert "+0.200 eV at confidence 0.970 (version 3" in text
    assert "a_paper  1/4 = 0.25" in text            # the pooled line of the serving models
    # c_ts has no events file there: said, not guessed
    assert "c_ts: within epsilon 0/0 served before the first refined version, 0/0 from it on; " \
           "as the trainer logged them (the refined model's error for labels that finished " \
           f"during a refinement) 0/0; folders not found: {run}" in text


@pytest.mark.parametrize("n", [1, 5, 30])
def test_coverage_interval_is_clopper_pearson(n):
    """All n within (or none): the exact interval has the closed form alpha/2 ** (1/n)."""
    lo = 0.025 ** (1.0 / n)
    assert pool_onthefly.coverage_interval(n, n) == f"95% interval {lo:.2f}-1.00"
    assert pool_onthefly.coverage_interval(0, n) == f"95% interval 0.00-{1 - lo:.2f}"
    # in between, the interval holds the observed share
    text = pool_onthefly.coverage_interval(11, 13)
    lo, hi = (float(x) for x in text.split()[-1].split("-"))
    assert lo < 11 / 13 < hi


def test_audit_labels_of_older_runs_take_the_served_prediction_from_the_frame_store(tmp_path):
    """Runs before the trainer logged ``served_error``: the driver's prediction stored with the
    frame gives the serving model's error (the logged one may be the refined model's)."""
    import json

    import numpy as np

    from rarefly.prediction import Structure
    from rarefly.trainer.store import FrameStore

    d = tmp_path / "r" / "a_paper"
    d.mkdir(parents=True)
    st = FrameStore(d / "frames.db")
    s = Structure(np.array([1, 1]), np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.74]]), None, (False,) * 3)
    row = st.add(s, frame_id="f1", origin="audit", model_version=4, pred_energy=-10.30,
                 confidence=0.97, sigma_E_raw=0.04)
    st.add_label(row, -10.0, np.zeros((2, 3)), "xtb")
    events = [{"event": "publish", "model_version": 5, "gradient_steps": 300},
              {"event": "label", "row": row, "origin": "audit", "model_version": 4, "refined": True,
               "ref_energy": -10.0, "error": 0.02}]
    (d / "frames.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (got,) = pool_onthefly.audit_labels(str(tmp_path / "r"), "a_paper")
    assert got["served_error"] == pytest.approx(-0.30) and got["error"] == 0.02
    assert (got["served_version"], got["served_confidence"], got["served_sigma_raw"]) == (4, 0.97, 0.04)
    assert got["refined"] is False               # served by version 4, before the refined 5
