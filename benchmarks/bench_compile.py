#!/usr/bin/env python
"""``rarefly driver --compile`` against i-PI's own MACE driver (issue 2, section 5, the
``lastlayer`` targets): per-call cost and bead batching, eager and compiled, in ONE run on
the SAME weights and structures, with the timing discipline of ``bench_driver.py`` (one torch
thread, interleaved repetitions, CPU time of the process, medians of per-repetition ratios).

Rows, for ethanol (9 atoms) and the periodic 64-atom box of ``bench_driver.py``:

- i-PI mace: ``ipi.pes._mace.MACE_driver(cell, pos)`` (energy, forces, stress; eager, as i-PI
  ships it: its ``use_compile`` is "not supported yet" in i-PI 3.3.1), the baseline;
- lastlayer eager: ``posterior.predict([s])`` (forces, sigma_E, d sigma_E/dR, sigma_F[, stress]);
- lastlayer compiled: the same after :func:`rarefly.posterior.compiled.compile_posterior`
  (what ``rarefly driver --compile`` serves);
- compiled, no d sigma_E/dR: for reference, how much of the gain is the compiler alone.

The one-off compilation time is printed, not part of the per-call figures.

Usage::

    .venv/bin/python benchmarks/bench_compile.py      # about 4 min on 2 cores, writes bench_compile.out
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_driver as B  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().with_suffix(".out")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--repeats", type=int, default=11, help="repetitions (64 atoms: half, at least 5)")
    ap.add_argument("--beads", type=int, default=8)
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="report file ('-' for none)")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    B._torch_one_thread()
    from rarefly.posterior import create_posterior, load_posterior
    from rarefly.posterior.compiled import compile_posterior

    lines: list[str] = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rarefly-bench-compile-") as tmp:
        work = Path(tmp)
        model_path = B.EMBEDDED_MODEL
        path = work / "lastlayer.rfly"
        create_posterior(str(model_path), "lastlayer").save(path)
        eager = load_posterior(path)
        compiled = compile_posterior(load_posterior(path))
        systems = {"ethanol (9 atoms, molecule)": B.ethanol(),
                   "box of 8 molecules (64 atoms, periodic)": B.molecular_box()}
        emit("rarefly driver --compile benchmark (issue 2, section 5, lastlayer)  --  "
             "benchmarks/bench_compile.py")
        for line in B.machine_header(model_path, "", {"lastlayer": (eager, path)}):
            emit(line)
        emit("times: CPU time of the process per call, medians [25th-75th percentile] in ms; "
             "ratios: medians of per-repetition ratios")
        emit()
        rows = []
        for name, atoms in systems.items():
            s = B.structure(atoms)
            cell, pos = B.ipi_args(atoms)
            base = B.make_baseline(model_path, atoms, work)
            c0 = time.perf_counter()
            compiled.predict([s])  # compiles (once per kind of structure: molecule / periodic)
            compile_s = time.perf_counter() - c0
            fns = {"ipi": lambda b=base, c=cell, p=pos: b(c.copy(), p.copy()),
                   "eager": lambda st=s: eager.predict([st]),
                   "compiled": lambda st=s: compiled.predict([st]),
                   "compiled-lean": lambda st=s: B._without_gradient(compiled, st)}
            print(f"timing {name} ...", file=sys.stderr, flush=True)
            reps = args.repeats if len(atoms) < 32 else B.heavy(args.repeats)
            t = B.interleaved(fns, reps, cpu=True)
            emit(f"{name}: first compiled call {compile_s:.1f} s (compilation)")
            for k, label in (("ipi", "i-PI mace"), ("eager", "lastlayer eager"),
                             ("compiled", "lastlayer compiled"),
                             ("compiled-lean", "compiled, no d sigma_E/dR")):
                emit(f"   {label:28s} {B.med(t[k]) * 1e3:7.1f} {B.spread(t[k])}  "
                     f"/ i-PI mace {B.paired_ratio(t[k], t['ipi']):.2f}")
            short = f"{name.split(' (')[0]} ({len(atoms)} atoms)"
            rows.append((f"lastlayer eager / i-PI mace, {short}", B.paired_ratio(t["eager"], t["ipi"]),
                         B.TARGETS["lastlayer"]))
            rows.append((f"lastlayer compiled / i-PI mace, {short}",
                         B.paired_ratio(t["compiled"], t["ipi"]), B.TARGETS["lastlayer"]))
            emit()
        name = next(iter(systems))
        bead_structs = [B.structure(b) for b in B.beads(systems[name], args.beads)]
        compiled.predict(bead_structs)  # the batched graph: no recompilation expected (dynamic shapes)
        fns = {"batch": lambda: compiled.predict(bead_structs),
               "single": lambda: [compiled.predict([b]) for b in bead_structs],
               "eager-batch": lambda: eager.predict(bead_structs),
               "eager-single": lambda: [eager.predict([b]) for b in bead_structs]}
        print("timing bead batching ...", file=sys.stderr, flush=True)
        t = B.interleaved(fns, B.heavy(args.repeats), warmup=1, cpu=True)
        emit(f"bead batching, {args.beads} ethanol beads: predict(all) / {args.beads} x predict([one])")
        for pre, label in (("eager-", "eager"), ("", "compiled")):
            r = B.paired_ratio(t[pre + "batch"], t[pre + "single"])
            emit(f"   {label:9s} batched {B.med(t[pre + 'batch']) * 1e3:6.1f} ms, singles "
                 f"{B.med(t[pre + 'single']) * 1e3:6.1f} ms, ratio {r:.2f}")
            rows.append((f"{label} lastlayer: batched {args.beads}-bead step / {args.beads} single calls",
                         r, B.TARGETS["batch"]))
        emit()
        width = max(len(r[0]) for r in rows)
        emit("Summary")
        emit(f"   {'figure'.ljust(width)}  {'measured':>9}  {'target':>8}  result")
        for fig, value, target in rows:
            emit(f"   {fig.ljust(width)}  {value:9.2f}  {'<= ' + format(target, 'g'):>8}  "
                 f"{B.verdict(value, target)}")
        emit(f"total run time {time.perf_counter() - t0:.0f} s wall")
    if args.out != "-":
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
