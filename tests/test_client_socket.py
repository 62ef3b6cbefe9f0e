"""The socket driver over REAL sockets: ASE's i-PI server, a real i-PI process, bad inputs.

The model is a test double (:class:`LJPredictor`: ASE's Lennard-Jones plus made-up,
deterministic uncertainties), so these tests exercise the socket logic, not MACE. The
subprocess tests run the real ``rarefly driver`` code path (``driver_cli.run``) with that
double as the model loader, through the small script :data:`DRIVER_SCRIPT`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.lj import LennardJones
from ase.calculators.socketio import SocketIOCalculator
from rarefly.client import (
    EXIT_CONNECT,
    EXIT_DISCONNECTED,
    EXIT_PROTOCOL,
    EXIT_STRUCTURE,
    DriverError,
    close_pairs,
    serve,
)
from rarefly.prediction import InputError, Prediction
from rarefly.protocol import (
    Channel,
    encode_init,
    encode_posdata,
    header,
    read_forceready,
)

TESTS = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
LJ = dict(sigma=3.4, epsilon=0.0104, rc=7.5, smooth=True)
TRICLINIC = np.array([[8.3, 0.1, -0.2], [0.9, 7.9, 0.3], [0.4, -0.6, 8.6]])


class LJPredictor:
    """Test double for a posterior: Lennard-Jones argon with deterministic "uncertainties"."""

    atomic_numbers = (1, 18)

    def __init__(self, model_version: int = 7, reject_below: float | None = None):
        self.model_version = model_version
        self.reject_below = reject_below
        self.batches: list[int] = []

    def reference(self, structure) -> Prediction:
        cell = structure.cell if structure.cell is not None else np.zeros((3, 3))
        atoms = Atoms(numbers=structure.numbers, positions=structure.positions, cell=cell,
                      pbc=structure.pbc)
        atoms.calc = LennardJones(**LJ)
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        stress = atoms.get_stress(voigt=False) if structure.cell is not None else None
        if self.reject_below is not None and energy < self.reject_below:
            raise InputError(f"energy {energy:.3f} eV is outside the training range")
        return Prediction(
            energy=energy, forces=forces, stress=stress,
            energy_sigma=0.01 * abs(energy) + 0.001,
            forces_sigma=0.05 * np.linalg.norm(forces, axis=1) + 0.001,
            energy_sigma_gradient=np.zeros_like(forces),
            confidence=1.0 / (1.0 + abs(energy)), model_version=self.model_version,
            extra={"n_atoms": np.int64(len(forces)), "first_position": structure.positions[0]})

    def predict(self, structures):
        self.batches.append(len(structures))
        return [self.reference(s) for s in structures]


DRIVER_SCRIPT = f"""\
import sys
sys.path.insert(0, {str(TESTS)!r})
from rarefly import cli, driver_cli
from test_client_socket import load_test_double
argv = ["driver"] + sys.argv[1:]
args = cli.build_parser(argv).parse_args(argv)
sys.exit(driver_cli.run(args, loader=load_test_double))
"""


def load_test_double(path, device="cpu", epsilon=None):
    """The model loader of :data:`DRIVER_SCRIPT`: a "model file" is the text 'test double'."""
    if Path(path).read_bytes() != b"test double":
        raise ValueError("unsupported format")
    return LJPredictor()


def argon(periodic=True, rattle=0.05, seed=0):
    if periodic:
        atoms = bulk("Ar", "fcc", a=5.26, cubic=True)
        atoms.set_cell(TRICLINIC * 5.26 / 8.3 * 1.02, scale_atoms=True)
    else:
        atoms = Atoms("Ar5", positions=[[0, 0, 0], [3.7, 0, 0], [0, 3.8, 0], [0, 0, 3.6],
                                        [2.5, 2.5, 2.5]])
    atoms.rattle(rattle, seed=seed)
    return atoms


def unique_name():
    return f"rarefly_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serving(threading.Thread):
    """serve() in a thread; ``result`` or ``error`` afterwards."""

    def __init__(self, predictor, atoms, **kwargs):
        super().__init__(daemon=True)
        kwargs.setdefault("connect_timeout", 10.0)
        kwargs.setdefault("pbc", tuple(atoms.pbc))
        self.args = (predictor, atoms.numbers)
        self.kwargs = kwargs
        self.result = self.error = None
        self.start()

    def run(self):
        try:
            self.result = serve(*self.args, **self.kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            self.error = exc

    def finish(self, timeout=15.0):
        self.join(timeout)
        assert not self.is_alive(), "serve() did not return"
        return self.result


def assert_close(a, b, rtol=1e-8):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.max(np.abs(b)))


# ------------------------------------------------------------------ (a) ASE's real server

@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize("periodic", [True, False], ids=["periodic", "cluster"])
def test_ase_server_matches_direct_prediction(transport, periodic):
    predictor = LJPredictor()
    template = argon(periodic)
    seen = []
    if transport == "unix":
        name = unique_name()
        server = dict(unixsocket=name)
        client = dict(unix=True, address=name)
    else:
        port = free_port()
        server = dict(port=port)
        client = dict(address="127.0.0.1", port=port)
    with SocketIOCalculator(**server, timeout=20) as calc:
        driver = Serving(predictor, template, on_prediction=lambda s, p: seen.append(p), **client)
        for step in range(3):
            atoms = argon(periodic, rattle=0.1, seed=step)
            atoms.calc = calc
            energy, forces = atoms.get_potential_energy(), atoms.get_forces()
            expected = predictor.reference(_structure(atoms))
            assert energy == pytest.approx(expected.energy, rel=1e-8)
            assert_close(forces, expected.forces)
            if periodic:
                assert_close(atoms.get_stress(voigt=False), expected.stress)
            else:
                assert "stress" not in calc.results
            extras = json.loads(calc.results["morebytes"].tobytes())
            assert extras["energy_uncertainty"] == pytest.approx(expected.energy_sigma, rel=1e-12)
            assert_close(extras["forces_uncertainty"], expected.forces_sigma, rtol=1e-12)
            assert extras["confidence"] == pytest.approx(expected.confidence, rel=1e-12)
            assert extras["model_version"] == 7 and extras["n_atoms"] == len(atoms)
            assert_close(extras["first_position"], atoms.positions[0], rtol=1e-12)
        calc.server.protocol.end()  # EXIT: a clean end
        summary = driver.finish()
    assert driver.error is None
    assert (summary.force_requests, summary.structures, summary.connections) == (3, 3, 1)
    assert len(seen) == 3


def _structure(atoms):
    from rarefly.prediction import Structure

    return Structure.from_atoms(atoms)


def test_hot_swap_between_force_calls():
    models = [LJPredictor(model_version=1)]
    template = argon()
    name = unique_name()
    with SocketIOCalculator(unixsocket=name, timeout=20) as calc:
        driver = Serving(models[0], template, unix=True, address=name,
                         predictor_provider=lambda: models[-1])
        versions = []
        for step in range(4):
            if step == 2:
                models.append(LJPredictor(model_version=2))
            atoms = argon(rattle=0.1, seed=step)
            atoms.calc = calc
            atoms.get_potential_energy()
            versions.append(json.loads(calc.results["morebytes"].tobytes())["model_version"])
        calc.server.protocol.end()
        driver.finish()
    assert versions == [1, 1, 2, 2]
    assert models[0].batches == [1, 1] and models[1].batches == [1, 1]


# --------------------------------------------- i-PI's batched protocol, zero virial, raw server

class RawServer:
    """A minimal i-PI-protocol server on a UNIX socket at an absolute path (test side)."""

    def __init__(self, path):
        self.path = str(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.listener.settimeout(15)
        self.connections = []

    def accept(self):
        conn, _ = self.listener.accept()
        conn.settimeout(15)
        self.connections.append(conn)
        return Channel(conn)

    def close(self):
        self.listener.close()
        os.unlink(self.path)
        for conn in self.connections:
            conn.close()


def status(ch):
    ch.send_header("STATUS")
    return ch.recv_header()


def test_batched_posdata_evaluates_padded_batch_once(tmp_path):
    predictor = LJPredictor()
    template = argon(periodic=False)
    server = RawServer(tmp_path / "sock")
    try:
        driver = Serving(predictor, template, unix=True, address=server.path)
        ch = server.accept()
        assert status(ch) == "NEEDINIT"
        ch.send(encode_init("batch_size:3", bead_index=0))
        assert status(ch) == "READY"
        beads = [argon(False, rattle=0.1, seed=s).positions for s in (1, 2)]
        # i-PI pads a batch by repeating the last structure; the cell is ignored (cluster).
        ch.send(encode_posdata([(TRICLINIC, b) for b in beads + beads[-1:]], batched=True)
                + header("GETFORCE"))
        assert ch.recv_header() == "FORCEREADY"
        results = read_forceready(ch, batch_size=3)
        assert status(ch) == "READY"
        ch.send_header("EXIT")
        driver.finish()
    finally:
        server.close()
    assert predictor.batches == [2]  # one model call, padding not re-evaluated
    for res, pos in zip(results, beads + beads[-1:]):
        expected = predictor.reference(_structure(Atoms(template.numbers, positions=pos)))
        assert res.energy == pytest.approx(expected.energy, rel=1e-8)
        assert_close(res.forces, expected.forces)
        assert np.array_equal(res.virial, np.zeros((3, 3)))  # non-periodic: zero virial
        assert json.loads(res.extras)["model_version"] == 7


def test_reconnects_when_the_server_comes_back(tmp_path):
    template = argon(periodic=False)
    server = RawServer(tmp_path / "sock")
    driver = Serving(LJPredictor(), template, unix=True, address=server.path,
                     connect_timeout=10.0)
    ch = server.accept()
    assert status(ch) == "NEEDINIT"
    server.close()  # a crash: no EXIT
    time.sleep(0.3)
    server = RawServer(tmp_path / "sock")  # "i-PI restarted from its checkpoint"
    try:
        ch = server.accept()
        assert status(ch) == "NEEDINIT"  # a fresh handshake on the new connection
        ch.send_header("EXIT")
        summary = driver.finish()
    finally:
        server.close()
    assert driver.error is None and summary.connections == 2


# ------------------------------------------------------------------ (c) bad inputs, threads

def run_against_ase(template, sent, **kwargs):
    """Serve ``template`` while ASE's server sends ``sent``; return the DriverError."""
    name = unique_name()
    with SocketIOCalculator(unixsocket=name, timeout=10) as calc:
        driver = Serving(LJPredictor(**kwargs.pop("predictor", {})), template, unix=True,
                         address=name, **kwargs)
        sent.calc = calc
        with pytest.raises((OSError, AssertionError)):  # ASE sees the driver hang up
            sent.get_potential_energy()
        driver.finish()
    assert isinstance(driver.error, DriverError), driver.error
    return driver.error


def test_atom_count_mismatch():
    err = run_against_ase(argon(), argon()[:3], template_name="the template init.xyz")
    assert err.exit_code == EXIT_STRUCTURE
    assert err.message == ("i-PI sent 3 atoms but the template init.xyz has 4; use the same "
                           "structure (same atoms in the same order) for --template as for "
                           "i-PI's <initialize>")


def test_nan_positions():
    sent = argon()
    sent.positions[2, 1] = np.nan
    err = run_against_ase(argon(), sent)
    assert err.exit_code == EXIT_STRUCTURE
    assert err.message == ("i-PI sent non-finite positions (NaN or inf) for atom 2 in force "
                           "request 1; the dynamics has blown up, so restart from an earlier "
                           "checkpoint with a smaller time step")


def test_overlapping_atoms_across_the_periodic_boundary():
    sent = argon(rattle=0.0)
    sent.positions[3] = sent.positions[1] + sent.cell[0] + [0.02, 0.03, 0.0]  # image of 1
    err = run_against_ase(argon(), sent)
    assert err.exit_code == EXIT_STRUCTURE
    assert err.message == ("atoms 1 and 3 are 0.036 A apart in force request 1, closer than "
                           "0.1 A; the structure has collapsed, so restart from an earlier "
                           "checkpoint with a smaller time step")


def test_zero_volume_cell_for_periodic_template():
    sent = argon()
    sent.cell[2] = 0.0
    sent.pbc = False
    err = run_against_ase(argon(), sent)
    assert err.exit_code == EXIT_STRUCTURE
    assert err.message == ("i-PI sent a cell of zero volume in force request 1, but the "
                           "template is periodic; give i-PI a cell (<cell> or a CELL line in "
                           "its .xyz) or use a non-periodic template")


def test_model_input_error_is_shown():
    err = run_against_ase(argon(), argon(), predictor={"reject_below": 1e9})
    assert err.exit_code == EXIT_STRUCTURE
    assert re.fullmatch(r"the model cannot evaluate the structure of force request 1: "
                        r"energy -?\d+\.\d{3} eV is outside the training range", err.message)


def test_server_not_there_gives_up_in_time():
    start = time.monotonic()
    with pytest.raises(DriverError) as err:
        serve(LJPredictor(), [18], unix=True, address="rarefly_nobody_" + uuid.uuid4().hex[:6],
              connect_timeout=0.5)
    assert time.monotonic() - start < 3
    assert err.value.exit_code == EXIT_CONNECT
    assert re.fullmatch(r"no i-PI server accepted a connection at UNIX socket "
                        r"/tmp/ipi_rarefly_nobody_\w+ within 0\.5 s; start i-PI first and "
                        r"check that -u/-a match the <ffsocket> of its input", err.value.message)
    port = free_port()
    with pytest.raises(DriverError) as err:
        serve(LJPredictor(), [18], address="127.0.0.1", port=port, connect_timeout=0.3)
    assert err.value.message == (f"no i-PI server accepted a connection at 127.0.0.1:{port} "
                                 "(TCP) within 0.3 s; start i-PI first and check that -a/-p "
                                 "match the <ffsocket> of its input")


@pytest.mark.parametrize("exit_on_disconnect", [True, False])
def test_server_closes_without_exit(tmp_path, exit_on_disconnect):
    template = argon(periodic=False)
    server = RawServer(tmp_path / "sock")
    driver = Serving(LJPredictor(), template, unix=True, address=server.path,
                     connect_timeout=0.5, exit_on_disconnect=exit_on_disconnect)
    ch = server.accept()
    status(ch)
    ch.send(encode_init("") + encode_posdata([(None, template.positions)]) + header("GETFORCE"))
    assert ch.recv_header() == "FORCEREADY"
    ch.sock.close()
    server.close()
    start = time.monotonic()
    driver.finish()
    assert time.monotonic() - start < 3
    expected = (f"the server at UNIX socket {server.path} closed the connection without "
                "sending EXIT, after 1 force request")
    if not exit_on_disconnect:
        expected += ", and no server came back within 0.5 s"
    assert driver.error.exit_code == EXIT_DISCONNECTED
    assert driver.error.message == expected


def test_garbage_from_the_server(tmp_path):
    server = RawServer(tmp_path / "sock")
    try:
        driver = Serving(LJPredictor(), argon(), unix=True, address=server.path)
        ch = server.accept()
        ch.send(b"GIVE FORCES!")
        driver.finish()
    finally:
        server.close()
    assert driver.error.exit_code == EXIT_PROTOCOL
    assert driver.error.message == (
        f"the server at UNIX socket {server.path} sent a malformed message: expected a "
        "message header (STATUS, READY, HAVEDATA, NEEDINIT, INIT, POSDATA, GETFORCE, "
        "FORCEREADY, EXIT), but received the 12 bytes b'GIVE FORCES!'")


def test_close_pairs_minimum_image():
    cell = np.diag([10.0, 10.0, 10.0])
    pos = np.array([[0.01, 5, 5], [9.98, 5, 5], [5, 5, 5], [5, 5, 5.05]])
    pairs = close_pairs(pos, cell, (True, True, True), 0.1)
    assert [(i, j) for i, j, _ in pairs] == [(0, 1), (2, 3)]
    assert pairs[0][2] == pytest.approx(0.03) and pairs[1][2] == pytest.approx(0.05)
    assert close_pairs(pos, cell, (False, True, True), 0.1)[0][:2] == (2, 3)
    assert len(close_pairs(pos, None, (False,) * 3, 0.1)) == 1


@pytest.mark.parametrize("seed", range(20))
def test_close_pairs_agrees_with_ase_neighbor_list(seed):
    from ase.neighborlist import neighbor_list

    rng = np.random.default_rng(seed)
    cell = np.diag(rng.uniform(2, 5, 3)) + rng.uniform(-1, 1, (3, 3)) * np.tri(3, k=-1)
    positions = rng.uniform(-1, 2, (40, 3)) @ cell  # also outside the cell
    pbc = tuple(bool(x) for x in rng.random(3) < 0.7)
    got = {(i, j) for i, j, _ in close_pairs(positions, cell, pbc, 0.6)}
    i, j = neighbor_list("ij", Atoms("H40", positions=positions, cell=cell, pbc=pbc), 0.6)
    assert got == {(min(a, b), max(a, b)) for a, b in zip(i, j) if a != b}


# ------------------------------------------------ command line: stderr line and exit codes

def driver_command(tmp_path, *args):
    script = tmp_path / "driver_with_test_model.py"
    script.write_text(DRIVER_SCRIPT)
    return [sys.executable, str(script), *args]


def write_template(tmp_path, atoms, name="init.extxyz"):
    path = tmp_path / name
    atoms.write(path)
    return str(path)


def run_command(argv, capsys):
    """``rarefly driver ARGV`` in this process with the test-double loader: (stderr, code)."""
    from rarefly import cli, driver_cli

    argv = ["driver", *argv]
    code = driver_cli.run(cli.build_parser(argv).parse_args(argv), loader=load_test_double)
    return capsys.readouterr().err, code


def test_command_line_errors(tmp_path, capsys):
    """One line on stderr, ``rarefly driver: <sentence>``, and the exit code."""
    periodic = write_template(tmp_path, argon())
    chlorine = write_template(tmp_path, Atoms("ArCl", positions=[[0, 0, 0], [0, 0, 3]]),
                              "arcl.extxyz")
    model = tmp_path / "model.rfly"
    model.write_text("test double")
    # The real entry point, as a process: stderr and exit status.
    missing = subprocess.Popen([sys.executable, "-m", "rarefly.cli", "driver", "--model",
                                str(tmp_path / "missing.rfly"), "--template", periodic],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        in_process_errors(tmp_path, capsys, periodic, chlorine, model)
    finally:
        _, stderr = missing.communicate(timeout=30)
    assert (stderr, missing.returncode) == (
        f"rarefly driver: the model file {tmp_path / 'missing.rfly'} does not exist\n", 1)


def in_process_errors(tmp_path, capsys, periodic, chlorine, model):
    name = unique_name()
    assert run_command(["--model", str(model), "--template", periodic, "-u", "-a", name,
                        "--connect-timeout", "0.5", "-q"], capsys) == (
        f"rarefly driver: no i-PI server accepted a connection at UNIX socket /tmp/ipi_{name} "
        "within 0.5 s; start i-PI first and check that -u/-a match the <ffsocket> of its "
        "input\n", EXIT_CONNECT)
    assert run_command(["--model", str(model), "--template", chlorine], capsys) == (
        f"rarefly driver: the template {chlorine} contains Cl, which the model {model} does "
        "not know (it knows H, Ar)\n", 1)
    assert run_command(["--model", periodic, "--template", periodic], capsys) == (
        f"rarefly driver: cannot load the model file {periodic} (unsupported format)\n", 1)
    assert run_command(["--model", str(model), "--template", str(tmp_path / "nope.xyz")],
                       capsys) == (f"rarefly driver: the template file {tmp_path / 'nope.xyz'} "
                                   "does not exist\n", 1)


IPI_XYZ = """2
# CELL(abcABC):   10.60000    10.60000    10.60000    90.00000    90.00000    90.00000  Step: 0
       Ar  1.0 1.0 1.0
       Ar  3.0 3.0 3.0
"""


def test_template_periodicity(tmp_path):
    from rarefly.driver_cli import read_template

    ipi_format = tmp_path / "ipi.xyz"
    ipi_format.write_text(IPI_XYZ)  # ASE alone reads this as a molecule
    atoms = read_template(str(ipi_format))
    assert atoms.pbc.all() and atoms.cell.lengths() == pytest.approx([10.6] * 3)
    assert not read_template(str(ipi_format), pbc="no").pbc.any()
    molecule = write_template(tmp_path, Atoms("Ar2", positions=[[0, 0, 0], [0, 0, 3]]), "m.xyz")
    assert not read_template(molecule).pbc.any()
    assert read_template(molecule, pbc="yes").pbc.all()
    slab = write_template(tmp_path, Atoms("Ar", cell=[4, 4, 0], pbc=True), "bad.extxyz")
    with pytest.raises(DriverError) as err:
        read_template(slab)
    assert err.value.message == (f"the template file {slab} is periodic but its cell has zero "
                                 "volume; give it a full cell, or use --pbc no")


def test_epsilon_unit_and_device_reach_the_loader(tmp_path, capsys):
    from rarefly import cli, driver_cli

    template = write_template(tmp_path, argon())
    seen = {}

    def loader(path, device, epsilon):
        seen.update(path=path, device=device, epsilon=epsilon)
        return LJPredictor()

    argv = ["driver", "--model", template, "--template", template, "--epsilon", "1.5",
            "--epsilon-unit", "kcal/mol", "--device", "cuda:1", "-u", "-a",
            unique_name(), "--connect-timeout", "0"]
    args = cli.build_parser(argv).parse_args(argv)
    assert driver_cli.run(args, loader=loader) == EXIT_CONNECT
    assert seen == {"path": template, "device": "cuda:1",
                    "epsilon": pytest.approx(1.5 * 0.0433641, rel=1e-5)}
    first, last = capsys.readouterr().err.splitlines()
    assert first == (f"rarefly driver: model {template} (version 7) ready for 4 atoms, "
                     "periodic; connecting to i-PI")
    assert last.startswith("rarefly driver: no i-PI server accepted")


# ------------------------------------------------------------------ (b) a real i-PI server

IPI_INPUT = """\
<simulation verbosity="low" safe_stride="1000">
  <output prefix="sim">
    <properties stride="1" filename="out">[step, potential{{electronvolt}}]</properties>
    <trajectory filename="pos" stride="1" format="xyz" cell_units="angstrom">
      positions{{angstrom}} </trajectory>
    <trajectory filename="sigma" stride="1" extra_type="energy_uncertainty">
      extras </trajectory>
    <trajectory filename="version" stride="1" extra_type="model_version">extras</trajectory>
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>31415</seed></prng>
  <ffsocket name="rarefly" mode="unix" pbc="true">
    <address>{address}</address>
    <latency>1e-3</latency>
    <batch_size>{batch}</batch_size>
  </ffsocket>
  <system>
    <initialize nbeads="{beads}">
      <file mode="ase">init.extxyz</file>
      <velocities mode="thermal" units="kelvin">60</velocities>
    </initialize>
    <forces><force forcefield="rarefly"/></forces>
    <ensemble><temperature units="kelvin">60</temperature></ensemble>
    <motion mode="dynamics">
      <dynamics mode="nvt">
        <timestep units="femtosecond">4</timestep>
        <thermostat mode="langevin"><tau units="femtosecond">100</tau></thermostat>
      </dynamics>
    </motion>
  </system>
</simulation>
"""


def start_ipi(tmp_path, steps, beads=1, batch=1):
    address = unique_name()
    atoms = bulk("Ar", "fcc", a=5.3, cubic=True) * (2, 2, 2)
    atoms.rattle(0.02, seed=3)
    write_template(tmp_path, atoms)
    (tmp_path / "input.xml").write_text(IPI_INPUT.format(steps=steps, address=address,
                                                         beads=beads, batch=batch))
    with open(tmp_path / "ipi.log", "w") as log:
        proc = subprocess.Popen([str(BIN / "i-pi"), "input.xml"], cwd=tmp_path, stdout=log,
                                stderr=subprocess.STDOUT)
    return proc, address, atoms


def stop(proc):
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def start_driver(tmp_path, address, *extra):
    cmd = driver_command(tmp_path, "--model", str(tmp_path / "model.rfly"), "--template",
                         str(tmp_path / "init.extxyz"), "-u", "-a", address,
                         "--connect-timeout", "20", *extra)
    (tmp_path / "model.rfly").write_text("test double")
    return subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def read_frames(path):
    from ase.io import read

    return read(path, index=":", format="xyz")


def extras_values(path):
    """Values of an i-PI extras trajectory: one list of floats per step."""
    rows, current = [], None
    for line in Path(path).read_text().splitlines():
        if line.startswith(" #EXTRAS"):
            current = []
            rows.append(current)
        elif line.strip():
            current.extend(float(x) for x in line.split())
    return rows


@pytest.mark.slow
def test_real_ipi_pimd_batched(tmp_path):
    """Two beads, batch_size 2: i-PI sends both beads in one batched POSDATA."""
    steps, beads, batch = 20, 2, 2
    ipi, address, atoms = start_ipi(tmp_path, steps, beads, batch)
    try:
        driver = start_driver(tmp_path, address)
        _, err = driver.communicate(timeout=45)
        assert ipi.wait(15) == 0, (tmp_path / "ipi.log").read_text()[-2000:]
    finally:
        stop(ipi)
        stop(driver)
    assert driver.returncode == 0, err
    assert f"connected to i-PI at UNIX socket /tmp/ipi_{address}" in err
    assert f"batch size {batch})" in err and "the server sent EXIT" in err
    # i-PI's potential (eV) equals the model's energy at i-PI's printed positions (bead 0
    # for nbeads=1; for PIMD the potential is the bead average).
    out = np.loadtxt(tmp_path / "sim.out", ndmin=2)
    assert out.shape[0] == steps + 1
    beads_frames = [read_frames(tmp_path / f"sim.pos_{b}.xyz") for b in range(beads)]
    predictor = LJPredictor()
    for step in (0, steps // 2, steps):
        energies = []
        for frames in beads_frames:
            frame = frames[step]
            frame.cell, frame.pbc = atoms.cell, True
            energies.append(predictor.reference(_structure(frame)).energy)
        assert out[step, 1] == pytest.approx(np.mean(energies), rel=1e-5)
    sigma = extras_values(tmp_path / "sim.sigma_0")
    assert len(sigma) == steps + 1 and all(s > 0.001 for row in sigma for s in row)
    assert {v for row in extras_values(tmp_path / "sim.version_0") for v in row} == {7.0}


@pytest.mark.slow
def test_ipi_killed_mid_run(tmp_path):
    ipi, address, _ = start_ipi(tmp_path, steps=100000)
    try:
        driver = start_driver(tmp_path, address, "--exit-on-disconnect")
        out = tmp_path / "sim.out"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until a few steps have run
            if out.exists() and len(out.read_text().splitlines()) > 8:
                break
            time.sleep(0.1)
        else:
            pytest.fail("i-PI made no progress: " + (tmp_path / "ipi.log").read_text()[-2000:])
        ipi.send_signal(signal.SIGKILL)
        start = time.monotonic()
        _, err = driver.communicate(timeout=20)
        assert time.monotonic() - start < 10
    finally:
        stop(ipi)
        stop(driver)
    assert driver.returncode == EXIT_DISCONNECTED
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"rarefly driver: the server at UNIX socket /tmp/ipi_{address} "
                        r"closed the connection without sending EXIT, after \d+ force "
                        r"requests?", last), err
    Path(f"/tmp/ipi_{address}").unlink(missing_ok=True)


# ------------------------------------------- (b) the real command with a real model file

BUILD_MODEL = """\
import json, sys
import numpy as np, torch
import rarefly
from e3nn import o3
from mace import modules
from ase.io import read
from rarefly.posterior import create_posterior
from rarefly.prediction import Structure

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
mace = modules.ScaleShiftMACE(
    r_max=4.0, num_bessel=4, num_polynomial_cutoff=5, max_ell=1, interaction_cls=block,
    interaction_cls_first=block, num_interactions=1, num_elements=3,
    hidden_irreps=o3.Irreps("4x0e+4x1o"), MLP_irreps=o3.Irreps("4x0e"),
    gate=torch.nn.functional.silu, atomic_energies=np.array([-13.6, -1030.0, -2040.0]),
    avg_num_neighbors=4.0, atomic_numbers=[1, 6, 8], correlation=2, radial_type="bessel",
    atomic_inter_scale=0.1, atomic_inter_shift=0.0)
model_path, template = sys.argv[1], sys.argv[2]
torch.save(mace, model_path + ".mace")
posterior = create_posterior(model_path + ".mace", "lastlayer")
posterior.save(model_path)
p = posterior.predict([Structure.from_atoms(read(template))])[0]
with open(model_path + ".json", "w") as f:
    json.dump({"energy": p.energy, "energy_sigma": p.energy_sigma}, f)
torch.set_default_dtype(torch.float32)
del posterior, mace
# Then exactly what `python -m rarefly.cli driver ARGS` does (one process saves a mace import).
from rarefly.cli import main
sys.exit(main(["driver", "--model", model_path, "--template", template] + sys.argv[3:]))
"""

IPI_MOLECULE = """\
<simulation verbosity="low" safe_stride="1000">
  <output prefix="sim">
    <properties stride="1" filename="out">[step, potential{{electronvolt}}]</properties>
    <trajectory filename="sigma" stride="1" extra_type="energy_uncertainty">extras</trajectory>
    <trajectory filename="fsigma" stride="1" extra_type="forces_uncertainty">extras</trajectory>
  </output>
  <total_steps>5</total_steps>
  <prng><seed>31415</seed></prng>
  <ffsocket name="rarefly" mode="unix" pbc="false">
    <address>{address}</address>
    <latency>1e-3</latency>
  </ffsocket>
  <system>
    <initialize nbeads="1">
      <file mode="ase">init.extxyz</file>
      <velocities mode="thermal" units="kelvin">100</velocities>
    </initialize>
    <forces><force forcefield="rarefly"/></forces>
    <ensemble><temperature units="kelvin">100</temperature></ensemble>
    <motion mode="dynamics">
      <dynamics mode="nve"><timestep units="femtosecond">0.1</timestep></dynamics>
    </motion>
  </system>
</simulation>
"""


@pytest.mark.slow
def test_rarefly_driver_command_with_a_model_file(tmp_path):
    """A real i-PI run served by ``rarefly driver``. (``--compile`` through the same command is
    tested on a real socket by ``test_driver_watch_serves_the_new_model_version[compile]``, its
    numbers against the eager model by ``tests/test_compiled.py``: one compilation per test.)"""
    from ase.build import molecule

    pytest.importorskip("mace")
    atoms = molecule("CH3CH2OH")
    atoms.cell = np.eye(3) * 12.0  # i-PI wants a cell; pbc=False keeps the template a molecule
    atoms.pbc = False
    template = write_template(tmp_path, atoms)
    model = tmp_path / "model.rfly"
    address = unique_name()
    (tmp_path / "input.xml").write_text(IPI_MOLECULE.format(address=address))
    with open(tmp_path / "ipi.log", "w") as log:
        ipi = subprocess.Popen([str(BIN / "i-pi"), "input.xml"], cwd=tmp_path, stdout=log,
                               stderr=subprocess.STDOUT)
    driver = subprocess.Popen([sys.executable, "-c", BUILD_MODEL, str(model), template, "-u",
                               "-a", address, "--connect-timeout", "60"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = driver.communicate(timeout=90)
        assert ipi.wait(15) == 0, (tmp_path / "ipi.log").read_text()[-2000:]
    finally:
        stop(ipi)
        stop(driver)
    assert driver.returncode == 0, err
    assert "compiling model version" not in err, err
    assert err.splitlines()[-1] == ("rarefly driver: the server sent EXIT after 6 force "
                                    "requests; done")
    reference = json.loads((tmp_path / "model.rfly.json").read_text())
    out = np.loadtxt(tmp_path / "sim.out", ndmin=2)
    assert out.shape[0] == 6
    assert out[0, 1] == pytest.approx(reference["energy"], rel=1e-6)
    sigma = extras_values(tmp_path / "sim.sigma_0")
    assert sigma[0][0] == pytest.approx(reference["energy_sigma"], rel=1e-6)
    fsigma = extras_values(tmp_path / "sim.fsigma_0")
    assert len(fsigma) == 6 and all(len(row) == len(atoms) for row in fsigma)


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_driver_watch_serves_the_new_model_version(tmp_path, compiled):
    """``rarefly driver --watch`` (no --learn, no --cv) serving ASE's SocketIOCalculator: a new
    model file (other MACE weights, other readout posterior) atomically replaces the served one
    between two force calls; the next call gives the new version's energy. With ``--compile``
    the new weights are copied into the compiled model (the driver says so): no second
    compilation."""
    import torch
    from ase.build import molecule

    from rarefly.posterior import load_posterior
    from rarefly.prediction import Structure

    pytest.importorskip("mace")
    atoms = molecule("CH3CH2OH")
    atoms.cell = np.eye(3) * 12.0
    atoms.pbc = False
    template = write_template(tmp_path, atoms)
    model = tmp_path / "model.rfly"
    name = unique_name()
    with open(tmp_path / "driver.log", "w") as log, \
            SocketIOCalculator(unixsocket=name, timeout=300) as calc:
        driver = subprocess.Popen([sys.executable, "-c", BUILD_MODEL, str(model), template, "-u",
                                   "-a", name, "--watch"] + (["--compile"] if compiled else []),
                                  stdout=subprocess.DEVNULL, stderr=log, text=True)
        try:
            atoms.calc = calc
            first = atoms.get_potential_energy()     # served once the compiled model is ready
            reference = json.loads((tmp_path / "model.rfly.json").read_text())
            assert first == pytest.approx(reference["energy"], rel=1e-6)
            newer = load_posterior(model)
            gen = torch.Generator().manual_seed(2)
            with torch.no_grad():
                for p in newer.backbone.model.parameters():
                    p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
                newer.mean.add_(1e-3)
            newer.model_version = 2
            newer.save(tmp_path / "v2.rfly")
            os.replace(tmp_path / "v2.rfly", model)   # what the trainer's publish does
            atoms.positions[0, 0] += 0.01
            expected = load_posterior(model).predict([Structure.from_atoms(atoms)])[0].energy
            assert abs(expected - first) > 1e-3
            assert atoms.get_potential_energy() == pytest.approx(expected, rel=1e-6)
        finally:
            stop(driver)
    err = (tmp_path / "driver.log").read_text()
    assert "Traceback" not in err, err
    assert "version 0 -> 2" in err, err
    assert err.count("compiling model version") == int(compiled), err
    assert ("model version 2: weights copied into the compiled model (no re-compilation)"
            in err) == compiled, err


def test_guarantee_mode_reference_failures_are_one_sentence_each(tmp_path):
    """``--mode guarantee`` with a reference that cannot do the structure (EMT has no argon):
    the first failures keep the model's forces with a one-line warning each and send the
    frame unlabelled; the third in a row stops the driver with one sentence, exit 1."""
    import zmq

    from rarefly.trainer.messages import decode

    model = tmp_path / "model.rfly"
    model.write_bytes(b"test double")
    atoms = argon(periodic=False)
    template = write_template(tmp_path, atoms)
    endpoint = f"ipc://{tmp_path}/learn"
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(endpoint)
    name = unique_name()
    expected = LJPredictor()
    try:
        with SocketIOCalculator(unixsocket=name, timeout=30) as calc:
            driver = subprocess.Popen(
                driver_command(tmp_path, "--model", str(model), "--template", template, "-u",
                               "-a", name, "--learn", endpoint, "--mode", "guarantee",
                               "--reference", "emt", "--audit-fraction", "0", "--walker", "w"),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                atoms.calc = calc
                for k in range(2):                 # the model's energy, not the reference's
                    atoms.positions[0, 0] += 0.01
                    e = atoms.get_potential_energy()
                    assert e == pytest.approx(expected.reference(_structure(atoms)).energy)
                atoms.positions[0, 0] += 0.01
                with pytest.raises((OSError, AssertionError)):   # the driver hangs up
                    atoms.get_potential_energy()
                _, err = driver.communicate(timeout=30)
            finally:
                stop(driver)
        assert driver.returncode == 1, err
        lines = [ln for ln in err.splitlines() if ln.startswith("rarefly driver:")]
        warned = [ln for ln in lines if "the reference failed on flagged frame" in ln]
        assert len(warned) == 2, err
        assert warned[0].startswith("rarefly driver: force call 1: the reference failed on "
                                    "flagged frame w-")
        assert "Traceback" not in err
        assert re.fullmatch(r"rarefly driver: the reference emt\(\) failed on 3 flagged frames "
                            r"in a row, the last w-\d+-3 \(force call 3\): .+; check --reference "
                            r"and that its code runs here \(the frames labelled before were sent "
                            r"to the trainer, which keeps them\)", lines[-1]), lines[-1]
        sent = []
        while len(sent) < 2 and pull.poll(5000):
            sent.append(decode(pull.recv_multipart()))
        assert [m.origin for m in sent] == ["flagged", "flagged"]   # kept for the trainer
    finally:
        pull.close()
