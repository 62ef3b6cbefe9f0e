"""The PLUMED side of the uncertainty collective variable sigma_E.

A PLUMED input turns the model's calibrated energy uncertainty into a CV with::

    UNITS LENGTH=A ENERGY=eV
    LOAD FILE=__RAREFLY_PYCV__
    sigma: PYCVINTERFACE ATOMS=@mdatoms IMPORT=rarefly.cv INIT=init CALCULATE=calculate

(``__RAREFLY_PYCV__`` is the PyCV plugin; ``python -m rarefly.cv render IN -o OUT`` fills it
in, see :func:`render_plumed_input`). The value is sigma_E, its derivatives are the exact
d sigma_E / d positions and, for periodic systems, the box derivatives, all computed by the
driver (:mod:`rarefly.cv_service`), the only process that evaluates the model.

Why PyCV and not EXTRACV
------------------------
PLUMED offers two ways to feed it an outside quantity. ``EXTRACV`` needs the MD engine to
call ``setExtraCV``/``setExtraCVForce`` every step; i-PI's ``<ffplumed>`` passes only
positions and cell, so EXTRACV would need a patched i-PI that users must run instead of
their own. PyCV (``PYCVINTERFACE``, the plugin bundled with the PLUMED kernel rarefly
installs) runs Python inside the process that hosts PLUMED. Under i-PI that is i-PI's own
interpreter (checked: the plugin reuses it), so this module runs in i-PI's main thread,
receives the positions PLUMED is biasing (the centroid in path-integral runs) and asks the
driver over zmq. Stock i-PI XML + a PLUMED file is all the user writes; the cost is one
local round trip per evaluation (about 0.1 ms on ipc).

Facts this module relies on (checked with i-PI 3.3.1 and the bundled PLUMED 2.11-dev):

* i-PI calls PLUMED twice per step at the same positions (the bias force, then
  ``mtd_update``); the second call is answered from this module's last result.
* i-PI evaluates the physical forces before the bias, so the driver has normally just
  evaluated (and remembered) the positions the CV asks for.
* An exception raised here at calculate time reaches i-PI as a ``PlumedError`` and i-PI exits
  with status 1, the message in its output. An exception in ``init`` aborts the process
  (pybind11 without the GIL), so ``init`` does nothing that can fail.
* PyCV passes no arguments to ``init``: the endpoint and timeout come from the environment
  of the i-PI process (``RAREFLY_CV_ENDPOINT``, ``RAREFLY_CV_TIMEOUT``).
* When the driver dies, i-PI usually waits for its forces, not for PLUMED, and i-PI waits
  for a dead socket client forever; :class:`DriverWatchdog` stops it then.
* i-PI runs PLUMED's update phase (PRINT, METAD/OPES deposition) only from
  ``<smotion mode="metad">``: every input needs it, static biases included.
* PLUMED cannot find the PyCV plugin by itself (no search path, no variables in inputs), so
  the inputs in ``plumed_inputs/`` carry a placeholder that :func:`render_plumed_input` fills.
* PLUMED's Angstrom, from i-PI's Bohr, differ from ``ase.units`` by 1e-9 (relative); the
  driver's cache matching allows for it (:mod:`rarefly.cv_service`).

Units
-----
All rarefly PLUMED inputs declare ``UNITS LENGTH=A ENERGY=eV``: sigma_E in eV, gradients in
eV/A, METAD heights and widths in eV. Inputs kept in PLUMED's defaults (nm, kJ/mol) work too
when ``RAREFLY_CV_PLUMED_UNITS=nm,kJ/mol`` is set; the conversion happens here and nowhere
else. The first evaluation checks the closest pair of atoms: closer than 0.3 A means the
positions are not in Angstrom (PLUMED in nm without the variable) and the run stops with a
sentence that says so.

Environment
-----------
``RAREFLY_CV_ENDPOINT``   the driver's CV endpoint (default ``ipc:///tmp/rarefly-cv-localhost``,
                          the endpoint of ``rarefly driver`` on i-PI's default address)
``RAREFLY_CV_TIMEOUT``    seconds to wait for an answer before stopping the run (default 30)
``RAREFLY_CV_PLUMED_UNITS``  ``A,eV`` (default) or PLUMED's length,energy units otherwise
``RAREFLY_PYCV``          path of the PyCV plugin, when not the one bundled with ``plumed``
``RAREFLY_CV_WATCHDOG``   ``0`` turns off the watchdog that stops i-PI when the driver is gone
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zmq
from ase import units as _ase_units

from rarefly import cv_service as _wire
from rarefly.units import ENERGY_UNITS, energy_to_ev

ENV_ENDPOINT = _wire.ENV_ENDPOINT
ENV_TIMEOUT = "RAREFLY_CV_TIMEOUT"
ENV_PLUMED_UNITS = "RAREFLY_CV_PLUMED_UNITS"
ENV_PYCV = "RAREFLY_PYCV"
ENV_WATCHDOG = "RAREFLY_CV_WATCHDOG"
DEFAULT_TIMEOUT_S = 30.0
#: a request unanswered this long is sent again on a fresh socket (requests are idempotent)
RESEND_S = 5.0
PYCV_PLACEHOLDER = "__RAREFLY_PYCV__"
#: closest allowed pair of atoms (Angstrom) at the first evaluation (a units check)
MIN_PAIR_DISTANCE_A = 0.3
#: PLUMED length units -> Angstrom (PLUMED's UNITS LENGTH keywords)
_LENGTH_TO_A = {"A": _ase_units.Ang, "nm": _ase_units.nm, "Bohr": _ase_units.Bohr,
                "bohr": _ase_units.Bohr}
_DATA_KEY = "rarefly"


class CVError(RuntimeError):
    """The uncertainty CV cannot be computed; the message is one sentence for the user."""


def plumed_units(spec: str | None = None) -> tuple[float, float]:
    """(Angstrom per PLUMED length unit, eV per PLUMED energy unit) from ``"A,eV"`` style."""
    spec = spec if spec is not None else os.environ.get(ENV_PLUMED_UNITS, "A,eV")
    try:
        length, energy = (s.strip() for s in spec.split(","))
        energy = {k.lower(): k for k in ENERGY_UNITS}[energy.lower()]  # PLUMED writes kj/mol
        return _LENGTH_TO_A[length], energy_to_ev(1.0, energy)
    except (ValueError, KeyError):
        raise CVError(f"{ENV_PLUMED_UNITS}={spec!r} is not LENGTH,ENERGY with LENGTH one of "
                      f"{', '.join(_LENGTH_TO_A)} and ENERGY one of eV, kJ/mol, kcal/mol") from None


class CVClient:
    """REQ side of the wire: sigma_E for positions, with a bounded wait.

    A request unanswered for ``RESEND_S`` is sent again on a fresh socket (a restarted driver
    gets it); after ``timeout_s`` in all, :class:`CVError` names the endpoint.
    """

    def __init__(self, endpoint: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                 resend_s: float = RESEND_S):
        self.endpoint = _wire.check_endpoint(endpoint)
        self.timeout_s = float(timeout_s)
        self.resend_s = float(resend_s)
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = self._ctx.socket(zmq.REQ)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(self.endpoint)
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def sigma(self, positions: np.ndarray, cell: np.ndarray | None = None) -> _wire.SigmaReply:
        """sigma_E (eV) and its gradients at ``positions`` (N,3, A), ``cell`` rows in A."""
        frames = _wire.encode_request(positions, cell)
        deadline = time.monotonic() + self.timeout_s
        while True:
            sock = self._socket()
            sock.send_multipart(frames)
            wait = min(self.resend_s, max(deadline - time.monotonic(), 0.0))
            if sock.poll(int(wait * 1000) + 1):
                reply = sock.recv_multipart()
                try:
                    return _wire.decode_reply(reply, len(positions))
                except _wire.ProtocolError as err:
                    raise CVError(f"rarefly uncertainty CV: the driver at {self.endpoint} could "
                                  f"not compute sigma_E: {err}") from None
            self._reset()  # a REQ socket cannot send again before it has received
            if time.monotonic() >= deadline:
                raise CVError(
                    f"rarefly uncertainty CV: no answer from the rarefly driver at "
                    f"{self.endpoint} within {self.timeout_s:g} s, so the run stops (start "
                    f"`rarefly driver` or `rarefly cv-server` with this CV endpoint, or set "
                    f"{ENV_ENDPOINT} / {ENV_TIMEOUT})")

    def close(self) -> None:
        self._reset()
        self._ctx.term()


class UncertaintyCV:
    """State of one ``PYCVINTERFACE`` action: the client, units and the last result."""

    def __init__(self, endpoint: str | None = None, timeout_s: float | None = None,
                 units: str | None = None):
        self.endpoint = endpoint or os.environ.get(ENV_ENDPOINT) or _wire.default_endpoint()
        if timeout_s is None:
            timeout_s = _env_float(ENV_TIMEOUT, DEFAULT_TIMEOUT_S)
        self.length_a, self.energy_ev = plumed_units(units)
        self.client = CVClient(self.endpoint, timeout_s)
        self.checked = False
        self.warned_virial = False
        self._last_key: tuple[bytes, bytes] | None = None
        self._last: tuple[float, np.ndarray, np.ndarray] | None = None
        self.requests = 0
        self.busy = False  # a request is in flight (it has its own deadline)
        self.watchdog: DriverWatchdog | None = None

    def compute(self, positions: np.ndarray, box: np.ndarray,
                log=None) -> tuple[float, np.ndarray, np.ndarray]:
        """(value, d value/d positions, box derivatives), all in PLUMED units.

        positions: (N,3) and box: (3,3) rows, both in PLUMED length units, as PyCV gives them.
        """
        positions = np.array(positions, dtype=float)
        box = np.array(box, dtype=float).reshape(3, 3)
        key = (positions.tobytes(), box.tobytes())
        if key == self._last_key:
            return self._last
        pos_a = positions * self.length_a
        box_a = box * self.length_a
        if not self.checked:
            _check_distances(pos_a)
            self.checked = True
        has_box = abs(np.linalg.det(box_a)) > 1e-6
        self.requests += 1
        self.busy = True
        try:
            reply = self.client.sigma(pos_a, box_a if has_box else None)
        finally:
            self.busy = False
        if self.watchdog is None and _under_ipi() and os.environ.get(ENV_WATCHDOG, "1") != "0":
            self.watchdog = DriverWatchdog(self.endpoint, self.client.timeout_s,
                                           busy=lambda: self.busy).start()
        scale = 1.0 / self.energy_ev  # eV -> PLUMED energy
        value = reply.sigma * scale
        grad = reply.gradient * (self.length_a * scale)
        if reply.cell_gradient is not None:
            # PLUMED's box derivative of a CV s is -(d s / d strain) (for a CV without explicit
            # cell dependence: -sum_i r_i (x) ds/dr_i); ASE row convention on both sides.
            box_deriv = -reply.cell_gradient * scale
        else:
            box_deriv = -np.einsum("ia,ib->ab", positions, grad)
            if reply.periodic and not self.warned_virial and log is not None:
                log("rarefly: WARNING the model gives no cell gradient of sigma_E; the bias "
                    "virial uses atom derivatives only (fine at constant volume)\n")
                self.warned_virial = True
        self._last_key, self._last = key, (value, grad, box_deriv)
        return self._last


class DriverWatchdog:
    """Stops i-PI when the driver stops answering while i-PI waits for it elsewhere.

    i-PI 3.3.1 waits forever for a socket client that died (a reset connection even kills
    its polling thread, ``exit_on_disconnect`` or not), and then it is blocked on the
    forces, not in PLUMED, so the CV's own bounded wait never comes. This daemon thread,
    started in i-PI's process after the CV's first answer, pings the CV endpoint every few
    seconds. When nothing has answered for ``timeout_s`` while no CV request was in flight,
    it prints one sentence naming the endpoint, runs i-PI's soft-exit cleanup (outputs and
    RESTART are written, i-PI says "I-PI reports a problem") and ends the process with
    status 1. It stands down once i-PI's own soft exit has begun (the normal end of a run
    stops the driver too). ``RAREFLY_CV_WATCHDOG=0`` turns it off.
    """

    def __init__(self, endpoint: str, timeout_s: float, busy: Callable[[], bool],
                 period_s: float | None = None, grace_s: float = 30.0):
        self.endpoint, self.timeout_s, self.busy = endpoint, float(timeout_s), busy
        self.period_s = period_s if period_s is not None else min(5.0, self.timeout_s / 3)
        self.grace_s = grace_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rarefly-cv-watchdog",
                                        daemon=True)

    def start(self) -> "DriverWatchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.period_s):
            if _ipi_exiting():
                return
            if self.busy() or self._ping():
                last_ok = time.monotonic()
            elif time.monotonic() - last_ok >= self.timeout_s and not self.busy():
                if _ipi_exiting():
                    return
                _stop_ipi(f"rarefly uncertainty CV: no answer from the rarefly driver at "
                          f"{self.endpoint} within {self.timeout_s:g} s while i-PI waited for "
                          f"it, so the run stops (the driver died or hangs; i-PI alone would "
                          f"wait forever)", self.grace_s)
                return

    def _ping(self) -> bool:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.endpoint)
            sock.send_multipart(_wire.encode_op("ping"))
            return bool(sock.poll(int(self.period_s * 1000)))
        finally:
            sock.close()
            ctx.term()


def _under_ipi() -> bool:
    """Inside the ``i-pi`` program (not merely a process that imported ipi, such as a test
    runner: the watchdog ends its process). ``RAREFLY_CV_WATCHDOG=1`` forces it on."""
    if "ipi.utils.softexit" not in sys.modules:
        return False
    return (os.environ.get(ENV_WATCHDOG) == "1"
            or os.path.basename(sys.argv[0] if sys.argv else "").startswith("i-pi"))


def _ipi_exiting() -> bool:
    softexit = getattr(sys.modules.get("ipi.utils.softexit"), "softexit", None)
    return bool(getattr(softexit, "triggered", False))


def _stop_ipi(message: str, grace_s: float) -> None:
    """Print ``message``, run i-PI's soft-exit cleanup and end the process with status 1."""
    print(message, file=sys.stderr, flush=True)

    def _exit_1():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    atexit.register(_exit_1)  # if i-PI's main thread gets to exit first, the status stays 1
    timer = threading.Timer(grace_s, _exit_1)  # in case the cleanup itself hangs
    timer.daemon = True
    timer.start()
    try:
        from ipi.utils.softexit import softexit
    except ImportError:
        _exit_1()
    # i-PI's executable ends with os._exit(0) after a soft exit (hard_exit); the status is
    # ours to give, so the other threads that notice the soft exit just end themselves.
    softexit.hard_exit = False
    cleanup = getattr(softexit, "cleanup", None)  # i-PI >= 3.3: cleanup without exiting
    if cleanup is not None:
        cleanup(status="bad", message=message)  # outputs, RESTART, driver sockets closed
    else:
        worker = threading.Thread(target=softexit.trigger, daemon=True,
                                  kwargs={"status": "bad", "message": message})
        worker.start()
        worker.join(grace_s)
    _exit_1()


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise CVError(f"{name}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise CVError(f"{name}={raw!r} must be positive")
    return value


def _check_distances(pos_a: np.ndarray, max_atoms: int = 500) -> None:
    p = pos_a[:max_atoms]
    if len(p) < 2:
        return
    d = np.linalg.norm(p[:, None, :] - p[None, :, :], axis=-1)
    d[np.diag_indices(len(p))] = np.inf
    closest = float(d.min())
    if closest < MIN_PAIR_DISTANCE_A:
        raise CVError(
            f"rarefly uncertainty CV: two atoms are {closest:.3g} A apart, so PLUMED's lengths "
            f"are not Angstrom; add `UNITS LENGTH=A ENERGY=eV` to the PLUMED input (or set "
            f"{ENV_PLUMED_UNITS} to its units)")


# ------------------------------------------------------------------- PyCV entry points


def init(action) -> dict:
    """PyCV ``INIT``: one non-periodic value with derivatives. Must not fail (see above)."""
    action.data[_DATA_KEY] = None  # created at the first calculate, where errors are clean
    return {"Value": {"period": None, "derivative": True}}


def calculate(action):
    """PyCV ``CALCULATE``: (sigma_E, d sigma_E/d positions, box derivatives) in PLUMED units."""
    cv = action.data.get(_DATA_KEY)
    if cv is None:
        indexes = np.asarray(action.absoluteIndexes())
        if not np.array_equal(indexes, np.arange(len(indexes))):
            raise CVError("rarefly uncertainty CV: the model needs every atom in the MD "
                          "order; use ATOMS=@mdatoms in PYCVINTERFACE")
        cv = UncertaintyCV()
        action.data[_DATA_KEY] = cv
    return cv.compute(action.getPositions(), action.getPbc().getBox(), log=action.log)


# ------------------------------------------------------------- PLUMED input rendering


def pycv_plugin_path() -> Path:
    """The PyCV plugin (``PythonCVInterface.so``): ``$RAREFLY_PYCV`` or the bundled one."""
    explicit = os.environ.get(ENV_PYCV)
    if explicit:
        path = Path(explicit)
    else:
        try:
            import plumed  # the hillclimber wheel's module: it knows its bundled plugin
        except ImportError:
            plumed = None
        bundled = getattr(plumed, "BUNDLED_PYCV_PATH", None)
        if bundled is None:
            raise CVError(f"no PyCV plugin found: install the `hillclimber` wheel (it bundles "
                          f"PLUMED and PyCV) or set {ENV_PYCV} to PythonCVInterface.so")
        path = Path(bundled)
    if not path.is_file():
        raise CVError(f"the PyCV plugin {path} does not exist")
    return path


_PLACEHOLDER_RE = re.compile(r"__([A-Z][A-Z0-9_]*)__")
#: placeholders filled from a structure's covalent bonds (:func:`bond_placeholders`)
BOND_PLACEHOLDERS = ("RAREFLY_XH_BONDS", "RAREFLY_HEAVY_BONDS")


def covalent_bonds(atoms) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The bonds of an ASE structure (ASE's natural covalent cutoffs), 0-based pairs: those
    with a hydrogen, and those between heavier atoms."""
    from ase.neighborlist import NeighborList, natural_cutoffs

    nl = NeighborList(natural_cutoffs(atoms), self_interaction=False, bothways=False)
    nl.update(atoms)
    bonds = [(i, int(j)) for i in range(len(atoms)) for j in sorted(nl.get_neighbors(i)[0])]
    xh = [b for b in bonds if 1 in (atoms.numbers[b[0]], atoms.numbers[b[1]])]
    return xh, [b for b in bonds if b not in xh]


def bond_placeholders(structure) -> dict[str, str]:
    """``__RAREFLY_XH_BONDS__`` and ``__RAREFLY_HEAVY_BONDS__``: the ATOMSn= lists of a
    PLUMED DISTANCES action over the structure's X-H and heavy-atom bonds (1-based, the MD's
    atom order). ``structure``: a file ASE reads, or ASE Atoms."""
    from ase import Atoms
    from ase.io import read

    try:
        atoms = structure if isinstance(structure, Atoms) else read(structure)
    except Exception as exc:  # noqa: BLE001
        raise CVError(f"cannot read the structure {structure} for its bonds ({exc})") from None
    out = {}
    for key, pairs, what in zip(BOND_PLACEHOLDERS, covalent_bonds(atoms), ("X-H", "heavy-atom")):
        if not pairs:
            raise CVError(f"the structure has no {what} bond for __{key}__: remove the lines "
                          "that use it from the PLUMED input")
        out[key] = " ".join(f"ATOMS{k + 1}={i + 1},{j + 1}" for k, (i, j) in enumerate(pairs))
    return out


def render_plumed_input(text: str, values: dict[str, str] | None = None,
                        structure=None) -> str:
    """Fill the placeholders of a rarefly PLUMED input.

    ``__RAREFLY_PYCV__`` becomes the PyCV plugin path; ``__RAREFLY_XH_BONDS__`` and
    ``__RAREFLY_HEAVY_BONDS__`` the bonds of ``structure`` (the MD's starting structure, see
    :func:`bond_placeholders`); any other ``__KEY__`` takes ``values[KEY]`` (e.g.
    ``WALKER_ID`` in the multiple-walker input). A placeholder left without a value is an
    error.
    """
    values = {k.upper(): str(v) for k, v in (values or {}).items()}
    if PYCV_PLACEHOLDER in text:
        values.setdefault("RAREFLY_PYCV", str(pycv_plugin_path()))
    wanted = set(_PLACEHOLDER_RE.findall(text))
    if wanted & set(BOND_PLACEHOLDERS) - set(values):
        if structure is None:
            raise CVError("the PLUMED input lists the structure's bonds: give the starting "
                          "structure (--structure FILE; `rarefly run` passes [system] structure)")
        values = {**bond_placeholders(structure), **values}
    missing = sorted(m for m in wanted if m not in values)
    if missing:
        raise CVError(f"the PLUMED input needs values for {', '.join(missing)} "
                      f"(give --set {missing[0]}=...)")
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rarefly.cv",
        description="Helpers for PLUMED inputs that use rarefly's uncertainty CV.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("render", help="fill __RAREFLY_PYCV__, the bond lists (--structure) and "
                                      "--set KEY=VALUE in an input")
    p.add_argument("input", help="a PLUMED input, e.g. plumed_inputs/metad.dat")
    p.add_argument("-o", "--output", help="output file (default: standard output)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="value of a __KEY__ placeholder (repeatable)")
    p.add_argument("--structure", metavar="FILE",
                   help="the MD's starting structure (any file ASE reads, in the MD's atom "
                        "order): its covalent bonds fill __RAREFLY_XH_BONDS__ and "
                        "__RAREFLY_HEAVY_BONDS__ (plumed_inputs/metad_bond_walls.dat)")
    sub.add_parser("pycv-path", help="print the path of the PyCV plugin")
    args = parser.parse_args(argv)
    try:
        if args.command == "pycv-path":
            print(pycv_plugin_path())
            return 0
        values = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise CVError(f"--set {item!r} is not KEY=VALUE")
            values[key] = value
        text = render_plumed_input(Path(args.input).read_text(), values, args.structure)
    except (CVError, OSError) as err:
        print(f"rarefly.cv: {err}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
