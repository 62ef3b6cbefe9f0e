"""Driver side of on-the-fly learning: decide which frames the trainer should see.

A frame is *flagged* when the confidence P(|E error| < epsilon) is below ``level``
(default 0.95, METHOD.md §1) or when an atom's calibrated force uncertainty exceeds
``force_threshold`` (eV/A). A random *audit* sample of the other frames (``audit_fraction``)
goes to the trainer too, so that calibration is measured on an unbiased sample and not only
on frames that already triggered.

Modes: ``async`` (default) sends the frame and returns the model's prediction: the MD goes
on. ``guarantee`` labels a flagged frame with the reference right here, returns the
reference energy and forces for that step (as the seed paper does) and sends the labelled
frame to the trainer, so it is never labelled twice.

In guarantee mode:

- a reference calculation that fails (SCF not converged, a crashed code ...) is one warning
  naming the frame and the error; that step uses the model's prediction (extras
  ``reference``: false) and the frame goes to the trainer unlabelled, as in async mode.
  After ``max_reference_failures`` (default 3) failures in a row the reference is taken to
  be broken (wrong settings, missing code): :class:`ReferenceFailed` (a
  :class:`rarefly.client.DriverError`, exit status 1) stops the driver with one sentence.
  The frames labelled before were sent already and stay in the trainer's database.
- ``max_labels`` caps the reference calls made here (the run's reference budget, minus the
  labels already in the database): once spent, flagged steps use the model's prediction
  and go to the trainer unlabelled (it labels nothing beyond its own budget either).

:class:`FlaggingPredictor` wraps any predictor, so the socket driver and the ``<ffdirect>``
PES flag alike. Sending never blocks the MD: a PUSH socket with a bounded queue; frames that
do not fit are counted in ``stats["dropped"]`` and logged.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from rarefly.client import EXIT_INPUT, DriverError
from rarefly.prediction import Prediction, Structure
from rarefly.trainer.messages import FrameMessage, encode

log = logging.getLogger("rarefly.flagging")

#: failed reference calls in a row after which guarantee mode gives up
MAX_REFERENCE_FAILURES = 3


class ReferenceFailed(DriverError):
    """The reference failed on several flagged frames in a row (guarantee mode)."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_INPUT)


@dataclass
class FlagPolicy:
    level: float = 0.95
    force_threshold: float | None = None   # eV/A
    audit_fraction: float = 0.02
    mode: str = "async"                    # async | guarantee
    seed: int = 0

    def __post_init__(self):
        if self.mode not in ("async", "guarantee"):
            raise ValueError(f"flagging mode must be 'async' or 'guarantee', not {self.mode!r}")
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"confidence level must be between 0 and 1, not {self.level}")

    def is_flagged(self, p: Prediction) -> bool:
        if p.confidence < self.level:
            return True
        return self.force_threshold is not None and float(np.max(p.forces_sigma)) > self.force_threshold


class FlaggingPredictor:
    """Wraps a predictor; flags frames and sends them to the trainer endpoint."""

    def __init__(self, inner, endpoint: str, policy: FlagPolicy, walker: str = "w0",
                 reference=None, hwm: int = 1000, max_labels: int | None = None,
                 max_reference_failures: int = MAX_REFERENCE_FAILURES):
        import zmq

        self.inner = inner
        self.policy = policy
        self.walker = walker
        self.reference = reference       # ReferenceSpec for guarantee mode
        self.max_labels = max_labels     # reference calls allowed here (guarantee mode)
        self.max_reference_failures = max(1, int(max_reference_failures))
        self._failures_in_a_row = 0
        # str hash() differs between processes (PYTHONHASHSEED); crc32 makes the audit sample
        # a function of (seed, walker) as intended
        self.rng = np.random.default_rng([policy.seed, zlib.crc32(walker.encode())])
        self.step = 0
        self.stats = {"flagged": 0, "audit": 0, "dropped": 0, "guaranteed": 0, "calls": 0,
                      "reference_failed": 0, "over_budget": 0}
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 2000)
        self._sock.connect(endpoint)
        if policy.mode == "guarantee" and reference is None:
            raise ValueError("guarantee mode needs a reference calculator")

    @property
    def model_version(self) -> int:
        return self.inner.model_version

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict(self, structures: Sequence[Structure]) -> list[Prediction]:
        preds = self.inner.predict(structures)
        for s, p in zip(structures, preds):
            self.step += 1
            self.stats["calls"] += 1
            if self.policy.is_flagged(p):
                origin = "flagged"
            elif self.rng.random() < self.policy.audit_fraction:
                origin = "audit"
            else:
                p.extra["flagged"] = False
                continue
            p.extra["flagged"] = origin == "flagged"
            ref_forces = None
            header = {"frame_id": f"{self.walker}-{os.getpid()}-{self.step}", "origin": origin,
                      "step": self.step, "walker": self.walker, "model_version": p.model_version,
                      "sigma_E": p.energy_sigma, "sigma_E_raw": p.extra.get("energy_sigma_raw"),
                      "confidence": p.confidence, "pred_energy": p.energy,
                      "forces_sigma_max": float(np.max(p.forces_sigma)),
                      # the criterion, so that the trainer can ask a newer model the same question
                      "level": self.policy.level, "force_threshold": self.policy.force_threshold,
                      "epsilon": self._epsilon()}
            if origin == "flagged" and self.policy.mode == "guarantee":
                labelled = self._reference(s, header["frame_id"])
                if labelled is not None:
                    e_ref, f_ref = labelled
                    header.update(origin="labelled", ref_energy=e_ref,
                                  reference=self.reference.describe(), flagged=True)
                    ref_forces = f_ref
                    # the integrator gets the reference on this step (offset onto the
                    # model's zero)
                    offset = sum(self.inner.energy_offset.get(int(z), 0.0) for z in s.numbers) \
                        if hasattr(self.inner, "energy_offset") else 0.0
                    p.energy, p.forces = e_ref + offset, f_ref
                    p.extra["reference"] = True
                    self.stats["guaranteed"] += 1
                else:
                    p.extra["reference"] = False
            self._send(FrameMessage(s, header, ref_forces), origin)
        return preds

    def _epsilon(self) -> float | None:
        settings = getattr(self.inner, "settings", None)
        return None if settings is None else float(settings.epsilon)

    def _reference(self, s: Structure, frame_id: str):
        """(energy, forces) of the reference for a flagged frame, or None when this step
        keeps the model's prediction (budget spent, or the reference failed on it)."""
        from rarefly.trainer.reference import label

        if self.max_labels is not None and self.stats["guaranteed"] >= self.max_labels:
            if self.stats["over_budget"] == 0:
                log.warning("the reference budget of this driver (%d calls) is spent: flagged "
                            "steps use the model's prediction from now on and go to the "
                            "trainer unlabelled", self.max_labels)
            self.stats["over_budget"] += 1
            return None
        try:
            result = label(self.reference, s.numbers, s.positions, s.cell, s.pbc)
        except Exception as exc:  # noqa: BLE001 - any failure of the reference code
            self.stats["reference_failed"] += 1
            self._failures_in_a_row += 1
            why = " ".join(str(exc).split()) or type(exc).__name__
            why = why if len(why) <= 300 else why[:297] + "..."
            if self._failures_in_a_row >= self.max_reference_failures:
                raise ReferenceFailed(
                    f"the reference {self.reference.describe()} failed on "
                    f"{self._failures_in_a_row} flagged frames in a row, the last "
                    f"{frame_id} (force call {self.step}): {why}; check --reference and that "
                    "its code runs here (the frames labelled before were sent to the "
                    "trainer, which keeps them)") from None
            log.warning("force call %d: the reference failed on flagged frame %s (%s); this "
                        "step uses the model's prediction and the frame goes to the trainer "
                        "unlabelled (%d more failures in a row stop the driver)",
                        self.step, frame_id, why,
                        self.max_reference_failures - self._failures_in_a_row)
            return None
        self._failures_in_a_row = 0
        return result

    def _send(self, msg: FrameMessage, origin: str) -> None:
        import zmq

        try:
            self._sock.send_multipart(encode(msg), flags=zmq.NOBLOCK)
            self.stats["flagged" if origin in ("flagged", "labelled") else "audit"] += 1
        except zmq.Again:
            self.stats["dropped"] += 1
            log.warning("trainer queue full: frame %s not sent (%d dropped so far)",
                        msg.frame_id, self.stats["dropped"])

    def close(self) -> None:
        self._sock.close()
