"""What does the trainer's backbone refinement do to the transition-state accuracy that the
readout had reached? bench_onthefly.out (runs 18-24): the uncertainty-biased run's readout-
only versions brought the held-out TS force RMSE from 0.186 to 0.161 eV/A after 9 labels, and
its final model, after the backbone refinements, was back at 0.186 (TS energy RMSE 0.108 ->
0.260 eV). This check replays one run's labels offline, the way the trainer learns them, and
compares refinement settings on the same labels:

1. the start model's readout conditioned on every label (readout-only learning);
2. for each variant: that readout, ``refine_backbone`` on every label with the start model's
   fit frames replayed (the trainer's call); then the readout prior re-centred at the refined
   readout and conditioned on every label again (the trainer's ``maybe_update``), and
   conditioned on every label and the replay frames' energies (``[learning] replay_energies``).

Reported on three held-out sets: the 15 TS frames (``ala2_ts_xtb.xyz``), the last 35
thermal C7eq xTB frames (``basin``) and the 120 xTB-labelled on-the-fly trajectory frames
(``md``, ``check_ala2_sigma_ranking.py``): energy RMSE and mean signed error, force RMSE,
P(|E err| < epsilon), and the mean raw sigma_E (before calibration).

    python benchmarks/check_refinement.py RUN_DIR [--variants lr=1e-3 lr=1e-3,cosine ...]

RUN_DIR: a bench_onthefly run folder (its ``frames.db``); the start model and replay frames
default to the benchmark's (``--model``, ``--replay``).
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

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
KCAL = 0.0433641043  # eV


def parse_variant(text: str) -> dict:
    """``lr=3e-4,cosine,steps=150[,fitreadout][,joint][,enoise=0.17]`` -> refinement settings
    (``fitreadout``: refined with the start model's readout instead of the one conditioned
    on the labels; ``joint``: the readout trained with the other weights; ``enoise``: the
    energy noise of the refinement's loss in eV instead of the fit's, so that energies weigh
    less against forces)."""
    out = {"lr": 1e-3, "lr_schedule": "constant", "steps": 150, "from_start": False,
           "energy_noise": None, "train_readout": False}
    for part in filter(None, text.split(",")):
        if part in ("cosine", "constant"):
            out["lr_schedule"] = part
        elif part == "fitreadout":     # refine with the start model's readout, not the labels'
            out["from_start"] = True
        elif part == "joint":          # the readout trained with the other weights
            out["train_readout"] = True
        elif "=" in part:
            k, v = part.split("=", 1)
            if k not in ("lr", "steps", "enoise"):
                raise SystemExit(f"check_refinement: unknown variant key {k!r} in {text!r}")
            if k == "enoise":
                out["energy_noise"] = float(v)
            else:
                out[k] = float(v) if k == "lr" else int(v)
        else:
            raise SystemExit(f"check_refinement: cannot read variant {text!r}")
    return out


def evaluate(post, frames, epsilon: float) -> dict:
    from rarefly.posterior.base import predict_in_chunks

    preds = predict_in_chunks(post, [f.structure for f in frames])
    de = np.array([p.energy - post.offset_energy(f.structure.numbers, f.energy)
                   for p, f in zip(preds, frames)])
    df = np.concatenate([(p.forces - f.forces).ravel() for p, f in zip(preds, frames)])
    raw = np.array([p.extra["energy_sigma_raw"] for p in preds])
    return {"e_rmse": float(np.sqrt(np.mean(de ** 2))), "e_mean": float(np.mean(de)),
            "f_rmse": float(np.sqrt(np.mean(df ** 2))), "cov": float(np.mean(np.abs(de) < epsilon)),
            "raw": float(np.mean(raw))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="bench_onthefly run folder (frames.db)")
    ap.add_argument("--model", type=Path, default=DATA / "ala2_c7eq_thermal_ft2000.rfly")
    ap.add_argument("--replay", type=Path, default=DATA / "ala2_c7eq_thermal_xtb.xyz")
    ap.add_argument("--labels", type=int, default=None, help="use the first N labels (default all)")
    ap.add_argument("--epsilon-kcal", type=float, default=4.0)
    ap.add_argument("--variants", nargs="+", default=["lr=1e-3", "lr=1e-3,cosine"])
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    from rarefly.data_io import read_frames
    from rarefly.posterior import load_posterior
    from rarefly.trainer.store import FrameStore

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    t0 = time.time()
    eps = args.epsilon_kcal * KCAL
    labels = FrameStore(args.run / "frames.db").labelled_frames()[:args.labels]
    replay = read_frames(args.replay)
    sets = {"TS": read_frames(DATA / "ala2_ts_xtb.xyz"), "basin": read_frames(args.replay)[-35:],
            "md": read_frames(DATA / "ala2_onthefly_md_xtb.xyz")}
    start = load_posterior(args.model)
    start.settings.epsilon = eps
    start_mean, start_cov = start.mean.detach().clone(), start.cov.detach().clone()
    anchor = {k: v.detach().clone() for k, v in start.backbone.model.named_parameters()}
    print(f"check_refinement.py {args.run} ({len(labels)} labels; start model {args.model.name}; "
          f"replay {args.replay.name}, {len(replay)} frames; {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)")
    print(f"epsilon = {args.epsilon_kcal:g} kcal/mol = {1000 * eps:.1f} meV; units eV and eV/A; "
          "cov = P(|E err| < eps); raw = mean sigma_E before calibration")
    head = f"{'model':34s}" + "".join(f" | {n:>5s} E rmse  mean  F rmse   cov    raw" for n in sets)
    print(head)

    def row(name, post):
        cells = []
        for frames in sets.values():
            m = evaluate(post, frames, eps)
            cells.append(f" | {m['e_rmse']:12.3f} {m['e_mean']:+.3f} {m['f_rmse']:7.4f} "
                         f"{m['cov']:5.2f} {m['raw']:.4f}")
        print(f"{name:34s}" + "".join(cells), flush=True)

    row("start model", start)
    blocks = start.design(labels)
    readout_only = copy.deepcopy(start)
    readout_only.condition(blocks, start_mean, start_cov)
    row("readout only (all labels)", readout_only)
    for text in args.variants:
        kw = parse_variant(text)
        post = copy.deepcopy(start if kw["from_start"] else readout_only)
        t1 = time.time()
        fit_noise = post.fit_noise
        if kw["energy_noise"] is not None:
            post.fit_noise = (kw["energy_noise"], fit_noise[1])
        post.refine_backbone(labels, kw["steps"], lr=kw["lr"], anchor=anchor, replay=replay,
                             lr_schedule=kw["lr_schedule"], train_readout=kw["train_readout"])
        post.fit_noise = fit_noise
        if getattr(post, "density", None) is not None:   # the trainer's _rebuild_density
            post.fit_density(list(replay) + list(labels))
        refined_readout = post.mean.detach().clone()
        row(f"refined {text} ({time.time() - t1:.0f} s)", post)
        blocks = post.design(labels)
        post.condition(blocks, refined_readout, start_cov)
        row("  + readout on the labels", post)
        post.condition(post.add_blocks(blocks, post.design(replay, forces=False)),
                       refined_readout, start_cov)
        row("  + readout on labels, replay energies", post)
    print(f"total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
