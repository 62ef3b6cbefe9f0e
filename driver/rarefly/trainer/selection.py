"""Which queued frames to label: drop near-duplicates, prefer high uncertainty, cap the rate.

Near-duplicates: two frames of the same composition whose sorted interatomic distances
differ by less than ``dedup_tol`` (RMS, Angstrom) are the same configuration for the purpose
of learning (invariant to rotation, translation and permutation of like atoms).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rarefly.prediction import Structure


@dataclass
class SelectionPolicy:
    dedup_tol: float = 0.02          # Angstrom, RMS of sorted pair distances
    max_in_flight: int = 2           # labelling tasks at a time
    max_per_update: int = 4          # labels per posterior update at most
    #: rate cap in MD steps: a flagged frame less than this many steps after the last flagged
    #: frame chosen from the same walker is skipped (0: no cap; audit frames are never capped)
    min_step_gap: int = 0
    #: a frame flagged by an older model version goes to the reference only if the model the
    #: trainer holds still flags it (the driver's criterion, from the frame's header); during a
    #: backbone refinement flagged frames are labelled as they come
    rescore_flagged: bool = True


def fingerprint(s: Structure) -> tuple[bytes, np.ndarray]:
    from scipy.spatial.distance import pdist

    comp = np.sort(np.asarray(s.numbers)).tobytes()
    return comp, np.sort(pdist(np.asarray(s.positions)))


class Deduplicator:
    def __init__(self, tol: float):
        self.tol = tol
        self.seen: dict[bytes, list[np.ndarray]] = {}

    def is_duplicate(self, s: Structure) -> bool:
        comp, fp = fingerprint(s)
        for other in self.seen.get(comp, []):
            if np.sqrt(np.mean((other - fp) ** 2)) < self.tol:
                return True
        return False

    def add(self, s: Structure) -> None:
        comp, fp = fingerprint(s)
        self.seen.setdefault(comp, []).append(fp)


class RateCap:
    """At most one flagged frame per ``gap`` MD steps of a walker: a frame less than ``gap``
    steps after the last one taken from its walker is refused. Audit frames and frames
    without a step are never capped; ``gap = 0`` caps nothing. Built from the rows already
    labelled, so that a restarted trainer keeps its window."""

    def __init__(self, gap: int, labelled_rows=()):
        self.gap = int(gap)
        self.last: dict = {}
        for r in labelled_rows:
            if self._capped(r):
                self.take(r)

    @staticmethod
    def _capped(row) -> bool:
        return row.get("origin") != "audit" and row.get("step") is not None

    def allows(self, row) -> bool:
        if not (self.gap and self._capped(row)):
            return True
        last = self.last.get(row.get("walker") or 0)
        return last is None or int(row.get("step")) >= last + self.gap

    def take(self, row) -> None:
        if self._capped(row):
            w = row.get("walker") or 0
            self.last[w] = max(int(row.get("step")), self.last.get(w, int(row.get("step"))))


def rank(rows) -> list:
    """Queued rows, audit frames first (they are few and measure calibration), then flagged
    frames by decreasing raw uncertainty."""
    rows = list(rows)
    audit = [r for r in rows if r.get("origin") == "audit"]
    flagged = sorted((r for r in rows if r.get("origin") != "audit"),
                     key=lambda r: -float(r.get("sigma_E_raw", r.get("sigma_E", 0.0)) or 0.0))
    return audit + flagged
