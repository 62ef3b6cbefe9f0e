#!/usr/bin/env python
"""Build rarefly's embedded small MACE "foundation" model from scratch.

The recipe, end to end (about 8 CPU-minutes on one core; 10-16 minutes of wall time on a
shared 2-core machine, training being most of it):

1. Data. Small closed-shell H/C/N/O molecules (<= 12 atoms) from ASE's G2 set are relaxed
   with GFN2-xTB (tblite), then sampled with short Langevin MD at two temperatures plus a
   few random rattles of the minimum. Every configuration is labelled with GFN2-xTB energy
   (eV) and forces (eV/A). Per-molecule stratified split into train/valid/test (80/10/10),
   written as extxyz with ``REF_energy`` (info) and ``REF_forces`` (arrays).
2. E0s. Isolated-atom GFN2-xTB energies in the atoms' ground-state spin multiplicity
   (H doublet, C triplet, N quartet, O triplet); if tblite fails on an atom, all E0s fall
   back to per-element least-squares averages of the training energies.
3. Training. A small ScaleShiftMACE is trained on CPU with mace's own trainer
   (``mace.cli.run_train``, energy+forces loss, stage two with higher energy weight at the
   end). Checkpoints, logs and results go to a scratch directory (under /tmp by default),
   never into the repository.
4. Outputs, in --out-dir (default driver/rarefly/data):
     foundation_train.xyz, foundation_valid.xyz, foundation_test.xyz   the labelled data
     foundation-small.model   the trained model (torch.save of a mace ScaleShiftMACE, float64)
     foundation-small.json    recipe settings, atomic numbers, r_max, split sizes and the
                              test-set RMSEs measured by evaluating the saved model
     ethanol.xyz              one xTB-relaxed ethanol molecule (the demo system)

Regenerate everything with:

    .venv/bin/python scripts/make_foundation.py

``--skip-data`` reuses existing xyz files (training only); ``--skip-train`` stops after
writing the data. Run ``--help`` for all settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "driver" / "rarefly" / "data"

# Closed-shell G2 molecules with only H, C, N, O and at most 12 atoms.
MOLECULES = [
    # hydrocarbons
    "H2", "CH4", "C2H2", "C2H4", "C2H6", "C3H8", "C3H6_Cs", "C3H6_D3h", "C3H4_C3v",
    "C3H4_D2d", "butadiene", "2-butyne", "cyclobutene", "isobutene",
    # oxygen
    "H2O", "H2O2", "CO", "CO2", "CH3OH", "CH3CH2OH", "CH3OCH3", "H2CO", "CH3CHO",
    "HCOOH", "CH3COOH", "HCOOCH3", "CH3COCH3", "H2CCO", "CH2OCH2", "OCHCHO",
    "C2H6CHOH", "CH3CH2OCH3", "C4H4O",
    # nitrogen (and N+O)
    "N2", "NH3", "N2H4", "HCN", "NCCN", "H3CNH2", "CH3CN", "H2CCHCN", "CH2NHCH2",
    "CH3CH2NH2", "C2H6NH", "C4H4NH", "CH3CONH2", "CH3NO2", "CH3ONO", "N2O",
]
ALLOWED_Z = (1, 6, 7, 8)
# Ground-state spin (number of unpaired electrons) of the isolated atoms.
ATOM_UHF = {1: 1, 6: 2, 7: 3, 8: 2}
DEMO_MOLECULE = "CH3CH2OH"

log = logging.getLogger("make_foundation")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(
            "Generate GFN2-xTB data for small H/C/N/O molecules, train rarefly's small "
            "ScaleShiftMACE 'foundation' model with mace's trainer, evaluate it and write "
            "the model, data and a JSON recipe/metrics file into --out-dir."
        ),
        epilog="Example: .venv/bin/python scripts/make_foundation.py --seed 0",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("general")
    g.add_argument("--out-dir", type=Path, default=DEFAULT_OUT,
                   help="where the model, json and xyz files are written")
    g.add_argument("--work-dir", type=Path, default=None,
                   help="scratch dir for mace checkpoints/logs/results "
                        "(default: a fresh temporary dir under /tmp, removed at the end)")
    g.add_argument("--keep-work-dir", action="store_true",
                   help="do not delete the scratch dir at the end")
    g.add_argument("--seed", type=int, default=0, help="seed for MD, rattles, split and training")
    g.add_argument("--threads", type=int, default=1,
                   help="torch/OpenMP threads for training and evaluation. 1 is the default: "
                        "on a shared 2-core machine 2 threads spin in OpenMP barriers and ran "
                        "10x slower per batch; use 2 on an idle machine")
    g.add_argument("--skip-data", action="store_true",
                   help="reuse the existing foundation_{train,valid,test}.xyz in --out-dir")
    g.add_argument("--skip-train", action="store_true", help="stop after writing the data")

    d = p.add_argument_group("data generation (GFN2-xTB via tblite)")
    d.add_argument("--temperatures", type=float, nargs="+", default=[300.0, 500.0],
                   help="Langevin MD temperatures (K); one trajectory per temperature")
    d.add_argument("--timestep", type=float, default=0.5, help="MD time step (fs)")
    d.add_argument("--friction", type=float, default=0.02, help="Langevin friction (1/fs)")
    d.add_argument("--equil-steps", type=int, default=40, help="MD steps before sampling")
    d.add_argument("--sample-every", type=int, default=15, help="MD steps between snapshots")
    d.add_argument("--samples-per-temp", type=int, default=8,
                   help="snapshots per molecule and temperature")
    d.add_argument("--n-rattle", type=int, default=4,
                   help="random rattles of the relaxed geometry per molecule")
    d.add_argument("--rattle-stdev", type=float, default=0.02,
                   help="rattle amplitude (A, per Cartesian component; larger values put "
                        "tens of eV/A on triple bonds)")
    d.add_argument("--demo-factor", type=int, default=3,
                   help=f"multiply the sampling of the demo molecule ({DEMO_MOLECULE}) by this")
    d.add_argument("--fmax", type=float, default=0.01, help="relaxation threshold (eV/A)")
    d.add_argument("--valid-fraction", type=float, default=0.1)
    d.add_argument("--test-fraction", type=float, default=0.1)

    m = p.add_argument_group("MACE model and training (mace.cli.run_train)")
    m.add_argument("--r-max", type=float, default=5.0, help="cutoff radius (A)")
    m.add_argument("--num-interactions", type=int, default=2)
    m.add_argument("--hidden-irreps", default="32x0e+32x1o")
    m.add_argument("--max-L", type=int, default=1)
    m.add_argument("--max-ell", type=int, default=2,
                   help="spherical-harmonics order of the edges (3 made the file 7.6 MB instead "
                        "of 1.3 MB: the symmetric-contraction U matrices grow as (max_ell+1)^6)")
    m.add_argument("--correlation", type=int, default=3)
    m.add_argument("--MLP-irreps", dest="mlp_irreps", default="16x0e")
    m.add_argument("--num-radial-basis", type=int, default=8)
    m.add_argument("--train-dtype", choices=["float32", "float64"], default="float64",
                   help="dtype used during training; the saved model is always float64")
    m.add_argument("--batch-size", type=int, default=8)
    m.add_argument("--lr", type=float, default=0.01)
    m.add_argument("--max-epochs", type=int, default=25)
    m.add_argument("--start-stage-two", type=int, default=None,
                   help="epoch at which mace's stage two (energy weight up) starts "
                        "(default: 70%% of --max-epochs)")
    m.add_argument("--energy-weight", type=float, default=100.0,
                   help="stage-one energy weight; with isolated-atom E0s the model has ~eV/atom "
                        "of composition-dependent energy to learn, and 1 left 100+ meV/atom")
    m.add_argument("--forces-weight", type=float, default=100.0)
    m.add_argument("--stage-two-energy-weight", type=float, default=1000.0)
    m.add_argument("--stage-two-forces-weight", type=float, default=100.0)
    m.add_argument("--model-name", default="foundation-small",
                   help="basename of the .model/.json outputs")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- data


def _xtb():
    from tblite.ase import TBLite

    return TBLite(method="GFN2-xTB", verbosity=0)


def _labelled(atoms, name: str, kind: str):
    """Copy of ``atoms`` with its xTB energy/forces stored under REF_* keys."""
    a = atoms.copy()
    a.calc = None
    a.info = {"REF_energy": float(atoms.get_potential_energy()), "molecule": name,
              "sample": kind}
    a.arrays["REF_forces"] = np.asarray(atoms.get_forces(), dtype=float).copy()
    for key in ("momenta", "masses", "initial_magmoms", "initial_charges"):
        a.arrays.pop(key, None)
    return a


def relax(name: str, fmax: float):
    from ase.build import molecule
    from ase.optimize import BFGS

    atoms = molecule(name)
    atoms.calc = _xtb()
    BFGS(atoms, logfile=None).run(fmax=fmax, steps=500)
    return atoms


def sample_molecule(name: str, args, rng: np.random.Generator) -> tuple[list, object]:
    """Relaxed minimum + Langevin MD snapshots + rattles, all labelled with GFN2-xTB."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md import velocitydistribution as vd

    factor = args.demo_factor if name == DEMO_MOLECULE else 1
    minimum = relax(name, args.fmax)
    configs = [_labelled(minimum, name, "minimum")]
    for temp in args.temperatures:
        atoms = minimum.copy()
        atoms.calc = _xtb()
        if hasattr(vd, "thermalize_momenta"):  # ase >= 3.29
            vd.thermalize_momenta(atoms, temp, rng=rng)
        else:
            vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temp, rng=rng)
        vd.Stationary(atoms)
        vd.ZeroRotation(atoms)
        # fixcm=False: a free molecule's centre-of-mass drift changes no label
        dyn = Langevin(atoms, args.timestep * units.fs, temperature_K=temp,
                       friction=args.friction / units.fs, fixcm=False, rng=rng)
        dyn.run(args.equil_steps)
        for _ in range(args.samples_per_temp * factor):
            dyn.run(args.sample_every)
            configs.append(_labelled(atoms, name, f"md{temp:.0f}K"))
    for _ in range(args.n_rattle * factor):
        atoms = minimum.copy()
        atoms.positions += rng.normal(scale=args.rattle_stdev, size=atoms.positions.shape)
        atoms.calc = _xtb()
        configs.append(_labelled(atoms, name, "rattle"))
    return configs, minimum


def isolated_atom_energies() -> dict[int, float]:
    from ase import Atoms

    e0s = {}
    for z in ALLOWED_Z:
        atom = Atoms(numbers=[z], positions=[[0.0, 0.0, 0.0]])
        atom.set_initial_magnetic_moments([ATOM_UHF[z]])
        atom.calc = _xtb()
        e0s[z] = float(atom.get_potential_energy())
    return e0s


def least_squares_e0s(configs) -> dict[int, float]:
    counts = np.array([[np.sum(a.numbers == z) for z in ALLOWED_Z] for a in configs], float)
    energies = np.array([a.info["REF_energy"] for a in configs])
    coef, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return {z: float(c) for z, c in zip(ALLOWED_Z, coef)}


def split(groups: dict[str, list], args, rng) -> tuple[list, list, list]:
    """Stratified per molecule; the relaxed minimum always goes to train."""
    train, valid, test = [], [], []
    for name, confs in groups.items():
        head, rest = confs[:1], list(confs[1:])
        order = rng.permutation(len(rest))
        rest = [rest[i] for i in order]
        n_test = max(1, int(round(args.test_fraction * len(confs))))
        n_valid = max(1, int(round(args.valid_fraction * len(confs))))
        test += rest[:n_test]
        valid += rest[n_test:n_test + n_valid]
        train += head + rest[n_test + n_valid:]
    return train, valid, test


def generate_data(args, paths: dict) -> dict:
    from ase.io import write
    from tqdm import tqdm

    rng = np.random.default_rng(args.seed)
    groups, demo = {}, None
    t0 = time.perf_counter()
    for name in (bar := tqdm(MOLECULES, desc="xTB sampling", unit="mol")):
        bar.set_postfix_str(name)
        confs, minimum = sample_molecule(name, args, rng)
        assert set(minimum.numbers) <= set(ALLOWED_Z) and len(minimum) <= 12, name
        groups[name] = confs
        if name == DEMO_MOLECULE:
            demo = minimum
    gen_time = time.perf_counter() - t0
    all_confs = [c for cs in groups.values() for c in cs]
    log.info("generated %d configurations of %d molecules in %.1f s",
             len(all_confs), len(groups), gen_time)

    train, valid, test = split(groups, args, rng)
    for key, confs in (("train", train), ("valid", valid), ("test", test)):
        write(paths[key], confs, format="extxyz")
        log.info("wrote %s (%d configurations, %.0f kB)", paths[key], len(confs),
                 paths[key].stat().st_size / 1024)

    demo_out = demo.copy()
    demo_out.calc = None
    demo_out.info = {}
    for key in list(demo_out.arrays):
        if key not in ("numbers", "positions"):
            del demo_out.arrays[key]
    write(paths["ethanol"], demo_out, format="extxyz")
    log.info("wrote %s (xTB-relaxed ethanol, %d atoms)", paths["ethanol"], len(demo_out))
    return {"generation_time_s": round(gen_time, 1)}


# --------------------------------------------------------------------------- training


def compute_e0s(train) -> tuple[dict[int, float], str]:
    try:
        e0s = isolated_atom_energies()
        if not all(np.isfinite(list(e0s.values()))):
            raise ValueError("non-finite isolated-atom energy")
        return e0s, "isolated atoms, GFN2-xTB, ground-state spin (H 2S+1=2, C 3, N 4, O 3)"
    except Exception as exc:  # tblite failing on an open-shell atom
        log.warning("isolated-atom xTB failed (%s): using least-squares E0s", exc)
        return least_squares_e0s(train), "least-squares per-element average of train energies"


def train_model(args, paths: dict, e0s: dict[int, float], work_dir: Path) -> tuple[Path, float]:
    from tqdm import tqdm

    start_two = args.start_stage_two or max(1, int(0.7 * args.max_epochs))
    name = args.model_name
    cmd = [
        sys.executable, "-c",
        # rarefly first: it allow-lists what e3nn's import needs under torch's safe loading
        "import rarefly, sys; from mace.cli.run_train import main; sys.exit(main())",
        f"--name={name}", f"--seed={args.seed}",
        f"--work_dir={work_dir}", f"--model_dir={work_dir}",
        f"--log_dir={work_dir / 'logs'}", f"--checkpoints_dir={work_dir / 'checkpoints'}",
        f"--results_dir={work_dir / 'results'}",
        "--device=cpu", f"--default_dtype={args.train_dtype}", "--plot=False",
        f"--train_file={paths['train']}", f"--valid_file={paths['valid']}",
        f"--test_file={paths['test']}",
        "--energy_key=REF_energy", "--forces_key=REF_forces",
        "--E0s=" + repr({int(z): float(e) for z, e in e0s.items()}),
        "--model=ScaleShiftMACE", f"--r_max={args.r_max}",
        f"--num_interactions={args.num_interactions}",
        f"--hidden_irreps={args.hidden_irreps}", f"--max_L={args.max_L}",
        f"--max_ell={args.max_ell}", f"--correlation={args.correlation}",
        f"--MLP_irreps={args.mlp_irreps}", f"--num_radial_basis={args.num_radial_basis}",
        "--loss=weighted", f"--energy_weight={args.energy_weight}",
        f"--forces_weight={args.forces_weight}",
        "--swa", f"--start_swa={start_two}",
        f"--swa_energy_weight={args.stage_two_energy_weight}",
        f"--swa_forces_weight={args.stage_two_forces_weight}",
        f"--batch_size={args.batch_size}", f"--valid_batch_size={2 * args.batch_size}",
        f"--lr={args.lr}", f"--max_num_epochs={args.max_epochs}", "--patience=1000",
        "--scheduler_patience=5", "--ema", "--ema_decay=0.99", "--amsgrad",
        "--error_table=PerAtomRMSE", "--eval_interval=1", "--save_cpu",
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONUNBUFFERED="1")
    train_log = work_dir / "train_stdout.log"
    log.info("training with mace.cli.run_train (scratch %s, full log %s)", work_dir, train_log)
    log.debug("command: %s", " ".join(cmd))
    t0 = time.perf_counter()
    epoch_re = re.compile(r"Epoch (\d+):.*?RMSE_E_per_atom=\s*([\d.]+).*?RMSE_F=\s*([\d.]+)")
    with open(train_log, "w") as fh, tqdm(total=args.max_epochs, desc="MACE training",
                                          unit="epoch") as bar:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, cwd=work_dir)
        for line in proc.stdout:
            fh.write(line)
            fh.flush()
            m = epoch_re.search(line)
            if m:
                bar.n = int(m.group(1)) + 1
                bar.set_postfix_str(f"valid E {m.group(2)} meV/at, F {m.group(3)} meV/A")
                bar.refresh()
        rc = proc.wait()
    train_time = time.perf_counter() - t0
    if rc != 0:
        tail = "".join(train_log.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"mace training failed (rc={rc}); last lines:\n{tail}")
    for candidate in (f"{name}_stagetwo.model", f"{name}.model"):
        if (work_dir / candidate).exists():
            log.info("training finished in %.1f s; using %s", train_time, candidate)
            return work_dir / candidate, train_time
    raise FileNotFoundError(f"no {name}*.model in {work_dir}")


def save_model(src: Path, dst: Path) -> dict:
    import torch
    from mace.modules import ScaleShiftMACE

    model = torch.load(src, map_location="cpu", weights_only=False)
    if not isinstance(model, ScaleShiftMACE):
        raise TypeError(f"{src} holds {type(model).__name__}, expected ScaleShiftMACE")
    model = model.to(dtype=torch.float64).cpu().eval()
    torch.save(model, dst)
    log.info("wrote %s (%.0f kB, %d parameters, float64)", dst, dst.stat().st_size / 1024,
             sum(p.numel() for p in model.parameters()))
    return {
        "atomic_numbers": [int(z) for z in model.atomic_numbers.tolist()],
        "r_max": float(model.r_max.item()),
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
    }


def evaluate(model_path: Path, test_path: Path) -> dict:
    from ase.io import read
    from mace.calculators import MACECalculator
    from tqdm import tqdm

    calc = MACECalculator(model_paths=str(model_path), device="cpu", default_dtype="float64")
    de, df, t0 = [], [], time.perf_counter()
    for atoms in tqdm(read(test_path, ":"), desc="test-set evaluation", unit="conf"):
        ref_e, ref_f = atoms.info["REF_energy"], atoms.arrays["REF_forces"]
        atoms.calc = calc
        de.append((atoms.get_potential_energy() - ref_e) / len(atoms))
        df.append((atoms.get_forces() - ref_f).ravel())
    de, df = np.array(de), np.concatenate(df)
    out = {
        "test_energy_rmse_meV_per_atom": round(1000 * float(np.sqrt(np.mean(de**2))), 2),
        "test_force_rmse_meV_per_A": round(1000 * float(np.sqrt(np.mean(df**2))), 2),
        "test_force_mae_meV_per_A": round(1000 * float(np.mean(np.abs(df))), 2),
        "test_eval_time_s": round(time.perf_counter() - t0, 1),
    }
    log.info("test set (%s): energy RMSE %.2f meV/atom, force RMSE %.1f meV/A", test_path,
             out["test_energy_rmse_meV_per_atom"], out["test_force_rmse_meV_per_A"])
    return out


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # xTB on a few atoms gains nothing from threads; training sets its own count.
    os.environ["OMP_NUM_THREADS"] = "1"
    import rarefly  # noqa: F401  (before mace/e3nn: safe-loading fix)

    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"foundation_{k}.xyz" for k in ("train", "valid", "test")}
    paths["ethanol"] = out / "ethanol.xyz"
    model_path = out / f"{args.model_name}.model"
    json_path = out / f"{args.model_name}.json"

    info: dict = {}
    if args.skip_data:
        missing = [str(p) for k, p in paths.items() if not p.exists()]
        if missing:
            raise SystemExit(f"--skip-data but missing: {missing}")
        log.info("reusing data in %s", out)
    else:
        info.update(generate_data(args, paths))
    if args.skip_train:
        return 0

    from ase.io import read

    splits = {k: read(paths[k], ":") for k in ("train", "valid", "test")}
    e0s, e0_method = compute_e0s(splits["train"])
    log.info("E0s (%s): %s", e0_method, {z: round(e, 4) for z, e in e0s.items()})

    tmp = args.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="rarefly-foundation-")) if tmp else args.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        trained, train_time = train_model(args, paths, e0s, work_dir.resolve())
        model_info = save_model(trained, model_path)
    finally:
        if tmp and not args.keep_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    import torch

    torch.set_num_threads(args.threads)
    metrics = evaluate(model_path, paths["test"])

    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("out_dir", "work_dir", "keep_work_dir", "skip_data", "skip_train")}
    record = {
        "model_file": model_path.name,
        "model_class": "mace.modules.ScaleShiftMACE",
        "dtype": "float64",
        "reference": "GFN2-xTB (tblite), energies in eV, forces in eV/A",
        **model_info,
        "E0s_eV": {str(z): e for z, e in e0s.items()},
        "E0s_method": e0_method,
        "molecules": MOLECULES,
        "n_configs": {k: len(v) for k, v in splits.items()},
        "n_atoms": {k: int(sum(len(a) for a in v)) for k, v in splits.items()},
        "data_files": {k: paths[k].name for k in ("train", "valid", "test")},
        "demo_file": paths["ethanol"].name,
        **info,
        "training_time_s": round(train_time, 1),
        **metrics,
        "recipe": recipe,
        "regenerate": "python scripts/make_foundation.py"
                      + ("" if args.seed == 0 else f" --seed {args.seed}"),
        "versions": _versions(),
    }
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("n_configs", "r_max", "atomic_numbers",
                                             "test_energy_rmse_meV_per_atom",
                                             "test_force_rmse_meV_per_A")}, indent=2))
    log.info("wrote %s", json_path)
    return 0


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("mace-torch", "torch", "ase", "tblite", "e3nn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    sys.exit(main())
