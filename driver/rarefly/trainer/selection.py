"""Which queued frames to label: drop near-duplicates, prefer high uncertainty, cap the rate.

Near-duplicates: two frames of the same composition whose sorted interatomic distances
differ by less than ``dedup_tol`` (RMS, Angstrom) are the same configuration for the purpose
of learning (invariant to rotation, translation and permutation of like atoms).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from rarefly.prediction import Structure


@dataclass
class SelectionPolicy:
    dedup_tol: float = 0.02          # Angstrom, RMS of sorted pair distances
    max_in_flight: int = 2           # labelling tasks at a time
    max_per_update: int = 4          # labels per posterior update at most
    #: rate cap in MD steps: at most one flagged frame per this many steps of a walker, the
    #: most uncertain of each window (:class:`RateCap`; 0: no cap; audit frames never capped)
    min_step_gap: int = 0
    #: a frame flagged by an older model version goes to the reference only if the model the
    #: trainer holds still flags it (the driver's criterion, from the frame's header); during a
    #: backbone refinement flagged frames are labelled as they come
    rescore_flagged: bool = True
    #: at most this fraction of the reference calls go to audit frames (the newest first); the
    #: others wait while it is reached (1: no bound)
    audit_share: float = 0.2


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


#: seconds without a new frame from a walker after which its open rate-cap window counts as
#: complete (a walker the model trusts for a while sends nothing to complete it)
WINDOW_IDLE_SECONDS = 10.0


class RateCap:
    """At most one flagged frame per ``gap`` MD steps of a walker, the most uncertain one of
    each window. After a label at step ``t`` frames before ``t + gap`` are refused; the next
    window is ``[s, s + gap)``, ``s`` the first queued frame at or after ``t + gap`` (found by
    :meth:`plan`). Its frames wait until the walker has been seen at ``s + gap`` (or has sent
    nothing for :data:`WINDOW_IDLE_SECONDS`), so that the choice is made among the window's
    frames, not given to the first one that arrives (bench_onthefly's thirty-third run: with
    frames taken as they came the labels fell exactly ``gap`` steps apart, whatever their
    uncertainty); later frames wait for their own window (before the thirty-eighth run the
    most uncertain frame anywhere past ``t + gap`` was taken, and labels jumped windows).
    Audit frames and frames without a step are never capped; ``gap = 0`` caps nothing. Built
    from the rows already stored, so that a restarted trainer keeps its window."""

    def __init__(self, gap: int, labelled_rows=(), seen_rows=()):
        self.gap = int(gap)
        self.last: dict = {}
        self.window: dict = {}         # walker -> first step of its open window (plan)
        self.seen: dict = {}           # walker -> [highest step received, when (monotonic)]
        for r in labelled_rows:
            if self._capped(r):
                self.take(r)
        for r in seen_rows:
            if r.get("step") is not None:
                self.see(r.get("walker"), r.get("step"))

    @staticmethod
    def _capped(row) -> bool:
        return row.get("origin") != "audit" and row.get("step") is not None

    def see(self, walker, step, now: float | None = None) -> None:
        """A frame of ``walker`` at ``step`` arrived (flagged or audit)."""
        if step is None:
            return
        w = walker or 0
        now = time.monotonic() if now is None else now
        prev = self.seen.get(w)
        self.seen[w] = [max(int(step), prev[0]) if prev else int(step), now]

    def plan(self, rows) -> None:
        """Open each walker's window at its first queued frame at or after the refusal line
        (``rows``: the queued rows, before the verdicts on them)."""
        self.window = {}
        for r in rows:
            if not (self.gap and self._capped(r)):
                continue
            w = r.get("walker") or 0
            last = self.last.get(w)
            step = int(r.get("step"))
            if last is not None and step >= last + self.gap:
                self.window[w] = min(step, self.window.get(w, step))

    def verdict(self, row, now: float | None = None) -> str:
        """``"ok"`` (may be labelled now), ``"skip"`` (before the walker's open window: refused
        for good) or ``"wait"`` (in the open window, which is not complete yet, or in a later
        one). Without :meth:`plan` the window opens at the refusal line."""
        if not (self.gap and self._capped(row)):
            return "ok"
        w = row.get("walker") or 0
        last = self.last.get(w)
        if last is None:               # no label yet: the first one at once
            return "ok"
        step = int(row.get("step"))
        if step < last + self.gap:
            return "skip"
        start = max(self.window.get(w, last + self.gap), last + self.gap)
        if step >= start + self.gap:   # a later window's frame
            return "wait"
        seen = self.seen.get(w)
        now = time.monotonic() if now is None else now
        if seen is None or seen[0] >= start + self.gap or now - seen[1] >= WINDOW_IDLE_SECONDS:
            return "ok"
        return "wait"

    def take(self, row) -> None:
        if self._capped(row):
            w = row.get("walker") or 0
            self.last[w] = max(int(row.get("step")), self.last.get(w, int(row.get("step"))))


def rank(rows) -> list:
    """Queued rows: audit frames first, the newest first (they are few, and measure the
    calibration of the models serving now; :attr:`SelectionPolicy.audit_share` bounds their
    calls), then flagged frames by decreasing raw uncertainty."""
    rows = list(rows)
    audit = sorted((r for r in rows if r.get("origin") == "audit"), key=lambda r: -r.id)
    flagged = sorted((r for r in rows if r.get("origin") != "audit"),
                     key=lambda r: -float(r.get("sigma_E_raw", r.get("sigma_E", 0.0)) or 0.0))
    return audit + flagged
