"""Pool finished bench_rare_events.py runs (several seeds) into one crossing-rate comparison.

One 6,000-step biased run gives a handful of crossings, and an unbiased run on a model with a
real barrier gives none, so the ratio the issue asks for (best bias >= 10x the unbiased
rate) is decided by how many steps each side has. Run the seeds separately, each in its own
folder, then pool them here:

    RAREFLY_BENCH_DIR=/tmp/rare_s7 python benchmarks/bench_rare_events.py --model M \\
        --steps 6000 --only metad_2d --sigma-ref S0,DS --seed 7
    python benchmarks/pool_rare_events.py \\
        --unbiased /tmp/rarefly_bench_rare_events/unbiased /tmp/rarefly_bench_rare_events/unbiased_b \\
        --biased /tmp/rarefly_bench_rare_events/metad_2d /tmp/rare_s7/metad_2d

Every folder is a finished run (COLVAR, simulation.out, input.xml, plumed.dat, model).
Biased runs are pooled only when their PLUMED inputs are the same, and all runs must have
been made on the same model file (sha256): the script refuses otherwise. Crossings are
counted with bench_rare_events.py's own rule (crossing_steps). Poisson bounds are one-sided
95 % (chi-square form); with no crossing the upper bound on the count is -ln(0.05) = 3.0.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_rare_events", HERE / "bench_rare_events.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def run_facts(d: Path) -> dict:
    if not (d / "COLVAR").exists() or not (d / "simulation.out").exists():
        raise SystemExit(f"{d}: not a finished bench_rare_events run (no COLVAR or simulation.out)")
    cv = bench.colvar(d / "COLVAR")
    _, idx = np.unique(cv["time"], return_index=True)
    phi = np.degrees(cv["phi"][idx])
    temp = np.loadtxt(d / "simulation.out", ndmin=2)[1:, 1]
    seed = re.search(r"<seed>(\d+)</seed>", (d / "input.xml").read_text())
    plumed = [ln for ln in (d / "plumed.dat").read_text().splitlines()
              if ln.split(":")[0].strip() in ("metad", "opes", "hal", "udd", "wall")]
    return {"dir": d, "steps": len(phi), "crossings": len(bench.crossing_steps(phi)),
            "seed": seed.group(1) if seed else "?", "T": float(temp.mean()),
            "T_std": float(temp.std()), "bias": "\n".join(plumed),
            "model": (d / "model").read_text().strip() if (d / "model").exists() else "?"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unbiased", nargs="+", type=Path, required=True, help="unbiased run folders")
    ap.add_argument("--biased", nargs="+", type=Path, required=True,
                    help="biased run folders with the same PLUMED bias (other seeds)")
    args = ap.parse_args()
    unb = [run_facts(d) for d in args.unbiased]
    bia = [run_facts(d) for d in args.biased]
    models = {r["model"].split()[-1] for r in unb + bia}
    if len(models) != 1:
        raise SystemExit(f"the runs were made on different models: {sorted(models)}")
    if len({r["bias"] for r in bia}) != 1:
        raise SystemExit("the biased runs do not share one PLUMED bias: pool only seeds of one bias")
    print(f"model: {unb[0]['model']}")
    print(f"bias: {bia[0]['bias']}")
    print(f"{'run':45s} {'seed':>5s} {'steps':>6s} {'cross':>5s} {'T mean':>7s} {'T std':>6s}")
    for r in unb + bia:
        print(f"{str(r['dir']):45s} {r['seed']:>5s} {r['steps']:6d} {r['crossings']:5d} "
              f"{r['T']:7.1f} {r['T_std']:6.1f}")
    nu, ku = sum(r["steps"] for r in unb), sum(r["crossings"] for r in unb)
    nb, kb = sum(r["steps"] for r in bia), sum(r["crossings"] for r in bia)
    ru, rb = ku * 1e4 / nu, kb * 1e4 / nb
    ru_hi, rb_lo = bench.poisson_upper(ku) * 1e4 / nu, bench.poisson_lower(kb) * 1e4 / nb
    print(f"unbiased: {ku} crossings in {nu} steps, {ru:.2f} per 10,000 steps "
          f"(95 % upper bound {ru_hi:.2f})")
    print(f"biased:   {kb} crossings in {nb} steps, {rb:.2f} per 10,000 steps "
          f"(95 % lower bound {rb_lo:.2f})")
    point = f"{rb / ru:.1f}x" if ku else "unbounded (no unbiased crossing)"
    print(f"ratio: point estimate {point}; biased rate over the unbiased upper bound "
          f"{rb / ru_hi:.1f}x; both at their 95 % bounds {rb_lo / ru_hi:.1f}x")
    verdict = ("MET on both bounds" if rb_lo / ru_hi >= 10 else
               "MET against the unbiased upper bound only" if rb / ru_hi >= 10 else
               "NOT RESOLVED at 95 %" if ku == 0 or rb / ru >= 10 else "NOT MET")
    print(f"target >= 10x: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
