"""Pool bench_label_value.py's replayed learning curves over seeds: issue 4 section 5, target 1.

One replay decides target 1 on one label set, and across seeds the verdict flips (as counted:
met on some, missed on others). This script reads the committed replays in
``bench_label_value.out`` (one ``=====`` section per run folder), takes each section's TS force
RMSE curve after N labels for the paper scheme (``a_paper``), the biased scheme (``c_ts`` by
default) and the control, and prints:

  per run, target 1's verdict (as counted and counting flagged labels only);
  the median label count to the target (Kaplan-Meier: a run that ended before reaching it is
  censored at its last label, so short runs neither count as reaching it nor drop out) and
  target 1 on the two medians;

and, for every label count N that all selected runs reach:

  mean TS force RMSE of each scheme over the runs;
  the paired difference a_paper - c_ts (positive: c_ts's labels are worth more), its mean,
  its standard error over runs and in how many runs it is positive;

then the label count at which each scheme's *mean* curve first reaches the target, with
bench_onthefly's verdict rule (target 1 asks for c_ts <= half of a_paper). Each scheme's mean
runs over the label counts it reaches in every selected run, the paired difference over those
both reach; a mean curve that does not reach the target within them is "not within N". The
same mean curves follow by count of flagged labels (an audit label counts with the flagged
label before it). The per-run counts come from each replay's own summary table, decided at
full precision (the per-label figures and the target are printed rounded to 0.0001 eV/A, and
the script says where a mean lies that close). Pool one run per seed made with the same
command.

    python benchmarks/pool_label_value.py /tmp/b52 /tmp/b53 /tmp/b54 /tmp/b56 /tmp/b57
    python benchmarks/pool_label_value.py --out benchmarks/bench_label_value.out --biased c_ts RUN ...

RUN: a run folder as named on a section's ``=====`` line (the latest section of that folder
is used). Nothing is recomputed: the figures are those committed in the .out file.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_onthefly as bo  # noqa: E402  (target 1's verdict, the same rule as the live runs)

SCHEME_RE = re.compile(r"^  (\w+): (\d+) (?:labels|of the)")
LABEL_RE = re.compile(r"^\s+(\d+) (\w+)\s+TS F ([0-9.]+) eV/A")
TARGET_RE = re.compile(r"TARGET ([0-9.]+) eV/A")
TABLE_RE = re.compile(r"^(\w+)\s+(\d+)\s+(\d+)\s+(\d+|-)\s+(\d+|-)\s+[0-9.]+\s+[0-9.]+\s*$")


def sections(text: str, key: str = r"bench_label_value\.py\s+(\S+)") -> dict[str, str]:
    """Run folder -> the text of its latest ``=====`` section (later sections win); ``key``
    finds the folder on the ``=====`` line (pool_onthefly passes its own)."""
    out: dict[str, str] = {}
    parts = re.split(r"^(=====.*)$", text, flags=re.M)
    for head, body in zip(parts[1::2], parts[2::2]):
        m = re.search(key, head)
        if m:
            out[m.group(1).rstrip("/")] = body
    return out


def curves(body: str) -> dict[str, list[tuple[str, float]]]:
    """Scheme -> [(origin, TS force RMSE)] after 1, 2, ... labels, from one section's per-label
    lines (four decimals; the summary curves further down have three)."""
    out: dict[str, list[tuple[str, float]]] = {}
    announced: dict[str, int] = {}
    name = None
    for ln in body.splitlines():
        m = SCHEME_RE.match(ln)
        if m:
            name = m.group(1)
            out[name], announced[name] = [], int(m.group(2))
            continue
        m = LABEL_RE.match(ln)
        if m and name is not None:
            if int(m.group(1)) != len(out[name]) + 1:
                raise SystemExit(f"label {m.group(1)} of {name} out of order: {ln.strip()}")
            out[name].append((m.group(2), float(m.group(3))))
    short = [f"{k} ({len(v)} of {announced[k]})" for k, v in out.items() if len(v) != announced[k]]
    if short:
        raise SystemExit(f"unfinished replay, labels missing: {', '.join(short)}")
    return out


def table(body: str) -> dict[str, tuple]:
    """Scheme -> (N@tgt, flagged@tgt) from a section's summary table, decided by the replay at
    full precision (None: not reached)."""
    out = {}
    for ln in body.splitlines():
        m = TABLE_RE.match(ln)
        if m:
            out[m.group(1)] = tuple(None if x == "-" else int(x) for x in m.group(4, 5))
    return out


def first_at(curve, target: float):
    return next((n for n, f in enumerate(curve, 1) if f <= target), None)


def km_median(counts) -> tuple[float, int | None]:
    """Kaplan-Meier median of the labels to the target: ``counts`` is [(n, reached)] per run,
    a run that did not reach it censored at its label count. Returns (the estimate of the
    fraction of runs not yet at the target after the last count, median or None when that
    fraction stays above one half)."""
    surv, median = 1.0, None
    at_risk = len(counts)
    for t in sorted({n for n, _ in counts}):
        events = sum(1 for n, r in counts if n == t and r)
        if at_risk and events:
            surv *= 1.0 - events / at_risk
            if median is None and surv <= 0.5:
                median = t
        at_risk -= sum(1 for n, _ in counts if n == t)
    return surv, median


def median_summary(name: str, counts, unit: str) -> tuple[tuple, str]:
    """Kaplan-Meier median of one scheme's ``counts`` ([(n, reached)] per run): ((median or
    None, the largest count seen), a line saying what went in and what came out)."""
    surv, m = km_median(counts)
    last = max(n for n, _ in counts)
    line = (f"{name:8s} reached after {sorted(n for n, r in counts if r) or 'none'}, not within "
            f"{sorted(n for n, r in counts if not r) or 'none'}: median "
            + (f"{m}" if m else f"beyond the data (still {surv:.2f} of runs above the target "
               f"after {last} {unit})"))
    return (m, last), line


def median_verdict(a: str, b: str, med: dict) -> str:
    """Target 1 on two medians from :func:`median_summary` (bench_onthefly's rule: b at most
    half of a; a median beyond the data is larger than the largest count seen)."""
    (mb, _), (ma, la) = med[b], med[a]
    if mb and ma:
        return f"{'met' if mb <= 0.5 * ma else 'missed'}: {mb} vs {ma}"
    if mb:
        return f"{'met' if mb <= 0.5 * la else 'not resolved'}: {mb}, {a}'s median beyond {la}"
    return f"not resolved: {b}'s median beyond the data"


def by_flagged(curve) -> list[float]:
    """TS force RMSE against the count of flagged labels: entry k-1 is the value after the k-th
    flagged label and the audit labels that followed it (the model in use when the next flagged
    call is made); audit labels before the first flagged one are left out."""
    out: list[float] = []
    seen = 0
    for origin, f in curve:
        if origin != "audit":
            seen += 1
            out.append(f)
        elif seen:
            out[-1] = f
    return out


def pooled(runs, a: str, b: str, target: float, unit: str, vals: dict[str, list[list[float]]]) -> None:
    """Mean curves over the runs (each scheme over the counts it reaches in every run), the
    paired difference a - b over the counts both reach, and target 1 on the mean curves."""
    n_of = {k: min(len(v) for v in vs) for k, vs in vals.items()}
    n_pair = min(n_of[a], n_of[b])
    mean = {k: [sum(v[n] for v in vs) / len(vs) for n in range(n_of[k])] for k, vs in vals.items()}
    print(f"\nmean TS force RMSE (eV/A) after N {unit} over the {len(runs)} runs (blank: a run has "
          f"fewer); {a} - {b}: paired difference, its standard error, runs where it is > 0")
    print("   N  " + "  ".join(f"{k:>9s}" for k in n_of) + f"   {a}-{b}   s.e.  runs > 0")
    for n in range(max(n_of.values())):
        cells = "  ".join(f"{mean[k][n]:9.4f}" if n < n_of[k] else " " * 9 for k in n_of)
        line = f"  {n + 1:2d}  {cells}"
        if n < n_pair:
            d = [x[n] - y[n] for x, y in zip(vals[a], vals[b])]
            md = sum(d) / len(d)
            se = (math.sqrt(sum((x - md) ** 2 for x in d) / (len(d) - 1) / len(d))
                  if len(d) > 1 else float("nan"))
            line += f"   {md:+7.4f}  {se:6.4f}  {sum(x > 0 for x in d)}/{len(d)}"
        print(line.rstrip())
    if not (n_of[a] and n_of[b]):
        print(f"TARGET 1 on the mean curves ({unit}): not resolved (a scheme has none in some run)")
        return
    na, nb = first_at(mean[a], target), first_at(mean[b], target)
    ta = f"after {na}" if na else f"not within {n_of[a]} (best {min(mean[a]):.4f})"
    tb = f"after {nb}" if nb else f"not within {n_of[b]} (best {min(mean[b]):.4f})"
    print(f"mean curves at the target {target:.4f} eV/A ({unit}): {a} {ta}; {b} {tb}")
    near = [f"{k} after {n + 1}" for k in (a, b) for n, f in enumerate(mean[k])
            if abs(f - target) < 5e-5]
    if near:
        print(f"  (within the rounding of the printed figures, 0.00005 eV/A, of the target: "
              f"{', '.join(near)})")
    print(bo.target1(b, nb, na, n_of[b], n_of[a], target, min(mean[b]), min(mean[a]),
                     unit=unit, how=f"mean curves of {len(runs)} replays"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("runs", nargs="+", help="run folders, as named on the .out file's ===== lines")
    ap.add_argument("--out", type=Path, default=HERE / "bench_label_value.out",
                    help="the replays (default: %(default)s)")
    ap.add_argument("--biased", default="c_ts", help="the biased scheme (default: %(default)s)")
    ap.add_argument("--baseline", default="a_paper", help="the paper's scheme (default: %(default)s)")
    args = ap.parse_args(argv)

    if not args.out.exists():
        sys.exit(f"{args.out}: no such file; run bench_label_value.py first or name the file with --out.")
    text = args.out.read_text()
    secs = sections(text)
    if not secs:
        sys.exit(f"{args.out} holds no bench_label_value.py replay (no '===== ... bench_label_value.py RUN' line).")
    runs, target, tables = [], None, {}
    for r in args.runs:
        key = r.rstrip("/")
        if key not in secs:
            sys.exit(f"{args.out.name} has no replay of {key}; its runs are: {', '.join(secs)}.")
        body = secs[key]
        c = curves(body)
        missing = [s for s in (args.baseline, args.biased) if s not in c]
        if missing:
            sys.exit(f"the replay of {key} has no curve for {', '.join(missing)}; it has {', '.join(c)}.")
        m = TARGET_RE.search(body)
        if not m:
            sys.exit(f"the replay of {key} states no target (a 'TARGET ... eV/A' line).")
        t = float(m.group(1))
        if target is not None and abs(t - target) > 1e-4:
            sys.exit(f"the replay of {key} has target {t} eV/A, the others {target}: not pooled.")
        target = t
        runs.append((key, c))
        tables[key] = table(body)

    a, b = args.baseline, args.biased
    print(f"pool_label_value: {len(runs)} replays from {args.out.name}; target {target:.4f} eV/A; "
          f"{a} against {b}")
    # per run and scheme, once: (labels at the target or None, labels in all), as counted and
    # counting flagged labels only; the counts at the target are the replay's own (full precision)
    counts: dict[str, dict[str, list[tuple]]] = {"labels": {a: [], b: []},
                                                  "flagged labels": {a: [], b: []}}
    tally: dict[str, dict[str, int]] = {unit: {} for unit in counts}
    print("\nper run: labels to reach the target (replayed), as counted and flagged labels only")
    for key, c in runs:
        tab = tables[key]
        for k in (a, b):
            fs = [f for _, f in c[k]]
            n = first_at(fs, target)
            if k in tab and tab[k][0] != n:   # the printed values and target are rounded
                print(f"  {key}: {k} at the target after {tab[k][0]} labels by the replay's own "
                      f"table, {n} from its rounded figures: the table's count is used")
                n = tab[k][0]
            nf = None if n is None else sum(o != "audit" for o, _ in c[k][:n])
            counts["labels"][k].append((n, len(fs), min(fs)))
            counts["flagged labels"][k].append((nf, sum(o != "audit" for o, _ in c[k]), min(fs)))
        (na, la, ba), (nb, lb, bb) = counts["labels"][a][-1], counts["labels"][b][-1]
        print(f"  {key}: {a} " + (f"{na}" if na else f"not within {la} (best {ba:.4f})")
              + f", {b} " + (f"{nb}" if nb else f"not within {lb} (best {bb:.4f})"))
        for unit in counts:
            (na, ca, ba), (nb, cb, bb) = counts[unit][a][-1], counts[unit][b][-1]
            v = bo.target1(b, nb, na, cb, ca, target, bb, ba, unit=unit, how="replayed")
            verdict = v.split("): ", 1)[1]
            print(f"    {verdict}   [{unit}]")
            word = verdict.split(":")[0]
            tally[unit][word] = tally[unit].get(word, 0) + 1
    for unit, t in tally.items():
        print(f"  target 1 per run, {unit}: " + ", ".join(f"{k} {v}" for k, v in sorted(t.items())))

    # runs end at different label counts: the median count to the target with the runs that
    # did not reach it censored where they ended (Kaplan-Meier)
    print("\nmedian labels to the target over the runs (Kaplan-Meier; a run that did not reach it "
          "counts as censored at its last label)")
    for unit in counts:
        med = {}
        for k in (a, b):
            km = [(n, True) if n else (total, False) for n, total, _ in counts[unit][k]]
            med[k], line = median_summary(k, km, unit)
            print(f"  {unit:15s} {line}")
        print(f"  TARGET 1 on the median counts ({unit}): {median_verdict(a, b, med)}")

    pooled(runs, a, b, target, "labels",
           {k: [[f for _, f in c[k]] for _, c in runs] for k in (a, b, "control")
            if all(k in c for _, c in runs)})
    pooled(runs, a, b, target, "flagged labels",
           {k: [by_flagged(c[k]) for _, c in runs] for k in (a, b)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
