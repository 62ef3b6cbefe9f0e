"""Frames on their way from a driver to the trainer: zmq multipart, JSON + raw arrays.

frame 1  JSON header: ``{"v": 1, "frame_id", "origin": "flagged"|"audit"|"labelled",
         "step", "walker", "model_version", "natoms", "periodic", "sigma_E", "sigma_E_raw",
         "confidence", "pred_energy", "forces_sigma_max", "level", "force_threshold",
         "epsilon"}`` (eV, eV/A; the last three are the driver's flagging criterion, which the
         trainer applies again with a newer model, non-numbers ignored); for ``labelled``
         frames (guarantee mode) also ``"ref_energy"`` and ``"reference"``.
frame 2  atomic numbers, N int32
frame 3  positions, N x 3 float64, Angstrom
frame 4  cell, 3 x 3 float64, Angstrom, rows (zero-length when not periodic)
frame 5  reference forces, N x 3 float64, eV/A (``labelled`` only; else zero-length)

Never pickle; sizes are checked against the header.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from rarefly.prediction import Structure

VERSION = 1


class MessageError(ValueError):
    pass


@dataclass
class FrameMessage:
    structure: Structure
    header: dict = field(default_factory=dict)
    ref_forces: np.ndarray | None = None

    @property
    def frame_id(self) -> str:
        return str(self.header["frame_id"])

    @property
    def origin(self) -> str:
        return str(self.header.get("origin", "flagged"))


def encode(msg: FrameMessage) -> list[bytes]:
    s = msg.structure
    periodic = s.cell is not None and any(s.pbc)
    header = dict(msg.header, v=VERSION, natoms=len(s.numbers), periodic=bool(periodic),
                  pbc=[bool(p) for p in s.pbc])
    return [
        json.dumps(header).encode(),
        np.ascontiguousarray(s.numbers, dtype="<i4").tobytes(),
        np.ascontiguousarray(s.positions, dtype="<f8").tobytes(),
        np.ascontiguousarray(s.cell, dtype="<f8").tobytes() if periodic else b"",
        np.ascontiguousarray(msg.ref_forces, dtype="<f8").tobytes() if msg.ref_forces is not None else b"",
    ]


def decode(frames: list[bytes]) -> FrameMessage:
    if len(frames) != 5:
        raise MessageError(f"a frame message has 5 parts, this one has {len(frames)}")
    try:
        header = json.loads(frames[0].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"the header is not JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("v") != VERSION or "frame_id" not in header:
        raise MessageError("the header is not a version-1 frame header with a frame_id")
    n = header.get("natoms")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise MessageError(f"the header's natoms is {n!r}, not a number of atoms")

    def arr(buf, dtype, shape, what):
        size = np.dtype(dtype).itemsize
        if len(buf) % size:
            raise MessageError(f"{what} is {len(buf)} bytes, not a whole number of {size}-byte values")
        a = np.frombuffer(buf, dtype=dtype)
        if a.size != int(np.prod(shape)):
            raise MessageError(f"{what} has {a.size} values, expected {int(np.prod(shape))}")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise MessageError(f"{what} holds non-finite values")
        return a.reshape(shape).astype(float if a.dtype.kind == "f" else int)

    numbers = arr(frames[1], "<i4", (n,), "atomic numbers")
    positions = arr(frames[2], "<f8", (n, 3), "positions")
    cell = arr(frames[3], "<f8", (3, 3), "cell") if header.get("periodic") else None
    pbc = header.get("pbc", [True] * 3) if cell is not None else [False] * 3
    if not isinstance(pbc, list) or len(pbc) != 3:
        raise MessageError(f"the header's pbc is {pbc!r}, not three true/false values")
    pbc = tuple(bool(p) for p in pbc)
    forces = arr(frames[4], "<f8", (n, 3), "forces") if frames[4] else None
    if header.get("origin") == "labelled":
        e = header.get("ref_energy")
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not np.isfinite(e):
            raise MessageError(f"a labelled frame needs a finite ref_energy, this one has {e!r}")
        if forces is None:
            raise MessageError("a labelled frame needs its reference forces, this one has none")
    return FrameMessage(Structure(numbers, positions, cell, pbc), header, forces)
