"""The driver side of the uncertainty collective variable: sigma_E on request, over zmq.

PLUMED (inside i-PI's process, see :mod:`rarefly.cv`) asks for the calibrated energy
uncertainty sigma_E and its gradient at the positions it is biasing. The driver is the only
process that evaluates the model, so it answers: :class:`CVService` is a zmq REP server that
runs in a thread of the driver (``rarefly driver`` starts it) or, without a socket driver
(e.g. i-PI's ``<ffdirect>``), alone as ``rarefly cv-server``.

The model is not evaluated twice for the same positions. After every force call the driver
hands its result to :meth:`CVService.remember` (the client's ``on_prediction`` hook; call it
*before* the forces go back to i-PI: i-PI asks PLUMED right after it has the forces). A
request whose positions match a remembered structure is answered from that cache; a new one
(a path-integral centroid) is evaluated once, under the lock the force loop also holds, and
cached too. In the driver::

    service = CVService(predictor, default_endpoint(name), template=template).start()
    serve(service.guarded(), ..., on_prediction=service.remember)   # rarefly.client.serve
    ...                                    # a hot-swapped model: service.set_predictor(new)
    service.stop()

``guarded()`` is the predictor behind ``service.model_lock``, so the force loop and the CV
never run the model at the same time.

Positions match when every coordinate agrees within ``1e-8 A + 1e-8 |x|``: PLUMED converts
i-PI's Bohr with its own constant (0.52917721), which differs from ``ase.units.Bohr`` by
1.1e-9, and periodic positions match modulo lattice vectors (i-PI may wrap what it sends to
the driver, never what it gives PLUMED).

Wire format (version 1), every message a zmq multipart message, never pickle:

request   frame 1  JSON ``{"op": "sigma", "natoms": N, "units": "angstrom/eV"}``
          frame 2  positions, N x 3 little-endian float64, Angstrom
          frame 3  (optional) cell, 3 x 3 float64, Angstrom, lattice vectors as rows
reply     frame 1  JSON ``{"ok": true, "sigma_E": s, "model_version": v, "cached": bool,
                   "natoms": N, "periodic": bool, "cell_gradient": bool}``, sigma_E in eV
          frame 2  d sigma_E / d positions, N x 3 float64, eV/Angstrom
          frame 3  (when "cell_gradient") d sigma_E / d strain, 3 x 3 float64, eV
                   (the convention of :class:`rarefly.prediction.Prediction`)
error     frame 1  JSON ``{"ok": false, "error": "one sentence"}``

``{"op": "ping"}`` answers ``{"ok": true, "model_version": v, "natoms": N or null}`` and
``{"op": "stats"}`` the counters of :attr:`CVService.stats`. A malformed request (bad JSON,
wrong sizes, non-finite numbers, another system) gets an error reply; the service never
crashes on one.

Endpoints: ``ipc:///tmp/rarefly-cv-<name>`` by default (:func:`default_endpoint`); a
``tcp://`` endpoint is only bound on another interface than loopback when the user gives it
explicitly.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import zmq

from rarefly.prediction import InputError, Prediction, Predictor, Structure

PROTOCOL_VERSION = 1
#: units of every array on the wire (the header's "units" must say so)
WIRE_UNITS = "angstrom/eV"
#: environment variable the PLUMED side reads the endpoint from (see :mod:`rarefly.cv`)
ENV_ENDPOINT = "RAREFLY_CV_ENDPOINT"
#: name used in the default endpoint when none is given (i-PI's default socket address)
DEFAULT_NAME = "localhost"
#: positions match a remembered structure within MATCH_ATOL + MATCH_RTOL * |x| (Angstrom)
MATCH_ATOL = 1e-8
MATCH_RTOL = 1e-8
DEFAULT_CACHE_SIZE = 64
#: how long a request waits for the driver's first structure when no template was given (s)
DEFAULT_FIRST_STRUCTURE_WAIT_S = 30.0
MAX_HEADER_BYTES = 65536
MAX_ATOMS = 10_000_000
_OPS = ("sigma", "ping", "stats")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ProtocolError(ValueError):
    """A message that does not follow the wire format; the text is one sentence."""


#: which Student-t calibration the CV's sigma_E carries (:meth:`CVService.cv_scale`)
CV_CALIBRATIONS = ("start", "current")


def default_endpoint(name: str = DEFAULT_NAME) -> str:
    """The endpoint of the CV service of the driver called ``name`` (its socket address)."""
    if not _NAME_RE.match(name):
        raise ValueError(f"CV service name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return f"ipc:///tmp/rarefly-cv-{name}"


def check_endpoint(endpoint: str) -> str:
    """Validate a user-given endpoint (``ipc://PATH`` or ``tcp://HOST:PORT``) and return it."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if not path or len(path.encode()) > 100:
            raise ValueError(f"ipc endpoint {endpoint!r} needs a path of 1-100 bytes")
        return endpoint
    if re.match(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[^:/\[\]]+):(\d+|\*)$", endpoint):
        return endpoint
    raise ValueError(f"endpoint {endpoint!r} is neither ipc://PATH nor tcp://HOST:PORT")


def is_loopback(endpoint: str) -> bool:
    """True for ipc endpoints and tcp endpoints on 127.0.0.1 / localhost / ::1."""
    if endpoint.startswith("ipc://"):
        return True
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


# --------------------------------------------------------------------------- wire format


@dataclass
class SigmaReply:
    """A decoded answer: sigma_E (eV), its gradients and where they came from."""

    sigma: float
    gradient: np.ndarray  # (N, 3) eV/A
    cell_gradient: np.ndarray | None  # (3, 3) eV, d sigma / d strain
    model_version: int
    cached: bool
    periodic: bool


def encode_request(positions: np.ndarray, cell: np.ndarray | None = None) -> list[bytes]:
    """Frames of a sigma request; positions (N, 3) and cell (3, 3) in Angstrom."""
    pos = np.ascontiguousarray(positions, dtype="<f8")
    if pos.ndim != 2 or pos.shape[1] != 3:
        raise ValueError(f"positions must have shape (N, 3), not {pos.shape}")
    header = {"op": "sigma", "natoms": int(pos.shape[0]), "units": WIRE_UNITS,
              "version": PROTOCOL_VERSION}
    frames = [json.dumps(header).encode(), pos.tobytes()]
    if cell is not None:
        frames.append(np.ascontiguousarray(cell, dtype="<f8").reshape(3, 3).tobytes())
    return frames


def encode_op(op: str) -> list[bytes]:
    """Frames of a ``ping`` or ``stats`` request."""
    return [json.dumps({"op": op, "version": PROTOCOL_VERSION}).encode()]


def encode_error(message: str) -> list[bytes]:
    return [json.dumps({"ok": False, "error": message}).encode()]


def encode_reply(prediction: Prediction, cached: bool, periodic: bool,
                 scale: float = 1.0) -> list[bytes]:
    """``scale`` multiplies sigma_E and its gradients (the CV's calibration, see
    :meth:`CVService.cv_scale`)."""
    grad = np.ascontiguousarray(scale * np.asarray(prediction.energy_sigma_gradient, dtype=float),
                                dtype="<f8")
    cell_grad = prediction.energy_sigma_cell_gradient if periodic else None
    if cell_grad is not None:
        cell_grad = scale * np.asarray(cell_grad, dtype=float)
    header = {"ok": True, "sigma_E": float(scale * prediction.energy_sigma),
              "model_version": int(prediction.model_version), "cached": bool(cached),
              "natoms": int(grad.shape[0]), "periodic": bool(periodic),
              "cell_gradient": cell_grad is not None}
    frames = [json.dumps(header).encode(), grad.tobytes()]
    if cell_grad is not None:
        frames.append(np.ascontiguousarray(cell_grad, dtype="<f8").reshape(3, 3).tobytes())
    return frames


def _header(frame: bytes) -> dict:
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError(f"the JSON header has {len(frame)} bytes, more than {MAX_HEADER_BYTES}")
    try:
        header = json.loads(bytes(frame).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProtocolError("the first frame is not a JSON object") from None
    if not isinstance(header, dict):
        raise ProtocolError("the first frame is not a JSON object")
    return header


def _array(frame: bytes, shape: tuple[int, ...], what: str) -> np.ndarray:
    expected = 8 * int(np.prod(shape))
    if len(frame) != expected:
        raise ProtocolError(f"the {what} frame has {len(frame)} bytes where {expected} "
                            f"(float64 {'x'.join(map(str, shape))}) were expected")
    arr = np.frombuffer(frame, dtype="<f8").reshape(shape).astype(float)
    if not np.all(np.isfinite(arr)):
        raise ProtocolError(f"the {what} frame holds NaN or infinite numbers")
    return arr


def decode_request(frames: Sequence[bytes]) -> tuple[str, np.ndarray | None, np.ndarray | None]:
    """Server side: (op, positions (N,3) or None, cell (3,3) or None); raises ProtocolError."""
    if not 1 <= len(frames) <= 3:
        raise ProtocolError(f"a request has 1 to 3 frames, this one has {len(frames)}")
    header = _header(frames[0])
    op = header.get("op")
    if op not in _OPS:
        raise ProtocolError(f"unknown op {op!r}; use one of {', '.join(_OPS)}")
    version = header.get("version", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"wire format version {version!r} is not {PROTOCOL_VERSION}; "
                            "update rarefly on both sides")
    if op != "sigma":
        if len(frames) != 1:
            raise ProtocolError(f"a {op} request has one frame, this one has {len(frames)}")
        return op, None, None
    natoms = header.get("natoms")
    if isinstance(natoms, bool) or not isinstance(natoms, int) or not 0 < natoms <= MAX_ATOMS:
        raise ProtocolError(f"natoms must be an integer from 1 to {MAX_ATOMS}, not {natoms!r}")
    if header.get("units") != WIRE_UNITS:
        raise ProtocolError(f"units must be {WIRE_UNITS!r}, not {header.get('units')!r}")
    if len(frames) < 2:
        raise ProtocolError("a sigma request needs a positions frame after the header")
    positions = _array(frames[1], (natoms, 3), "positions")
    cell = _array(frames[2], (3, 3), "cell") if len(frames) == 3 else None
    return op, positions, cell


def decode_reply(frames: Sequence[bytes], natoms: int) -> SigmaReply:
    """Client side: a :class:`SigmaReply`; raises ProtocolError for errors and bad replies."""
    if not 1 <= len(frames) <= 3:
        raise ProtocolError(f"the reply has {len(frames)} frames")
    header = _header(frames[0])
    if not header.get("ok"):
        raise ProtocolError(str(header.get("error", "the service answered with an error")))
    if header.get("natoms") != natoms or len(frames) < 2:
        raise ProtocolError(f"the reply is for {header.get('natoms')} atoms, not {natoms}")
    gradient = _array(frames[1], (natoms, 3), "gradient")
    cell_gradient = None
    if header.get("cell_gradient"):
        if len(frames) != 3:
            raise ProtocolError("the reply announces a cell gradient but has no such frame")
        cell_gradient = _array(frames[2], (3, 3), "cell gradient")
    sigma = header.get("sigma_E")
    if not isinstance(sigma, (int, float)) or not np.isfinite(sigma):
        raise ProtocolError(f"the reply's sigma_E is {sigma!r}, not a finite number")
    return SigmaReply(float(sigma), gradient, cell_gradient, int(header.get("model_version", -1)),
                      bool(header.get("cached")), bool(header.get("periodic")))


# --------------------------------------------------------------------------------- cache


def _cells_match(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.all(np.abs(a - b) <= MATCH_ATOL + MATCH_RTOL * np.abs(a)))


class PredictionCache:
    """The last ``size`` (structure, prediction) pairs, searched newest first. Thread-safe."""

    def __init__(self, size: int = DEFAULT_CACHE_SIZE):
        if size < 1:
            raise ValueError("the cache needs room for at least one structure")
        self._items: deque[tuple[Structure, Prediction]] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, structure: Structure, prediction: Prediction) -> None:
        with self._lock:
            self._items.appendleft((structure, prediction))

    def find(self, structure: Structure) -> Prediction | None:
        periodic = structure.cell is not None and any(structure.pbc)
        pos = structure.positions
        with self._lock:
            items = [(k, p) for k, p in self._items if k.positions.shape == pos.shape
                     and (not periodic or _cells_match(k.cell, structure.cell))]
        if not items:
            return None
        # all candidates at once (newest first): one numpy pass instead of one per entry
        known = np.stack([k.positions for k, _ in items])
        delta = known - pos
        if periodic:
            frac = delta @ np.linalg.inv(structure.cell)
            delta = (frac - np.round(frac)) @ structure.cell
        tol = MATCH_ATOL + MATCH_RTOL * np.maximum(np.abs(known), np.abs(pos))
        hits = np.flatnonzero(np.all(np.abs(delta) <= tol, axis=(1, 2)))
        return items[hits[0]][1] if hits.size else None

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class LockedPredictor:
    """A service's current predictor, evaluated under a lock (see :meth:`CVService.guarded`)."""

    def __init__(self, service: "CVService", lock: threading.Lock):
        self._service, self._lock = service, lock

    @property
    def model_version(self) -> int:
        return self._service.predictor.model_version

    def predict(self, structures: Sequence[Structure]) -> list[Prediction]:
        with self._lock:
            return self._service.predictor.predict(structures)

    def __getattr__(self, name):  # atomic_numbers, epsilon, ...: the wrapped predictor's
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._service.predictor, name)


# ------------------------------------------------------------------------------- service


class CVService:
    """zmq REP server answering sigma_E requests for one system, in a daemon thread.

    predictor: the model (the driver's own; evaluated only under ``model_lock``).
    endpoint: where to bind; :func:`default_endpoint` when None.
    template: the system's species and periodicity (a :class:`Structure`); when None, the
        first structure given to :meth:`remember` is the template.
    model_lock: the lock the driver's force loop holds while it evaluates ``predictor``.
    cache_size: how many structures to remember (beads x a few is plenty).

    Use ``with CVService(...) as service:`` or ``start()``/``stop()``; after ``start()``,
    ``service.endpoint`` is the bound endpoint (a ``tcp://...:*`` port resolved).
    """

    def __init__(self, predictor: Predictor, endpoint: str | None = None, *,
                 template: Structure | None = None, model_lock: threading.Lock | None = None,
                 cache_size: int = DEFAULT_CACHE_SIZE,
                 first_structure_wait_s: float = DEFAULT_FIRST_STRUCTURE_WAIT_S,
                 calibration: str = "start"):
        if calibration not in CV_CALIBRATIONS:
            raise ValueError(f"CV calibration {calibration!r} is not one of "
                             f"{', '.join(CV_CALIBRATIONS)}")
        self.predictor = predictor
        self.calibration = calibration
        #: the Student-t variance factor of the first model the CV was served from
        self._start_factor: float | None = None
        self.endpoint = check_endpoint(endpoint or default_endpoint())
        self.model_lock = model_lock if model_lock is not None else threading.Lock()
        self.cache = PredictionCache(cache_size)
        self.first_structure_wait_s = float(first_structure_wait_s)
        #: sigma requests, cache hits, model evaluations, error replies, ping/stats requests
        self.stats = {"requests": 0, "hits": 0, "evaluations": 0, "errors": 0, "control": 0}
        self._template = template
        self._template_ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._bind_error: BaseException | None = None

    # -- the driver's side
    def guarded(self) -> "LockedPredictor":
        """The service's predictor behind ``model_lock``: give this to the force loop."""
        return LockedPredictor(self, self.model_lock)

    def set_predictor(self, predictor: Predictor) -> None:
        """Serve a new model (hot swap); predictions of the old one are forgotten."""
        with self.model_lock:
            self.predictor = predictor
            self.cache.clear()

    def remember(self, structure: Structure, prediction: Prediction) -> None:
        """Cache a prediction the driver has just made (the client's ``on_prediction`` hook)."""
        if self._template is None:
            with self._template_ready:
                if self._template is None:
                    self._template = structure
                self._template_ready.notify_all()
        self.cache.add(structure, prediction)

    def lookup(self, structure: Structure) -> Prediction | None:
        """A cached prediction for ``structure`` (e.g. one the CV asked for first), or None."""
        return self.cache.find(structure)

    # -- lifecycle
    def start(self) -> "CVService":
        """Bind and start serving; raises OSError with a sentence when the endpoint is taken."""
        if self._thread is not None:
            raise RuntimeError("the CV service is already running")
        if self.endpoint.startswith("ipc://") and os.path.exists(self.endpoint[6:]):
            if _answers_ping(self.endpoint):
                raise OSError(f"another rarefly CV service already answers on {self.endpoint}; "
                              "give this driver another name or --cv-endpoint")
        if not is_loopback(self.endpoint):
            print(f"rarefly cv: warning: {self.endpoint} is reachable from other machines",
                  file=sys.stderr)
        self._thread = threading.Thread(target=self._serve, name="rarefly-cv", daemon=True)
        self._thread.start()
        self._bound.wait()
        if self._bind_error is not None:
            self._thread.join()
            self._thread = None
            raise OSError(f"cannot bind the CV service to {self.endpoint}: {self._bind_error}")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> "CVService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the server thread
    def _serve(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(self.endpoint)
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT) or self.endpoint
        except zmq.ZMQError as err:
            self._bind_error = err
            sock.close()
            ctx.term()
            self._bound.set()
            return
        self._bound.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                frames = sock.recv_multipart()
                sock.send_multipart(self.handle(frames))
        finally:
            sock.close()
            ctx.term()
            if self.endpoint.startswith("ipc://"):  # zmq leaves the socket file behind
                try:
                    os.unlink(self.endpoint[len("ipc://"):])
                except OSError:
                    pass

    def handle(self, frames: Sequence[bytes]) -> list[bytes]:
        """Answer one request (frames in, frames out); never raises."""
        try:
            op, positions, cell = decode_request(frames)
            self.stats["requests" if op == "sigma" else "control"] += 1
            if op == "ping":
                natoms = None if self._template is None else len(self._template.numbers)
                return [json.dumps({"ok": True, "natoms": natoms,
                                    "model_version": int(self.predictor.model_version)}).encode()]
            if op == "stats":
                return [json.dumps({"ok": True, **self.stats, "cached": len(self.cache)}).encode()]
            structure = self._structure(positions, cell)
            prediction = self.cache.find(structure)
            cached = prediction is not None
            if prediction is None:
                with self.model_lock:  # the force loop may be evaluating this very structure
                    prediction = self.cache.find(structure)
                    cached = prediction is not None
                    if prediction is None:
                        prediction = self._evaluate(structure)
            if cached:
                self.stats["hits"] += 1
            return encode_reply(prediction, cached, structure.cell is not None,
                                self.cv_scale(prediction))
        except (ProtocolError, InputError) as err:
            self.stats["errors"] += 1
            return encode_error(str(err))
        except Exception as err:  # noqa: BLE001 - a request must never kill the service
            self.stats["errors"] += 1
            return encode_error(f"the model failed on this structure ({type(err).__name__}: {err})")

    def cv_scale(self, prediction: Prediction) -> float:
        """Factor from the prediction's calibrated sigma_E to the CV's.

        ``calibration="start"`` (default): the CV keeps the Student-t calibration of the first
        model it was served from, sigma_E_raw * sqrt(k_start), so that a new model version
        whose calibration widened (the trainer updates it with every label) does not rescale
        the CV under a running bias: a wall or METAD hills set in eV keep their meaning and a
        hot swap moves the CV only as much as the model's raw uncertainty changed.
        (bench_onthefly.out, fifteenth run: with the current calibration a hot swap doubled
        sigma_E at one step, an upper wall's bias jumped from 0.18 to 6.9 eV and the molecule
        blew up 30 steps later.) ``"current"``: the calibrated sigma_E of the model in use,
        as in the extras. Predictions without ``energy_sigma_raw`` are served unscaled."""
        if self.calibration == "current":
            return 1.0
        raw = (prediction.extra or {}).get("energy_sigma_raw")
        sigma = float(prediction.energy_sigma)
        if not raw or not sigma > 0.0 or not np.isfinite(sigma):
            return 1.0
        factor = (sigma / float(raw)) ** 2
        if self._start_factor is None:
            self._start_factor = factor
        return float(np.sqrt(self._start_factor / factor))

    def _structure(self, positions: np.ndarray, cell: np.ndarray | None) -> Structure:
        template = self._wait_template()
        n = len(template.numbers)
        if positions.shape[0] != n:
            raise ProtocolError(f"the CV asked for {positions.shape[0]} atoms but the driver's "
                                f"system has {n}; use ATOMS=@mdatoms on the same system")
        periodic = template.cell is not None and any(template.pbc)
        if not periodic:
            return Structure(template.numbers, positions, None, (False, False, False))
        if cell is None:
            raise ProtocolError("the system is periodic but the request carries no cell")
        if abs(np.linalg.det(cell)) < 1e-6:
            raise ProtocolError("the request's cell has (almost) zero volume")
        return Structure(template.numbers, positions, cell, template.pbc)

    def _wait_template(self) -> Structure:
        if self._template is None:
            with self._template_ready:
                self._template_ready.wait_for(lambda: self._template is not None,
                                              self.first_structure_wait_s)
        if self._template is None:
            raise ProtocolError("the driver has not evaluated any structure yet and has no "
                                "template, so it does not know the species")
        return self._template

    def _evaluate(self, structure: Structure) -> Prediction:
        prediction = self.predictor.predict([structure])[0]
        self.stats["evaluations"] += 1
        grad = np.asarray(prediction.energy_sigma_gradient, dtype=float)
        if grad.shape != structure.positions.shape:
            raise InputError(f"the model's sigma_E gradient has shape {grad.shape}, "
                             f"not {structure.positions.shape}")
        self.cache.add(structure, prediction)
        return prediction


def _answers_ping(endpoint: str, timeout_s: float = 0.5) -> bool:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart(encode_op("ping"))
        return bool(sock.poll(int(timeout_s * 1000)))
    finally:
        sock.close()
        ctx.term()


def request(endpoint: str, frames: list[bytes], timeout_s: float = 5.0) -> list[bytes]:
    """One request/reply round trip with a fresh REQ socket (tools, tests; not the CV path)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart(frames)
        if not sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no answer from {endpoint} within {timeout_s:g} s")
        return sock.recv_multipart()
    finally:
        sock.close()
        ctx.term()


# ----------------------------------------------------------------------- `rarefly cv-server`


def serve(service: CVService, *, quiet: bool = False) -> int:
    """Run ``service`` until SIGINT/SIGTERM (main thread only); returns an exit status."""
    stop = threading.Event()

    def _handler(signum, frame):  # noqa: ARG001
        stop.set()

    old = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        service.start()
        if not quiet:
            print(f"rarefly cv-server: serving sigma_E (model version "
                  f"{service.predictor.model_version}) on {service.endpoint}", flush=True)
        while not stop.wait(0.2):
            if not service.running:
                print("rarefly cv-server: the service thread stopped", file=sys.stderr)
                return 1
        return 0
    finally:
        service.stop()
        for s, h in old.items():
            signal.signal(s, h)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Serve the calibrated energy uncertainty sigma_E (and its gradient) of a rarefly model "
        "to PLUMED's PyCV interface (rarefly.cv). `rarefly driver` normally runs this service "
        "itself; run it alone when no socket driver evaluates the model (e.g. with i-PI's "
        "<ffdirect>). Point PLUMED at it with RAREFLY_CV_ENDPOINT=<endpoint>.")
    parser.add_argument("--model", required=True, metavar="FILE", help="rarefly model file")
    parser.add_argument("--template", required=True, metavar="FILE",
                        help="a structure file with the species and atom order of i-PI's "
                             "system, e.g. the file of its <initialize> (as for `rarefly "
                             "driver`); it also tells whether the system is periodic")
    parser.add_argument("--pbc", choices=("auto", "yes", "no"), default="auto",
                        help="is the system periodic? auto: as the template says "
                             "(default: %(default)s)")
    parser.add_argument("--endpoint", metavar="URL",
                        help="zmq endpoint to bind: ipc://PATH or tcp://127.0.0.1:PORT "
                             "(default: ipc:///tmp/rarefly-cv-NAME)")
    parser.add_argument("--name", default=DEFAULT_NAME,
                        help="NAME in the default endpoint (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--cache-size", type=int, default=DEFAULT_CACHE_SIZE,
                        help="structures to remember (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from rarefly.client import DriverError
    from rarefly.driver_cli import check_species, load_model, read_template

    try:
        atoms = read_template(args.template, args.pbc)
        predictor = load_model(args.model, args.device, None)
        check_species(atoms.numbers, predictor, args.model, args.template)
        service = CVService(predictor, args.endpoint or default_endpoint(args.name),
                            template=Structure.from_atoms(atoms), cache_size=args.cache_size)
    except DriverError as err:
        print(f"rarefly cv-server: {err.message}", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"rarefly cv-server: {err}", file=sys.stderr)
        return 1
    try:
        return serve(service)
    except OSError as err:
        print(f"rarefly cv-server: {err}", file=sys.stderr)
        return 1
