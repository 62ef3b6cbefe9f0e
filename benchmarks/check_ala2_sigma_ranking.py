"""Does sigma_E sort the frames an on-the-fly run visits by their error? bench_onthefly.out
found the calibrated sigma_E of the lastlayer model nearly constant along a run (the raw
readout spread is 15-30x smaller than the errors, so the Student-t calibration is one scale
factor) and the models trusting none of the frames they are right on. This check measures,
per model file and frame set, how well sigma_E ranks the energy errors:

- ``rho``: Spearman rank correlation of sigma_E with |E error|;
- ``AUC``: the probability that a frame with |E error| > epsilon has a larger sigma_E than one
  within epsilon (0.5: no better than chance);
- ``cov@0.95``: P(|E error| < epsilon) over the frames the model trusts (confidence >= 0.95),
  with their number: what target 2 of issue 4 asks of the audit frames.

Frame sets: ``md`` = benchmarks/data/ala2_onthefly_md_xtb.xyz, 120 frames of the 14th
bench_onthefly run's trajectories (60 random frames each of a_paper and c_ts, the frames the
offline audit labels), GFN2-xTB labelled; ``basin-test`` = the last 35 thermal xTB frames
(check_ala2_start_model.py); ``TS`` = the 15 transition-region frames. Build the md set once
from run folders with ``--from-runs DIR ...`` (committed afterwards).

    python benchmarks/check_ala2_sigma_ranking.py benchmarks/data/ala2_c7eq_thermal_ft.rfly [MODEL ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
MD_SET = DATA / "ala2_onthefly_md_xtb.xyz"
THERMAL = DATA / "ala2_c7eq_thermal_xtb.xyz"
TS = DATA / "ala2_ts_xtb.xyz"
START = DATA / "ala2_c7eq_min.xyz"
EPS_KCAL = 4.0
LEVEL = 0.95


def build_md_set(run_dirs: list[Path], per_run: int = 60, seed: int = 7) -> None:
    """Random frames of each run's i-PI trajectory (the offline audit's pick), xTB-labelled."""
    import ase.io
    from tblite.ase import TBLite

    species = ase.io.read(START).get_chemical_symbols()
    out = []
    for d in run_dirs:
        frames = ase.io.read(d / "simulation.pos_0.xyz", index=":", format="xyz")
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(frames), size=min(per_run, len(frames)), replace=False)
        for i in sorted(pick):
            a = frames[i]
            a.set_chemical_symbols(species)
            a.pbc = False
            a.cell = None
            a.calc = TBLite(method="GFN2-xTB", verbosity=0)
            try:
                e, f = a.get_potential_energy(), a.get_forces()
            except Exception:  # noqa: BLE001 - a blown-up geometry: left out, counted
                print(f"{d.name} frame {i}: xTB failed, left out")
                continue
            a.calc = None
            a.info.update({"REF_energy": float(e), "source": f"{d.name} frame {i} (every 10 steps)"})
            a.arrays["REF_forces"] = np.asarray(f)
            out.append(a)
    ase.io.write(MD_SET, out, format="extxyz")
    print(f"wrote {MD_SET.relative_to(HERE.parent)}: {len(out)} frames from "
          + ", ".join(str(d) for d in run_dirs))


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half."""
    pos, neg = score[positive], score[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", type=Path, help="rarefly model files to check")
    ap.add_argument("--from-runs", nargs="+", type=Path,
                    help="build the md frame set from these bench_onthefly run folders first")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="The TorchScript type system")  # model loading
    t0 = time.time()
    if args.from_runs:
        build_md_set(args.from_runs)
    import ase.io
    import torch
    from scipy.stats import spearmanr

    torch.set_num_threads(1)
    from rarefly.posterior import load_posterior
    from rarefly.posterior.base import LabelledFrame, predict_in_chunks
    from rarefly.prediction import Structure
    from rarefly.units import KCAL_MOL_TO_EV

    eps = EPS_KCAL * KCAL_MOL_TO_EV

    def labelled(path, sl=slice(None)):
        return [LabelledFrame(Structure.from_atoms(a), a.info["REF_energy"], a.arrays["REF_forces"])
                for a in ase.io.read(path, ":")[sl]]

    sets = {"md": labelled(MD_SET), "basin-test": labelled(THERMAL, slice(140, None)),
            "TS": labelled(TS)}
    print(f"python benchmarks/check_ala2_sigma_ranking.py {' '.join(str(m) for m in args.models)}"
          f"   ({time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {os.cpu_count()} CPUs, "
          f"1 torch thread)")
    print(f"epsilon = {EPS_KCAL:g} kcal/mol = {eps * 1000:.1f} meV; frames: "
          + ", ".join(f"{k} {len(v)}" for k, v in sets.items()))
    print(f"{'model':28s} {'set':10s} {'E err':>7s} {'spread':>7s} {'cov':>5s} {'sigma_E':>8s} "
          f"{'raw':>7s} {'rho':>6s} {'AUC':>5s} {'cov@0.95':>12s} {'s/frame':>8s}")
    for path in args.models:
        post = load_posterior(path)
        post.settings.epsilon = eps
        name = f"{path.name} ({post.kind})"
        for set_name, frames in sets.items():
            t1 = time.perf_counter()
            preds = predict_in_chunks(post, [f.structure for f in frames])
            dt = (time.perf_counter() - t1) / len(frames)
            de = np.array([p.energy - post.offset_energy(f.structure.numbers, f.energy)
                           for p, f in zip(preds, frames)])
            sig = np.array([p.energy_sigma for p in preds])
            raw = np.array([p.extra.get("energy_sigma_raw", np.nan) for p in preds])
            conf = np.array([p.confidence for p in preds])
            err = np.abs(de)
            rho = spearmanr(sig, err).statistic
            trusted = conf >= LEVEL
            cov_t = (f"{np.mean(err[trusted] < eps):.2f} n={trusted.sum():3d}" if trusted.any()
                     else f" -   n=  0")
            print(f"{name:28s} {set_name:10s} {de.mean():+7.3f} {np.std(de):7.3f} "
                  f"{np.mean(err < eps):5.2f} {sig.mean():8.3f} {np.nanmean(raw):7.4f} "
                  f"{rho:+6.2f} {auc(sig, err > eps):5.2f} {cov_t:>12s} {dt:8.3f}")
    print("units: eV; E err = mean signed error (model - xTB), spread = its standard deviation, "
          "cov = P(|E err| < eps) over the set, sigma_E = calibrated, raw = before calibration, "
          "rho = Spearman(sigma_E, |E err|), AUC = P(sigma_E ranks a miss above a hit), "
          "cov@0.95 = cov over the frames with confidence >= 0.95")
    print(f"total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
