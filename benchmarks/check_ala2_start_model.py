"""Is the one-basin alanine-dipeptide model of the rare-event and on-the-fly benchmarks good
enough? Both benchmarks found it wrong far beyond its sigma_E (bench_rare_events.out,
bench_onthefly.out). This check compares, on the same held-out frames, the model those
benchmarks use (``benchmarks/data/ala2_c7eq.rfly``: lastlayer on ``small``, 40 frames of a
cold 400-step xTB run, made by bench_rare_events.py) with a model fitted the same way on
thermalised frames: a 4,000-step GFN2-xTB Langevin run at 300 K from the same minimum,
500 steps of equilibration dropped, every 20th frame kept (175 frames; the first 140 fitted,
the last 35 held out as "basin-test").

A third model: the thermal frames again, with all MACE weights fine-tuned first
(``rarefly fit --finetune-steps``), written to benchmarks/data/ala2_c7eq_thermal_ft.rfly for
``bench_onthefly.py --model``.

Test sets: basin-test (above) and the 15 transition-region frames of bench_onthefly.py
(benchmarks/data/ala2_ts_xtb.xyz, phi held at -30..30 deg). Printed per model and set: the mean
energy error, its spread about the mean, the force RMSE, mean sigma_E and the share of frames
with |E error| < 2 sigma_E.

    python benchmarks/check_ala2_start_model.py      # ~1-2 minutes on 2 cores
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
WORK = Path(os.environ.get("RAREFLY_BENCH_DIR", "/tmp/rarefly_check_ala2"))
TUNED_MODEL = DATA / "ala2_c7eq_thermal_ft.rfly"     # git-ignored, rebuilt by this script
THERMAL = DATA / "ala2_c7eq_thermal_xtb.xyz"         # committed; the first 140 are fitted
FINETUNE_STEPS = 300


def thermal_frames(path: Path, steps: int = 4000, skip: int = 500, stride: int = 20) -> None:
    import warnings

    import ase.io
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from tblite.ase import TBLite

    atoms = ase.io.read(DATA / "ala2_c7eq_min.xyz")
    atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
    e_min = atoms.get_potential_energy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(17))
        md = Langevin(atoms, 1.0 * units.fs, temperature_K=300, friction=0.02,
                      rng=np.random.default_rng(18))
    frames = []
    for step in range(steps):
        md.run(1)
        if step >= skip and step % stride == stride - 1:
            a = atoms.copy()
            a.info["REF_energy"] = atoms.get_potential_energy()
            a.arrays["REF_forces"] = atoms.get_forces()
            frames.append(a)
    above = np.mean([f.info["REF_energy"] - e_min for f in frames])
    print(f"xTB 300 K: {len(frames)} frames, mean energy {above:.3f} eV above the minimum")
    ase.io.write(path, frames, format="extxyz")


def main() -> int:
    t0 = time.time()
    import ase.io
    import torch

    torch.set_num_threads(1)
    from rarefly.posterior import build_posterior, load_posterior
    from rarefly.posterior.base import LabelledFrame
    from rarefly.prediction import Structure

    WORK.mkdir(parents=True, exist_ok=True)
    old_model = DATA / "ala2_c7eq.rfly"
    if not old_model.exists():  # git-ignored: rebuilt from the committed frames
        sys.path.insert(0, str(HERE))
        import bench_rare_events

        bench_rare_events.build_model()
    frames_path = THERMAL
    if not frames_path.exists():
        thermal_frames(frames_path)

    def labelled(path):
        return [LabelledFrame(Structure.from_atoms(a), a.info["REF_energy"], a.arrays["REF_forces"])
                for a in ase.io.read(path, ":")]

    thermal = labelled(frames_path)
    train, test = thermal[:140], thermal[140:]
    sets = {"basin-test": test, "TS": labelled(DATA / "ala2_ts_xtb.xyz")}
    old_frames = len(ase.io.read(DATA / "ala2_c7eq_xtb.xyz", ":"))
    tuned = build_posterior("small", "lastlayer", train, finetune_steps=FINETUNE_STEPS)
    tuned.save(TUNED_MODEL)
    models = {f"cold ({old_frames} frames)": load_posterior(old_model),
              f"thermal ({len(train)} frames)": build_posterior("small", "lastlayer", train),
              f"thermal + fine-tune": tuned}
    print(f"fine-tune: {FINETUNE_STEPS} Adam steps on all weights (rarefly fit --finetune-steps); "
          f"model written to {TUNED_MODEL.relative_to(HERE.parent)} (bench_onthefly.py --model)")
    print(f"{'model':22s} {'set':10s} {'E err mean':>10s} {'E spread':>9s} {'F rmse':>7s} "
          f"{'sigma_E':>8s} {'|err|<2sig':>10s}")
    for name, post in models.items():
        for set_name, frames in sets.items():
            preds = post.predict([f.structure for f in frames])
            de = np.array([p.energy - post.offset_energy(f.structure.numbers, f.energy)
                           for p, f in zip(preds, frames)])
            fe = np.sqrt(np.mean([np.mean((p.forces - f.forces) ** 2) for p, f in zip(preds, frames)]))
            sig = np.array([p.energy_sigma for p in preds])
            print(f"{name:22s} {set_name:10s} {de.mean():+10.3f} {np.std(de):9.3f} {fe:7.3f} "
                  f"{sig.mean():8.3f} {np.mean(np.abs(de) < 2 * sig):10.2f}")
    print("units: eV and eV/A; E spread = standard deviation of the energy error over the set")
    print(f"total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
