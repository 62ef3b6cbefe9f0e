"""The uncertainty CV with a real rarefly posterior (MACE + lastlayer), real PLUMED, real i-PI.

The model is the session's ``model_file`` (a posterior on the shipped foundation model, see
conftest.py) when the shipped files exist, otherwise a small random MACE at its prior built
here: both give sigma_E and its exact gradients through ``Posterior.predict``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from rarefly import cv as rcv
from rarefly import cv_service as cs
from rarefly.prediction import Structure
from test_cv_ipi import (IPI, colvar, data_lines, ipi_env, ipi_xml, kill_driver_and_wait, prepare,
                         read_frames, reap, run_ipi, write_frames)
from test_cv_service import unique_endpoint

pytestmark = pytest.mark.slow
pytest.importorskip("mace")

RESTRAINT = """UNITS LENGTH=A ENERGY=eV
LOAD FILE=__RAREFLY_PYCV__
sigma: PYCVINTERFACE ATOMS=@mdatoms IMPORT=rarefly.cv INIT=init CALCULATE=calculate
RESTRAINT ARG=sigma AT=0.0 KAPPA=2.0
PRINT ARG=sigma STRIDE=1 FILE=COLVAR
"""


def _random_model(path: Path) -> Path:
    import torch
    from e3nn import o3
    from mace import modules

    from rarefly.posterior import create_posterior

    old = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    try:
        block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
        mace = modules.ScaleShiftMACE(
            r_max=4.0, num_bessel=4, num_polynomial_cutoff=5, max_ell=1, interaction_cls=block,
            interaction_cls_first=block, num_interactions=1, num_elements=3,
            hidden_irreps=o3.Irreps("4x0e+4x1o"), MLP_irreps=o3.Irreps("4x0e"),
            gate=torch.nn.functional.silu, atomic_energies=np.array([-13.6, -1030.0, -2040.0]),
            avg_num_neighbors=4.0, atomic_numbers=[1, 6, 8], correlation=2,
            radial_type="bessel", atomic_inter_scale=0.1, atomic_inter_shift=0.0)
        torch.save(mace, path.with_suffix(".mace"))
        create_posterior(str(path.with_suffix(".mace")), "lastlayer").save(path)
    finally:
        torch.set_default_dtype(old)
    return path


@pytest.fixture(scope="module")
def real_model(request, tmp_path_factory) -> Path:
    try:
        return Path(request.getfixturevalue("model_file"))  # the shipped foundation model
    except (pytest.FixtureLookupError, pytest.skip.Exception):
        pass
    with warnings.catch_warnings():  # torch.jit / TorchScript deprecation noise of mace
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return _random_model(tmp_path_factory.mktemp("cvmodel") / "random.rfly")


@pytest.fixture(scope="module")
def posterior(real_model):
    from rarefly.posterior import load_posterior

    with warnings.catch_warnings():  # torch.jit / TorchScript deprecation noise of mace
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return load_posterior(str(real_model))


def test_cv_server_with_the_real_model_gives_the_right_bias_force(tmp_path, real_model,
                                                                   posterior):
    """`rarefly cv-server` + i-PI replay: PLUMED's force on a static configuration equals
    -dV/dsigma dsigma/dR with the model's gradient, and finite differences of V."""
    endpoint = unique_endpoint()
    ref = prepare(tmp_path, "metad.dat", replay="replay.xyz")
    (tmp_path / "plumed.dat").write_text(rcv.render_plumed_input(RESTRAINT))
    server = subprocess.Popen(
        [sys.executable, "-m", "rarefly.cli", "cv-server", "--model", str(real_model),
         "--template", str(tmp_path / "init.xyz"), "--pbc", "no", "--endpoint", endpoint],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        rng = np.random.default_rng(11)
        base = ref.positions + 0.05 * rng.standard_normal(ref.positions.shape)
        h, coords = 1e-3, [0, 4, 8, 13, 20, 26]  # a few coordinates of C, C, O, H atoms
        frames = [base]
        for k in coords:
            for sign in (1, -1):
                p = base.copy().ravel()
                p[k] += sign * h
                frames.append(p.reshape(-1, 3))
        symbols = list("CCOHHHHHH")  # ASE's g2 ethanol, as prepare() wrote it
        write_frames(tmp_path / "init.xyz", symbols, [base])
        write_frames(tmp_path / "replay.xyz", symbols, frames)
        (tmp_path / "input.xml").write_text(ipi_xml(steps=len(frames), replay="replay.xyz"))
        # i-PI starts while the server loads the model: the CV waits for it (bounded)
        run_ipi(tmp_path, endpoint, timeout=58, cv_timeout=50)
    finally:
        server.terminate()
        out = server.communicate(timeout=10)[0]
    assert server.returncode == 0, out
    assert f"serving sigma_E (model version {posterior.model_version}) on {endpoint}" in out

    from rarefly.units import HARTREE_TO_EV

    pot = np.loadtxt(tmp_path / "sim.out", ndmin=2)[:, 1] * HARTREE_TO_EV
    pos = read_frames(tmp_path / "sim.pos_0.extxyz", "positions")
    force = read_frames(tmp_path / "sim.for_0.extxyz", "forces")
    index = [int(np.argmin(np.abs(pos - f).max(axis=(1, 2)))) for f in frames]
    assert all(np.abs(pos[i] - f).max() < 1e-6 for i, f in zip(index, frames))
    v = pot[index]
    pred = posterior.predict([Structure(ref.numbers, base)])[0]
    sigma, grad = pred.energy_sigma, pred.energy_sigma_gradient
    assert v[0] == pytest.approx(sigma**2, rel=1e-5)  # RESTRAINT: V = KAPPA/2 sigma^2
    expected = -2.0 * sigma * grad  # -dV/dsigma dsigma/dR
    f_plumed = force[index[0]]
    scale = np.abs(expected).max()
    assert scale > 1e-3
    np.testing.assert_allclose(f_plumed, expected, atol=1e-4 * scale)
    fd = -(v[1::2] - v[2::2]) / (2 * h)
    np.testing.assert_allclose(f_plumed.ravel()[coords], fd, atol=2e-3 * scale)


def test_driver_loop_with_the_real_model_evaluates_each_step_once(tmp_path, posterior):
    """i-PI <ffsocket> + rarefly.client.serve + the CV service: the model runs once per MD
    step; PLUMED's sigma_E requests are all answered from the driver's cache."""
    from rarefly.client import serve

    class Counting:
        def __init__(self, model):
            self.model, self.calls = model, 0

        def __getattr__(self, name):
            return getattr(self.model, name)

        def predict(self, structures):
            self.calls += len(structures)
            return self.model.predict(structures)

    counting = Counting(posterior)
    socket = f"rarefly-cvm-{os.getpid()}"
    steps = 20
    ref = prepare(tmp_path, "metad.dat", socket=socket, steps=steps)
    with cs.CVService(counting, unique_endpoint(), template=ref) as svc:
        done = {}
        driver = threading.Thread(target=lambda: done.update(summary=serve(
            svc.guarded(), ref.numbers, address=socket, unix=True, connect_timeout=30,
            on_prediction=svc.remember)), daemon=True)
        driver.start()
        run_ipi(tmp_path, svc.endpoint, timeout=55)
        driver.join(10)
    assert done["summary"].structures == steps + 1
    assert counting.calls == steps + 1  # the model: once per step, for forces and sigma_E
    assert svc.stats["hits"] == svc.stats["requests"] == steps + 1
    cv = colvar(tmp_path / "COLVAR")
    assert len(cv["sigma"]) == steps and np.all(cv["sigma"] > 0)
    assert len(data_lines(tmp_path / "HILLS")) == 1


def test_real_model_box_derivatives_match_the_strain_derivative(tmp_path, posterior,
                                                                 monkeypatch):
    """A periodic system through the real kernel: PLUMED's virial of V = sigma^2 equals
    finite differences over strain (the posterior's cell gradient convention is PLUMED's)."""
    from ase.build import molecule
    from test_cv_plumed import _evaluate, _plumed

    from rarefly.units import KJ_MOL_TO_EV

    monkeypatch.chdir(tmp_path)  # PLUMED writes its COLVAR here
    atoms = molecule("CH3CH2OH")
    atoms.cell = [6.0, 6.5, 7.0]
    atoms.pbc = True
    atoms.center()
    atoms.positions[:, 0] -= 2.0  # some atoms outside the box: PLUMED gets them unwrapped
    ref = Structure.from_atoms(atoms)
    with cs.CVService(posterior, unique_endpoint(), template=ref) as svc:
        monkeypatch.setenv(rcv.ENV_ENDPOINT, svc.endpoint)
        p = _plumed(tmp_path, RESTRAINT, len(atoms), 0.1, 1.0 / KJ_MOL_TO_EV)
        try:
            _, forces, virial = _evaluate(p, 0, ref.positions, ref.cell)
            h, fd = 1e-4, np.zeros((3, 3))
            for a, b in [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2)]:
                vals = []
                for sign in (1, -1):
                    strain = np.eye(3)
                    strain[a, b] += sign * h
                    vals.append(_evaluate(p, 1, ref.positions @ strain, ref.cell @ strain)[0])
                fd[a, b] = (vals[0] - vals[1]) / (2 * h)
        finally:
            p.finalize()
    pred = posterior.predict([ref])[0]
    np.testing.assert_allclose(forces, -2.0 * pred.energy_sigma * pred.energy_sigma_gradient,
                               rtol=1e-5, atol=1e-8)
    scale = np.abs(fd).max()
    assert scale > 1e-4
    for a, b in [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2)]:
        assert virial[a, b] == pytest.approx(fd[a, b], abs=1e-3 * scale), (a, b)


def test_rarefly_driver_cv_serves_from_cache_and_its_death_stops_ipi(tmp_path, real_model):
    """`rarefly driver --cv` with the real model: every CV request of a classical run is a
    cache hit (the model runs once per step); SIGKILL on the driver stops i-PI (status 1,
    the sentence naming the endpoint) within the CV timeout plus a few seconds."""
    endpoint, socket = unique_endpoint(), f"rarefly-cvd-{os.getpid()}"
    prepare(tmp_path, "metad.dat", socket=socket, steps=100000)
    ipi = subprocess.Popen([str(IPI), "input.xml"], cwd=tmp_path,
                           env=ipi_env(endpoint, timeout_s=3.0), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    driver = subprocess.Popen(
        [sys.executable, "-m", "rarefly.cli", "driver", "--model", str(real_model),
         "--template", str(tmp_path / "init.xyz"), "--pbc", "no", "-u", "-a", socket,
         "--cv", "--cv-endpoint", endpoint, "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ipi_env(endpoint))
    try:
        deadline = time.monotonic() + 50
        while not ((tmp_path / "sim.out").exists()
                   and len(data_lines(tmp_path / "sim.out")) >= 8):
            assert ipi.poll() is None and driver.poll() is None, driver.communicate()[0]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        stats = json.loads(cs.request(endpoint, cs.encode_op("stats"), timeout_s=5)[0])
        out, elapsed = kill_driver_and_wait(driver, ipi)
    finally:
        reap(driver, ipi)
    assert stats["requests"] >= 8 and stats["hits"] == stats["requests"]
    assert stats["evaluations"] == 0
    assert ipi.returncode == 1, out[-3000:]
    assert elapsed < 3.0 + 10.0, elapsed
    assert f"no answer from the rarefly driver at {endpoint} within 3 s" in out


def test_rarefly_driver_cv_path_integrals_evaluate_the_centroid_once_per_step(tmp_path,
                                                                            real_model):
    """4 beads in one batch from i-PI, the bias on the centroid: every CV request is a new
    centroid, evaluated once by the driver (no request for i-PI's second PLUMED call)."""
    endpoint, socket = unique_endpoint(), f"rarefly-cvp-{os.getpid()}"
    steps = 6
    prepare(tmp_path, "metad.dat", socket=socket, steps=steps, nbeads=4, batch=4)
    ipi = subprocess.Popen([str(IPI), "input.xml"], cwd=tmp_path, env=ipi_env(endpoint),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    driver = subprocess.Popen(
        [sys.executable, "-m", "rarefly.cli", "driver", "--model", str(real_model),
         "--template", str(tmp_path / "init.xyz"), "--pbc", "no", "-u", "-a", socket,
         "--cv", "--cv-endpoint", endpoint, "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ipi_env(endpoint))
    stats = []
    try:
        deadline = time.monotonic() + 50
        while ipi.poll() is None:  # the driver leaves with i-PI's EXIT: ask while it runs
            assert time.monotonic() < deadline
            try:
                stats.append(json.loads(cs.request(endpoint, cs.encode_op("stats"), 1.0)[0]))
            except TimeoutError:
                pass
            time.sleep(0.2)
        out = ipi.communicate(timeout=10)[0]
        driver.wait(20)
    finally:
        reap(driver, ipi)
    assert ipi.returncode == 0 and driver.returncode == 0, out[-2000:]
    assert len(colvar(tmp_path / "COLVAR")["sigma"]) == steps
    last = stats[-1]
    # step 0: all beads start at init.xyz, so the centroid is a bead the driver just evaluated
    assert last["requests"] >= steps - 1 and last["hits"] <= 1
    assert last["evaluations"] + last["hits"] == last["requests"]  # one call per new centroid


@pytest.mark.parametrize("calibration", ["start", "current"])
def test_a_hot_swap_with_a_wider_calibration_does_not_rescale_the_cv(calibration, real_model):
    """The trainer widens the Student-t scale with every label. With ``calibration="start"``
    (the default) the CV keeps the scale of the first model served: a new version whose
    variance factor is 4x serves the same sigma_E and gradient for the same positions while
    its own calibrated sigma_E doubles; ``"current"`` follows the new model."""
    import copy

    from ase.build import molecule

    from rarefly.posterior import load_posterior

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = load_posterior(str(real_model))
        new = load_posterior(str(real_model))
    new.calibration = copy.deepcopy(old.calibration)
    cal = new.calibration.energy
    cal.b = 4.0 * cal.b                       # variance factor b / (a - 1): 4x
    new.model_version = old.model_version + 1
    ref = Structure.from_atoms(molecule("CH3CH2OH"))
    p_old, p_new = old.predict([ref])[0], new.predict([ref])[0]
    assert p_new.energy_sigma == pytest.approx(2.0 * p_old.energy_sigma, rel=1e-9)
    with cs.CVService(old, unique_endpoint(), template=ref, calibration=calibration) as svc:
        client = rcv.CVClient(svc.endpoint, timeout_s=20)
        try:
            before = client.sigma(ref.positions)
            svc.set_predictor(new)
            after = client.sigma(ref.positions)
        finally:
            client.close()
    assert (before.model_version, after.model_version) == (old.model_version, new.model_version)
    assert before.sigma == pytest.approx(p_old.energy_sigma, rel=1e-9)
    np.testing.assert_allclose(before.gradient, p_old.energy_sigma_gradient, rtol=1e-9, atol=1e-14)
    want = p_old if calibration == "start" else p_new
    assert after.sigma == pytest.approx(want.energy_sigma, rel=1e-9)
    np.testing.assert_allclose(after.gradient, want.energy_sigma_gradient, rtol=1e-8, atol=1e-14)

