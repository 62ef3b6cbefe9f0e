"""Rare events with the uncertainty CV: alanine dipeptide C7eq -> C7ax, unbiased vs biased.

System: alanine dipeptide (ACE-ALA-NME, 22 atoms) in vacuum, benchmarks/data/alanine_dipeptide.xyz
(source named in the file). Reference: GFN2-xTB (tblite). Model: `rarefly fit --foundation small
--kind lastlayer` on xTB-labelled frames of a short xTB Langevin MD in the C7eq basin only
(phi < 0), generated here and cached in benchmarks/data/ (ala2_c7eq_xtb.xyz, ala2_c7eq.rfly).

Runs, all with stock i-PI + `rarefly driver --cv` + PLUMED (PyCV) at the same temperature,
timestep, thermostat and number of steps, each starting from the same structure:
  unbiased   PLUMED only prints (sigma_E, phi, psi)
  metad      well-tempered METAD on sigma_E                  (plumed_inputs/metad.dat)
  metad_2d   well-tempered METAD on (sigma_E, phi)            (plumed_inputs/metad_2d.dat)
  hal        linear bias -tau*sigma_E + upper wall on sigma_E (plumed_inputs/hal.dat)
  udd        bounded A[exp(-sigma^2/B^2) - 1]                 (plumed_inputs/udd.dat)
The bias parameters (eV) are set from the unbiased run's sigma_E (mean s0, std ds), as the
inputs' "Scale" notes say.

Measured per run: barrier crossings per 10,000 steps (state L: -180 < phi < -30 deg, the C7eq
side; state R: 30 < phi < 130 deg, C7ax; a crossing is a change of state, other phi keep the
last state: hysteresis), the fraction of frames near the transition state (|phi| < 30 deg),
the physical temperature (i-PI's `temperature`, mean and std, K), sigma_E (mean, max) and the
wall time.

    python benchmarks/bench_rare_events.py [--steps 300] [--temperature 300] [--only NAME ...]

Output: a table on stdout (committed as bench_rare_events.out); run folders under
/tmp/rarefly_bench_rare_events/.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = HERE / "data"
INIT = DATA / "alanine_dipeptide.xyz"
FRAMES = DATA / "ala2_c7eq_xtb.xyz"
MODEL = DATA / "ala2_c7eq.rfly"
WORK = Path(os.environ.get("RAREFLY_BENCH_DIR", "/tmp/rarefly_bench_rare_events"))
BIN = Path(sys.executable).parent
PHI, PSI = "5,7,9,15", "7,9,15,17"  # 1-based, the usual 22-atom order
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
           PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


# ------------------------------------------------------------------ data and model


def xtb_frames(n_steps: int = 400, stride: int = 10, temperature: float = 300.0) -> None:
    """Short GFN2-xTB Langevin MD from the C7eq structure; every stride-th frame labelled."""
    import ase.io
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.optimize import BFGS
    from tblite.ase import TBLite

    atoms = ase.io.read(INIT)
    atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
    BFGS(atoms, logfile=None).run(fmax=0.05, steps=200)
    ase.io.write(DATA / "ala2_c7eq_min.xyz", atoms, format="extxyz")
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature,
                                 rng=np.random.default_rng(7))
    md = Langevin(atoms, 1.0 * units.fs, temperature_K=temperature, friction=0.02,
                  rng=np.random.default_rng(8))
    frames = []
    for step in range(n_steps):
        md.run(1)
        if step % stride == stride - 1:
            a = atoms.copy()
            a.info["REF_energy"] = atoms.get_potential_energy()
            a.arrays["REF_forces"] = atoms.get_forces()
            a.info["phi_deg"] = atoms.get_dihedral(4, 6, 8, 14, mic=False)
            frames.append(a)
    phis = [((f.info["phi_deg"] + 180) % 360) - 180 for f in frames]
    print(f"xTB MD: {len(frames)} frames, phi {min(phis):.0f} .. {max(phis):.0f} deg")
    ase.io.write(FRAMES, frames, format="extxyz")


def build_model() -> None:
    if not FRAMES.exists():
        xtb_frames()
    subprocess.run([str(BIN / "rarefly"), "fit", "--foundation", "small", "--data",
                    str(FRAMES), "-o", str(MODEL), "--kind", "lastlayer"],
                   check=True, env=ENV, stdout=subprocess.DEVNULL)


# ------------------------------------------------------------------ one i-PI run

XML = """<simulation verbosity="low">
  <output prefix="simulation">
    <properties filename="out" stride="1"> [ step, temperature{{kelvin}}, potential{{electronvolt}}, ensemble_bias{{electronvolt}} ] </properties>
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>{seed}</seed></prng>
  <ffsocket name="rarefly" mode="unix" pbc="false">
    <address>{name}</address><latency>1e-4</latency>
  </ffsocket>
  <ffplumed name="plumed"><file mode="ase">init.xyz</file><plumed_dat>plumed.dat</plumed_dat></ffplumed>
  <system>
    <initialize nbeads="1">
      <file mode="ase">init.xyz</file>
      <cell mode="abc" units="angstrom"> [30.0, 30.0, 30.0] </cell>
      <velocities mode="thermal" units="kelvin">{temperature}</velocities>
    </initialize>
    <forces><force forcefield="rarefly"/></forces>
    <ensemble><temperature units="kelvin">{temperature}</temperature>
      <bias><force forcefield="plumed" nbeads="1"/></bias></ensemble>
    <motion mode="dynamics"><dynamics mode="nvt">
      <timestep units="femtosecond">{dt}</timestep>
      <thermostat mode="langevin"><tau units="femtosecond">50</tau></thermostat>
    </dynamics></motion>
  </system>
  <smotion mode="metad"><metad><metaff>[plumed]</metaff></metad></smotion>
</simulation>
"""

HEAD = f"""UNITS LENGTH=A ENERGY=eV
LOAD FILE=__RAREFLY_PYCV__
sigma: PYCVINTERFACE ATOMS=@mdatoms IMPORT=rarefly.cv INIT=init CALCULATE=calculate
phi: TORSION ATOMS={PHI}
psi: TORSION ATOMS={PSI}
"""


def bias_inputs(s0: float, ds: float, temperature: float) -> dict[str, str]:
    """PLUMED bias lines per run, scaled to the unbiased sigma_E (mean s0, std ds, eV)."""
    width = max(ds, 1e-3)
    kt = 8.617e-5 * temperature
    metad = (f"metad: METAD ARG=sigma SIGMA={width:.4g} HEIGHT={kt:.4g} PACE=10 "
             f"BIASFACTOR=10 TEMP={temperature} FILE=HILLS\n"
             "PRINT ARG=sigma,phi,psi,metad.bias STRIDE=1 FILE=COLVAR\n")
    metad2 = (f"metad: METAD ARG=sigma,phi SIGMA={width:.4g},0.35 HEIGHT={kt:.4g} PACE=10 "
              f"BIASFACTOR=10 TEMP={temperature} FILE=HILLS\n"
              "PRINT ARG=sigma,phi,psi,metad.bias STRIDE=1 FILE=COLVAR\n")
    # linear: tau such that a rise of sigma_E by 4 ds lowers the energy by ~4 kT; the wall
    # at s0 + 10 ds keeps the walker out of wildly unphysical regions
    tau = kt / width
    hal = (f"hal: CUSTOM ARG=sigma VAR=s FUNC=-{tau:.4g}*s PERIODIC=NO\nBIASVALUE ARG=hal\n"
           f"wall: UPPER_WALLS ARG=sigma AT={s0 + 10 * width:.4g} KAPPA={100 * kt / width**2:.4g} EXP=2\n"
           "PRINT ARG=sigma,phi,psi,hal,wall.bias STRIDE=1 FILE=COLVAR\n")
    # bounded: depth A = 10 kT, B such that the force peaks at sigma = s0 + 3 ds
    b = np.sqrt(2.0) * (s0 + 3 * width)
    udd = (f"udd: CUSTOM ARG=sigma VAR=s FUNC={10 * kt:.4g}*(exp(-s^2/{b:.4g}^2)-1) PERIODIC=NO\n"
           "BIASVALUE ARG=udd\nPRINT ARG=sigma,phi,psi,udd STRIDE=1 FILE=COLVAR\n")
    return {"metad": metad, "metad_2d": metad2, "hal": hal, "udd": udd}


def run_one(name: str, bias: str, steps: int, temperature: float, dt: float) -> dict:
    from rarefly.cv import render_plumed_input

    d = WORK / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    shutil.copy(DATA / "ala2_c7eq_min.xyz", d / "init.xyz")
    (d / "plumed.dat").write_text(render_plumed_input(HEAD + bias))
    sock = f"rfbench_{name}"
    (d / "input.xml").write_text(XML.format(steps=steps, seed=2024, name=sock,
                                            temperature=temperature, dt=dt))
    Path(f"/tmp/ipi_{sock}").unlink(missing_ok=True)
    env = dict(ENV, RAREFLY_CV_ENDPOINT=f"ipc:///tmp/rarefly-cv-{sock}")
    t0 = time.perf_counter()
    with open(d / "ipi.log", "w") as log, open(d / "driver.log", "w") as dlog:
        ipi = subprocess.Popen([str(BIN / "i-pi"), "input.xml"], cwd=d, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
        drv = subprocess.Popen([str(BIN / "rarefly"), "driver", "--model", str(MODEL),
                                "--template", "init.xyz", "-u", "-a", sock, "--cv", "-q"],
                               cwd=d, env=env, stdout=dlog, stderr=subprocess.STDOUT)
        rc = ipi.wait()
        drv.wait(timeout=60)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{name}: i-PI failed, see {d / 'ipi.log'}")
    return analyse(d, wall)


def colvar(path: Path) -> dict[str, np.ndarray]:
    lines = path.read_text().splitlines()
    fields = next(ln for ln in lines if ln.startswith("#! FIELDS")).split()[2:]
    data = np.loadtxt([ln for ln in lines if not ln.startswith("#")], ndmin=2)
    return dict(zip(fields, data.T))


def crossings(phi_deg: np.ndarray) -> int:
    """State changes between L (-180 < phi < -30) and R (30 < phi < 130), with hysteresis."""
    state, n = None, 0
    for p in phi_deg:
        new = "L" if p < -30 else ("R" if 30 < p < 130 else None)
        if new is not None:
            if state is not None and new != state:
                n += 1
            state = new
    return n


def analyse(d: Path, wall: float) -> dict:
    cv = colvar(d / "COLVAR")
    _, idx = np.unique(cv["time"], return_index=True)  # one row per step
    phi = np.degrees(cv["phi"][idx])
    sigma = cv["sigma"][idx]
    out = np.loadtxt(d / "simulation.out", ndmin=2)
    temp = out[1:, 1]
    n = len(phi)
    return {"steps": n, "crossings": crossings(phi), "rate": crossings(phi) * 1e4 / n,
            "ts": float(np.mean(np.abs(phi) < 30)), "phi_max": float(phi.max()),
            "in_R": float(np.mean((phi > 30) & (phi < 130))),
            "T": float(temp.mean()), "T_std": float(temp.std()),
            "sigma_mean": float(sigma.mean()), "sigma_std": float(sigma.std()),
            "sigma_max": float(sigma.max()), "wall": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--temperature", type=float, default=300.0)
    ap.add_argument("--dt", type=float, default=1.0, help="fs")
    ap.add_argument("--only", nargs="*", help="biased runs to do (default: all)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    if not MODEL.exists():
        build_model()
    print(f"model: {MODEL.name} (lastlayer on `small`, fitted on {FRAMES.name}); "
          f"data+model {time.perf_counter() - t0:.0f} s (0 if cached)")
    print(f"MD: i-PI NVT, Langevin tau 50 fs, {args.temperature:.0f} K, dt {args.dt} fs, "
          f"{args.steps} steps per run, start from the xTB-minimised C7eq structure")
    results = {"unbiased": run_one("unbiased", "PRINT ARG=sigma,phi,psi STRIDE=1 FILE=COLVAR\n",
                                   args.steps, args.temperature, args.dt)}
    s0, ds = results["unbiased"]["sigma_mean"], results["unbiased"]["sigma_std"]
    print(f"unbiased sigma_E: mean {s0:.4f} eV, std {ds:.4f} eV (bias parameters scale with these)")
    for name, bias in bias_inputs(s0, ds, args.temperature).items():
        if args.only and name not in args.only:
            continue
        print(f"--- {name}:\n{bias.rstrip()}")
        results[name] = run_one(name, bias, args.steps, args.temperature, args.dt)

    base = results["unbiased"]["rate"]
    print()
    print(f"{'run':10s} {'steps':>6s} {'cross':>6s} {'per 1e4':>8s} {'ratio':>7s} "
          f"{'TS frac':>8s} {'C7ax frac':>9s} {'max phi':>8s} {'T mean':>7s} {'T std':>6s} "
          f"{'sigma':>7s} {'sig max':>7s} {'wall s':>7s}")
    for name, r in results.items():
        ratio = (f"{r['rate'] / base:7.1f}" if base > 0 else
                 ("    inf" if r["rate"] > 0 else "      -"))
        print(f"{name:10s} {r['steps']:6d} {r['crossings']:6d} {r['rate']:8.1f} {ratio} "
              f"{r['ts']:8.3f} {r['in_R']:9.3f} {r['phi_max']:8.1f} {r['T']:7.1f} "
              f"{r['T_std']:6.1f} {r['sigma_mean']:7.4f} {r['sigma_max']:7.4f} {r['wall']:7.0f}")
    best = max((r["rate"] for k, r in results.items() if k != "unbiased"), default=0.0)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if base == 0:
        print(f"unbiased: no crossing in {results['unbiased']['steps']} steps, so the ratio to the "
              "unbiased rate is not resolved (a lower bound needs the unbiased rate: order "
              "1e5-1e6 steps at 300 K for C7eq -> C7ax).")
    elif best / base >= 10:
        print(f"target met: best biased rate {best / base:.1f}x the unbiased one")
    else:
        print(f"target missed: best biased rate {best / base:.1f}x the unbiased one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
