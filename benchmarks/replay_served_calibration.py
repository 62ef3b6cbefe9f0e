"""Replay ``[learning] served_calibration`` offline on on-the-fly runs made without it.

Why: in bench_onthefly's runs 74-81 the start model and its readout-only versions served the
MD for the 80-100 s of the first backbone refinement, trusted frames they were 0.19-0.35 eV
wrong on, and kept their calibration until the refined model was published, while the labels
finishing meanwhile showed them wrong. With ``served_calibration`` (the trainer's default
from bench_onthefly's run 87 on) the served version's energy calibration takes those
residuals during the refinement and is republished with the same weights
(``Trainer._patch_served_calibration``).

What it replays, from each run's trainer events (``FOLDER/SCHEME/frames.jsonl``), database
(``frames.db``) and i-PI extras (``simulation.uncertainty_0``), as the trainer would have:

- at a ``refine`` event, the served version's published calibration takes the residuals of
  the labels logged since that version was published (discounted with the run's
  ``calibration_memory``), and a patch goes out;
- each label of a frame served by that version (or a patch of it) that finished during the
  refinement (its row's ``labelled_at``; the label event itself is logged after the
  refinement) adds the served model's residual, as the driver sent it with the frame; a patch
  goes out at most every ``--patch-seconds``;
- a patch reaches the driver ``--delay`` seconds later (its reload); wall times map to MD
  steps through the steps at which the driver first served each published version.

Printed per run and pooled: the audit frames a patch would have flagged (so they would not
have been audit frames), split into the misses (outside epsilon) and the hits, the audit
coverage that remains before and from the first backbone-refined version, and the fraction
of MD steps flagged with and without the patches (the cost: more frames queued).

This is a counterfactual on fixed trajectories. In the paper's scheme (async mode, no bias)
the calibration does not move the MD, but the frames flagged and so labelled would have been
others, and the later models too. Live runs decide; this says whether one is worth making.

Usage::

    python benchmarks/replay_served_calibration.py /tmp/b74 ... /tmp/b81 [--scheme a_paper]
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "driver"))

from rarefly.calibration import ScaleCalibration  # noqa: E402
from rarefly.report import read_events, read_step_extras  # noqa: E402
from rarefly.trainer.loop import SERVED_PATCH_SECONDS  # noqa: E402


def _steps(path: Path):
    """Per MD step: (step, calibrated sigma_E, confidence, model version) from i-PI's extras
    (energy_uncertainty, confidence, model_version, flagged)."""
    steps, values = read_step_extras(path)
    return [(int(step), v[0], v[1], int(v[2])) for step, v in zip(steps, values)]


def replay(folder: Path, scheme: str, delay: float, patch_seconds: float) -> dict:
    from ase.db import connect

    d = folder / scheme
    run = json.loads((d / "run.json").read_text())
    eps, level = float(run["epsilon_eV"]), float(run["level"])
    cfg = tomllib.loads((folder / f"{scheme}.toml").read_text())
    memory = int(cfg.get("learning", {}).get("calibration_memory", 0))
    events = read_events(d / "frames.jsonl")
    pubs = {e["model_version"]: e for e in events if e["event"] == "publish"}
    steps = _steps(d / "simulation.uncertainty_0")
    first: dict[int, int] = {}
    for step, _, _, v in steps:
        first.setdefault(v, step)
    pts = sorted((pubs[v]["t"], first[v]) for v in pubs if v in first)
    times, marks = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])

    def step_at(t: float) -> float:
        return float(np.interp(t, times, marks, left=np.nan, right=np.nan))

    db = connect(d / "frames.db")
    labelled_at = {r.id: r.get("labelled_at") for r in db.select(state="labelled")}
    patches: dict[int, list] = {}          # served version -> [(first step, ScaleCalibration)]
    cal, since, last, served = None, [], None, None

    def add(residual: float, raw: float) -> None:
        cal.learn(np.array([residual]), np.array([raw]), memory)

    def patch(t: float) -> None:
        nonlocal last
        t = t if last is None else max(t, last + patch_seconds)
        last = t
        patches.setdefault(served, []).append((step_at(t + delay), ScaleCalibration(cal.a, cal.b)))

    for e in events:
        if e["event"] == "publish":
            cal, since = None, []
        elif e["event"] == "label" and not e.get("refined"):
            since.append(e)
        elif e["event"] == "refine":
            served = e["model_version"]
            c = pubs[served]["calibration"]["energy"]
            cal, last = ScaleCalibration(c["a"], c["b"]), None
            for lab in since:                # learned at the refinement's start
                add(-lab["error"], lab["sigma_raw"])
            if since:
                patch(e["t"])
        elif (e["event"] == "label" and e.get("refined") and cal is not None
              and e.get("served_version") == served and e.get("served_sigma_raw")):
            add(-e["served_error"], e["served_sigma_raw"])
            patch(labelled_at.get(e["row"]) or e["t"])

    def patched(version: int, step: int):
        ok = [c for s, c in patches.get(version, []) if np.isfinite(s) and s <= step]
        return ok[-1] if ok else None

    refined = min((v for v, e in pubs.items() if e.get("gradient_steps")), default=10 ** 9)
    res = {"before": [0, 0], "after": [0, 0], "flagged_miss": 0, "flagged_hit": 0, "lines": []}
    for r in db.select(origin="audit", state="labelled"):
        err = float(r.pred_energy) - float(r.ref_energy)
        within = abs(err) < eps
        c = patched(r.model_version, r.step)
        if c is not None and c.confidence(r.sigma_E_raw, eps) < level:
            res["flagged_miss" if not within else "flagged_hit"] += 1
            res["lines"].append(f"  {folder.name} step {r.step} version {r.model_version}: error "
                                f"{err:+.3f} eV, confidence {r.confidence:.3f} -> "
                                f"{c.confidence(r.sigma_E_raw, eps):.3f}, flagged")
            continue
        if not within:
            res["lines"].append(f"  {folder.name} step {r.step} version {r.model_version}: error "
                                f"{err:+.3f} eV, confidence {r.confidence:.3f}, still trusted"
                                + ("" if c is not None else " (no patch of its version yet)"))
        key = "after" if r.model_version >= refined else "before"
        res[key][0] += within
        res[key][1] += 1
    # the steps flagged: a step's raw sigma is its calibrated sigma over its version's factor
    factor = {v: pubs[v]["calibration"]["energy"] for v in pubs}
    flagged = [0, 0]
    for step, sigma, conf, v in steps:
        flagged[0] += conf < level
        c = patched(v, step)
        if c is not None and v in factor:
            f = factor[v]
            conf = c.confidence(sigma / np.sqrt(f["b"] / (f["a"] - 1.0)), eps)
        flagged[1] += conf < level
    res["steps"], res["flagged_steps"] = len(steps), flagged
    res["patches"] = sum(len(p) for p in patches.values())
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path, help="bench_onthefly.py run folders")
    ap.add_argument("--scheme", default="a_paper", help="the scheme's folder (default %(default)s)")
    ap.add_argument("--delay", type=float, default=2.0,
                    help="seconds from a patch to the driver serving it (default %(default)s)")
    ap.add_argument("--patch-seconds", type=float, default=SERVED_PATCH_SECONDS,
                    help="at most one patch per this many seconds (default %(default)s, the trainer's)")
    args = ap.parse_args(argv)
    pooled = {"before": [0, 0], "after": [0, 0], "flagged_miss": 0, "flagged_hit": 0,
              "steps": 0, "flagged_steps": [0, 0], "patches": 0}
    print(f"replay of [learning] served_calibration on {len(args.folders)} {args.scheme} runs; "
          f"patch reaches the driver {args.delay:g} s after it is due, at most one per "
          f"{args.patch_seconds:g} s")
    for folder in args.folders:
        r = replay(folder, args.scheme, args.delay, args.patch_seconds)
        print(f"{folder}: {r['patches']} patches; audit frames flagged by a patch: "
              f"{r['flagged_miss']} outside epsilon, {r['flagged_hit']} within; left within "
              f"epsilon: before the first refined version {r['before'][0]}/{r['before'][1]}, "
              f"from it {r['after'][0]}/{r['after'][1]}; MD steps flagged "
              f"{r['flagged_steps'][0] / r['steps']:.2f} -> {r['flagged_steps'][1] / r['steps']:.2f}")
        for line in r["lines"]:
            print(line)
        for k in ("before", "after", "flagged_steps"):
            pooled[k] = [a + b for a, b in zip(pooled[k], r[k])]
        for k in ("flagged_miss", "flagged_hit", "steps", "patches"):
            pooled[k] += r[k]
    b, a = pooled["before"], pooled["after"]
    n_with, n_without = b[1] + a[1], b[1] + a[1] + pooled["flagged_miss"] + pooled["flagged_hit"]
    w_without = b[0] + a[0] + pooled["flagged_hit"]
    print(f"pooled: {pooled['patches']} patches; audit frames flagged by a patch: "
          f"{pooled['flagged_miss']} outside epsilon, {pooled['flagged_hit']} within")
    print(f"  audit coverage without the patches {w_without}/{n_without} = {w_without / n_without:.2f}; "
          f"with them {b[0] + a[0]}/{n_with} = {(b[0] + a[0]) / n_with:.2f} (before the first "
          f"refined version {b[0]}/{b[1]}, from it {a[0]}/{a[1]})")
    fs = pooled["flagged_steps"]
    print(f"  MD steps flagged: {fs[0] / pooled['steps']:.2f} without, {fs[1] / pooled['steps']:.2f} with")
    return 0


if __name__ == "__main__":
    sys.exit(main())
