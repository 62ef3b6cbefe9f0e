"""The uncertainty CV inside a real i-PI server with the real PLUMED kernel and PyCV.

Every PLUMED input in plumed_inputs/ runs in a short i-PI simulation; the PLUMED-applied
bias force is checked against finite differences of the bias energy; a path-integral run
evaluates the centroid CV once per step; killing the service stops i-PI with a sentence.

The physical forces come from i-PI's own <ffdirect> GFN2-xTB (tblite); sigma_E comes from
rarefly.cv_service serving the analytic double of test_cv_service.py (exact gradient).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rarefly import cv as rcv
from rarefly import cv_service as cs
from rarefly.prediction import Structure
from test_cv_service import AnalyticSigma, unique_endpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
INPUTS = REPO / "plumed_inputs"
IPI = Path(sys.executable).with_name("i-pi")
BOX_A = 20.0
STEPS = 40  # two METAD hills at PACE=20


def ethanol_xyz(path: Path, positions: np.ndarray | None = None) -> Structure:
    """Write ethanol in i-PI's xyz format (Angstrom, 20 A box); return the structure."""
    from ase.build import molecule

    atoms = molecule("CH3CH2OH")
    atoms.cell = [BOX_A] * 3
    atoms.center()
    if positions is not None:
        atoms.positions = positions
    write_frames(path, atoms.get_chemical_symbols(), [atoms.positions])
    return Structure(atoms.numbers, atoms.positions.copy())


def write_frames(path: Path, symbols, frames) -> None:
    with open(path, "w") as f:
        for pos in frames:
            f.write(f"{len(symbols)}\n# CELL(abcABC): {BOX_A} {BOX_A} {BOX_A} 90.0 90.0 90.0 "
                    "cell{angstrom} positions{angstrom}\n")
            for s, p in zip(symbols, pos):
                f.write(f"{s} {p[0]:.12f} {p[1]:.12f} {p[2]:.12f}\n")


def ipi_xml(steps: int = STEPS, nbeads: int = 1, seed: int = 12345,
            replay: str | None = None, socket: str | None = None, batch: int = 1) -> str:
    """i-PI input: xTB physics (or a socket driver at the UNIX ``socket``), PLUMED as the
    bias (or, with ``replay``, as the only force).

    The metad <smotion> is needed for every bias: without it i-PI never runs PLUMED's update
    phase, so PRINT writes nothing and METAD deposits nothing.
    """
    phys = ('<ffdirect name="phys"><pes>xtb</pes>'
            '<parameters>{template: init.xyz, method: GFN2-xTB}</parameters></ffdirect>')
    if socket:
        phys = (f'<ffsocket name="phys" mode="unix" pbc="false"><address>{socket}</address>'
                f'<latency>1e-4</latency><batch_size>{batch}</batch_size></ffsocket>')
    plumed = ('<ffplumed name="plumed"><file mode="xyz">init.xyz</file>'
              '<plumed_dat>plumed.dat</plumed_dat></ffplumed>')
    if replay:
        forces, bias = '<force forcefield="plumed"/>', ""
        motion = f'<motion mode="replay"><file mode="xyz">{replay}</file></motion>'
        outputs = ('<properties stride="1" filename="out">[step, potential]</properties>'
                   '<trajectory stride="1" filename="pos" format="ase">positions</trajectory>'
                   '<trajectory stride="1" filename="for" format="ase">forces</trajectory>')
        phys = ""
    else:
        forces = '<force forcefield="phys"/>'
        bias = '<bias><force forcefield="plumed" nbeads="1"/></bias>'
        thermostat = "pile_l" if nbeads > 1 else "langevin"
        motion = ('<motion mode="dynamics"><dynamics mode="nvt">'
                  '<timestep units="femtosecond">0.5</timestep>'
                  f'<thermostat mode="{thermostat}"><tau units="femtosecond">100</tau>'
                  '</thermostat></dynamics></motion>')
        outputs = ('<properties stride="1" filename="out">[step, temperature{kelvin}, '
                   'potential{electronvolt}, ensemble_bias{electronvolt}]</properties>')
    smotion = ('<smotion mode="metad"><metad><metaff>[plumed]</metaff></metad></smotion>'
               if not replay else "")
    return f"""<simulation verbosity="low">
  <output prefix="sim">{outputs}</output>
  <total_steps>{steps}</total_steps>
  <prng><seed>{seed}</seed></prng>
  {phys}
  {plumed}
  <system>
    <initialize nbeads="{nbeads}"><file mode="xyz">init.xyz</file>
      <velocities mode="thermal" units="kelvin">300</velocities></initialize>
    <forces>{forces}</forces>
    <ensemble><temperature units="kelvin">300</temperature>{bias}</ensemble>
    {motion}
  </system>
  {smotion}
</simulation>
"""


def ipi_env(endpoint: str, timeout_s: float = 30.0) -> dict:
    return dict(os.environ, RAREFLY_CV_ENDPOINT=endpoint, RAREFLY_CV_TIMEOUT=str(timeout_s),
                OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def prepare(run_dir: Path, plumed_input: str, values: dict | None = None, **xml) -> Structure:
    run_dir.mkdir(parents=True, exist_ok=True)
    from ase import Atoms

    ref = ethanol_xyz(run_dir / "init.xyz")
    text = rcv.render_plumed_input((INPUTS / plumed_input).read_text(), values,
                                   structure=Atoms(numbers=ref.numbers, positions=ref.positions))
    (run_dir / "plumed.dat").write_text(text)
    (run_dir / "input.xml").write_text(ipi_xml(**xml))
    return ref


def run_ipi(run_dir: Path, endpoint: str, timeout: float = 50.0,
            cv_timeout: float = 30.0) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(IPI), "input.xml"], cwd=run_dir,
                          env=ipi_env(endpoint, cv_timeout), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def colvar(path: Path) -> dict[str, np.ndarray]:
    lines = path.read_text().splitlines()
    fields = lines[0].split()[2:]
    data = np.loadtxt([ln for ln in lines if not ln.startswith("#")], ndmin=2)
    return dict(zip(fields, data.T))


def kill_driver_and_wait(driver, ipi, timeout: float = 40.0) -> tuple[str, float]:
    """SIGKILL the driver (or the CV service); i-PI's output and the seconds it took to stop
    after the kill."""
    driver.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    out = ipi.communicate(timeout=timeout)[0]
    return out, time.monotonic() - killed


def reap(*procs) -> None:
    """Kill what is still running (a failed test) and wait for every process."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def data_lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


@pytest.fixture
def double_service():
    from ase.build import molecule

    atoms = molecule("CH3CH2OH")
    atoms.cell = [BOX_A] * 3
    atoms.center()
    template = Structure(atoms.numbers, atoms.positions.copy())
    with cs.CVService(AnalyticSigma(template), unique_endpoint(), template=template) as svc:
        yield svc


# ----------------------------------------------------------------- every PLUMED input


SINGLE_WALKER = {  # input -> file that must grow with hills/kernels (None: static bias)
    "metad.dat": "HILLS",
    "opes.dat": "KERNELS",
    "udd.dat": None,
    "hal.dat": None,
    "upper_wall.dat": None,
    "metad_2d.dat": "HILLS",
    "opes_2d.dat": "KERNELS",
    "metad_bond_walls.dat": "HILLS",
}


def test_all_inputs_are_covered():
    assert sorted(p.name for p in INPUTS.glob("*.dat")) == sorted(
        [*SINGLE_WALKER, "metad_walkers.dat"])
    for path in INPUTS.glob("*.dat"):
        text = path.read_text()
        assert "UNITS LENGTH=A ENERGY=eV" in text, path.name
        assert "IMPORT=rarefly.cv" in text and "ATOMS=@mdatoms" in text, path.name
        assert "PRINT ARG=sigma" in text and "FILE=COLVAR" in text, path.name


@pytest.mark.parametrize("name", sorted(SINGLE_WALKER))
def test_plumed_input_runs_in_ipi(tmp_path, double_service, name):
    grows = SINGLE_WALKER[name]
    prepare(tmp_path, name)
    plumed = tmp_path / "plumed.dat"
    if name == "upper_wall.dat":  # let the wall act within a short run (sigma ~ 0.01-0.05 eV)
        plumed.write_text(plumed.read_text().replace("AT=0.2 ", "AT=0.02 "))
    if name == "metad_bond_walls.dat":  # ethanol's bonds: X-H 1.09-1.10 A, C-C 1.51 A
        plumed.write_text(plumed.read_text().replace("AT=1.35,1.9 ", "AT=1.05,1.45 "))
    run_ipi(tmp_path, double_service.endpoint)
    cv = colvar(tmp_path / "COLVAR")
    sigma = cv["sigma"]
    assert len(sigma) >= STEPS and np.all(np.isfinite(sigma))
    assert np.all(sigma >= 0.01 - 1e-6) and sigma.max() > sigma[0]  # the double: s0 = 0.01 eV
    if grows:
        assert len(data_lines(tmp_path / grows)) >= STEPS // 20
    # the bias i-PI applied (eV) is the bias PLUMED printed next to sigma_E (eV), step by step
    ipi_bias = np.loadtxt(tmp_path / "sim.out", ndmin=2)[:, 3]
    plumed_bias = sum(v for k, v in cv.items() if k not in ("time", "sigma", "phys"))
    steps = cv["time"].round().astype(int)
    same = steps % 20 != 0 if grows else np.ones(len(steps), bool)  # i-PI reports a deposition
    np.testing.assert_allclose(ipi_bias[steps][same], plumed_bias[same], atol=2e-6)  # step after
    assert np.any(plumed_bias != 0.0)
    if name == "metad_bond_walls.dat":  # the walls act on the longest bond of each kind
        bonds = np.loadtxt(data_lines(tmp_path / "BONDS"), ndmin=2)
        want = (50 * np.maximum(bonds[:, 1] - 1.05, 0) ** 2 + 50 * np.maximum(bonds[:, 2] - 1.45, 0) ** 2)
        np.testing.assert_allclose(cv["bondwall.bias"], want, atol=1e-5)
        assert cv["bondwall.bias"].min() > 0.01
    # i-PI asks PLUMED twice per step at the same positions: one request per step
    assert double_service.stats["requests"] <= STEPS + 2


def test_multiple_walkers_share_one_bias(tmp_path, double_service):
    """Walker 1 runs first; walker 0 then starts with walker 1's hills in its bias and adds
    its own to the shared directory (sequential runs keep the check deterministic)."""
    outs = []
    for i in (1, 0):
        wdir = tmp_path / f"walker{i}"
        prepare(wdir, "metad_walkers.dat", {"WALKERS_N": 2, "WALKER_ID": i}, seed=100 + i,
                steps=40)
        outs.append(run_ipi(wdir, double_service.endpoint).stdout)
        assert len(data_lines(tmp_path / f"HILLS.{i}")) == 2  # PACE=20, 40 steps
    other = np.loadtxt(data_lines(tmp_path / "HILLS.1"), ndmin=2)
    own = np.loadtxt(data_lines(tmp_path / "HILLS.0"), ndmin=2)
    cv = colvar(tmp_path / "walker0" / "COLVAR")
    # at step 20 walker 0 deposits its first hill and reads HILLS.1 (WALKERS_RSTRIDE=20):
    # from step 21 on, its bias is its own hill plus walker 1's first hill(s)
    rows = (cv["time"] > 20) & (cv["time"] <= 40)
    mine = own[own[:, 0] < 21]
    alone = np.array([metad_bias(x, mine) for x in cv["sigma"][rows]])
    assert np.abs(cv["metad.bias"][rows] - alone).max() > 1e-4  # walker 1's hills count
    matches = [np.abs(cv["metad.bias"][rows] - [metad_bias(x, np.vstack([mine, other[:n]]))
                                                 for x in cv["sigma"][rows]]).max() < 2e-6
               for n in range(1, len(other) + 1)]
    assert any(matches)


def metad_bias(s: float, hills: np.ndarray, biasfactor: float = 10.0) -> float:
    """Well-tempered METAD bias at s from HILLS rows (time, center, width, height, biasf).

    PLUMED writes height * biasf / (biasf - 1) and uses "stretched" Gaussians that reach
    zero at (s - center)^2 / (2 width^2) = 6.25.
    """
    center, width, height = hills[:, 1], hills[:, 2], hills[:, 3]
    scale = (biasfactor - 1.0) / biasfactor
    half_d2 = 0.5 * ((s - center) / width) ** 2
    cut = np.exp(-6.25)
    kernel = np.where(half_d2 < 6.25, (np.exp(-half_d2) - cut) / (1.0 - cut), 0.0)
    return float(np.sum(scale * height * kernel))


# --------------------------------------------------------------- the bias force is right


def test_bias_force_matches_finite_differences(tmp_path, double_service):
    """udd.dat on a static configuration: F = -dV/dsigma dsigma/dR = -(FD of V)."""
    from rarefly.units import HARTREE_TO_EV

    rng = np.random.default_rng(3)
    ref = prepare(tmp_path, "udd.dat", replay="replay.xyz", steps=0)
    base = ref.positions + 0.04 * rng.standard_normal(ref.positions.shape)
    h = 1e-3  # A; i-PI prints the potential with 9 digits
    frames = [base]
    for k in range(base.size):
        for sign in (1, -1):
            p = base.copy().ravel()
            p[k] += sign * h
            frames.append(p.reshape(-1, 3))
    from ase.build import molecule

    symbols = molecule("CH3CH2OH").get_chemical_symbols()
    write_frames(tmp_path / "init.xyz", symbols, [base])
    write_frames(tmp_path / "replay.xyz", symbols, frames)
    (tmp_path / "input.xml").write_text(ipi_xml(steps=len(frames), replay="replay.xyz"))
    run_ipi(tmp_path, double_service.endpoint)

    pot = np.loadtxt(tmp_path / "sim.out", ndmin=2)[:, 1] * HARTREE_TO_EV
    pos = read_frames(tmp_path / "sim.pos_0.extxyz", "positions")  # format="ase": A, eV/A
    force = read_frames(tmp_path / "sim.for_0.extxyz", "forces")
    # match i-PI's steps to the replayed frames by their positions
    index = [int(np.argmin(np.abs(pos - f).max(axis=(1, 2)))) for f in frames]
    assert all(np.abs(pos[i] - f).max() < 1e-6 for i, f in zip(index, frames))
    v = pot[index]
    fd = -(v[1::2] - v[2::2]) / (2 * h)
    f_plumed = force[index[0]].ravel()

    sigma, grad, _ = double_service.predictor.sigma(Structure(ref.numbers, base))
    a, b = 0.5, 0.05  # udd.dat: V = A (exp(-s^2/B^2) - 1)
    assert v[0] == pytest.approx(a * (np.exp(-sigma**2 / b**2) - 1), rel=1e-6)
    dv_ds = -2 * a * sigma / b**2 * np.exp(-sigma**2 / b**2)
    analytic = -dv_ds * grad.ravel()
    scale = np.abs(analytic).max()
    assert scale > 0.05  # eV/A: the check is not vacuous
    np.testing.assert_allclose(f_plumed, analytic, atol=1e-5 * scale)  # PLUMED's Bohr: 1e-9
    np.testing.assert_allclose(f_plumed, fd, atol=2e-4 * scale)


def read_frames(path: Path, quantity: str) -> np.ndarray:
    """One array of an i-PI ``format="ase"`` trajectory (8 decimals, ASE units), (frames, N, 3)."""
    import ase.io

    frames = ase.io.read(path, ":", format="extxyz")
    if quantity == "positions":
        return np.array([a.positions for a in frames])
    return np.array([a.calc.results[quantity] if a.calc else a.arrays[quantity]
                     for a in frames])


# ------------------------------------------------------------- the driver's own cache


def test_driver_loop_answers_the_cv_from_its_cache(tmp_path, double_service):
    """rarefly.client.serve with the service's hooks: PLUMED's requests are all cache hits."""
    from rarefly.client import serve

    socket = f"rarefly-cv-test-{os.getpid()}"
    ref = prepare(tmp_path, "metad.dat", socket=socket)
    summary = {}
    driver = threading.Thread(target=lambda: summary.update(done=serve(
        double_service.guarded(), ref.numbers, address=socket, unix=True, connect_timeout=30,
        on_prediction=double_service.remember)), daemon=True)
    driver.start()
    run_ipi(tmp_path, double_service.endpoint)
    driver.join(10)
    stats = double_service.stats
    assert "done" in summary and summary["done"].structures == STEPS + 1
    assert len(colvar(tmp_path / "COLVAR")["sigma"]) == STEPS
    assert stats["evaluations"] == 0 and stats["hits"] == stats["requests"] == STEPS + 1


# ------------------------------------------------------------------- path integrals


def test_path_integral_centroid_is_evaluated_once_per_step(tmp_path, double_service):
    steps = 20
    prepare(tmp_path, "metad.dat", nbeads=4, steps=steps)
    run_ipi(tmp_path, double_service.endpoint)
    cv = colvar(tmp_path / "COLVAR")
    assert len(cv["sigma"]) == steps
    # the centroid is new every step: one model evaluation per step (+ the initial one),
    # and i-PI's second PLUMED call at the same centroid costs no request at all
    assert double_service.stats["evaluations"] == steps + 1
    assert double_service.stats["requests"] == steps + 1
    assert len(data_lines(tmp_path / "HILLS")) == 1


# ----------------------------------------------------------------- a dead driver


def test_killing_the_service_stops_ipi_with_a_clear_message(tmp_path):
    endpoint = unique_endpoint()
    prepare(tmp_path, "metad.dat", steps=100000)
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("test_cv_service.py")),
                               endpoint], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ipi = None
    try:
        # the service must be up before i-PI's first request times out (2 s): wait for it
        deadline = time.monotonic() + 30
        while True:
            try:
                cs.request(endpoint, cs.encode_op("ping"), timeout_s=0.5)
                break
            except TimeoutError:
                assert time.monotonic() < deadline and server.poll() is None
        ipi = subprocess.Popen([str(IPI), "input.xml"], cwd=tmp_path,
                               env=ipi_env(endpoint, timeout_s=2.0),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        colvar_file = tmp_path / "COLVAR"
        while not (colvar_file.exists() and len(data_lines(colvar_file)) >= 3):
            assert ipi.poll() is None and time.monotonic() < deadline + 30
            time.sleep(0.05)
        out, elapsed = kill_driver_and_wait(server, ipi, timeout=30)
    finally:
        server.kill()
        server.wait()
        if ipi is not None and ipi.poll() is None:
            ipi.kill()
            ipi.wait()
    assert ipi.returncode != 0
    assert elapsed < 2.0 + 8.0, elapsed  # the CV timeout, then i-PI's own exit
    assert f"no answer from the rarefly driver at {endpoint} within 2 s" in out


def test_killing_the_driver_stops_ipi_waiting_for_forces(tmp_path):
    """The whole driver (socket client + CV service) dies: i-PI, blocked on the forces,
    would wait forever; the CV's watchdog stops it with the sentence and status 1."""
    endpoint, socket = unique_endpoint(), f"rarefly-cvkill-{os.getpid()}"
    prepare(tmp_path, "metad.dat", steps=100000, socket=socket)
    ipi = subprocess.Popen([str(IPI), "input.xml"], cwd=tmp_path,
                           env=ipi_env(endpoint, timeout_s=2.0), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    driver = subprocess.Popen([sys.executable, str(Path(__file__).with_name("test_cv_service.py")),
                               endpoint, socket], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 40
        while not ((tmp_path / "sim.out").exists()
                   and len(data_lines(tmp_path / "sim.out")) >= 10):
            assert ipi.poll() is None and driver.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        out, elapsed = kill_driver_and_wait(driver, ipi)
    finally:
        reap(driver, ipi)
    assert ipi.returncode == 1, out[-3000:]
    assert elapsed < 2.0 + 10.0, elapsed
    assert f"no answer from the rarefly driver at {endpoint} within 2 s" in out
