"""The i-PI socket protocol: message framing, and the only place with atomic units.

This module knows bytes, shapes and units, nothing about physics or models. Every number
that leaves it is in rarefly's units (eV, Angstrom, lattice vectors as rows); every number
that enters the wire is in Hartree atomic units (Hartree, Bohr), converted here with the
constants of :mod:`rarefly.units`.

Messages (all integers int32, all reals float64, native byte order, no padding)::

    header              12 ASCII bytes, upper case, padded with spaces: STATUS, READY,
                        HAVEDATA, NEEDINIT, INIT, POSDATA, GETFORCE, FORCEREADY, EXIT
    INIT                bead index, n, n bytes of parameters (text; i-PI announces
                        batching there as the token "batch_size:B")
    POSDATA             cell h (9 reals, Bohr), inverse cell (9 reals, 1/Bohr),
                        natoms, positions (3*natoms reals, Bohr)
    POSDATA, batched    natoms, B times [h (9), inverse h (9)], B*3*natoms positions
    FORCEREADY          energy (Hartree), natoms, forces (3*natoms, Hartree/Bohr),
                        virial (9, Hartree), n, n bytes of extras (UTF-8 text)
    FORCEREADY, batched B energies, natoms, B*3*natoms forces, B*9 virials,
                        then B times [n, n bytes of extras]

The batched layouts are used when B = ``batch_size`` > 1 (i-PI's ``<ffsocket>`` attribute
``batch_size``), as in i-PI's own ``i-pi-py_driver``.

Cell convention: i-PI's matrix ``h`` holds the lattice vectors as COLUMNS (and the virial
in the same layout); rarefly holds them as rows. :func:`ipi_transpose` is the one place
that converts, in both directions. The inverse cell on the wire is legacy: i-PI sends
``inv(h)``, while ASE's server sends its transpose, so rarefly never relies on it.

Errors: a malformed message raises :class:`ProtocolError`; a connection that closes, at a
message boundary or in the middle of one, raises its subclass :class:`ConnectionClosed`.
Their text is one sentence naming what was expected and what arrived. Nothing is ever
unpickled: arrays are read with :func:`numpy.frombuffer` from exactly counted bytes.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rarefly.units import (
    ANGSTROM_TO_BOHR,
    BOHR_TO_ANGSTROM,
    EV_TO_HARTREE,
    FORCE_EV_A_TO_AU,
    HARTREE_TO_EV,
)

HEADER_LENGTH = 12
HEADERS = ("STATUS", "READY", "HAVEDATA", "NEEDINIT", "INIT", "POSDATA", "GETFORCE",
           "FORCEREADY", "EXIT")
#: Largest atom count / extras length accepted from the wire (guards against garbage).
MAX_ATOMS = 10_000_000
MAX_EXTRAS_BYTES = 256 * 1024 * 1024

_F64 = np.dtype("=f8")
_I32 = np.dtype("=i4")


class ProtocolError(Exception):
    """A malformed message; ``str(error)`` is one sentence: what was expected, what arrived."""


class ConnectionClosed(ProtocolError):
    """The peer closed the connection (``received`` bytes of the pending item had arrived)."""

    def __init__(self, message: str, received: int = 0):
        super().__init__(message)
        self.received = received


def header(name: str) -> bytes:
    """The 12-byte wire form of a message name (``"STATUS"`` -> ``b"STATUS      "``)."""
    raw = name.upper().encode("ascii")
    if len(raw) > HEADER_LENGTH:
        raise ValueError(f"message name {name!r} is longer than {HEADER_LENGTH} bytes")
    return raw.ljust(HEADER_LENGTH)


def ipi_transpose(matrix: np.ndarray) -> np.ndarray:
    """Convert a 3x3 cell-like matrix between i-PI's layout and rarefly's.

    i-PI stores lattice vectors as columns, rarefly (like ASE) as rows; the virial travels
    in i-PI's layout too. The conversion is a transpose, so this one function serves both
    directions. Returns a new C-contiguous array.
    """
    return np.ascontiguousarray(np.asarray(matrix, dtype=float).reshape(3, 3).T)


@dataclass(frozen=True)
class Init:
    """The INIT message: bead index, parameter text and the batch size announced in it."""

    bead_index: int
    parameters: str
    batch_size: int = 1


@dataclass
class Frame:
    """One structure as the server sent it, in rarefly units.

    cell: (3, 3) Angstrom, lattice vectors as rows (zeros when the server has no cell).
    inverse_cell: (3, 3) 1/Angstrom, the wire's inverse cell through the same transpose
        (``inv(cell)`` when the server is i-PI; informational only, see module docstring).
    positions: (N, 3) Angstrom.
    """

    cell: np.ndarray
    inverse_cell: np.ndarray
    positions: np.ndarray


@dataclass
class ForceResult:
    """What the driver returns for one structure, in rarefly units.

    energy: eV. forces: (N, 3) eV/Angstrom. virial: (3, 3) eV, rarefly (row) layout,
    ``-stress * volume`` for periodic systems. extras: text sent verbatim (JSON in rarefly).
    """

    energy: float
    forces: np.ndarray
    virial: np.ndarray
    extras: str = ""


class Channel:
    """A connected stream socket with exact-length reads; knows nothing about units."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def recv_exact(self, nbytes: int, what: str) -> bytes:
        """Read exactly ``nbytes`` bytes of ``what`` (used in error messages)."""
        buf = bytearray(nbytes)
        view = memoryview(buf)
        got = 0
        while got < nbytes:
            try:
                n = self.sock.recv_into(view[got:], nbytes - got)
            except (ConnectionResetError, ConnectionAbortedError):
                n = 0
            if n == 0:
                raise ConnectionClosed(
                    f"expected {what} ({nbytes} bytes), but the connection closed after "
                    f"{got} of them", received=got)
            got += n
        return bytes(buf)

    def recv_header(self) -> str:
        """Read one header and return its name; unknown headers raise ProtocolError."""
        try:
            raw = self.recv_exact(HEADER_LENGTH, "a 12-byte message header")
        except ConnectionClosed as exc:
            if exc.received == 0:
                raise ConnectionClosed("expected a message header, but the connection "
                                       "closed") from None
            raise
        name = raw.decode("ascii", errors="replace").rstrip(" \x00")
        if name not in HEADERS:
            raise ProtocolError(f"expected a message header ({', '.join(HEADERS)}), but "
                                f"received the 12 bytes {raw!r}")
        return name

    def recv_array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        """Read ``count`` values of ``dtype``; returns a new writable 1-D array."""
        dtype = np.dtype(dtype)
        raw = self.recv_exact(dtype.itemsize * count, what)
        return np.frombuffer(raw, dtype=dtype, count=count).copy()

    def recv_int32(self, what: str) -> int:
        return int(self.recv_array(_I32, 1, what)[0])

    def send(self, data: bytes, what: str = "a message") -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            raise ConnectionClosed(f"expected to send {what}, but the connection was "
                                   "closed by the other side") from None

    def send_header(self, name: str) -> None:
        self.send(header(name), name)


# --------------------------------------------------------------------------- driver side

def parse_batch_size(parameters: str) -> int:
    """The batch size announced in an INIT parameter string (1 when absent)."""
    for token in parameters.split(","):
        key, sep, value = token.partition(":")
        if sep and key.strip() == "batch_size":
            try:
                size = int(value.strip())
            except ValueError:
                raise ProtocolError(f"expected an integer after 'batch_size:' in INIT, but "
                                    f"received {value.strip()!r}") from None
            if size < 1:
                raise ProtocolError(f"expected a positive batch_size in INIT, but received "
                                    f"{size}")
            return size
    return 1


def read_init(ch: Channel) -> Init:
    """Read the body of an INIT message (after its header)."""
    bead = ch.recv_int32("the INIT bead index (int32)")
    n = ch.recv_int32("the INIT parameter length (int32)")
    if not 0 <= n <= MAX_EXTRAS_BYTES:
        raise ProtocolError(f"expected a parameter length between 0 and {MAX_EXTRAS_BYTES} "
                            f"bytes in INIT, but received {n}")
    text = ch.recv_exact(n, "the INIT parameter string").decode("utf-8", errors="replace")
    text = text.strip("\x00")
    return Init(bead, text, parse_batch_size(text))


def _check_natoms(natoms: int) -> int:
    if not 0 <= natoms <= MAX_ATOMS:
        raise ProtocolError(f"expected an atom count between 0 and {MAX_ATOMS} in POSDATA, "
                            f"but received {natoms}")
    return natoms


def _frame(h: np.ndarray, ih: np.ndarray, pos: np.ndarray) -> Frame:
    return Frame(cell=ipi_transpose(h) * BOHR_TO_ANGSTROM,
                 inverse_cell=ipi_transpose(ih) * ANGSTROM_TO_BOHR,
                 positions=pos.reshape(-1, 3) * BOHR_TO_ANGSTROM)


def read_posdata(ch: Channel, batch_size: int = 1) -> list[Frame]:
    """Read the body of a POSDATA message (after its header): ``batch_size`` frames."""
    if batch_size == 1:
        h = ch.recv_array(_F64, 9, "the POSDATA cell (9 float64)")
        ih = ch.recv_array(_F64, 9, "the POSDATA inverse cell (9 float64)")
        nat = _check_natoms(ch.recv_int32("the POSDATA atom count (int32)"))
        pos = ch.recv_array(_F64, 3 * nat, f"the POSDATA positions of {nat} atoms")
        return [_frame(h, ih, pos)]
    nat = _check_natoms(ch.recv_int32("the batched POSDATA atom count (int32)"))
    cells = ch.recv_array(_F64, 18 * batch_size,
                          f"the cells of a batched POSDATA of {batch_size} structures")
    pos = ch.recv_array(_F64, 3 * nat * batch_size,
                        f"the positions of {batch_size} structures of {nat} atoms")
    cells = cells.reshape(batch_size, 2, 9)
    pos = pos.reshape(batch_size, 3 * nat)
    return [_frame(cells[b, 0], cells[b, 1], pos[b]) for b in range(batch_size)]


def _extras_bytes(result: ForceResult) -> bytes:
    data = result.extras.encode("utf-8")
    if len(data) > MAX_EXTRAS_BYTES:
        raise ValueError(f"the extras string is {len(data)} bytes; the limit is "
                         f"{MAX_EXTRAS_BYTES}")
    return np.int32(len(data)).tobytes() + data


def _wire_forces(result: ForceResult, natoms: int) -> np.ndarray:
    forces = np.asarray(result.forces, dtype=float)
    if forces.shape != (natoms, 3):
        raise ValueError(f"forces have shape {forces.shape}; expected ({natoms}, 3)")
    return forces * FORCE_EV_A_TO_AU


def encode_forceready(results: Sequence[ForceResult], batched: bool = False) -> bytes:
    """The complete FORCEREADY reply for ``results`` (one result unless ``batched``)."""
    if not batched and len(results) != 1:
        raise ValueError(f"an unbatched FORCEREADY carries 1 result, not {len(results)}")
    if not results:
        raise ValueError("FORCEREADY needs at least one result")
    natoms = len(np.asarray(results[0].forces).reshape(-1, 3))
    energies = np.array([r.energy for r in results], dtype=_F64) * EV_TO_HARTREE
    forces = np.stack([_wire_forces(r, natoms) for r in results]).astype(_F64)
    virials = np.stack([ipi_transpose(r.virial) for r in results]).astype(_F64) * EV_TO_HARTREE
    if batched:
        tail = b"".join(_extras_bytes(r) for r in results)
        return (header("FORCEREADY") + energies.tobytes() + np.int32(natoms).tobytes()
                + forces.tobytes() + virials.tobytes() + tail)
    return (header("FORCEREADY") + energies.tobytes() + np.int32(natoms).tobytes()
            + forces.tobytes() + virials.tobytes() + _extras_bytes(results[0]))


# --------------------------------------------------------------------------- server side
# What i-PI (or ASE's SocketIOCalculator) does; used by rarefly's tests and tools.

def encode_init(parameters: str = "", bead_index: int = 0) -> bytes:
    """The complete INIT message."""
    data = parameters.encode("utf-8")
    return header("INIT") + np.int32(bead_index).tobytes() + np.int32(len(data)).tobytes() + data


def encode_posdata(frames: Sequence[tuple[np.ndarray | None, np.ndarray]],
                   batched: bool = False) -> bytes:
    """The complete POSDATA message for ``(cell, positions)`` pairs in rarefly units.

    ``cell`` holds lattice vectors as rows (Angstrom), or is None for no cell (zeros are
    sent, with a zero inverse, as ASE does). The inverse is sent the way i-PI does.
    """
    if not batched and len(frames) != 1:
        raise ValueError(f"an unbatched POSDATA carries 1 structure, not {len(frames)}")
    blocks, positions = [], []
    natoms = len(np.asarray(frames[0][1]).reshape(-1, 3))
    for cell, pos in frames:
        pos = np.asarray(pos, dtype=float).reshape(-1, 3)
        if len(pos) != natoms:
            raise ValueError("all structures of a batched POSDATA must have the same atoms")
        rows = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=float)
        h = ipi_transpose(rows) * ANGSTROM_TO_BOHR
        ih = np.linalg.pinv(h)
        blocks.append(h.astype(_F64).tobytes() + ih.astype(_F64).tobytes())
        positions.append((pos * ANGSTROM_TO_BOHR).astype(_F64).tobytes())
    count = np.int32(natoms).tobytes()
    if batched:
        return header("POSDATA") + count + b"".join(blocks) + b"".join(positions)
    return header("POSDATA") + blocks[0] + count + positions[0]


def read_forceready(ch: Channel, batch_size: int = 1) -> list[ForceResult]:
    """Read the body of a FORCEREADY reply (after its header) in rarefly units."""
    b = batch_size
    energies = ch.recv_array(_F64, b, "the FORCEREADY energies") * HARTREE_TO_EV
    nat = _check_natoms(ch.recv_int32("the FORCEREADY atom count (int32)"))
    forces = ch.recv_array(_F64, 3 * nat * b, f"the FORCEREADY forces of {nat} atoms")
    virials = ch.recv_array(_F64, 9 * b, "the FORCEREADY virial (9 float64)")
    forces = forces.reshape(b, nat, 3) / FORCE_EV_A_TO_AU
    virials = virials.reshape(b, 9) * HARTREE_TO_EV
    out = []
    for i in range(b):
        n = ch.recv_int32("the FORCEREADY extras length (int32)")
        if not 0 <= n <= MAX_EXTRAS_BYTES:
            raise ProtocolError(f"expected an extras length between 0 and "
                                f"{MAX_EXTRAS_BYTES} bytes in FORCEREADY, but received {n}")
        raw = ch.recv_exact(n, "the FORCEREADY extras string")
        try:
            extras = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"expected UTF-8 text as FORCEREADY extras, but received "
                                f"{raw[:40]!r}") from None
        out.append(ForceResult(float(energies[i]), forces[i], ipi_transpose(virials[i]),
                               extras))
    return out
