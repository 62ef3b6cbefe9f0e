"""Which frame of a rate-cap window is worth labelling? An offline check on one
bench_onthefly scheme folder, with bench_label_value.py's replay.

The trainer labels the most uncertain flagged frame of each window of ``min_step_gap`` MD
steps (``rarefly.trainer.selection.RateCap``). bench_label_value.out shows the biased scheme's
labels, chosen that way, worth no more for the held-out TS forces than the paper scheme's
basin labels. Here the same run's stored flagged frames (the trainer keeps every frame it
received, labelled or not) are chosen again, one per live label, from the window of
``--gap`` steps centred on the live label's step, by another rule:

  live     the frames the trainer labelled (the most uncertain of their window)
  energy   the lowest predicted energy in the window (the least strained geometry)
  median   the median raw sigma_E of the window
  random   a random frame of the window (seeded)

labelled with GFN2-xTB here, then learned with the trainer's schedule
(``bench_label_value.replay_curve``). The live run's audit labels are kept as they are.

    python benchmarks/check_window_choice.py RUN_DIR/c_ts [--rules energy median random]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DATA = HERE / "data"
KCAL = 0.0433641043  # eV


def choose(rule: str, window: list, rng) -> object:
    if rule == "energy":
        return min(window, key=lambda r: float(r.get("pred_energy")))
    if rule == "median":
        order = sorted(window, key=lambda r: float(r.get("sigma_E_raw") or 0.0))
        return order[len(order) // 2]
    if rule == "random":
        return window[int(rng.integers(len(window)))]
    raise SystemExit(f"check_window_choice: unknown rule {rule!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scheme", type=Path, help="one scheme's run folder (its frames.db)")
    ap.add_argument("--model", type=Path, default=DATA / "ala2_c7eq_thermal_ft2000_misfit.rfly")
    ap.add_argument("--replay", type=Path, default=DATA / "ala2_c7eq_thermal_xtb.xyz")
    ap.add_argument("--rules", nargs="+", default=["energy", "median", "random"])
    ap.add_argument("--gap", type=int, default=60, help="window width in MD steps (default %(default)s)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    import bench_label_value as blv
    import bench_onthefly as bo
    from rarefly.data_io import read_frames
    from rarefly.posterior import load_posterior
    from rarefly.posterior.base import LabelledFrame
    from rarefly.trainer.reference import ReferenceSpec, label
    from rarefly.trainer.store import FrameStore

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    t_all = time.time()
    store = FrameStore(args.scheme / "frames.db")
    live = sorted(store.rows(state="labelled"), key=lambda r: (r.get("labelled_at", 0), r.id))
    pool = [r for r in store.rows() if r.get("origin") == "flagged" and r.get("step") is not None
            and r.get("pred_energy") is not None]
    bo.MODEL = args.model.resolve()
    eps = 4.0 * KCAL
    target = bo.start_model_numbers(eps)["target"]
    ts, replay = read_frames(bo.TS), read_frames(args.replay)
    start = load_posterior(args.model)
    start.settings.epsilon = eps
    spec = ReferenceSpec("xtb", {"method": "GFN2-xTB"})
    print(f"check_window_choice.py {args.scheme} ({time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC): "
          f"{len(live)} live labels, {len(pool)} flagged frames stored; windows of {args.gap} "
          f"steps; refinement {args.steps} Adam steps every {args.every} labels; TS target {target:.4f} eV/A")
    results = {"live": blv.replay_curve(start, store.labelled_frames(), [r.origin for r in live],
                                        ts, replay, args.steps, args.every, 1e-3, log=lambda m: None)}
    print(f"  live: TS F " + " ".join(f"{p['n']}:{p['f']:.3f}" for p in results["live"]), flush=True)
    for rule in args.rules:
        rng = np.random.default_rng(args.seed)
        frames, origins, steps = [], [], []
        for r in live:
            if r.origin == "audit":
                frames.append(LabelledFrame(store.structure(r), float(r.ref_energy),
                                            np.array(r.data["ref_forces"])))
                origins.append("audit")
                steps.append(None)
                continue
            s0 = int(r.step)
            window = [q for q in pool if (q.get("walker") or 0) == (r.get("walker") or 0)
                      and s0 - args.gap // 2 <= int(q.step) < s0 + args.gap - args.gap // 2]
            pick = choose(rule, window, rng)
            s = store.structure(pick)
            e, f = label(spec, s.numbers, s.positions)
            frames.append(LabelledFrame(s, e, f))
            origins.append("flagged")
            steps.append(int(pick.step))
        t0 = time.time()
        results[rule] = c = blv.replay_curve(start, frames, origins, ts, replay, args.steps,
                                             args.every, 1e-3, log=lambda m: None)
        print(f"  {rule}: TS F " + " ".join(f"{p['n']}:{p['f']:.3f}" for p in c)
              + f"  ({time.time() - t0:.0f} s; steps {[s for s in steps if s is not None]})", flush=True)
    print(f"\n{'rule':8s} {'N@tgt':>6s} {'F at N=5,10,15,...':s}")
    for rule, c in results.items():
        n = blv.reached(c, target)
        print(f"{rule:8s} {n if n else '-':>6} " + " ".join(f"{p['f']:.3f}" for p in c
                                                           if p["refined"] or p is c[-1])
              + f"   TS E last {c[-1]['e']:.3f} eV")
    print(f"total {time.time() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
