"""What are the labels each on-the-fly scheme chose worth? Issue 4 section 5, target 1, with the
clock taken out of the loop.

bench_onthefly.py counts the reference calls a scheme had made when a *published* model first
reached the TS force target. With the trainer asynchronous, that count holds every call made
while a backbone refinement ran: in its forty-sixth run (seed 2025) the first refinement of
the biased scheme took 90 s on 2 cores, the MD made ~1300 steps meanwhile, and 14 calls went
in before the next version was out; the paper's scheme made 25. The learning curve then has
one point between 4 and 19-30 calls, and the count measures the trainer's latency against the
MD's speed as much as the labels.

This script replays each scheme's labels offline, in the order the trainer labelled them
(``FrameStore.labelled_frames``), with the trainer's own learning schedule and nothing else:

  after every label   the readout posterior conditioned on every label so far (the trainer's
                      readout-only version);
  every EVERY labels  ``refine_backbone`` (STEPS Adam steps on all MACE weights, anchored at
                      the start model's weights, the start model's fit frames replayed), then
                      the readout prior re-centred at the readout it was refined with and
                      conditioned on every label on the new features (``Trainer.maybe_update``).

The held-out TS force RMSE after each label gives the learning curve against reference calls,
"calls to reach the target" is the first N where it is at or below the target, and the ratio
c / a is printed for every biased scheme found. The target is bench_onthefly's (half-way from
the start model to the lastlayer floor on the TS frames, computed here). The labels are the
ones the live run chose (so the selection, the bias and the rate cap are what is compared);
only the timing of their learning is replaced. Deterministic for given labels (seeded Adam
mini-batches).

A control (``--control N``) runs the same schedule on N frames the start model was fitted on
(the first ``--fit-frames`` of the replay file, in a seeded random order) as if they were new
labels: the same Adam steps with no new information. Where the control reaches the target too,
the target measures the refinement's extra training, not the labels; the gain of a scheme over
the control at the same label count is what its labels added.

The TS energy RMSE is also split into its spread over the TS frames and the barrier's error
(the TS frames' mean error minus that of the held-out basin frames, the replay file's frames
after ``--fit-frames``): for one molecule a shift of all energies changes the RMSE and nothing
else, while the barrier's error moves populations.

    python benchmarks/bench_label_value.py RUN_DIR [--model M] [--steps 300] [--every 5]
                                           [--control 20]

RUN_DIR: a bench_onthefly folder (RAREFLY_BENCH_DIR) with an a_paper/ folder and one or more
biased scheme folders (c_ts/, c_metad2d/, c_metad/), each with its frames.db.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402  (after the thread setting)


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DATA = HERE / "data"
KCAL = 0.0433641043  # eV
SCHEMES = ("a_paper", "b_periodic", "c_metad2d", "c_metad", "c_ts")


def replay_curve(start, labels, origins, ts, replay, steps: int, every: int, lr: float,
                 log=print, basin=()) -> list[dict]:
    """The trainer's schedule on ``labels`` (in labelling order) from the model ``start``:
    one point per label, TS force and energy RMSE after it. With ``basin`` (held-out basin
    frames of the same molecule) also the TS energy error split into its spread (std over
    the TS frames) and its mean relative to the basin's mean error (the barrier's error): a
    shift of every energy of a fixed composition moves the RMSE but no force and no
    population."""
    from check_refinement import evaluate

    post = copy.deepcopy(start)
    anchor = {k: v.detach().clone() for k, v in post.backbone.model.named_parameters()}
    prior_mean, prior_cov = post.mean.detach().clone(), post.cov.detach().clone()
    blocks, since, out = None, 0, []
    for n, (frame, origin) in enumerate(zip(labels, origins), start=1):
        t0 = time.time()
        blocks = post.add_blocks(blocks, post.design([frame]))
        post.condition(blocks, prior_mean, prior_cov)
        since += 1
        refined = False
        if steps > 0 and since >= every:
            post.model_version += 1                       # the trainer's seed varies with it
            post.refine_backbone(labels[:n], steps, lr=lr, anchor=anchor, replay=replay)
            prior_mean = post.mean.detach().clone()       # re-centred at the refined readout
            blocks = post.design(labels[:n])              # the features changed: every label
            post.condition(blocks, prior_mean, prior_cov)
            since, refined = 0, True
        m = evaluate(post, ts, post.settings.epsilon)
        f, e = m["f_rmse"], m["e_rmse"]
        point = {"n": n, "origin": origin, "f": f, "e": e, "refined": refined}
        split = ""
        if basin:
            point["e_std"] = float(np.sqrt(max(e ** 2 - m["e_mean"] ** 2, 0.0)))
            point["barrier"] = m["e_mean"] - evaluate(post, basin, post.settings.epsilon)["e_mean"]
            split = f" (spread {point['e_std']:.3f}, barrier {point['barrier']:+.3f})"
        out.append(point)
        log(f"    {n:3d} {origin:8s} TS F {f:.4f} eV/A  E {e:.3f} eV{split}"
            f"{'  (refined)' if refined else ''}  {time.time() - t0:5.1f} s")
    return out


def reached(curve, target: float, flagged_only: bool = False):
    k = 0
    for p in curve:
        k += (p["origin"] != "audit") if flagged_only else 1
        if p["f"] <= target:
            return k
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="bench_onthefly folder holding a_paper/ and c_*/")
    ap.add_argument("--model", type=Path, default=DATA / "ala2_c7eq_thermal_ft2000_misfit.rfly",
                    help="the start model of the live run (default: %(default)s)")
    ap.add_argument("--replay", type=Path, default=DATA / "ala2_c7eq_thermal_xtb.xyz",
                    help="the fit frames replayed in every refinement (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=300, help="Adam steps per refinement ([learning] "
                    "backbone_steps; default %(default)s)")
    ap.add_argument("--every", type=int, default=5, help="labels between refinements ([learning] "
                    "backbone_every; default %(default)s)")
    ap.add_argument("--lr", type=float, default=1e-3, help="refinement learning rate (default %(default)s)")
    ap.add_argument("--epsilon-kcal", type=float, default=4.0)
    ap.add_argument("--control", type=int, default=0, metavar="N",
                    help="also replay N of the start model's own fit frames as labels (no new "
                    "information; default: no control)")
    ap.add_argument("--fit-frames", type=int, default=140,
                    help="how many leading frames of --replay the start model was fitted on "
                    "(its `rarefly fit --max-frames`; default %(default)s)")
    ap.add_argument("--schemes", nargs="+", default=None, choices=SCHEMES,
                    help="default: every scheme folder found in RUN")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    import bench_onthefly as bo
    from rarefly.data_io import read_frames
    from rarefly.posterior import load_posterior
    from rarefly.trainer.store import FrameStore

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    schemes = args.schemes or [s for s in SCHEMES if (args.run / s / "frames.db").exists()]
    if "a_paper" not in schemes:
        raise SystemExit(f"bench_label_value: no a_paper/frames.db in {args.run}: the baseline "
                         "is the paper's scheme; give a bench_onthefly folder that ran it")
    t_all = time.time()
    bo.MODEL = args.model.resolve()
    eps = args.epsilon_kcal * KCAL
    s = bo.start_model_numbers(eps)
    target = s["target"]
    ts, replay = read_frames(bo.TS), read_frames(args.replay)
    basin = replay[args.fit_frames:]           # held out of the start model's fit
    start = load_posterior(args.model)
    start.settings.epsilon = eps
    print(f"bench_label_value.py {args.run} ({time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)")
    print(f"start model {args.model.name}; replay {args.replay.name} ({len(replay)} frames); "
          f"refinement: {args.steps} Adam steps (lr {args.lr:g}) every {args.every} labels")
    print(f"TS frames: {len(ts)}; start {s['ts_start']:.4f} eV/A, lastlayer floor {s['ts_floor']:.4f}; "
          f"TARGET {target:.4f} eV/A (bench_onthefly's)")
    curves = {}
    for name in schemes:
        store = FrameStore(args.run / name / "frames.db")
        labels = store.labelled_frames()
        rows = sorted(store.rows(state="labelled"), key=lambda r: (r.get("labelled_at", 0), r.id))
        origins = [r.get("origin") for r in rows]
        assert len(origins) == len(labels)
        rejected = sum(str(r.get("reason", "")).startswith("label not learned")
                       for r in store.rows(state="failed"))
        print(f"  {name}: {len(labels)} labels ({origins.count('audit')} audit)"
              f"{f', {rejected} refused by max_label_force' if rejected else ''}", flush=True)
        t0 = time.time()
        curves[name] = replay_curve(start, labels, origins, ts, replay, args.steps, args.every,
                                    args.lr, log=lambda m: print(m, flush=True), basin=basin)
        print(f"  {name}: replayed in {time.time() - t0:.0f} s", flush=True)
    if args.control:
        pick = np.random.default_rng(0).permutation(min(args.fit_frames, len(replay)))[:args.control]
        print(f"  control: {len(pick)} of the start model's {args.fit_frames} fit frames as labels",
              flush=True)
        t0 = time.time()
        curves["control"] = replay_curve(start, [replay[int(i)] for i in pick],
                                         ["fit"] * len(pick), ts, replay, args.steps, args.every,
                                         args.lr, log=lambda m: print(m, flush=True), basin=basin)
        print(f"  control: replayed in {time.time() - t0:.0f} s", flush=True)

    print("\nlearning curve, replayed: TS force RMSE (eV/A) after N labels (* = after a refinement)")
    for name, c in curves.items():
        print(f"  {name:11s} " + " ".join(f"{p['n']}:{p['f']:.3f}{'*' if p['refined'] else ''}"
                                          for p in c))
    print("learning curve, replayed: TS energy RMSE (eV) after N labels")
    for name, c in curves.items():
        print(f"  {name:11s} " + " ".join(f"{p['n']}:{p['e']:.3f}" for p in c))
    if basin:
        print(f"  split: spread (std over the TS frames) / barrier (TS mean error minus the mean "
              f"error on {len(basin)} held-out basin frames), eV")
        for name, c in curves.items():
            print(f"  {name:11s} " + " ".join(f"{p['n']}:{p['e_std']:.3f}/{p['barrier']:+.3f}"
                                              for p in c))
    print(f"\n{'scheme':11s} {'labels':>6s} {'audit':>5s} {'N@tgt':>6s} {'flagged@tgt':>11s} "
          f"{'F best':>7s} {'F last':>7s}")
    res = {}
    for name, c in curves.items():
        n, nf = reached(c, target), reached(c, target, flagged_only=True)
        res[name] = (n, nf, len(c), sum(p["origin"] != "audit" for p in c), min(p["f"] for p in c))
        print(f"{name:11s} {len(c):6d} {sum(p['origin'] == 'audit' for p in c):5d} "
              f"{n if n else '-':>6} {nf if nf else '-':>11} {res[name][4]:7.4f} {c[-1]['f']:7.4f}")
    print(f"\ntotal {time.time() - t_all:.0f} s\n")
    a = res["a_paper"]
    ctl = curves.get("control")
    if ctl:
        n = reached(ctl, target)
        if n:
            print(f"CONTROL (no new information) reaches the target after {n} labels: at this "
                  "target the count measures the refinement's extra training, not the labels")
        else:
            print(f"CONTROL (no new information) does not reach the target within {len(ctl)} "
                  f"labels (best {res['control'][4]:.4f} eV/A)")
        for name, c in curves.items():
            if name == "control":
                continue
            gains = [f"{p['n']}:{q['f'] - p['f']:+.3f}" for p, q in zip(c, ctl)]
            print(f"  {name} below the control at equal labels (eV/A): " + " ".join(gains))
    for name in curves:
        if name in ("a_paper", "control"):
            continue
        c = res[name]
        for unit, nc, na, ca, aa in (("labels", c[0], a[0], c[2], a[2]),
                                     ("flagged labels", c[1], a[1], c[3], a[3])):
            print(bo.target1(name, nc, na, ca, aa, target, c[4], a[4], unit=unit, how="replayed"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
