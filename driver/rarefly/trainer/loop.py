"""The trainer's main loop: receive, store, select, label, update, publish.

One process owns the data set (:class:`FrameStore`) and the posterior; drivers only read the
published model file. Each labelled frame is first compared with the prediction of the model
*before* it learns from it (its residual updates the Student-t calibration and is logged:
this is how coverage is measured honestly, on audit frames too); then, every
``update_every`` labels, the posterior is updated and a new version published atomically.

Events go to ``trainer.jsonl`` (one JSON object per line: ``label``, ``publish``, ``holdout``,
``start``, ``stop``) for progress displays and the report.
"""

from __future__ import annotations

import copy
import json
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rarefly.flagging import FlagPolicy
from rarefly.posterior import load_posterior
from rarefly.posterior.base import LabelledFrame, update_calibration
from rarefly.trainer.inbox import FrameInbox
from rarefly.trainer.labelling import ExecutorSpec, Labeller
from rarefly.trainer.messages import MessageError, decode
from rarefly.trainer.reference import DEFAULT_MAX_LABEL_FORCE, ReferenceSpec, label_problem
from rarefly.trainer.selection import Deduplicator, RateCap, SelectionPolicy, rank
from rarefly.trainer.store import FrameStore

log = logging.getLogger("rarefly.trainer")

#: at most this many messages, or this many seconds, per receive() (see there)
RECEIVE_BATCH = 64
RECEIVE_SECONDS = 0.5
#: between two refinement steps: this fraction of the step's time (at least
#: ``REFINE_RECEIVE_MIN_SECONDS``) goes to storing the frames that arrived; a frame costs about
#: 1 ms, an Adam step of alanine dipeptide 0.3-0.5 s on 2 cores (was a fixed 5 ms; the trainers
#: of bench_onthefly's runs 61-64 stored 1-4 frames a second during refinements against the
#: driver's 10-20, see :mod:`rarefly.trainer.inbox`)
REFINE_RECEIVE_FRACTION = 0.05
REFINE_RECEIVE_MIN_SECONDS = 0.005
REFINE_RECEIVE_MAX_SECONDS = 0.25
#: at most this many stale flagged frames asked again per select_and_submit()
RESCORE_BATCH = 16
#: at most this long storing the frames still queued when the trainer is stopped
STOP_DRAIN_SECONDS = 3.0
#: at the end of a run (finished or budget spent): the most seconds spent storing the frames
#: received but not yet stored (about 1 ms a frame); before, bench_onthefly's 6000-step runs
#: 61-64 ended with up to a thousand frames in zmq's queues, lost with the socket
FINISH_DRAIN_SECONDS = 30.0
#: during a refinement, at most one republication of the served model's calibration per this
#: many seconds (the driver reloads the file, about a second on a CPU)
SERVED_PATCH_SECONDS = 10.0
#: provenance key of a calibration patch: the calibration of the version it patches
UNPATCHED_CALIBRATION = "unpatched_calibration"


def refinement_receive_seconds(step_seconds: float) -> float:
    """How long to store arriving frames after a refinement step that took ``step_seconds``."""
    return min(REFINE_RECEIVE_MAX_SECONDS,
               max(REFINE_RECEIVE_MIN_SECONDS, REFINE_RECEIVE_FRACTION * step_seconds))


def _number(v) -> float | None:
    """A finite number from a frame header, else None (a malformed value is not trusted)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
        return float(v)
    return None


@dataclass
class TrainerConfig:
    model: str                                   # model file: read at start, published to
    database: str                                # ASE db (SQLite)
    endpoint: str                                # zmq PULL endpoint the drivers push to
    reference: ReferenceSpec = field(default_factory=ReferenceSpec)
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)
    selection: SelectionPolicy = field(default_factory=SelectionPolicy)
    update_every: int = 1                        # labels per posterior update
    max_labels: int | None = None                # budget of reference calls
    align_energies: bool = True                  # offset at the first label (METHOD.md §1)
    holdout: str | None = None                   # extxyz of held-out reference frames
    sghmc_cycles: int = 1
    #: lastlayer: Adam steps on all MACE weights every ``backbone_every`` labels, after which the
    #: readout posterior is conditioned afresh on every label (0: readout-only learning)
    backbone_steps: int = 0
    backbone_every: int = 10
    backbone_lr: float = 1e-3
    #: at most this many flagged frames are labelled while a refinement runs (None:
    #: backbone_every, the labels the next refinement takes); the rest wait for the refined model
    calls_while_refining: int | None = None
    #: frames the starting model was fitted on (extxyz or ASE db), replayed in the refinement
    backbone_replay: str | None = None
    #: Student-t calibration: about the last N labels count (0: all, the seed paper's update)
    calibration_memory: int = 0
    #: after a backbone refinement the Student-t calibration restarts from its prior: the
    #: residuals so far are of the model the refinement replaced (default off: kept)
    recalibrate_after_refinement: bool = False
    #: after a backbone refinement the readout is conditioned on the replay frames' energies
    #: as well as on the labels (default off: on the labels, from the first prior)
    replay_energies: bool = False
    #: while a backbone refinement runs, the served version's energy calibration takes the
    #: residuals of the labels that finish meanwhile (the served model's own predictions) and is
    #: republished as a new version with the same weights (False: it waits for the refinement)
    served_calibration: bool = True
    #: labels with a larger force component (eV/A) are kept but not learned (None: no limit)
    max_label_force: float | None = DEFAULT_MAX_LABEL_FORCE
    events: str | None = None                    # trainer.jsonl path (default: beside the db)


class Trainer:
    #: during a refinement: the served model's calibration, updated with the residuals of the
    #: labels it served (see :meth:`_patch_served_calibration`), else None
    _serving: dict | None = None

    def __init__(self, cfg: TrainerConfig):
        self.cfg = cfg
        self.store = FrameStore(cfg.database)
        recovered = self.store.recover()
        self.posterior = load_posterior(cfg.model)
        self._unpatch_calibration()
        self.events_path = Path(cfg.events or Path(cfg.database).with_suffix(".jsonl"))
        self.dedup = Deduplicator(cfg.selection.dedup_tol)
        for f in self.store.labelled_frames():
            self.dedup.add(f.structure)
        gap = cfg.selection.min_step_gap        # without a cap, no need to read every row
        self.rate_cap = RateCap(gap, self.store.rows(state="labelled") if gap else (),
                                self.store.rows() if gap else ())
        self._start_mean = getattr(self.posterior, "mean", None)
        self._start_cov = getattr(self.posterior, "cov", None)
        self._blocks = None
        self._labels_since_refine = 0
        self._calls_this_refinement = 0          # flagged frames sent during this one
        self._redesign = False
        if self._refines():
            # weights at start anchor every refinement; the readout prior is the posterior
            # before the first trainer label, re-centred after each refinement at the readout
            # it was refined with (kept in the model file, see maybe_update)
            self._anchor = {k: v.detach().clone()
                            for k, v in self.posterior.backbone.model.named_parameters()}
            self._replay = self._read_frames(cfg.backbone_replay)
            base = getattr(self.posterior, "base_posterior", None)
            if base is not None:
                self._start_mean, self._start_cov = base
                self._redesign = True     # design every label again at the next update
        self._pending_cal: list[LabelledFrame] = []
        self._new_since_update = 0
        self._in_flight: dict[int, object] = {}
        self._holdout = self._read_frames(cfg.holdout)
        import zmq

        sock = zmq.Context.instance().socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(cfg.endpoint)                  # a taken endpoint fails here, before Parsl
        run_dir = Path(cfg.database).parent / "parsl"
        try:
            self.labeller = Labeller(cfg.reference, cfg.executor, str(run_dir))
        except BaseException:
            sock.close()
            raise
        # read by a thread of its own from now on (started after Parsl's processes)
        self.inbox = FrameInbox(sock)
        self._last_between: float | None = None  # when _keep_labelling last ran
        self._stop = False
        #: SIGUSR1 (`rarefly run` when i-PI has done its steps): no new reference calls; the
        #: labels in flight are collected, the update due (a refinement too) is published, exit
        self._finishing = False
        self._t_end: float | None = None       # --max-seconds, as a time.time() deadline
        self._new_frames: list[LabelledFrame] = []
        self._refining = False                 # inside refine_backbone: labels only stored
        self._stored_unlearned: list[tuple] = []
        # resuming: labels stored but not yet in a published model are learned now
        for f in self.store.labelled_frames():
            row = self.store.db.get(id=f.info["row"])
            used = row.get("used_in_version")
            if used is None or used > self.posterior.model_version:   # not in the model file
                self._align_if_needed(f.structure, f.energy)
                self._pending_cal.append(f)
                self._new_frames.append(f)
                self._new_since_update += 1
        done = self.store.count(state="labelled")
        self._event("start", recovered=recovered, labelled=done, model_version=self.posterior.model_version,
                    queued=self.store.count(state="queued"))

    # ------------------------------------------------------------------ helpers
    def _event(self, kind: str, **data) -> None:
        data = {"event": kind, "t": time.time(), **data}
        with open(self.events_path, "a") as fh:
            fh.write(json.dumps(data, default=float) + "\n")
        log.info("%s %s", kind, {k: v for k, v in data.items() if k not in ("event", "t")})

    @staticmethod
    def _read_frames(path):
        if not path:
            return []
        from rarefly.data_io import read_frames

        return read_frames(path)

    def labels_done(self) -> int:
        return self.store.count(state="labelled")

    # ------------------------------------------------------------------ steps
    def receive(self, timeout_ms: int = 200, max_messages: int = RECEIVE_BATCH,
                max_seconds: float = RECEIVE_SECONDS) -> int:
        """Store the frames that arrived (waiting up to ``timeout_ms`` for the first).

        The inbox's thread has already taken them off the zmq socket (:mod:`.inbox`); this
        stores at most ``max_messages`` of them or for ``max_seconds``: drivers that flag
        faster than frames are stored cannot keep the loop here, away from submitting,
        collecting (a finished label waits in memory until collected) and publishing, or
        from a SIGTERM. What is left waits in the inbox for the next call. The frames taken
        are committed to the database in one transaction before this returns (about 1 ms a
        frame; one commit per frame cost 5-18 ms, ``benchmarks/bench_frame_intake.out``);
        a frame labelled by the driver (guarantee mode) is stored with its label after that.
        Returns the frames stored.
        """
        n = 0
        if not self.inbox.wait(timeout_ms / 1000.0):
            return 0
        t_end = time.monotonic() + max_seconds
        labelled = []
        with self.store.db:
            for _ in range(max_messages):
                if time.monotonic() >= t_end:
                    break
                frames = self.inbox.take()
                if frames is None:
                    break
                try:
                    msg = decode(frames)
                except MessageError as exc:
                    log.warning("dropped a malformed frame message: %s", exc)
                    continue
                h = msg.header
                self.rate_cap.see(h.get("walker"), _number(h.get("step")))
                if msg.origin == "labelled" and msg.ref_forces is not None:
                    labelled.append(msg)
                    continue
                n += self._store_frame(msg) is not None
        for msg in labelled:
            row = self._store_frame(msg)
            if row is not None:
                self.dedup.add(msg.structure)       # labelled by the driver: a near-duplicate
                self._record_label(row, msg.structure, float(msg.header["ref_energy"]),
                                   msg.ref_forces, msg.header.get("reference", "driver"))
                n += 1
        return n

    def _store_frame(self, msg) -> int | None:
        h = msg.header
        meta = {k: h.get(k) for k in ("step", "walker", "model_version", "sigma_E", "sigma_E_raw",
                                      "confidence", "pred_energy")}
        meta.update({f"flag_{k}": _number(h.get(k)) for k in ("level", "force_threshold", "epsilon")})
        origin = "flagged" if msg.origin == "labelled" else msg.origin
        return self.store.add(msg.structure, frame_id=msg.frame_id, origin=origin, **meta)

    def select_and_submit(self) -> None:
        """Send the best queued frames to the reference, up to ``max_in_flight`` tasks at a
        time (finished tasks count until collected: during a refinement too, which collects
        between its steps and sends at most :meth:`_refinement_call_limit` flagged frames). With
        ``rescore_flagged`` (default), outside a refinement, a frame flagged by an older model
        version is sent only if the model the trainer holds still flags it (audit frames always
        are: they measure the calibration)."""
        budget = self.cfg.max_labels
        free = self.cfg.selection.max_in_flight - len(self._in_flight)
        if free <= 0 or self._finishing:
            return
        held = self._refinement_call_limit()
        asked = 0
        # not during a refinement: a half-refined model gives no verdict, and the labels that
        # finish meanwhile are the refined model's first calibration evidence (holding the
        # flagged frames back then left it none: bench_onthefly's twenty-second run)
        rescore = self.cfg.selection.rescore_flagged and not self._refining
        queued = rank(self.store.queued())
        self.rate_cap.plan(queued)
        audits = None                           # (audit calls, all calls), counted when needed
        # once per call: no label finishes in this loop (a count per queued row was half the
        # trainer's time during a refinement with 3000 frames queued: 144,000 queries, 88 s
        # of 178 s, profiled with bench_onthefly run 63's frames replayed)
        done = self.labels_done() if budget is not None else 0
        for row in queued:
            if free <= 0:
                break
            if budget is not None and done + len(self._in_flight) >= budget:
                return
            flagged = row.get("origin") != "audit"
            if flagged and held is not None and self._calls_this_refinement >= held:
                continue                        # waits for the refined model
            if not flagged:
                audits = audits or self._audit_calls()
                if audits[0] >= self.cfg.selection.audit_share * (audits[1] + 1):
                    continue                    # over its share of the calls: waits
            verdict = self.rate_cap.verdict(row)
            if verdict == "skip":
                self.store.set_state(row.id, "skipped", reason=f"rate cap: within "
                                     f"{self.rate_cap.gap} steps of the last label")
                continue
            if verdict == "wait":               # its window is still filling
                continue
            s = self.store.structure(row)
            if row.get("origin") != "audit" and self.dedup.is_duplicate(s):
                self.store.set_state(row.id, "skipped", reason="near-duplicate")
                continue
            if rescore and row.get("origin") == "flagged":
                if asked >= RESCORE_BATCH:
                    return                      # the next loop goes on (receiving meanwhile)
                asked += 1
                trusted = self._trusted_now(row, s)
                if trusted:
                    self.store.set_state(row.id, "skipped", reason=trusted)
                    continue
            self.rate_cap.take(row)
            self.dedup.add(s)
            self.store.set_state(row.id, "labelling")
            self._in_flight[row.id] = (self.labeller.submit(s), s)
            free -= 1
            if audits is not None:
                audits = (audits[0] + (not flagged), audits[1] + 1)
            if self._refining and flagged:
                self._calls_this_refinement += 1

    def _audit_calls(self) -> tuple[int, int]:
        """(reference calls on audit frames, all reference calls): finished, failed or in
        flight. ``audit_share`` bounds their ratio: audit frames are ranked first, and once the
        drivers' frames reached the trainer as they were sent, they took 38 of the paper
        scheme's 46 calls in bench_onthefly's seventy-third run (36 during its first refinement,
        where flagged frames are held), leaving 8 to learn from."""
        st = self.store
        calls = sum(st.count(state=k) for k in ("labelled", "failed", "labelling"))
        audit = sum(st.count(state=k, origin="audit") for k in ("labelled", "failed", "labelling"))
        return audit, calls

    def _refinement_call_limit(self) -> int | None:
        """During a backbone refinement: how many flagged frames may go to the reference before
        it ends (``calls_while_refining``, default ``backbone_every``); None outside one. The
        model that flagged the frames queued meanwhile is being replaced, and the labels taken
        now wait for the next refinement anyway: in bench_onthefly's forty-sixth and forty-
        seventh runs the first refinement (90 s on 2 cores) saw 14-25 calls, all chosen by the
        model it replaced. Beyond the limit the flagged frames stay queued, and the refined
        model asks them again (``rescore_flagged``): a frame it trusts costs no call. Audit
        frames are not counted and not held (as with the rate cap): they are a fixed random
        fraction of the unflagged frames, and ranked first they took the whole share in
        bench_onthefly's forty-ninth and fifty-first runs (20 of the paper scheme's 24 calls
        in run 51 were audits while 2399 flagged frames waited)."""
        if not self._refining:
            return None
        limit = self.cfg.calls_while_refining
        return int(self.cfg.backbone_every if limit is None else limit)

    def _trusted_now(self, row, s) -> str | None:
        """A flagged frame from an older model version, asked again with the driver's criterion
        (its level, force threshold and epsilon, from the frame's header) by the model the
        trainer holds: the reason to skip it when that model trusts it, else None. A driver
        that flags at a scale the trainer has since narrowed (or with a model since refined)
        queues frames the current model gets right; the seed paper's rule is a reference call
        when the *current* model is unsure. Frames without the criterion (older drivers) are
        labelled as before."""
        level, version = row.get("flag_level"), row.get("model_version")
        if level is None or version is None:
            return None
        post = self.posterior
        if int(version) >= post.model_version:
            return None
        try:
            policy = FlagPolicy(level=float(level), force_threshold=row.get("flag_force_threshold"))
        except ValueError:                   # not a criterion the driver could have used
            return None
        eps = row.get("flag_epsilon") or post.settings.epsilon
        p = post.predict([s])[0]
        p.confidence = conf = float(post.calibration.energy.confidence(p.extra["energy_sigma_raw"], eps))
        if policy.is_flagged(p):
            return None
        return (f"trusted by model version {post.model_version} (confidence {conf:.3f}; "
                f"flagged by version {int(version)})")

    def collect(self) -> None:
        for row_id, (fut, s) in list(self._in_flight.items()):
            if not fut.done():
                continue
            del self._in_flight[row_id]
            try:
                energy, forces = fut.result()
            except Exception as exc:  # noqa: BLE001
                self.store.set_state(row_id, "failed", reason=str(exc)[:200])
                self._event("label_failed", row=row_id, error=str(exc)[:200])
                continue
            self._record_label(row_id, s, energy, np.asarray(forces), self.cfg.reference.describe())

    def _record_label(self, row_id: int, s, energy: float, forces, reference: str) -> None:
        """Store a label (one transaction) and learn it; during a backbone refinement only
        store it: its pre-update residual needs a model that is not half-way through an
        update, so it is learned by the refined model before its version is published
        (:meth:`_learn_late_labels`), or at the next update when the refinement was abandoned
        at a stop. A SIGKILL at any moment loses no finished label, and a restart learns the
        stored ones it finds unused. A label :func:`label_problem` refuses (a blown-up geometry,
        non-finite numbers) is kept in its row as ``failed`` and not learned."""
        problem = label_problem(energy, forces, len(s.numbers), self.cfg.max_label_force)
        if problem:
            self.store.reject_label(row_id, energy, forces, reference, f"label not learned: {problem}")
            step = self.store.db.get(id=row_id).get("step")
            self._event("label_rejected", row=row_id, step=step, reason=problem)
            log.warning("%s row %d (MD step %s): label not learned: %s",
                        self.cfg.database, row_id, step, problem)
            return
        if self._refining:
            self.store.add_label(row_id, energy, forces, reference,
                                 energy_offset=self.posterior.offset_energy(s.numbers, 0.0))
            self._stored_unlearned.append((row_id, s, energy, np.asarray(forces)))
            self._note_served_residual(row_id, s, energy)
            return
        self._align_if_needed(s, energy)
        self.store.add_label(row_id, energy, forces, reference,
                             energy_offset=self.posterior.offset_energy(s.numbers, 0.0))
        self._learn_label(row_id, s, energy, forces)

    def _learn_stored(self, **event) -> None:
        """Learn the labels stored during a refinement, with the refined model's residuals."""
        stored, self._stored_unlearned = self._stored_unlearned, []
        for row_id, s, energy, forces in stored:
            self._align_if_needed(s, energy)
            self._learn_label(row_id, s, energy, forces, **event)

    def _learn_late_labels(self) -> int:
        """Right after a refinement, before its version is published: the labels that finished
        during it are predicted by the refined model (conditioned on the labels it was refined
        on, not on these), their residuals update the calibration, and the readout takes them.
        They are the first evidence of how wrong the refined model is. Learned one version
        later instead (as before), the refined model went out with the calibration of the model
        it replaced: in bench_onthefly's eighteenth run 20 labels finished during the first
        refinement (87-93 s on 2 cores), 19-20 of 20 within epsilon at a stale confidence of
        0.29-0.61, and the drivers flagged nearly every step until the next version. Returns
        the number of labels learned (the readout is conditioned again by the caller)."""
        post = self.posterior
        if not self._stored_unlearned:
            return 0
        post.condition(self._blocks, self._start_mean, self._start_cov)   # without them
        self._learn_stored(refined=True)
        late, self._new_frames = self._new_frames, []
        update_calibration(post, self._pending_cal, self.cfg.calibration_memory)
        self._pending_cal = []
        self._blocks = post.add_blocks(self._blocks, post.design(late))
        self._add_to_density(late)
        return len(late)

    def _add_to_density(self, frames) -> None:
        """A model with the misfit variance counts learned frames as seen (their atoms' readout
        features join the density), so that it stops calling frames like them far."""
        if getattr(self.posterior, "density", None) is not None and frames:
            self.posterior.fit_density(frames, add=True)

    def _rebuild_density(self, labels) -> None:
        """After a refinement the readout features have changed: the density is rebuilt from the
        replay frames (the fit's) and the labels on the new features. Without replay frames
        the labels alone hold too few atoms for a covariance per element; the old density is
        then kept (it describes the features before the refinement) and the event says so."""
        post = self.posterior
        if getattr(post, "density", None) is None:
            return
        frames = list(self._replay) + list(labels)
        if len(frames) < 2 * post.density.num_features:
            self._event("density_kept", frames=len(frames),
                        reason="too few replay frames and labels to rebuild the feature density; "
                               "give [learning] backbone_replay the fit frames")
            return
        atoms = post.fit_density(frames)
        self._event("density_rebuilt", frames=len(frames), atoms=atoms)

    def _learn_label(self, row_id: int, s, energy: float, forces, **event) -> None:
        post = self.posterior
        offset = post.offset_energy(s.numbers, 0.0)
        frame = LabelledFrame(s, energy, np.asarray(forces))
        # pre-update prediction: residual for calibration and for the log
        pred = post.predict([s])[0]
        ref = energy + offset
        err = pred.energy - ref
        row = self.store.db.get(id=row_id)
        self._event("label", row=row_id, origin=row.origin, model_version=post.model_version,
                    pred_energy=pred.energy, ref_energy=ref, error=err,
                    sigma=pred.energy_sigma, sigma_raw=pred.extra.get("energy_sigma_raw"),
                    confidence=pred.confidence, within_eps=bool(abs(err) < post.settings.epsilon),
                    force_rmse=float(np.sqrt(np.mean((pred.forces - forces) ** 2))),
                    **self._served(row, ref), **event)
        self._pending_cal.append(frame)
        self._new_frames.append(frame)
        self._new_since_update += 1

    def _served(self, row, ref: float) -> dict:
        """The error of the model that served the frame (the driver's prediction, sent with
        it): the audit coverage of issue 4 is about that model. The label's ``error`` is the
        trainer's current model's, which differs for labels that finished during a backbone
        refinement (predicted by the refined model, before it learns them): in bench_onthefly's
        runs 52-64, 72 of the paper scheme's 87 audit labels were such, and 80 of 87 were within
        epsilon as logged against 46 of 87 for the models that had trusted them."""
        served = row.get("pred_energy")
        if served is None:
            return {}
        err = float(served) - ref
        return {"served_error": err, "served_within_eps": bool(abs(err) < self.posterior.settings.epsilon),
                "served_version": row.get("model_version"), "served_confidence": row.get("confidence"),
                "served_sigma_raw": row.get("sigma_E_raw")}

    def _align_if_needed(self, s, energy: float) -> None:
        """METHOD.md §1: at the first reference call, offset = E_pred - E_ref, spread evenly
        over the atoms of that structure (per element), added to all later reference energies."""
        post = self.posterior
        if not self.cfg.align_energies or post.provenance.get("aligned"):
            return
        pred = post.predict([s])[0]
        delta = (pred.energy - post.offset_energy(s.numbers, energy)) / len(s.numbers)
        for z in set(int(z) for z in s.numbers):
            post.energy_offset[z] = post.energy_offset.get(z, 0.0) + delta
        post.provenance["aligned"] = True
        self._event("aligned", offset_per_atom=delta)

    def _refinement_owed(self) -> bool:
        """A refinement is due although no label came since the last update: the labels that
        finished during the last refinement were learned by the readout only and are already
        ``backbone_every`` or more. Waiting for one more label left them out of every
        refinement once no label followed (the budget spent or the MD done): in bench_onthefly's
        forty-first run the paper's scheme made 21 calls during its first refinement (300 Adam
        steps, 131 s) and its final model was refined on 5 of its 26 labels."""
        return (not self._stop and self._refines()
                and self._labels_since_refine >= self.cfg.backbone_every)

    def maybe_update(self) -> bool:
        self._learn_stored()
        if self._new_since_update == 0 and not self._refinement_owed():
            return False
        if self._new_since_update < self.cfg.update_every and self._in_flight:
            return False
        post = self.posterior
        t0 = time.time()
        update_calibration(post, self._pending_cal, self.cfg.calibration_memory)  # residuals of the pre-update model
        self._pending_cal = []
        new, self._new_frames = self._new_frames, []
        self._labels_since_refine += len(new)
        refine = self._refines() and (self._redesign or self._labels_since_refine >= self.cfg.backbone_every)
        abandoned = None
        if refine and not self._stop:
            frames = self.store.labelled_frames()
            self._event("refine", labels=len(frames), steps=self.cfg.backbone_steps,
                        model_version=post.model_version)
            before = {k: v.detach().clone() for k, v in post.backbone.model.state_dict().items()}
            readout = post.mean.detach().clone()     # the readout the backbone is refined with
            self._refining, self._calls_this_refinement = True, 0
            self._last_between = None
            if self.cfg.served_calibration:
                # the file being served lacks the residuals just learned: the first patch
                # carries them (same weights, so they are the served model's residuals too)
                self._serving = {"versions": {post.model_version}, "pending": len(new),
                                "calibration": copy.deepcopy(post.calibration), "at": None}
            try:
                ft = post.refine_backbone(frames, self.cfg.backbone_steps, lr=self.cfg.backbone_lr,
                                          anchor=self._anchor, replay=self._replay,
                                          between_steps=self._keep_labelling)
            finally:
                self._refining, self._serving = False, None
            if ft["stopped_early"]:
                # asked to stop mid-refinement: designing every label again on the new features
                # costs about a second per label on a CPU (30 labels of alanine dipeptide: 30 s),
                # more than the supervisor waits, and a stopped trainer was then killed before
                # it published (bench_onthefly's seventeenth run). The weights go back to those
                # the readout blocks hold, the readout takes the new labels below, and the
                # restarted trainer refines at its first update.
                post.backbone.model.load_state_dict(before)
                abandoned = ft["gradient_steps"]
        if refine and not self._stop and abandoned is None:
            post.provenance["backbone_refined"] = True
            # The readout prior is centred from now on at the readout the backbone was refined
            # with (the two fit the labels and the replay frames together), with the first
            # prior's covariance. Conditioned again from the first prior's mean, the readout
            # lifted every energy: in bench_onthefly (offline, the twenty-first and twenty-third
            # runs' first 10 labels) c_ts's final readout had 0.15 / 0.90 of the basin's held-out
            # frames within epsilon and 0.00 / 0.20 of the TS frames, centred at the refined
            # readout 0.88 / 0.97 and 0.40 / 0.40; a_paper and b_periodic the same either way.
            # The labels before the refinement then count in the mean twice; their residuals
            # under the refined backbone are small, so the second conditioning moves it little.
            self._start_mean = readout
            self._blocks = self._design_all(frames)  # the features changed: every label again
            self._rebuild_density(frames)
            if self.cfg.recalibrate_after_refinement:
                post.calibration.restart()
            late = self._learn_late_labels()         # the refined model's first residuals
            stats = {**post.condition(self._blocks, self._start_mean, self._start_cov), **ft,
                     "calibration_restarted": self.cfg.recalibrate_after_refinement,
                     "learned_after_refinement": late}
            self._labels_since_refine = late
            self._redesign = False
        elif post.kind == "lastlayer":
            # readout-only; also when a refinement is due but the trainer is stopping (SIGTERM,
            # --max-seconds): a refinement takes minutes on a CPU and the supervisor waits
            # seconds, so the readout posterior takes every label now and the restarted
            # trainer refines at its first update
            if self._redesign:                       # restarted after a refinement
                self._blocks = self._design_all(self.store.labelled_frames())
                self._redesign = False
            elif new:
                self._blocks = post.add_blocks(self._blocks, post.design(new))
            self._add_to_density(new)
            stats = {**post.condition(self._blocks, self._start_mean, self._start_cov),
                     "refinement_deferred": refine}
            if abandoned is not None:
                stats["refinement_abandoned_after"] = abandoned
        else:
            frames = self.store.labelled_frames()
            stats = post.sample(frames, newest=len(new), cycles=self.cfg.sghmc_cycles)
        if self._refines():
            # from the first version on, not only after a refinement: a trainer restarted
            # between two refinements conditions the first prior on every label, never the
            # published posterior (which holds some of them already) on all of them again
            post.base_posterior = (self._start_mean, self._start_cov)
        post.model_version += 1
        post.provenance["trainer_labels"] = self.labels_done()
        # Rows are marked before the model is written (one transaction), and a restart
        # relearns rows marked with a version newer than the model file's: a SIGKILL between
        # the two neither drops a label from the posterior nor learns one twice.
        unlearned = {row_id for row_id, *_ in self._stored_unlearned}   # stored meanwhile
        with self.store.db:
            for r in list(self.store.rows(state="labelled")):
                if r.id in unlearned:
                    continue
                u = r.get("used_in_version")
                if u is None or u >= post.model_version:
                    self.store.db.update(r.id, used_in_version=post.model_version)
        post.save(self.cfg.model)
        self._new_since_update = 0
        hold = self.holdout_errors()
        self._event("publish", model_version=post.model_version, labels=self.labels_done(),
                    seconds=time.time() - t0, gradient_steps=stats.get("gradient_steps", 0),
                    calibration=post.calibration.to_dict(), **hold,
                    **{k: stats[k] for k in ("stopped_early", "refinement_deferred",
                                               "calibration_restarted", "refinement_abandoned_after",
                                               "learned_after_refinement")
                       if stats.get(k) is not None and stats.get(k) is not False})  # 0 stays
        return True

    def _design_all(self, frames) -> tuple:
        """The readout's design on every label; with ``replay_energies``, once the backbone has
        been refined, also on the replay frames' energies (forward passes only): the first
        prior holds what the fit frames taught the readout on the old features, not on the new
        ones. Without them the readout's element energies absorb the new labels' errors: in
        bench_onthefly's eighteenth run, c_ts's eleven labels were predicted 0.62 eV too low by
        the start model, and after the refinement every energy was shifted (C7eq basin mean
        error +0.17 eV, TS frames +0.24 eV; with the replay energies +0.014 and +0.083 eV,
        forces unchanged). With them (twentieth run) the held-out TS energies were better (final
        RMSE 0.14 eV in all three schemes, was 0.18-0.31) but the model was further from the
        frames its own MD samples (offline coverage a 0.92, b 0.85, was 1.00): off by default."""
        post = self.posterior
        blocks = post.design(frames)
        if self.cfg.replay_energies and self._replay and post.provenance.get("backbone_refined"):
            blocks = post.add_blocks(blocks, post.design(self._replay, forces=False))
        return blocks

    def _keep_labelling(self) -> bool:
        """Between two refinement steps: store the frames the drivers sent, store the finished
        labels (learned after the refinement, see :meth:`_record_label`) and give free
        reference workers new frames. True (end the refinement here) once the trainer is
        asked to stop."""
        if self._stop or (self._t_end is not None and time.time() >= self._t_end):
            return True
        now = time.monotonic()
        step = 0.0 if self._last_between is None else now - self._last_between
        self.receive(timeout_ms=0, max_seconds=refinement_receive_seconds(step))
        self._last_between = time.monotonic()
        self.collect()
        self._patch_served_calibration()
        self.select_and_submit()
        return False

    def _note_served_residual(self, row_id: int, s, energy: float) -> None:
        """During a refinement: the residual of the model that served a label's frame (its
        prediction came with the frame) updates the served version's energy calibration,
        when that model is the one being served (the version the refinement started from, or
        a calibration patch of it)."""
        st = self._serving
        if st is None:
            return
        row = self.store.db.get(id=row_id)
        pred, raw = _number(row.get("pred_energy")), _number(row.get("sigma_E_raw"))
        if row.get("model_version") not in st["versions"] or pred is None or not raw:
            return
        st["calibration"].energy.learn(np.array([self.posterior.offset_energy(s.numbers, energy) - pred]),
                                       np.array([raw]), self.cfg.calibration_memory)
        st["pending"] += 1

    def _unpatch_calibration(self) -> None:
        """Started from a calibration patch (stopped during a refinement): the labels whose
        residuals the patch holds were never marked as learned, so they are learned again, with
        the calibration the patched version had when it was published."""
        prov = self.posterior.provenance
        if UNPATCHED_CALIBRATION in prov:
            from rarefly.calibration import Calibration

            self.posterior.calibration = Calibration.from_dict(prov.pop(UNPATCHED_CALIBRATION))
            prov.pop("calibration_patch_of", None)

    def _patch_served_calibration(self) -> bool:
        """Republish the served model with the calibration of :meth:`_note_served_residual`,
        as a new version (same weights and readout; the refined model is published after it).
        A refinement takes minutes on a CPU, and the start model was confident and wrong on the
        frames its own MD met while the first one ran: in bench_onthefly's runs 74-81 the audit
        frames served by the start model and its readout-only versions were 20 of 29 within
        epsilon, every miss 0.19-0.35 eV too low at a confidence of 0.96-1.00; of the 170 labels
        of frames they served that finished during a refinement, 98 % were predicted too low, by
        a median of 1.7 calibrated standard deviations. Replayed on those runs' events
        (``benchmarks/replay_served_calibration.out``), the patches would have flagged 4 of the
        10 audit frames outside epsilon and 6 of the 65 within (coverage 0.91, was 0.87).
        At most one patch per ``SERVED_PATCH_SECONDS``; the file is left alone if it no longer
        holds the served version. True when a patch was published."""
        from rarefly.model_file import ModelFileError, load_model_file, save_model_file

        st = self._serving
        now = time.monotonic()
        if st is None or not st["pending"] or (st["at"] is not None
                                              and now - st["at"] < SERVED_PATCH_SECONDS):
            return False
        t0, post = time.time(), self.posterior
        try:
            payload = load_model_file(self.cfg.model)
        except ModelFileError as exc:
            log.warning("%s: served calibration not republished: %s", self.cfg.model, exc)
            self._serving = None
            return False
        if int(payload.get("model_version", -1)) not in st["versions"]:
            log.warning("%s holds model version %s, not the one this trainer published; the served "
                        "calibration is not republished during this refinement", self.cfg.model,
                        payload.get("model_version"))
            self._serving = None
            return False
        version = post.model_version + 1
        payload["model_version"] = version
        payload["calibration"], unpatched = st["calibration"].to_dict(), payload["calibration"]
        prov = dict(payload.get("provenance") or {})
        # a restarted trainer learns the labels of a patch again: it starts from this one
        prov.setdefault(UNPATCHED_CALIBRATION, unpatched)
        prov["calibration_patch_of"] = min(st["versions"])
        payload["provenance"] = prov
        save_model_file(self.cfg.model, payload)
        post.model_version = version             # the refined model is published after it
        st["versions"].add(version)
        st["pending"], st["at"] = 0, now
        self._event("publish", model_version=version, labels=self.labels_done(),
                    seconds=time.time() - t0, gradient_steps=0, calibration_only=True,
                    calibration=payload["calibration"])
        return True

    def _refines(self) -> bool:
        return self.cfg.backbone_steps > 0 and self.posterior.kind == "lastlayer"

    def holdout_errors(self) -> dict:
        if not self._holdout:
            return {}
        from rarefly.posterior.base import predict_in_chunks

        preds = predict_in_chunks(self.posterior, [f.structure for f in self._holdout])
        de = [p.energy - self.posterior.offset_energy(f.structure.numbers, f.energy)
              for p, f in zip(preds, self._holdout)]
        df = np.concatenate([(p.forces - f.forces).ravel() for p, f in zip(preds, self._holdout)])
        return {"holdout_energy_rmse": float(np.sqrt(np.mean(np.square(de)))),
                "holdout_force_rmse": float(np.sqrt(np.mean(df ** 2)))}

    # ------------------------------------------------------------------ main loop
    def run(self, max_seconds: float | None = None) -> int:
        self._t_end = None if max_seconds is None else time.time() + max_seconds
        self._event("holdout", model_version=self.posterior.model_version, **self.holdout_errors())

        def _stop(signum, frame):  # noqa: ARG001
            self._stop = True

        old = signal.signal(signal.SIGTERM, _stop)
        try:
            while not self._stop and (self._t_end is None or time.time() < self._t_end):
                self.receive()
                self.select_and_submit()
                self.collect()
                self.maybe_update()
                settled = (not self._in_flight and self._new_since_update == 0
                           and not self._stored_unlearned and not self._refinement_owed())
                if self.cfg.max_labels is not None and self.labels_done() >= self.cfg.max_labels \
                        and settled:
                    self._drain(FINISH_DRAIN_SECONDS)
                    self._event("budget", labels=self.labels_done())
                    break
                if self._finishing and settled:
                    self._drain(FINISH_DRAIN_SECONDS)
                    self._event("finished", labels=self.labels_done(),
                                queued=self.store.count(state="queued"))
                    break
            else:
                self._wind_down()
        finally:
            signal.signal(signal.SIGTERM, old)
            self.close()
        return 0

    def finish(self) -> None:
        """End the run without losing work (`rarefly trainer` on SIGUSR1, which `rarefly run`
        sends when i-PI has done its steps): no new reference calls (queued frames stay queued
        for a restart), the labels in flight are collected, the update they make due is
        published (a backbone refinement too, unlike a SIGTERM), then :meth:`run` returns.
        Safe to call from a signal handler, and more than once."""
        if not self._finishing:
            self._finishing = True
            log.info("asked to finish: no new reference calls; %d in flight, then the update due",
                     len(self._in_flight))

    def _wind_down(self, seconds: float = STOP_DRAIN_SECONDS) -> None:
        """On SIGTERM or --max-seconds: store the frames still queued in zmq (a driver's last
        ones, labelled ones in guarantee mode), record the labels already finished and
        publish them, so a clean stop loses nothing; at most ``seconds`` of receiving. A
        refinement that falls due now waits for the next start (see :meth:`maybe_update`)."""
        self._stop = True
        self._drain(seconds)
        self.collect()
        self.maybe_update()

    def _drain(self, seconds: float) -> None:
        """Store the frames received but not yet stored (in the inbox, or still on their way
        through zmq), for at most ``seconds``: a run that ends keeps the drivers' last frames
        queued in its database for a restart instead of losing them with the socket."""
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end and self.receive(
                timeout_ms=50, max_seconds=max(0.0, t_end - time.monotonic())):
            pass

    def close(self) -> None:
        self._event("stop", labels=self.labels_done(), model_version=self.posterior.model_version)
        try:
            self.labeller.close()
        finally:
            self.inbox.close()
