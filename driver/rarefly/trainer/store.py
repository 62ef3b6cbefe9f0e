"""Every frame the trainer receives, and every label, in one ASE database (SQLite).

Rows move ``queued -> labelling -> labelled`` (or ``failed``/``skipped``). Each change is one
SQLite transaction, so a SIGKILL at any moment loses no finished label: at restart, rows
left in ``labelling`` go back to ``queued`` and are labelled again; a label is written
together with its state change, so no frame is labelled twice into the data set.

Key-value pairs of a row (ASE db columns): ``frame_id`` (unique: walker/step/model version),
``state``, ``origin`` (``flagged`` | ``audit`` | ``seed``), ``step``, ``walker``,
``model_version`` (the model that flagged it), ``sigma_E`` (eV, calibrated),
``sigma_E_raw`` (eV), ``confidence``, ``pred_energy`` (eV), ``reference`` (description),
``ref_energy`` (eV, as returned by the reference), ``energy_offset`` (eV, added to
``ref_energy`` to line it up with the model's zero), ``labelled_at`` (unix time),
``used_in_version`` (first model version trained on it). Forces go into the row's data:
``ref_forces`` (eV/A).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np

from rarefly.posterior.base import LabelledFrame
from rarefly.prediction import Structure

STATES = ("queued", "labelling", "labelled", "failed", "skipped")


class QueuedRow:
    """What selection reads of a queued row (its id and key-value pairs), kept in memory."""

    __slots__ = ("id", "kv")

    def __init__(self, row_id: int, kv: dict):
        self.id, self.kv = int(row_id), kv

    def get(self, key, default=None):
        return self.kv.get(key, default)

    def __getattr__(self, name):
        try:
            return self.kv[name]
        except KeyError:
            raise AttributeError(name) from None


class FrameStore:
    """The trainer's frames and labels in an ASE database. The trainer is its only writer, so
    the queued rows are also kept in memory (:meth:`queued`): reading a thousand of them back
    through ASE took 0.25 s, and selection reads them between every two refinement steps."""

    def __init__(self, path: str | Path):
        from ase.db import connect

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = connect(str(self.path), type="db", append=True)
        self._queued: dict[int, QueuedRow] | None = None     # loaded at the first queued()
        self._frame_ids: set[str] | None = None              # loaded at the first add()

    # ------------------------------------------------------------------ writing
    def add(self, structure: Structure, *, frame_id: str, origin: str, **meta) -> int | None:
        """Queue a frame; returns its row id, or None if ``frame_id`` is already stored."""
        from ase import Atoms

        if self._frame_ids is None:      # one query per frame cost 0.5 ms at 2500 rows, growing
            self._frame_ids = {str(r.frame_id) for r in self.db.select(include_data=False)
                               if r.get("frame_id") is not None}
        if frame_id in self._frame_ids:
            return None
        atoms = Atoms(numbers=structure.numbers, positions=structure.positions,
                      cell=structure.cell, pbc=structure.pbc)
        kv = {"frame_id": frame_id, "state": "queued", "origin": origin}
        kv.update({k: _plain(v) for k, v in meta.items() if v is not None})
        row_id = self.db.write(atoms, key_value_pairs=kv)
        self._frame_ids.add(frame_id)
        if self._queued is not None:
            self._queued[row_id] = QueuedRow(row_id, kv)
        return row_id

    def set_state(self, row_id: int, state: str, **meta) -> None:
        assert state in STATES
        self.db.update(row_id, state=state, **{k: _plain(v) for k, v in meta.items() if v is not None})
        self._follow_state(row_id, state)

    def _follow_state(self, row_id: int, state: str) -> None:
        """Keep the in-memory queue in step with a row's new state."""
        if self._queued is None:
            return
        if state == "queued":
            row = self.db.get(id=row_id)
            self._queued[row_id] = QueuedRow(row_id, dict(row.key_value_pairs))
        else:
            self._queued.pop(row_id, None)

    def add_label(self, row_id: int, energy: float, forces: np.ndarray, reference: str,
                  energy_offset: float = 0.0) -> None:
        """Store a label and mark the row ``labelled``, in one transaction."""
        self.db.update(row_id, state="labelled", ref_energy=float(energy), reference=reference,
                       energy_offset=float(energy_offset), labelled_at=time.time(),
                       data={"ref_forces": np.asarray(forces, dtype=float)})
        self._follow_state(row_id, "labelled")

    def reject_label(self, row_id: int, energy: float, forces: np.ndarray, reference: str,
                     reason: str) -> None:
        """Keep a label the trainer refuses to learn: the row becomes ``failed`` with the reason,
        the energy and forces stay in the row (``rejected_energy``, data ``rejected_forces``)."""
        e = float(energy)
        kept = {"rejected_energy": e} if np.isfinite(e) else {}
        self.db.update(row_id, state="failed", reason=reason[:300], reference=reference,
                       labelled_at=time.time(), **kept,
                       data={"rejected_forces": np.asarray(forces, dtype=float)})
        self._follow_state(row_id, "failed")

    def recover(self) -> int:
        """After a crash: rows left in ``labelling`` go back to ``queued``. Returns their count."""
        ids = [row.id for row in self.db.select(state="labelling")]
        for i in ids:
            self.db.update(i, state="queued")
        self._queued = None
        return len(ids)

    # ------------------------------------------------------------------ reading
    def rows(self, **selection) -> Iterator:
        return self.db.select(**selection)

    def count(self, **selection) -> int:
        return self.db.count(**selection)

    def queued(self) -> list[QueuedRow]:
        """The queued rows (id and key-value pairs), in the order they were stored."""
        if self._queued is None:
            self._queued = {r.id: QueuedRow(r.id, dict(r.key_value_pairs))
                            for r in self.db.select(state="queued")}
        return list(self._queued.values())

    def structure(self, row) -> Structure:
        if isinstance(row, QueuedRow):
            row = self.db.get(id=row.id)
        return Structure(np.array(row.numbers), np.array(row.positions),
                         np.array(row.cell) if any(row.pbc) else None,
                         tuple(bool(p) for p in row.pbc))

    def labelled_frames(self, origin: str | None = None) -> list[LabelledFrame]:
        """Labelled frames in labelling order, energies as the reference returned them."""
        sel = {"state": "labelled"}
        if origin:
            sel["origin"] = origin
        rows = sorted(self.db.select(**sel), key=lambda r: (r.get("labelled_at", 0), r.id))
        return [LabelledFrame(self.structure(r), float(r.ref_energy), np.array(r.data["ref_forces"]),
                              info={"row": r.id, "origin": r.origin, "frame_id": r.frame_id})
                for r in rows]


def _plain(v):
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    return v
