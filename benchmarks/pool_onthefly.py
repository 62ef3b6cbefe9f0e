"""Pool bench_onthefly.py's live runs over seeds: issue 4 section 5, target 1, as the live
runs count it (reference calls until a published model first reached the TS force target).

A 2000-step run of the paper's scheme often ends before it has made twice the biased scheme's
calls, and then a single run cannot say "at most half". Longer baseline runs of the same seed
(``--only a_paper --steps 6000``) can, so the two schemes' runs are named separately:

    python benchmarks/pool_onthefly.py --baseline-runs /tmp/b52 /tmp/b61 ... \\
                                       --biased-runs /tmp/b52 /tmp/b57 ...

Each folder is read from its latest ``=====`` section in ``bench_onthefly.out`` (its
RAREFLY_BENCH_DIR); nothing is recomputed. The script prints, per seed that has both schemes,
target 1 with bench_onthefly's own rule, and over all runs the Kaplan-Meier median of the
calls to the target for each scheme (a run that ended before reaching it is censored at its
call count; pool_label_value.km_median) and target 1 on the two medians, then target 2's
audit coverage pooled over each scheme's runs, with its exact 95 % interval: as
bench_onthefly printed it, on the offline frames each final model trusts, and, where the run
folders are on this machine, by the model that served each audit frame (``audit_labels``:
the printed figure of runs 1-72 is the trainer's logged error, which for a label that
finished during a refinement is the refined model's). All runs must have the same target;
one run per scheme and seed. ``--audit-details`` also lists the audit frames the serving
model got outside epsilon, split at the first model version that had a backbone refinement.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_onthefly as bo  # noqa: E402  (target 1's verdict rule)
import pool_label_value as plv  # noqa: E402  (the shared parsing and median helpers)

ROW_RE = re.compile(r"^(\w+)\s+(\d+)\s+\d+\s+(\d+)\s+(\d+)/(\d+)\s+(\d+|-)\s+[0-9.]+\s+([0-9.]+)"
                    r"\s+[0-9.]+(?:\s+(nan|[0-9.]+) n=(\d+)\s+(nan|[0-9.]+) n=(\d+))?")
SEED_RE = re.compile(r"\bseed (\d+)\b")
TARGET_RE = re.compile(r"^TARGET force RMSE on the TS frames: ([0-9.]+) eV/A", re.M)


def sections(text: str) -> dict[str, str]:
    """Run folder (RAREFLY_BENCH_DIR) -> the text of its latest ``=====`` section."""
    return plv.sections(text, key=r"RAREFLY_BENCH_DIR=(\S+)")


def coverage_interval(ok: int, n: int, level: float = 0.95) -> str:
    """The exact (Clopper-Pearson) two-sided interval of a coverage ``ok`` of ``n`` frames:
    with the few audit frames of a run, a coverage of 1.00 on 5 frames says little."""
    from scipy.stats import beta

    lo = beta.ppf((1 - level) / 2, ok, n - ok + 1) if ok > 0 else 0.0
    hi = beta.ppf(1 - (1 - level) / 2, ok + 1, n - ok) if ok < n else 1.0
    return f"{level:.0%} interval {lo:.2f}-{hi:.2f}"


def _within(cov, n):
    """(frames within epsilon, frames) from a printed coverage and its count (None if absent)."""
    if n is None:
        return None
    n = int(n)
    return (0 if cov == "nan" else round(float(cov) * n), n)


def run_rows(body: str) -> dict[str, dict]:
    """Scheme -> {steps, calls, flagged, audit, n (calls at the target or None), best} from a
    section's summary table."""
    out = {}
    for ln in body.splitlines():
        m = ROW_RE.match(ln)
        if m:
            out[m.group(1)] = {"steps": int(m.group(2)), "calls": int(m.group(3)),
                               "flagged": int(m.group(4)), "audit": int(m.group(5)),
                               "n": None if m.group(6) == "-" else int(m.group(6)),
                               "best": float(m.group(7)),
                               # audit coverage: (frames within epsilon, frames) on the run's
                               # audit frames and on the offline frames the final model trusts
                               "cov_audit": _within(m.group(8), m.group(9)),
                               "cov_offline": _within(m.group(10), m.group(11))}
    return out


def load(folders, scheme: str, secs: dict[str, str], out_name: str) -> tuple[dict, float]:
    """Seed -> the scheme's row (plus its folder) for every folder; the runs' common target."""
    rows, target = {}, None
    for f in folders:
        key = f.rstrip("/")
        if key not in secs:
            sys.exit(f"{out_name} has no run in {key}; its runs are: {', '.join(secs)}.")
        body = secs[key]
        r = run_rows(body).get(scheme)
        if r is None:
            sys.exit(f"the run in {key} has no {scheme} row in its table.")
        seed, t = SEED_RE.search(body), TARGET_RE.search(body)
        if not (seed and t):
            sys.exit(f"the run in {key} states no seed or no TS force target.")
        if target is not None and abs(float(t.group(1)) - target) > 1e-4:
            sys.exit(f"the run in {key} has target {t.group(1)} eV/A, the others {target}: not pooled.")
        target = float(t.group(1))
        s = int(seed.group(1))
        if s in rows:
            sys.exit(f"two {scheme} runs of seed {s} ({rows[s]['folder']}, {key}): name one.")
        rows[s] = {**r, "folder": key}
    return rows, target


EPS_RE = re.compile(r"^epsilon = [^=]*= ([0-9.]+) meV", re.M)


def audit_labels(folder: str, scheme: str) -> list[dict] | None:
    """The run's audit labels from its trainer events (``FOLDER/SCHEME/frames.jsonl``), each
    with ``served_error`` and ``served_version``: the error of the model that served the frame
    (and trusted it), from the event or, for runs before the trainer logged it, from the
    driver's prediction stored with the frame (``frames.db``); and ``refined``: whether that
    model had been through a backbone refinement. The event's own ``error`` is the trainer's
    prediction before it learned the label: the refined model's for a label that finished
    during a refinement. None when the folder is not on this machine."""
    path = Path(folder) / scheme / "frames.jsonl"
    if not path.exists():
        return None
    from rarefly.report import read_events

    events = read_events(path)
    rows = None
    if any(e["event"] == "label" and e.get("origin") == "audit" and "served_error" not in e
           for e in events):
        from rarefly.trainer.store import FrameStore

        db = FrameStore(Path(folder) / scheme / "frames.db").db
        rows = {r.id: r for r in db.select(origin="audit")}
    first_refined, out = None, []
    for e in events:
        if e["event"] == "publish" and e.get("gradient_steps") and first_refined is None:
            first_refined = int(e["model_version"])
        elif e["event"] == "label" and e.get("origin") == "audit":
            e = dict(e)
            if "served_error" not in e:
                r = rows[e["row"]]
                # the label's reference energy in the model's zero, as the event has it
                e.update(served_error=float(r.pred_energy) - float(e["ref_energy"]),
                         served_version=r.get("model_version"), served_confidence=r.get("confidence"),
                         served_sigma_raw=r.get("sigma_E_raw"))
            v = int(e.get("served_version") or e.get("model_version", 0))
            e["refined"] = first_refined is not None and v >= first_refined
            out.append(e)
    return out


def run_epsilon(folder: str, scheme: str, section: str) -> float | None:
    """The run's epsilon (eV): from its config when the folder is here (full precision), else
    from the .out section's header (0.1 meV)."""
    config = Path(folder) / f"{scheme}.toml"
    if config.exists():
        import tomllib

        from rarefly.run_config import quantity
        from rarefly.units import ENERGY_UNITS

        text = tomllib.loads(config.read_text())["learning"]["epsilon"]
        return quantity(text, ENERGY_UNITS, "eV", f"{config} [learning] epsilon")
    m = EPS_RE.search(section)
    return float(m.group(1)) / 1000.0 if m else None


def served_coverage(rows, scheme: str, secs: dict[str, str]):
    """Audit frames within epsilon by the model that served them, pooled over the runs whose
    folders are here: (within, frames, per-run list, folders missing, labels)."""
    ok = n = 0
    per, missing, labels = [], [], []
    for r in rows.values():
        got = audit_labels(r["folder"], scheme)
        eps = run_epsilon(r["folder"], scheme, secs[r["folder"]])
        if got is None or eps is None:
            missing.append(r["folder"])
            continue
        w = sum(abs(float(e["served_error"])) < eps for e in got)
        ok, n = ok + w, n + len(got)
        per.append(f"{w}/{len(got)}")
        labels.extend((e, eps, r["folder"]) for e in got)
    return ok, n, per, missing, labels


def audit_details(served: dict[str, tuple]) -> None:
    """Where the runs' audit frames fell outside epsilon (``served``: scheme ->
    :func:`served_coverage`'s answer, from the run folders where they are here)."""
    print("\naudit frames outside epsilon for the model that served them, from the run folders "
          "(error = predicted - reference energy)")
    for k, (_, _, _, missing, labels) in served.items():
        pre, post, logged, misses = [0, 0], [0, 0], 0, []
        for e, eps, folder in labels:
            ok = abs(float(e["served_error"])) < eps
            tally = post if e["refined"] else pre
            tally[0] += ok
            tally[1] += 1
            logged += abs(float(e["error"])) < eps
            if not ok:
                misses.append(f"{float(e['served_error']):+.3f} eV at confidence "
                              f"{float(e.get('served_confidence') or float('nan')):.3f} (version "
                              f"{e.get('served_version')}, {folder})")
        print(f"  {k}: within epsilon {pre[0]}/{pre[1]} served before the first refined version, "
              f"{post[0]}/{post[1]} from it on; as the trainer logged them (the refined model's "
              f"error for labels that finished during a refinement) {logged}/{len(labels)}"
              + (f"; folders not found: {', '.join(missing)}" if missing else ""))
        for line in misses:
            print(f"    {line}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--baseline-runs", nargs="+", required=True,
                    help="run folders whose baseline scheme counts (one per seed)")
    ap.add_argument("--biased-runs", nargs="*", default=[],
                    help="run folders whose biased scheme counts (one per seed; none: the baseline "
                         "runs alone, for their audit coverage)")
    ap.add_argument("--out", type=Path, default=HERE / "bench_onthefly.out",
                    help="the runs (default: %(default)s)")
    ap.add_argument("--biased", default="c_ts", help="the biased scheme (default: %(default)s)")
    ap.add_argument("--baseline", default="a_paper", help="the paper's scheme (default: %(default)s)")
    ap.add_argument("--audit-details", action="store_true",
                    help="also list the audit frames outside epsilon, read from the run folders "
                         "(their frames.jsonl) where they are on this machine")
    args = ap.parse_args(argv)
    if not args.out.exists():
        sys.exit(f"{args.out}: no such file; name the runs' output with --out.")
    secs = sections(args.out.read_text())
    if not secs:
        sys.exit(f"{args.out} holds no bench_onthefly.py run (no '===== RAREFLY_BENCH_DIR=...' line).")
    a, b = args.baseline, args.biased
    base, ta = load(args.baseline_runs, a, secs, args.out.name)
    bias, tb = load(args.biased_runs, b, secs, args.out.name) if args.biased_runs else ({}, ta)
    if abs(ta - tb) > 1e-4:
        sys.exit(f"the {a} runs have target {ta} eV/A, the {b} runs {tb}: not pooled.")
    target = ta
    print(f"pool_onthefly: {len(base)} {a} runs, {len(bias)} {b} runs from {args.out.name}; "
          f"TS force target {target:.4f} eV/A; live counts (calls until a published model "
          f"reached it)")

    def show(r):
        return (f"{r['n']} of {r['calls']}" if r["n"] else f"not within {r['calls']}") + \
            f" calls ({r['flagged']}/{r['audit']} flagged/audit, {r['steps']} steps, {r['folder']})"

    print("\nper seed:")
    tally: dict[str, int] = {}
    for s in sorted(set(base) | set(bias)):
        ra, rb = base.get(s), bias.get(s)
        print(f"  seed {s}: {a} " + (show(ra) if ra else "no run") + f"; {b} "
              + (show(rb) if rb else "no run"))
        if ra and rb:
            v = bo.target1(b, rb["n"], ra["n"], rb["calls"], ra["calls"], target, rb["best"],
                           ra["best"])
            verdict = v.split("): ", 1)[1]
            print(f"    {verdict}")
            word = verdict.split(":")[0]
            tally[word] = tally.get(word, 0) + 1
    print("  target 1 per seed: " + (", ".join(f"{k} {v}" for k, v in sorted(tally.items()))
                                     or "no seed with both schemes"))

    print("\nmedian calls to the target (Kaplan-Meier; a run that did not reach it is censored "
          "at its call count)")
    med = {}
    for k, rows in ((a, base), (b, bias)):
        if not rows:
            continue
        counts = [(r["n"], True) if r["n"] else (r["calls"], False) for r in rows.values()]
        med[k], line = plv.median_summary(k, counts, "calls")
        print(f"  {line}")
    if bias:
        verdict = plv.median_verdict(a, b, med)
        print(f"TARGET 1 on the median calls (live): {verdict}")

    print("\naudit coverage pooled over the runs (target 2: >= 0.95): frames within epsilon / frames")
    for k, rows in ((a, base), (b, bias)) if bias else ((a, base),):
        for col, what in (("cov_audit", "the runs' audit frames as bench_onthefly printed it"),
                          ("cov_offline", "offline frames the final model trusts")):
            got = [r[col] for r in rows.values() if r[col] is not None]
            ok, n = sum(x for x, _ in got), sum(y for _, y in got)
            per = " ".join(f"{x}/{y}" for x, y in got)
            print(f"  {k:8s} {what}: " + (f"{ok}/{n} = {ok / n:.2f} ({coverage_interval(ok, n)})"
                                          if n else "none") + f"  (per run {per})")
    print("  the model that served each audit frame (and trusted it), from the run folders:")
    served = {k: served_coverage(rows, k, secs) for k, rows in ((a, base), (b, bias)) if rows}
    for k, (ok, n, per, missing, _) in served.items():
        print(f"  {k:8s} " + (f"{ok}/{n} = {ok / n:.2f} ({coverage_interval(ok, n)})" if n else "none")
              + f"  (per run {' '.join(per)})"
              + (f"; folders not found: {', '.join(missing)}" if missing else ""))
    if args.audit_details:
        audit_details(served)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
