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

from rarefly.prediction import Prediction, Structure
from rarefly.trainer.messages import FrameMessage, encode

log = logging.getLogger("rarefly.flagging")


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
                 reference=None, hwm: int = 1000):
        import zmq

        self.inner = inner
        self.policy = policy
        self.walker = walker
        self.reference = reference       # ReferenceSpec for guarantee mode
        # str hash() differs between processes (PYTHONHASHSEED); crc32 makes the audit sample
        # a function of (seed, walker) as intended
        self.rng = np.random.default_rng([policy.seed, zlib.crc32(walker.encode())])
        self.step = 0
        self.stats = {"flagged": 0, "audit": 0, "dropped": 0, "guaranteed": 0, "calls": 0}
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
                      "forces_sigma_max": float(np.max(p.forces_sigma))}
            if origin == "flagged" and self.policy.mode == "guarantee":
                from rarefly.trainer.reference import label

                e_ref, f_ref = label(self.reference, s.numbers, s.positions, s.cell, s.pbc)
                header.update(origin="labelled", ref_energy=e_ref, reference=self.reference.describe(),
                              flagged=True)
                ref_forces = f_ref
                # the integrator gets the reference on this step (offset onto the model's zero)
                offset = sum(self.inner.energy_offset.get(int(z), 0.0) for z in s.numbers) \
                    if hasattr(self.inner, "energy_offset") else 0.0
                p.energy, p.forces = e_ref + offset, f_ref
                p.extra["reference"] = True
                self.stats["guaranteed"] += 1
            self._send(FrameMessage(s, header, ref_forces), origin)
        return preds

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
