"""The rarefly model file (``.rfly``): one file, complete or absent.

A ``torch.save`` of a dict of tensors and plain Python values only, so it loads with
``torch.load(weights_only=True)`` (no pickled code):

==================  ===============================================================
``format``          ``"rarefly-model"``
``format_version``  layout version of this dict (upgraded on load, see ``UPGRADES``)
``model_version``   increases by one with every published refinement of the posterior
``kind``            posterior kind: ``"lastlayer"`` or ``"sghmc"``
``architecture``    JSON-able MACE architecture (:func:`rarefly.foundation.architecture_of`)
``weights``         state dict of the base MACE (foundation or fine-tuned mean)
``posterior``       the kind's own tensors (see its module)
``calibration``     Student-t state (:class:`rarefly.calibration.Calibration`)
``settings``        epsilon (eV), noise levels, ... (:class:`PosteriorSettings`)
``energy_offset``   per-element reference-energy offsets, eV (METHOD.md §1)
``provenance``      where it came from: foundation, data, creation time, parent version
==================  ===============================================================

Writes are atomic: a temporary file in the same folder, ``fsync``, then ``os.replace``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

FORMAT = "rarefly-model"
FORMAT_VERSION = 1

#: format_version -> function upgrading a dict of that version to the next one
UPGRADES: dict[int, Callable[[dict], dict]] = {}


class ModelFileError(RuntimeError):
    """An unreadable or foreign model file; the message names the file."""


def save_model_file(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically to ``path`` (never a half-written file at ``path``)."""
    path = Path(path)
    payload = dict(payload, format=FORMAT, format_version=FORMAT_VERSION)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_model_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a model file (safe loading), upgrading older layouts."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file {path} does not exist; build one with `rarefly fit`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(f"cannot read model file {path}: it is not a rarefly model file or it "
                             f"is damaged ({type(exc).__name__})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a rarefly model file (for a MACE checkpoint, run "
                             "`rarefly fit --foundation FILE` first)")
    version = int(payload.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{path} has format version {version}, newer than this rarefly "
                             f"({FORMAT_VERSION}); upgrade rarefly")
    while version < FORMAT_VERSION:
        payload = UPGRADES[version](payload)
        version += 1
        payload["format_version"] = version
    return payload
