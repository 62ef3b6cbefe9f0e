"""The i-PI socket client: connect to an i-PI (or ASE) server and serve predictions.

:func:`serve` connects to the server, answers its STATUS / INIT / POSDATA / GETFORCE
messages, evaluates every structure it receives with ``predictor.predict`` and returns
energy, forces, virial and a JSON "extras" string with each force reply. It returns when
the server sends EXIT. Wire framing and atomic units live in :mod:`rarefly.protocol`;
everything here is eV and Angstrom.

Periodicity. i-PI always sends a cell, also for a molecule, so the cell cannot tell
whether a system is periodic. The ``pbc`` argument decides (in ``rarefly driver``: the
periodicity of the ``--template`` structure, or ``--pbc yes/no``). Periodic structures are
built with the cell i-PI sends (rows = lattice vectors) and get the virial
``-stress * volume``; non-periodic ones are built without a cell and get a zero virial.
For molecules, also set ``pbc="false"`` on i-PI's ``<ffsocket>`` so that i-PI does not
wrap the atoms into its box.

Extras. Every force reply carries one JSON object, which i-PI parses; any key can be
written out with ``<trajectory filename="..." extra_type="KEY"> extras </trajectory>``:

- ``energy_uncertainty`` (float, eV): calibrated predictive standard deviation of the
  total energy (``Prediction.energy_sigma``).
- ``forces_uncertainty`` (list of N floats, eV/Angstrom): per-atom predictive standard
  deviation of the force, root of the mean of the three Cartesian variances
  (``Prediction.forces_sigma``), in the order of the atoms.
- ``confidence`` (float in [0, 1]): P(|energy error| < epsilon) under the model's
  Student-t calibration, for the epsilon the model was loaded with.
- ``model_version`` (int): version of the model file that produced the prediction; it
  changes when a new model is hot-swapped in.

Everything in ``Prediction.extra`` is merged into the same object (numpy values become
lists/numbers); it cannot override the four keys above, and ``"raw"`` is refused because
i-PI reserves it. Unlike i-PI's own quantities, these values are in eV / Angstrom.

Errors end :func:`serve` with a :class:`DriverError`: one sentence for the user and an
exit code for the command line (``rarefly driver`` prints ``rarefly driver: <message>``):

====  ====================================================================================
code  meaning
====  ====================================================================================
0     the server sent EXIT (normal end; :func:`serve` returns)
1     bad input before serving: model file, template, options (``rarefly.driver_cli``)
3     no server accepted a connection within ``connect_timeout``
4     the server closed the connection without sending EXIT
5     the server sent a malformed message
6     a structure that cannot be evaluated: wrong atom count, NaN/inf positions,
      overlapping atoms, zero-volume cell for a periodic system, or a structure the model
      rejected (:class:`rarefly.prediction.InputError`)
====  ====================================================================================

After a disconnect without EXIT, :func:`serve` tries to reconnect to the same address for
``connect_timeout`` seconds (an i-PI restarted from its checkpoint gets its driver back)
unless ``exit_on_disconnect`` is set; either way it ends with code 4 if no server returns.

Hooks for other parts of rarefly (both optional, both called in the serving thread):

- ``on_prediction(structure, prediction)`` is called for every structure right after the
  model evaluated it and before the forces go back to the server, so anything the server
  does next (e.g. PLUMED asking for the uncertainty CV) sees it. Keep it fast; its
  exceptions propagate out of :func:`serve`.
- ``predictor_provider()`` is called once per POSDATA message, before the evaluation, and
  returns the predictor to use (usually the same object; a new one to hot-swap a model
  between two force calls). It must not block; return the current predictor when no new
  model is ready.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any

import numpy as np

from rarefly.prediction import InputError, Prediction, Predictor, Structure
from rarefly.protocol import (
    Channel,
    ConnectionClosed,
    ForceResult,
    Frame,
    ProtocolError,
    encode_forceready,
    read_init,
    read_posdata,
)

log = logging.getLogger(__name__)

DEFAULT_PORT = 31415
DEFAULT_SOCKETS_PREFIX = "/tmp/ipi_"
DEFAULT_CONNECT_TIMEOUT = 60.0
#: Two atoms closer than this (Angstrom) make a structure "collapsed".
DEFAULT_MIN_DISTANCE = 0.1

EXIT_OK = 0
EXIT_INPUT = 1
EXIT_CONNECT = 3
EXIT_DISCONNECTED = 4
EXIT_PROTOCOL = 5
EXIT_STRUCTURE = 6

#: Extras keys written by rarefly (a posterior's ``Prediction.extra`` cannot override them).
EXTRAS_KEYS = ("energy_uncertainty", "forces_uncertainty", "confidence", "model_version")

OnPrediction = Callable[[Structure, Prediction], None]
PredictorProvider = Callable[[], Predictor]


class DriverError(Exception):
    """A condition that ends the driver: ``message`` is one sentence, ``exit_code`` as above."""

    def __init__(self, message: str, exit_code: int = EXIT_INPUT):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


@dataclass(frozen=True)
class Endpoint:
    """Where the server listens: a UNIX socket path or a TCP host and port.

    For UNIX sockets, ``address`` follows i-PI: the socket file is ``sockets_prefix +
    address`` (``/tmp/ipi_NAME``) unless ``address`` is an absolute path, which is used
    as it is.
    """

    address: str = "localhost"
    port: int = DEFAULT_PORT
    unix: bool = False
    sockets_prefix: str = DEFAULT_SOCKETS_PREFIX

    @property
    def path(self) -> str:
        return self.address if os.path.isabs(self.address) else self.sockets_prefix + self.address

    def __str__(self) -> str:
        return f"UNIX socket {self.path}" if self.unix else f"{self.address}:{self.port} (TCP)"

    def connect(self, timeout: float) -> socket.socket:
        """Connect, retrying until ``timeout`` seconds have passed; DriverError otherwise."""
        deadline = time.monotonic() + max(0.0, timeout)
        hint = ("-u/-a" if self.unix else "-a/-p")
        while True:
            remaining = deadline - time.monotonic()
            try:
                sock = self._try_connect(max(remaining, 0.05))
            except (FileNotFoundError, ConnectionRefusedError, TimeoutError, ConnectionResetError):
                pass
            except socket.gaierror:
                raise DriverError(f"cannot resolve the host name {self.address!r} given with "
                                  "-a/--address", EXIT_CONNECT) from None
            except OSError as exc:
                raise DriverError(f"cannot connect to {self}: {exc.strerror or exc}",
                                  EXIT_CONNECT) from None
            else:
                return sock
            if time.monotonic() >= deadline:
                raise DriverError(
                    f"no i-PI server accepted a connection at {self} within {timeout:g} s; "
                    f"start i-PI first and check that {hint} match the <ffsocket> of its "
                    "input", EXIT_CONNECT)
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _try_connect(self, timeout: float) -> socket.socket:
        if not self.unix:  # tries every address the name resolves to (IPv4 and IPv6)
            sock = socket.create_connection((self.address, self.port), timeout=timeout)
            try:
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except BaseException:
                sock.close()
                raise
            return sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self.path)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return sock


@dataclass
class ServeSummary:
    """What :func:`serve` did: force requests answered, structures evaluated, connections."""

    force_requests: int = 0
    structures: int = 0
    connections: int = 0


# ------------------------------------------------------------------ physics at the boundary

def virial_from_stress(stress: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Virial (3, 3) in eV from ASE-convention stress (eV/A^3): ``-stress * volume``."""
    return -np.asarray(stress, dtype=float).reshape(3, 3) * abs(np.linalg.det(cell))


_SHIFTS = np.array([s for s in product((-1, 0, 1), repeat=3) if any(s)])


def close_pairs(positions: np.ndarray, cell: np.ndarray | None,
                pbc: Sequence[bool], cutoff: float) -> list[tuple[int, int, float]]:
    """Pairs of atoms closer than ``cutoff`` (Angstrom), minimum image along periodic axes.

    Returns ``(i, j, distance)`` with ``i < j``, sorted by distance. Uses a k-d tree plus
    images of the atoms within ``cutoff`` of a periodic face, so it costs O(N log N).
    """
    from scipy.spatial import cKDTree

    positions = np.asarray(positions, dtype=float)
    n = len(positions)
    points, owner = positions, np.arange(n)
    periodic = np.array([bool(p) for p in pbc]) if cell is not None else np.zeros(3, bool)
    if periodic.any():
        cell = np.asarray(cell, dtype=float)
        frac = positions @ np.linalg.inv(cell)
        frac[:, periodic] %= 1.0
        wrapped = frac @ cell
        # Perpendicular widths of the cell: an atom within `cutoff` of a periodic face gets
        # images across it (and across edges/corners where it is near several faces).
        normals = np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]])
        delta = cutoff * np.linalg.norm(normals, axis=1) / abs(np.linalg.det(cell))
        low, high = frac < delta, frac > 1.0 - delta
        near = np.flatnonzero(((low | high) & periodic).any(axis=1))
        pts, own = [wrapped], [owner]
        if near.size:
            sh = _SHIFTS[None]  # (1, 26, 3)
            ok = np.where(sh == 1, low[near, None, :],
                          np.where(sh == -1, high[near, None, :], True))
            ok &= periodic | (sh == 0)
            atom, image = np.nonzero(ok.all(axis=2))
            pts.append(wrapped[near[atom]] + _SHIFTS[image] @ cell)
            own.append(near[atom])
        points, owner = np.concatenate(pts), np.concatenate(own)
    pairs = cKDTree(points).query_pairs(cutoff, output_type="ndarray")
    found: dict[tuple[int, int], float] = {}
    for a, b in pairs:
        i, j = sorted((int(owner[a]), int(owner[b])))
        if i == j:
            continue
        d = float(np.linalg.norm(points[a] - points[b]))
        if d < found.get((i, j), math.inf):
            found[(i, j)] = d
    return sorted(((i, j, d) for (i, j), d in found.items()), key=lambda t: t[2])


def extras_json(prediction: Prediction) -> str:
    """The JSON extras string for one prediction (keys documented in the module docstring)."""
    data = dict(prediction.extra)
    if "raw" in data:
        raise DriverError("the model put the key 'raw' into its extras, which i-PI reserves; "
                          "rename it in the posterior", EXIT_STRUCTURE)
    data.update(
        energy_uncertainty=float(prediction.energy_sigma),
        forces_uncertainty=[float(x) for x in np.asarray(prediction.forces_sigma).ravel()],
        confidence=float(prediction.confidence),
        model_version=int(prediction.model_version),
    )
    return json.dumps(data, separators=(",", ":"), default=_json_default)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return value.tolist()
    raise TypeError(f"extras value of type {type(value).__name__} is not JSON serialisable")


# ------------------------------------------------------------------------------ serving

class _Server:
    """One serving session (possibly over several connections); see :func:`serve`."""

    def __init__(self, predictor, numbers, pbc, endpoint, connect_timeout, exit_on_disconnect,
                 on_prediction, predictor_provider, min_distance, template_name):
        self.predictor = predictor
        self.numbers = np.asarray(numbers, dtype=int)
        self.pbc = _as_pbc(pbc)
        self.periodic = any(self.pbc)
        self.endpoint = endpoint
        self.connect_timeout = connect_timeout
        self.exit_on_disconnect = exit_on_disconnect
        self.on_prediction = on_prediction
        self.predictor_provider = predictor_provider
        self.min_distance = min_distance
        self.template_name = template_name
        self.summary = ServeSummary()
        self._warned_no_stress = False

    # -- connection management
    def run(self) -> ServeSummary:
        sock = self.endpoint.connect(self.connect_timeout)
        while True:
            self.summary.connections += 1
            log.info("connected to i-PI at %s", self.endpoint)
            try:
                self._serve_connection(Channel(sock))
                log.info("the server sent EXIT after %s; done",
                         _count(self.summary.force_requests))
                return self.summary
            except ConnectionClosed as exc:
                message = (f"the server at {self.endpoint} closed the connection without "
                           f"sending EXIT, after {_count(self.summary.force_requests)}")
                log.debug("disconnect detail: %s", exc)
            except ProtocolError as exc:
                raise DriverError(f"the server at {self.endpoint} sent a malformed message: "
                                  f"{exc}", EXIT_PROTOCOL) from None
            finally:
                sock.close()
            if self.exit_on_disconnect:
                raise DriverError(message, EXIT_DISCONNECTED)
            log.info("%s; waiting up to %g s for a server to come back", message,
                     self.connect_timeout)
            try:
                sock = self.endpoint.connect(self.connect_timeout)
            except DriverError:
                raise DriverError(f"{message}, and no server came back within "
                                  f"{self.connect_timeout:g} s", EXIT_DISCONNECTED) from None

    def _serve_connection(self, ch: Channel) -> None:
        state, batch_size, reply = "NEEDINIT", 1, None
        while True:
            name = ch.recv_header()
            if name == "STATUS":
                ch.send_header(state)
            elif name == "INIT":
                init = read_init(ch)
                batch_size = init.batch_size
                state = "HAVEDATA" if reply is not None else "READY"
                log.info("initialised by the server (bead %d, batch size %d)",
                         init.bead_index, batch_size)
            elif name == "POSDATA":
                frames = read_posdata(ch, batch_size)
                reply = self._evaluate(frames, batched=batch_size > 1)
                state = "HAVEDATA"
            elif name == "GETFORCE":
                if reply is None:
                    raise ProtocolError("expected POSDATA before GETFORCE, but GETFORCE "
                                        "arrived with no structure pending")
                ch.send(reply, "FORCEREADY")
                reply, state = None, "READY"
            elif name == "EXIT":
                return
            else:
                raise ProtocolError(f"expected STATUS, INIT, POSDATA, GETFORCE or EXIT from "
                                    f"the server, but received {name}")

    # -- evaluation
    def _evaluate(self, frames: list[Frame], batched: bool) -> bytes:
        self.summary.force_requests += 1
        if self.predictor_provider is not None:
            self.predictor = self.predictor_provider()
        # Batches are padded by repeating the last structure: evaluate repeats only once.
        unique: list[Structure] = []
        index: list[int] = []
        for frame in frames:
            structure = self._structure(frame)
            if unique and _same(unique[-1], structure):
                index.append(len(unique) - 1)
            else:
                unique.append(structure)
                index.append(len(unique) - 1)
        try:
            predictions = list(self.predictor.predict(unique))
        except InputError as exc:
            raise DriverError(f"the model cannot evaluate the structure of force request "
                              f"{self.summary.force_requests}: {exc}", EXIT_STRUCTURE) from None
        if len(predictions) != len(unique):
            raise RuntimeError(f"the predictor returned {len(predictions)} predictions for "
                               f"{len(unique)} structures")
        self.summary.structures += len(unique)
        results = []
        for structure, prediction in zip(unique, predictions):
            if self.on_prediction is not None:
                self.on_prediction(structure, prediction)
            results.append(ForceResult(float(prediction.energy), np.asarray(prediction.forces),
                                       self._virial(structure, prediction),
                                       extras_json(prediction)))
        return encode_forceready([results[i] for i in index], batched=batched)

    def _virial(self, structure: Structure, prediction: Prediction) -> np.ndarray:
        if structure.cell is None:
            return np.zeros((3, 3))
        if prediction.stress is None:
            if not self._warned_no_stress:
                log.warning("the model returned no stress for a periodic structure; sending "
                            "a zero virial (constant-pressure runs will be wrong)")
                self._warned_no_stress = True
            return np.zeros((3, 3))
        return virial_from_stress(prediction.stress, structure.cell)

    def _structure(self, frame: Frame) -> Structure:
        """Build and validate the Structure for one frame; DriverError for bad input."""
        request = self.summary.force_requests
        n, expected = len(frame.positions), len(self.numbers)
        if n != expected:
            raise DriverError(
                f"i-PI sent {n} atoms but {self.template_name} has {expected}; use the same "
                "structure (same atoms in the same order) for --template as for i-PI's "
                "<initialize>", EXIT_STRUCTURE)
        bad = np.flatnonzero(~np.isfinite(frame.positions).all(axis=1))
        if len(bad):
            raise DriverError(
                f"i-PI sent non-finite positions (NaN or inf) for "
                f"atom{'s' if len(bad) > 1 else ''} {_list(bad)} in force request {request}; "
                "the dynamics has blown up, so restart from an earlier checkpoint with a "
                "smaller time step", EXIT_STRUCTURE)
        cell = None
        if self.periodic:
            cell = frame.cell
            volume = abs(np.linalg.det(cell)) if np.isfinite(cell).all() else 0.0
            if not volume > 1e-6:
                raise DriverError(
                    f"i-PI sent a cell of zero volume in force request {request}, but "
                    f"{self.template_name} is periodic; give i-PI a cell (<cell> or a CELL "
                    "line in its .xyz) or use a non-periodic template", EXIT_STRUCTURE)
        pairs = close_pairs(frame.positions, cell, self.pbc, self.min_distance)
        if pairs:
            i, j, d = pairs[0]
            more = f" (and {len(pairs) - 1} more pairs)" if len(pairs) > 1 else ""
            raise DriverError(
                f"atoms {i} and {j} are {d:.3f} A apart in force request {request}, closer "
                f"than {self.min_distance:g} A{more}; the structure has collapsed, so restart "
                "from an earlier checkpoint with a smaller time step", EXIT_STRUCTURE)
        return Structure(self.numbers.copy(), frame.positions.copy(),
                         None if cell is None else cell.copy(),
                         self.pbc if cell is not None else (False, False, False))


def _as_pbc(pbc) -> tuple[bool, bool, bool]:
    if isinstance(pbc, (bool, np.bool_)):
        return (bool(pbc),) * 3
    values = tuple(bool(p) for p in pbc)
    if len(values) != 3:
        raise ValueError(f"pbc needs 3 values, got {len(values)}")
    return values  # type: ignore[return-value]


def _same(a: Structure, b: Structure) -> bool:
    return (np.array_equal(a.positions, b.positions)
            and (a.cell is None) == (b.cell is None)
            and (a.cell is None or np.array_equal(a.cell, b.cell)))


def _count(n: int) -> str:
    return f"{n} force request{'' if n == 1 else 's'}"


def _list(indices, limit: int = 5) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:limit])
    return shown + (f" and {len(indices) - limit} more" if len(indices) > limit else "")


def serve(predictor: Predictor, numbers: Sequence[int], *, address: str = "localhost",
          port: int | None = None, unix: bool = False,
          connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
          pbc: bool | Sequence[bool] = (False, False, False),
          sockets_prefix: str = DEFAULT_SOCKETS_PREFIX, exit_on_disconnect: bool = False,
          on_prediction: OnPrediction | None = None,
          predictor_provider: PredictorProvider | None = None,
          min_distance: float = DEFAULT_MIN_DISTANCE,
          template_name: str = "the template") -> ServeSummary:
    """Serve ``predictor`` to the i-PI-protocol server at the given address until EXIT.

    predictor: evaluates structures (:class:`rarefly.prediction.Predictor`).
    numbers: (N,) atomic numbers in i-PI's atom order (i-PI does not send species).
    address, port, unix, sockets_prefix: the server, as in i-PI's drivers: with ``unix``,
        the socket file ``sockets_prefix + address`` (or ``address`` if absolute);
        otherwise TCP ``address:port`` (port 31415 when None).
    connect_timeout: seconds to keep trying to connect (and to reconnect after a
        disconnect without EXIT).
    pbc: periodicity of the system (bool or 3 bools); decides cell and virial handling.
    exit_on_disconnect: end at once (code 4) when the server disconnects without EXIT.
    on_prediction, predictor_provider: hooks, see the module docstring.
    min_distance: Angstrom; closer atoms end the run (code 6).
    template_name: how error messages name the source of ``numbers``.

    Returns a :class:`ServeSummary` after EXIT; raises :class:`DriverError` otherwise.
    """
    endpoint = Endpoint(address, DEFAULT_PORT if port is None else int(port), unix,
                        sockets_prefix)
    return _Server(predictor, numbers, pbc, endpoint, connect_timeout, exit_on_disconnect,
                   on_prediction, predictor_provider, min_distance, template_name).run()
