"""Does the lastlayer energy variance tell near frames from far ones, with and without the
misfit term (``rarefly fit --misfit-variance``, :mod:`rarefly.posterior.feature_density`)?

bench_onthefly.out (runs 28-29): after a backbone refinement the uncertainty-biased run's model
had the same raw sigma_E on basin, transition-state and far frames, so its calibration either
trusted nothing or trusted frames it was wrong on. This check takes a run folder's final model,
its labels and its trajectory, and on four sets (every trajectory frame, xTB-labelled here; the
15 held-out TS frames; the last 35 thermal C7eq frames; the 120 on-the-fly MD frames) compares
the raw sigma_E of the model as it is (weight variance only) with the same model given the
feature density of its fit frames and labels (what the trainer holds after a refinement):

- mean raw sigma_E per set, and the Spearman rank correlation of sigma_E with |E error|;
- ``z-corr``: the rank correlation of sigma_E with |error| / sigma_E (0 when one scale fits all);
- a calibration emulated without the trainer: one scale ``k = rms(|error| / sigma_E)`` over the
  30 % most uncertain frames (the frames a run flags), or over all; a frame is trusted when
  ``epsilon > 1.96 k sigma_E`` (a Gaussian 95 % interval); then the fraction trusted and the
  coverage P(|error| < epsilon) among the trusted, overall and per set.

    python benchmarks/check_misfit_variance.py RUN_DIR [--model FILE]

RUN_DIR: a bench_onthefly run folder (``model.rfly``, ``frames.db``, ``simulation.pos_0.xyz``);
its trajectory's xTB labels are cached in ``RUN_DIR/trajectory_xtb.xyz``.
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
DATA = HERE / "data"
KCAL = 0.0433641043  # eV


def trajectory_labels(run: Path):
    """Every trajectory frame of the run, xTB-labelled (cached as extxyz in the run folder)."""
    import ase.io
    from tblite.ase import TBLite

    from rarefly.data_io import read_frames

    cache = run / "trajectory_xtb.xyz"
    if not cache.exists():
        species = ase.io.read(DATA / "ala2_c7eq_min.xyz").get_chemical_symbols()
        out = []
        calc = TBLite(method="GFN2-xTB", verbosity=0)
        for a in ase.io.read(run / "simulation.pos_0.xyz", index=":", format="xyz"):
            a.set_chemical_symbols(species)
            a.pbc = False
            a.calc = calc
            try:
                e, f = a.get_potential_energy(), a.get_forces()
            except Exception:  # noqa: BLE001 - xTB fails on a blown-up geometry: left out
                calc = TBLite(method="GFN2-xTB", verbosity=0)
                continue
            b = a.copy()
            b.info["REF_energy"] = e
            b.arrays["REF_forces"] = f
            out.append(b)
        ase.io.write(cache, out, format="extxyz")
    return read_frames(cache)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="bench_onthefly run folder")
    ap.add_argument("--model", type=Path, help="model file (default: RUN/model.rfly)")
    ap.add_argument("--replay", type=Path, default=DATA / "ala2_c7eq_thermal_xtb.xyz",
                    help="the fit frames, replayed by the trainer's refinements")
    ap.add_argument("--epsilon-kcal", type=float, default=4.0)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import torch
    from scipy.stats import spearmanr

    from rarefly.data_io import read_frames
    from rarefly.posterior import load_posterior
    from rarefly.posterior.base import predict_in_chunks
    from rarefly.trainer.store import FrameStore

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    t0 = time.time()
    eps = args.epsilon_kcal * KCAL
    model = args.model or args.run / "model.rfly"
    labels = FrameStore(args.run / "frames.db").labelled_frames()
    replay = read_frames(args.replay)
    sets = {"traj": trajectory_labels(args.run), "TS": read_frames(DATA / "ala2_ts_xtb.xyz"),
            "basin": replay[-35:], "md": read_frames(DATA / "ala2_onthefly_md_xtb.xyz")}
    post = load_posterior(model)
    post.settings.epsilon = eps
    print(f"check_misfit_variance.py {args.run} (model {model}; {len(labels)} labels; density from "
          f"{args.replay.name} ({len(replay)} frames) and the labels; "
          f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {torch.get_num_threads()} torch threads)")
    print(f"epsilon = {args.epsilon_kcal:g} kcal/mol = {1000 * eps:.1f} meV; sets: "
          + ", ".join(f"{k} {len(v)}" for k, v in sets.items()))
    err = {k: None for k in sets}
    variants = [("weight variance only", None), ("with the misfit variance", "density")]
    for name, kind in variants:
        if kind is None:
            post.density = None
        else:
            post.fit_density(list(replay) + list(labels))
        sig = {}
        for k, frames in sets.items():
            preds = predict_in_chunks(post, [f.structure for f in frames])
            sig[k] = np.array([p.extra["energy_sigma_raw"] for p in preds])
            if err[k] is None:
                err[k] = np.abs([p.energy - post.offset_energy(f.structure.numbers, f.energy)
                                 for p, f in zip(preds, frames)])
        e_all = np.concatenate(list(err.values()))
        s_all = np.concatenate(list(sig.values()))
        z = e_all / s_all
        print(f"\n{name}: mean raw sigma_E (eV) " + "  ".join(f"{k} {sig[k].mean():.4f}" for k in sets)
              + f"; within epsilon " + "  ".join(f"{k} {np.mean(err[k] < eps):.2f}" for k in sets))
        print(f"  spearman(sigma, |err|) {spearmanr(s_all, e_all)[0]:+.2f}   "
              f"z-corr {spearmanr(s_all, z)[0]:+.2f}   log-sigma spread {np.std(np.log(s_all)):.2f}")
        for label, sel in (("top 30 %", s_all >= np.quantile(s_all, 0.7)),
                           ("all", np.ones_like(s_all, bool))):
            k = float(np.sqrt(np.mean(z[sel] ** 2)))
            trusted = eps > 1.96 * k * s_all
            cov = float(np.mean(e_all[trusted] < eps)) if trusted.any() else float("nan")
            per = []
            for n in sets:
                tr = eps > 1.96 * k * sig[n]
                c = float(np.mean(err[n][tr] < eps)) if tr.any() else float("nan")
                per.append(f"{n} {tr.mean():.2f}/{c:.2f}")
            print(f"  scale from {label:8s} k = {k:6.2f}: trusted {trusted.mean():.2f}, coverage "
                  f"{cov:.2f}  (per set trusted/coverage: {', '.join(per)})")
    print(f"\ntotal {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
