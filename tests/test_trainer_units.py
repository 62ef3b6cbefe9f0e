"""Unit tests of the trainer's parts and the driver-side flagging, without processes or models:
frame messages, the frame store, selection, the flag policy, the reference registry and the
model hot swap."""

from __future__ import annotations

import json
import logging
import os
import time
import types

import numpy as np
import pytest

from rarefly.prediction import Prediction, Structure
from rarefly.trainer.messages import FrameMessage, MessageError, decode, encode


def _water(shift=(0.0, 0.0, 0.0)) -> Structure:
    pos = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]]) + np.asarray(shift)
    return Structure(np.array([8, 1, 1]), pos)


def _ethanol() -> Structure:
    from ase.io import read

    from rarefly.foundation import DATA_DIR

    return Structure.from_atoms(read(DATA_DIR / "ethanol.xyz"))


def _header(**kw):
    h = {"frame_id": "w0-1-5", "origin": "flagged", "step": 5, "walker": "w0", "model_version": 3,
         "sigma_E": 0.12, "sigma_E_raw": 0.01, "confidence": 0.4, "pred_energy": -310.5}
    h.update(kw)
    return h


# ------------------------------------------------------------------ messages

def test_message_round_trip_molecule():
    s = _water()
    out = decode(encode(FrameMessage(s, _header())))
    assert out.frame_id == "w0-1-5" and out.origin == "flagged"
    np.testing.assert_array_equal(out.structure.numbers, s.numbers)
    np.testing.assert_array_equal(out.structure.positions, s.positions)   # bit for bit
    assert out.structure.cell is None and out.structure.pbc == (False, False, False)
    assert out.ref_forces is None
    assert out.header["sigma_E"] == 0.12 and out.header["step"] == 5 and out.header["natoms"] == 3


def test_message_round_trip_periodic_with_reference_forces():
    s = Structure(np.array([29, 29]), np.array([[0.0, 0.0, 0.0], [1.8, 1.8, 0.0]]),
                  np.diag([3.6, 3.6, 3.6]) + np.array([[0, 0, 0], [0.1, 0, 0], [0, 0, 0]]),
                  (True, True, False))
    f = np.array([[0.1, -0.2, 0.3], [-0.1, 0.2, -0.3]])
    out = decode(encode(FrameMessage(s, _header(origin="labelled", ref_energy=-7.5), f)))
    assert out.origin == "labelled" and out.header["ref_energy"] == -7.5
    np.testing.assert_array_equal(out.structure.cell, s.cell)
    assert out.structure.pbc == (True, True, False)
    np.testing.assert_array_equal(out.ref_forces, f)


def _parts(**header):
    return encode(FrameMessage(_water(), _header(**header)))


@pytest.mark.parametrize("mutate, words", [
    (lambda p: p[:4], "has 5 parts, this one has 4"),
    (lambda p: p + [b""], "has 5 parts, this one has 6"),
    (lambda p: [b"{not json"] + p[1:], "header is not JSON"),
    (lambda p: [b"\xff\xfe"] + p[1:], "header is not JSON"),
    (lambda p: [b"[1, 2]"] + p[1:], "frame_id"),
    (lambda p: [json.dumps({"v": 1, "natoms": 3}).encode()] + p[1:], "frame_id"),
    (lambda p: [json.dumps({"v": 2, "frame_id": "a", "natoms": 3}).encode()] + p[1:], "version-1"),
    (lambda p: [p[0], p[1][:8]] + p[2:], "atomic numbers has 2 values, expected 3"),
    (lambda p: [p[0], p[1], p[2][:-8]] + p[3:], "positions has 8 values, expected 9"),
    (lambda p: p[:4] + [np.zeros(5).tobytes()], "forces has 5 values, expected 9"),
    (lambda p: [p[0], p[1][:-1]] + p[2:], "atomic numbers"),            # not whole int32s
    (lambda p: [p[0], p[1], p[2] + b"\x00"] + p[3:], "positions"),      # not whole float64s
])
def test_malformed_messages_are_one_sentence(mutate, words):
    with pytest.raises(MessageError) as err:
        decode(mutate(_parts()))
    msg = str(err.value)
    assert words in msg and "\n" not in msg


def test_non_finite_positions_and_forces_are_refused():
    bad = _water()
    bad.positions[1, 2] = np.nan
    with pytest.raises(MessageError, match="positions holds non-finite values"):
        decode(encode(FrameMessage(bad, _header())))
    f = np.zeros((3, 3))
    f[0, 0] = np.inf
    with pytest.raises(MessageError, match="forces holds non-finite values"):
        decode(encode(FrameMessage(_water(), _header(origin="labelled", ref_energy=-1.0), f)))


@pytest.mark.parametrize("header, words", [
    ({"natoms": "three"}, "natoms"),
    ({"natoms": -3}, "natoms"),
    ({"origin": "labelled"}, "ref_energy"),                       # a label without its energy
    ({"origin": "labelled", "ref_energy": float("nan")}, "ref_energy"),
    ({"origin": "labelled", "ref_energy": "low"}, "ref_energy"),
])
def test_malformed_headers_are_message_errors(header, words):
    parts = _parts()
    h = json.loads(parts[0])
    h.update(header)
    parts[0] = json.dumps(h).encode()
    if h.get("origin") == "labelled":
        parts[4] = np.zeros((3, 3)).tobytes()
    with pytest.raises(MessageError, match=words):
        decode(parts)


def test_periodic_header_needs_three_pbc_flags():
    s = Structure(np.array([29]), np.zeros((1, 3)), np.eye(3) * 3.0, (True, True, True))
    parts = encode(FrameMessage(s, _header()))
    h = json.loads(parts[0])
    h["pbc"] = [True, True]
    parts[0] = json.dumps(h).encode()
    with pytest.raises(MessageError, match="pbc"):
        decode(parts)


def test_labelled_message_without_forces_is_refused():
    with pytest.raises(MessageError, match="forces"):
        decode(encode(FrameMessage(_water(), _header(origin="labelled", ref_energy=-1.0))))


# ------------------------------------------------------------------ frame store

def test_frame_store_states_labels_and_recovery(tmp_path):
    from rarefly.trainer.store import FrameStore

    path = tmp_path / "sub" / "frames.db"
    st = FrameStore(path)
    a = st.add(_water(), frame_id="w0-1", origin="flagged", step=1, sigma_E=np.float64(0.3),
               walker="w0", confidence=None)
    b = st.add(_water((0.1, 0, 0)), frame_id="w0-2", origin="audit", step=2)
    c = st.add(_water((0.2, 0, 0)), frame_id="w0-3", origin="flagged", step=3)
    assert st.add(_water(), frame_id="w0-1", origin="flagged") is None          # duplicate id
    assert FrameStore(path).add(_water(), frame_id="w0-3", origin="flagged") is None  # reopened
    assert st.count() == 3 and st.count(state="queued") == 3
    row = st.db.get(id=a)
    assert row.sigma_E == 0.3 and row.walker == "w0" and "confidence" not in row
    # a labelled, b in flight when the process dies, c still queued
    forces = np.arange(9.0).reshape(3, 3)
    st.set_state(a, "labelling")
    st.add_label(a, -470.25, forces, "xtb(method=GFN2-xTB)", energy_offset=1.5)
    st.set_state(b, "labelling")
    with pytest.raises(AssertionError):
        st.set_state(c, "lost")
    del st

    st = FrameStore(path)                                       # reopened after the crash
    assert st.count(state="labelling") == 1
    assert st.recover() == 1
    assert st.count(state="labelling") == 0 and st.count(state="queued") == 2
    assert st.recover() == 0
    frames = st.labelled_frames()
    assert len(frames) == 1
    f = frames[0]
    assert f.energy == -470.25 and f.info["frame_id"] == "w0-1" and f.info["origin"] == "flagged"
    np.testing.assert_array_equal(f.forces, forces)
    np.testing.assert_array_equal(f.structure.positions, _water().positions)
    row = st.db.get(id=a)
    assert row.state == "labelled" and row.energy_offset == 1.5 and row.reference.startswith("xtb")
    assert row.step == 1 and row.labelled_at > 0
    assert st.labelled_frames(origin="audit") == []
    # the labelled row is not queued again and its id still refuses a duplicate
    assert st.add(_water(), frame_id="w0-1", origin="flagged") is None
    assert {r.frame_id for r in st.rows(state="queued")} == {"w0-2", "w0-3"}


def test_frame_store_keeps_its_queued_rows_in_memory_as_the_database_has_them(tmp_path):
    """The in-memory queue (selection reads it between refinement steps) follows every write:
    new frames, state changes, labels, refused labels and a crash recovery."""
    from rarefly.trainer.store import FrameStore

    st = FrameStore(tmp_path / "frames.db")

    def same():
        from_db = sorted((r.id, r.frame_id, r.get("step")) for r in st.rows(state="queued"))
        cached = sorted((r.id, r.frame_id, r.get("step")) for r in st.queued())
        assert cached == from_db
        return [c[1] for c in cached]

    ids = [st.add(_water((0.1 * i, 0, 0)), frame_id=f"f{i}", origin="flagged", step=i,
                  sigma_E_raw=0.01 * i) for i in range(6)]
    assert same() == [f"f{i}" for i in range(6)]            # loaded from the database
    ids.append(st.add(_water((1, 0, 0)), frame_id="f6", origin="audit", step=6))
    st.set_state(ids[0], "skipped", reason="near-duplicate")
    st.set_state(ids[1], "labelling")
    st.set_state(ids[2], "labelling")
    st.add_label(ids[2], -1.0, np.zeros((3, 3)), "test")
    st.set_state(ids[3], "labelling")
    st.reject_label(ids[3], -1.0, np.full((3, 3), 99.0), "test", "too large")
    assert same() == ["f4", "f5", "f6"]
    assert st.recover() == 1                                 # f1 was being labelled
    assert same() == ["f1", "f4", "f5", "f6"]
    st.set_state(ids[4], "queued", reason="again")           # back to the queue by hand
    assert same() == ["f1", "f4", "f5", "f6"]
    assert FrameStore(tmp_path / "frames.db").queued()[0].frame_id == "f1"   # a restart reads it
    row = next(r for r in st.queued() if r.frame_id == "f5")
    assert row.sigma_E_raw == 0.05 and row.get("walker") is None
    assert st.structure(row).positions[0, 0] == 0.5          # positions read when asked for


def test_frame_store_keeps_periodic_structures(tmp_path):
    from rarefly.trainer.store import FrameStore

    s = Structure(np.array([29, 29]), np.array([[0.0, 0.0, 0.0], [1.8, 1.8, 0.0]]),
                  np.eye(3) * 3.6, (True, True, True))
    st = FrameStore(tmp_path / "f.db")
    rid = st.add(s, frame_id="p", origin="flagged")
    back = st.structure(st.db.get(id=rid))
    np.testing.assert_allclose(back.cell, s.cell)
    assert back.pbc == (True, True, True)
    mol = st.structure(st.db.get(id=st.add(_water(), frame_id="m", origin="flagged")))
    assert mol.cell is None and mol.pbc == (False, False, False)


# ------------------------------------------------------------------ selection

def _rotated_copy(s: Structure, seed=0) -> Structure:
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    rot = Rotation.random(random_state=seed).as_matrix()
    perm = np.arange(len(s.numbers))
    hs = np.flatnonzero(s.numbers == 1)
    perm[hs] = rng.permutation(hs)                      # swap like atoms
    pos = s.positions @ rot.T + rng.normal(size=3) * 5.0
    return Structure(s.numbers[perm], pos[perm])


def test_deduplicator_sees_through_rotation_translation_permutation():
    from rarefly.trainer.selection import Deduplicator

    eth = _ethanol()
    d = Deduplicator(0.02)
    assert not d.is_duplicate(eth)
    d.add(eth)
    assert d.is_duplicate(eth)
    for seed in range(3):
        assert d.is_duplicate(_rotated_copy(eth, seed))
    distorted = Structure(eth.numbers.copy(), eth.positions.copy())
    distorted.positions[0] += [0.15, 0.0, 0.0]
    assert not d.is_duplicate(distorted)
    rattled = Structure(eth.numbers.copy(),
                        eth.positions + np.random.default_rng(1).normal(scale=0.05, size=eth.positions.shape))
    assert not d.is_duplicate(rattled)
    # a different composition with the same number of atoms is never a duplicate
    other = Structure(eth.numbers.copy(), eth.positions.copy())
    other.numbers[0] = 7
    assert not d.is_duplicate(other)
    # tolerance: a tiny jiggle is below it
    jiggle = Structure(eth.numbers, eth.positions + 1e-4)
    assert d.is_duplicate(jiggle)


def test_rank_puts_audit_first_newest_first_then_decreasing_sigma():
    from rarefly.trainer.selection import rank
    from rarefly.trainer.store import QueuedRow

    rows = [QueuedRow(1, {"origin": "flagged", "sigma_E_raw": 0.01}),
            QueuedRow(2, {"origin": "audit", "sigma_E_raw": 0.001}),
            QueuedRow(3, {"origin": "flagged", "sigma_E_raw": 0.05}),
            QueuedRow(4, {"origin": "flagged", "sigma_E": 0.02}),     # only the calibrated sigma
            QueuedRow(5, {"origin": "audit", "sigma_E_raw": 0.5}),
            QueuedRow(6, {"origin": "flagged"})]                       # no sigma at all: last
    assert [r.id for r in rank(rows)] == [5, 2, 3, 4, 1, 6]
    assert rank([]) == []


def test_rank_reads_ase_rows(tmp_path):
    from rarefly.trainer.selection import rank
    from rarefly.trainer.store import FrameStore

    st = FrameStore(tmp_path / "f.db")
    for i, (origin, sig) in enumerate([("flagged", 0.1), ("audit", 0.01), ("flagged", 0.3)]):
        st.add(_water((0.1 * i, 0, 0)), frame_id=f"f{i}", origin=origin, sigma_E_raw=sig)
    assert [r.frame_id for r in rank(st.rows(state="queued"))] == ["f1", "f2", "f0"]


def test_rate_cap_labels_one_flagged_frame_per_step_window_and_survives_a_restart(tmp_path):
    """[learning] min_step_gap: at most one flagged frame per GAP MD steps of a walker (the
    most uncertain one of its window, chosen once the window is complete), audit frames
    always; a restarted trainer keeps the window."""
    from types import SimpleNamespace

    from rarefly.trainer.loop import Trainer
    from rarefly.trainer.selection import Deduplicator, RateCap, SelectionPolicy
    from rarefly.trainer.store import FrameStore

    class Labeller:                               # records what would go to the reference
        def __init__(self):
            self.sent = []

        def submit(self, s):
            self.sent.append(s)
            return None

    def trainer_on(store, gap):
        t = Trainer.__new__(Trainer)              # only what select_and_submit() uses
        t.cfg = SimpleNamespace(max_labels=None,
                                selection=SelectionPolicy(max_in_flight=100, min_step_gap=gap))
        t.store, t.dedup, t.labeller, t._in_flight = store, Deduplicator(0.0), Labeller(), {}
        t._refining = t._finishing = False
        t.rate_cap = RateCap(gap, store.rows(state="labelled"), store.rows())  # as Trainer.__init__
        t.labels_done = lambda: 0
        return t

    st = FrameStore(tmp_path / "frames.db")
    # walker 0: steps 0..49 flagged, sigma growing with the step; one audit frame at step 3
    for i in range(50):
        st.add(_water((0.01 * i, 0, 0)), frame_id=f"w0-{i}", origin="flagged", step=i, walker=0,
               sigma_E_raw=0.01 * (1 + i))
    st.add(_water((0, 0.3, 0)), frame_id="audit", origin="audit", step=3, walker=0, sigma_E_raw=0.001)
    # walker 1: two frames close together
    for i in (5, 8):
        st.add(_water((0, 0, 0.01 * i)), frame_id=f"w1-{i}", origin="flagged", step=i, walker=1,
               sigma_E_raw=0.02)
    t = trainer_on(st, gap=20)
    t.select_and_submit()
    chosen = {r.frame_id for r in st.rows(state="labelling")}
    # the most uncertain frame of walker 0 (step 49) rules out everything before step 69;
    # walker 1 has its own window; the audit frame is not capped
    assert chosen == {"audit", "w0-49", "w1-5"} or chosen == {"audit", "w0-49", "w1-8"}
    assert st.count(state="skipped") == 49 + 1
    assert all("rate cap" in r.reason for r in st.rows(state="skipped"))
    for r in list(st.rows(state="labelling")):
        st.add_label(r.id, -1.0, np.zeros((3, 3)), "test")
    # restart: the window of the labelled frames holds; step 69 is the first allowed again
    for i in (60, 68, 69, 75):
        st.add(_water((0.5 + 0.01 * i, 0, 0)), frame_id=f"late-{i}", origin="flagged", step=i,
               walker=0, sigma_E_raw=0.01 * (100 - i))
    t = trainer_on(st, gap=20)
    t.select_and_submit()
    # frames before step 69 are refused; the window [69, 89) is open but not complete
    # (walker 0 seen up to step 75): nothing is sent yet
    assert st.count(state="labelling") == 0
    assert {r.frame_id for r in st.rows(state="queued")} == {"late-69", "late-75"}
    # a frame at step 90 completes it: the most uncertain from step 69 on, earlier ones refused
    st.add(_water((0.9, 0, 0)), frame_id="late-90", origin="flagged", step=90, walker=0,
           sigma_E_raw=0.05)
    t.rate_cap.see(0, 90)                         # as Trainer.receive does
    t.select_and_submit()
    assert {r.frame_id for r in st.rows(state="labelling")} == {"late-69"}
    assert {r.frame_id for r in st.rows(state="queued")} == {"late-90"}
    # without a cap every frame queued is sent (the default)
    st2 = FrameStore(tmp_path / "nocap.db")
    for i in range(5):
        st2.add(_water((0.01 * i, 0, 0)), frame_id=f"n{i}", origin="flagged", step=i, walker=0)
    t = trainer_on(st2, gap=0)
    t.select_and_submit()
    assert st2.count(state="labelling") == 5


def test_a_refinement_starts_at_most_its_share_of_reference_calls(tmp_path):
    """[learning] calls_while_refining: while the backbone refines, at most that many flagged
    frames go to the reference (default backbone_every, the labels the next refinement
    takes); the others stay queued for the refined model. Audit frames are neither counted
    nor held (ranked first, they took the whole share in bench_onthefly's fifty-first run).
    Outside a refinement the workers take everything."""
    from types import SimpleNamespace

    from rarefly.trainer.loop import Trainer
    from rarefly.trainer.selection import Deduplicator, RateCap, SelectionPolicy
    from rarefly.trainer.store import FrameStore

    def trainer(name, **cfg):
        t = Trainer.__new__(Trainer)              # only what select_and_submit() uses
        t.cfg = SimpleNamespace(max_labels=None, backbone_every=3,   # audits unbounded here
                                selection=SelectionPolicy(max_in_flight=100, audit_share=1.0), **cfg)
        t.store, t.dedup, t.rate_cap = FrameStore(tmp_path / name), Deduplicator(0.0), RateCap(0)
        t._in_flight, t._finishing, t._refining, t._calls_this_refinement = {}, False, True, 0
        t.labeller = SimpleNamespace(submit=lambda s: None)
        t.labels_done = lambda: 0
        for i in range(8):
            t.store.add(_water((0.05 * i, 0, 0)), frame_id=f"f{i}", step=10 * i,
                        origin="audit" if i == 0 else "flagged")
        return t

    def sent(t, origin):
        return sum(r.origin == origin for r in t.store.rows(state="labelling"))

    t = trainer("default.db", calls_while_refining=None)
    t.select_and_submit()
    assert (sent(t, "audit"), sent(t, "flagged")) == (1, 3) and t._calls_this_refinement == 3
    t.store.add(_water((0.9, 0, 0)), frame_id="late-audit", step=90, origin="audit")
    t.select_and_submit()                         # the share is spent; an audit still goes
    assert (sent(t, "audit"), sent(t, "flagged")) == (2, 3) and t.store.count(state="queued") == 4
    t._refining = False                           # published: the queue goes on
    t.select_and_submit()
    assert t.store.count(state="labelling") == 9
    t = trainer("none.db", calls_while_refining=0)
    t.select_and_submit()
    assert (sent(t, "audit"), sent(t, "flagged")) == (1, 0)
    t = trainer("seven.db", calls_while_refining=7)
    t.select_and_submit()
    assert (sent(t, "audit"), sent(t, "flagged")) == (1, 7)


def test_audit_frames_take_at_most_their_share_of_the_calls_the_newest_first(tmp_path):
    """[learning] audit_share: an audit frame goes to the reference only while the audit calls
    (finished, failed or in flight) stay below that share of all calls counting it; the newest
    audit goes first, the others wait (queued), and flagged frames are not held by them."""
    from types import SimpleNamespace

    from rarefly.trainer.loop import Trainer
    from rarefly.trainer.selection import Deduplicator, RateCap, SelectionPolicy
    from rarefly.trainer.store import FrameStore

    t = Trainer.__new__(Trainer)                  # only what select_and_submit() uses
    t.cfg = SimpleNamespace(max_labels=None, selection=SelectionPolicy(max_in_flight=100,
                                                                       audit_share=0.25))
    t.store, t.dedup, t.rate_cap = FrameStore(tmp_path / "f.db"), Deduplicator(0.0), RateCap(0)
    t._in_flight, t._finishing, t._refining = {}, False, False
    t.cfg.selection.rescore_flagged = False
    t.labeller = SimpleNamespace(submit=lambda s: None)
    t.labels_done = lambda: t.store.count(state="labelled")
    for i in range(6):                            # audits a0..a5, oldest first
        t.store.add(_water((0.05 * i, 0, 0)), frame_id=f"a{i}", step=i, origin="audit")
    for i in range(6):
        t.store.add(_water((0.05 * i, 0.5, 0)), frame_id=f"f{i}", step=100 + i, origin="flagged",
                    sigma_E_raw=0.1 + 0.01 * i)

    def labelling(origin):
        return sorted(r.frame_id for r in t.store.rows(state="labelling") if r.origin == origin)

    t.select_and_submit()
    # the first call may be an audit (0 < 0.25 * 1), the next only once 4 calls are made
    # (1 < 0.25 * 5): the newest audit, then every flagged frame; 7 calls, 1 audit
    assert labelling("audit") == ["a5"]
    assert labelling("flagged") == [f"f{i}" for i in range(6)]
    assert t.store.count(state="queued", origin="audit") == 5
    t.select_and_submit()                         # 7 calls: a second audit (1 < 0.25 * 8),
    assert labelling("audit") == ["a3", "a4", "a5"]   # and a third (2 < 0.25 * 9)
    t.select_and_submit()                         # 9 calls, 3 audits: 3 >= 0.25 * 10, none
    assert labelling("audit") == ["a3", "a4", "a5"]
    t.cfg.selection.audit_share = 0.0             # none at all
    t.store.add(_water((0.9, 0, 0)), frame_id="a6", step=6, origin="audit")
    t.select_and_submit()
    assert labelling("audit") == ["a3", "a4", "a5"]


def test_rate_cap_picks_the_most_uncertain_frame_of_each_window_as_frames_stream_in():
    """Frames arriving one step at a time: the cap waits for each window to be complete and
    takes its most uncertain frame, not the first frame past the gap; a walker that falls
    silent completes its window after WINDOW_IDLE_SECONDS."""
    from rarefly.trainer.selection import WINDOW_IDLE_SECONDS, RateCap

    gap = 10
    sigma = lambda step: 1.0 + np.sin(0.7 * step)        # noqa: E731 - a bumpy uncertainty
    cap, queue, taken = RateCap(gap), [], []
    for step in range(60):
        queue.append({"origin": "flagged", "step": step, "walker": 0, "sigma_E_raw": sigma(step)})
        cap.see(0, step, now=float(step))
        for row in sorted(queue, key=lambda r: -r["sigma_E_raw"]):
            v = cap.verdict(row, now=float(step))
            if v == "ok":
                cap.take(row)
                taken.append(row["step"])
                queue = [r for r in queue if r is not row]
            elif v == "skip":
                queue = [r for r in queue if r is not row]
    assert taken[0] == 0                                  # the first label at once
    for a, b in zip(taken, taken[1:]):
        assert gap <= b - a < 2 * gap + 1
        window = [s for s in range(a + gap, b + 1)]       # what was queued when b was taken
        assert sigma(b) == max(sigma(s) for s in window)
    assert len(taken) >= 3
    # idle walker: the open window completes after WINDOW_IDLE_SECONDS without new frames
    cap = RateCap(gap)
    cap.take({"origin": "flagged", "step": 0, "walker": 0})
    cap.see(0, 12, now=0.0)
    row = {"origin": "flagged", "step": 12, "walker": 0}
    assert cap.verdict(row, now=1.0) == "wait"
    assert cap.verdict(row, now=WINDOW_IDLE_SECONDS + 0.1) == "ok"
    assert cap.verdict({"origin": "flagged", "step": 5, "walker": 0}, now=1.0) == "skip"
    assert cap.verdict({"origin": "audit", "step": 5, "walker": 0}, now=1.0) == "ok"


def test_rate_cap_takes_from_the_open_window_not_a_more_uncertain_frame_windows_ahead():
    """A trainer that lags (frames of many windows queued at once) labels the most uncertain
    frame of the open window, not the most uncertain frame queued: the next window waits its
    turn. The window opens at the first queued frame past the refusal line, so a stretch the
    walker spent trusted (nothing flagged) does not stall the cap."""
    from rarefly.trainer.selection import RateCap, rank

    gap = 10
    cap = RateCap(gap)
    cap.take({"origin": "flagged", "step": 0, "walker": 0})
    # nothing flagged in steps 1-24; frames 25..64 queued, the most uncertain at step 60
    queue = [{"origin": "flagged", "step": s, "walker": 0, "sigma_E_raw": 0.1 + 0.01 * (s == 60)
              + 0.001 * (s == 31)} for s in range(25, 65)]
    cap.see(0, 64, now=0.0)
    taken = []
    for _ in range(3):
        ranked = rank(queue)
        cap.plan(ranked)
        verdicts = {r["step"]: cap.verdict(r, now=0.0) for r in ranked}
        ok = [r for r in ranked if verdicts[r["step"]] == "ok"]
        cap.take(ok[0])
        taken.append(ok[0]["step"])
        queue = [r for r in queue if verdicts[r["step"]] != "skip" and r is not ok[0]]
    # window [25, 35): step 31; then [41, 51): the first frame of the window wins a tie;
    # then [51, 61) holds step 60
    assert taken == [31, 41, 60]
    assert all(verdicts[s] == "wait" for s in range(61, 65))    # [61, 71) is not complete


def test_trainer_keeps_reference_workers_busy_during_a_refinement(tmp_path):
    """Between refinement steps the trainer stores arriving frames and hands free workers new
    frames (a flagged one is not asked again by the half-refined model); a finished label is
    stored at once (learned after the refinement) and frees its slot."""
    import zmq
    from concurrent.futures import Future
    from types import SimpleNamespace

    from rarefly.trainer.inbox import FrameInbox
    from rarefly.trainer.loop import Trainer
    from rarefly.trainer.selection import Deduplicator, RateCap, SelectionPolicy
    from rarefly.trainer.store import FrameStore

    endpoint = f"ipc://{tmp_path}/learn"
    t = Trainer.__new__(Trainer)
    t.cfg = SimpleNamespace(max_labels=None, selection=SelectionPolicy(max_in_flight=1), max_label_force=25.0,
                            reference=SimpleNamespace(describe=lambda: "test reference"),
                            backbone_every=10, calls_while_refining=None)
    t.store, t.dedup, t.rate_cap = FrameStore(tmp_path / "frames.db"), Deduplicator(0.0), RateCap(0)
    t.posterior = SimpleNamespace(offset_energy=lambda numbers, energy: energy)
    t.inbox = FrameInbox(_pull(endpoint))
    t._stop, t._t_end, t._finishing = False, None, False   # not stopping: the refinement goes on
    t._refining, t._stored_unlearned, t._calls_this_refinement = True, [], 0
    t._last_between = None
    done = Future()
    done.set_result((-1.0, np.zeros((3, 3))))
    first = t.store.add(_water(), frame_id="first", origin="flagged")
    t.store.set_state(first, "labelling")
    t._in_flight = {first: (done, _water())}        # finished, not yet collected
    sent = []
    t.labeller = SimpleNamespace(submit=lambda s: sent.append(s) or Future())
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(endpoint)
    try:
        push.send_multipart(encode(FrameMessage(_water((0.3, 0, 0)),
                                                _header(frame_id="new", step=7, origin="audit"))))
        time.sleep(0.3)
        t.select_and_submit()                     # outside a refinement: the slot is taken
        assert sent == []
        assert t._keep_labelling() is False       # inside: both stored, the worker gets "new"
        assert [r.frame_id for r in t.store.rows(state="labelling")] == ["new"]
        assert [r.frame_id for r in t.store.rows(state="labelled")] == ["first"]
        assert [row for row, *_ in t._stored_unlearned] == [first]   # learned after it
        assert len(sent) == 1 and first not in t._in_flight and len(t._in_flight) == 1
        t._keep_labelling()                       # one worker, busy: nothing more
        assert len(sent) == 1
        t.cfg.selection.max_in_flight = 2         # a free worker, and a flagged frame arrives:
        push.send_multipart(encode(FrameMessage(_water((0.6, 0, 0)), _header(
            frame_id="held", step=9, model_version=1, level=0.95, epsilon=0.2))))
        time.sleep(0.3)
        t._keep_labelling()                       # labelled as it comes (no rescoring by a
        assert len(sent) == 2                     # half-refined model)
        assert [r.frame_id for r in t.store.rows(state="labelling")] == ["new", "held"]
        t._stop = True                            # SIGTERM: end the refinement here
        assert t._keep_labelling() is True
    finally:
        push.close()
        t.inbox.close()


# ------------------------------------------------------------------ flag policy


def test_a_flagged_frame_is_labelled_only_while_the_trainers_model_still_flags_it(tmp_path):
    """rescore_flagged: a frame flagged by an older model version is asked again, with the
    driver's level, force threshold and epsilon (from its header), by the model the trainer
    holds; skipped, with the reason, when that model trusts it; frames of the current version
    or without the criterion go to the reference as before."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    from rarefly.calibration import ScaleCalibration
    from rarefly.trainer.loop import Trainer
    from rarefly.trainer.selection import Deduplicator, RateCap, SelectionPolicy
    from rarefly.trainer.store import FrameStore

    raw = {}                                      # x offset of the water -> raw sigma_E (eV)

    def predict(structures):
        return [SimpleNamespace(extra={"energy_sigma_raw": raw[round(float(s.positions[0, 0]), 3)]},
                                forces_sigma=np.full(3, 0.05)) for s in structures]

    def trainer(rescore=True):
        t = Trainer.__new__(Trainer)
        t.cfg = SimpleNamespace(max_labels=None, selection=SelectionPolicy(
            max_in_flight=10, rescore_flagged=rescore))
        t.store, t.dedup, t.rate_cap = FrameStore(tmp_path / f"f{rescore}.db"), Deduplicator(0.0), RateCap(0)
        t.posterior = SimpleNamespace(model_version=5, predict=predict,
                                      settings=SimpleNamespace(epsilon=1.0),
                                      calibration=SimpleNamespace(energy=ScaleCalibration(a=50.0, b=50.0)))
        t._refining, t._finishing, t._in_flight = False, False, {}
        t.labeller = SimpleNamespace(submit=lambda s: Future())
        crit = {"flag_level": 0.95, "flag_epsilon": 0.2, "flag_force_threshold": None}
        for name, x, sigma, version, extra in [
                ("sure_now", 0.1, 0.01, 4, crit),                   # old version, trusted now
                ("unsure_now", 0.2, 0.5, 4, crit),                  # old version, still flagged
                ("forces_now", 0.3, 0.01, 4, {**crit, "flag_force_threshold": 0.01}),
                ("this_version", 0.4, 0.01, 5, crit),               # flagged by the model held
                ("old_driver", 0.5, 0.01, 4, {})]:                  # no criterion in the header
            raw[x] = sigma
            t.store.add(_water((x, 0, 0)), frame_id=name, origin="flagged", step=int(x * 10),
                        model_version=version, sigma_E_raw=sigma, **extra)
        return t

    t = trainer()
    t.select_and_submit()
    assert sorted(r.frame_id for r in t.store.rows(state="labelling")) == \
        ["forces_now", "old_driver", "this_version", "unsure_now"]
    (skipped,) = t.store.rows(state="skipped")
    assert skipped.frame_id == "sure_now" and "trusted by model version 5" in skipped.reason
    from rarefly.trainer.loop import _number
    assert [_number(v) for v in (0.95, 1, "0.95", None, float("nan"), True)] == \
        [0.95, 1.0, None, None, None, None]            # a malformed criterion is not trusted
    t = trainer(rescore=False)                     # the switch off: every flagged frame goes
    t.select_and_submit()
    assert t.store.count(state="labelling") == 5

def _prediction(confidence=0.99, forces_sigma=(0.01, 0.02, 0.03)):
    n = len(forces_sigma)
    return Prediction(energy=-1.0, forces=np.zeros((n, 3)), stress=None, energy_sigma=0.01,
                      forces_sigma=np.asarray(forces_sigma), energy_sigma_gradient=np.zeros((n, 3)),
                      confidence=confidence, model_version=1)


def test_flag_policy_level_and_force_threshold():
    from rarefly.flagging import FlagPolicy

    p = FlagPolicy()
    assert p.level == 0.95 and p.mode == "async" and p.force_threshold is None
    assert p.is_flagged(_prediction(confidence=0.94))
    assert not p.is_flagged(_prediction(confidence=0.96))
    assert not p.is_flagged(_prediction(confidence=0.99, forces_sigma=(5.0, 0.0, 0.0)))
    strict = FlagPolicy(level=0.5, force_threshold=0.1)
    assert not strict.is_flagged(_prediction(confidence=0.6, forces_sigma=(0.05, 0.1, 0.02)))
    assert strict.is_flagged(_prediction(confidence=0.6, forces_sigma=(0.05, 0.11, 0.02)))
    assert strict.is_flagged(_prediction(confidence=0.4))


@pytest.mark.parametrize("kw, words", [
    ({"mode": "sync"}, "flagging mode must be 'async' or 'guarantee', not 'sync'"),
    ({"level": 1.5}, "confidence level must be between 0 and 1, not 1.5"),
    ({"level": 0.0}, "confidence level must be between 0 and 1"),
])
def test_flag_policy_refuses_bad_settings(kw, words):
    from rarefly.flagging import FlagPolicy

    with pytest.raises(ValueError) as err:
        FlagPolicy(**kw)
    assert words in str(err.value)


class _FixedPredictor:
    """A predictor double: confidence taken from a list, one per call."""

    model_version = 4
    energy_offset = {1: 0.25, 8: -1.0}

    def __init__(self, confidences):
        self.confidences = list(confidences)

    def predict(self, structures):
        return [_prediction(confidence=self.confidences.pop(0)) for _ in structures]


def test_flagging_predictor_sends_flagged_and_audit_frames(tmp_path):
    import zmq

    from rarefly.flagging import FlagPolicy, FlaggingPredictor

    endpoint = f"ipc://{tmp_path}/learn"
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(endpoint)
    try:
        fp = FlaggingPredictor(_FixedPredictor([0.5, 0.99, 0.2]), endpoint,
                               FlagPolicy(audit_fraction=0.0), walker="wA")
        preds = [fp.predict([_water((0.1 * i, 0, 0))])[0] for i in range(3)]
        assert [p.extra["flagged"] for p in preds] == [True, False, True]
        assert fp.stats["flagged"] == 2 and fp.stats["calls"] == 3 and fp.model_version == 4
        msgs = []
        while pull.poll(2000) and len(msgs) < 2:
            msgs.append(decode(pull.recv_multipart()))
        assert [m.header["step"] for m in msgs] == [1, 3]
        assert all(m.origin == "flagged" and m.header["walker"] == "wA" for m in msgs)
        assert msgs[0].header["confidence"] == 0.5 and msgs[0].header["model_version"] == 1
        assert len({m.frame_id for m in msgs}) == 2
        np.testing.assert_array_equal(msgs[1].structure.positions, _water((0.2, 0, 0)).positions)
        fp.close()
        # audit_fraction=1: every unflagged frame goes out as audit
        fa = FlaggingPredictor(_FixedPredictor([0.99]), endpoint, FlagPolicy(audit_fraction=1.0))
        assert fa.predict([_water()])[0].extra["flagged"] is False
        assert pull.poll(2000)
        assert decode(pull.recv_multipart()).origin == "audit"
        assert fa.stats["audit"] == 1
        fa.close()
    finally:
        pull.close()


def test_audit_sample_depends_on_seed_and_walker_only(tmp_path):
    import subprocess
    import sys

    code = ("from rarefly.flagging import FlagPolicy, FlaggingPredictor as F; "
            f"f = F(None, 'ipc://{tmp_path}/none', FlagPolicy(seed=3), walker='w1'); "
            "print(list(f.rng.random(3))); f.close()")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONHASHSEED=h)).stdout for h in ("1", "2")}
    assert len(outs) == 1, outs


def test_guarantee_mode_returns_reference_with_the_models_offset(tmp_path):
    import zmq

    from rarefly.flagging import FlagPolicy, FlaggingPredictor
    from rarefly.trainer.reference import ReferenceSpec, label

    endpoint = f"ipc://{tmp_path}/learn"
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(endpoint)
    with pytest.raises(ValueError, match="guarantee mode needs a reference"):
        FlaggingPredictor(_FixedPredictor([]), endpoint, FlagPolicy(mode="guarantee"))
    ref = ReferenceSpec("xtb")
    water = _water()
    e_ref, f_ref = label(ref, water.numbers, water.positions)
    try:
        fp = FlaggingPredictor(_FixedPredictor([0.1, 0.99]), endpoint,
                               FlagPolicy(mode="guarantee", audit_fraction=0.0), reference=ref)
        p = fp.predict([water])[0]
        assert p.extra["reference"] is True and p.extra["flagged"] is True
        assert p.energy == pytest.approx(e_ref + 2 * 0.25 - 1.0, abs=1e-9)   # offset of O + 2 H
        np.testing.assert_allclose(p.forces, f_ref, atol=1e-9)
        q = fp.predict([_water((0.05, 0, 0))])[0]
        assert "reference" not in q.extra and q.energy == -1.0
        assert fp.stats["guaranteed"] == 1
        assert pull.poll(2000)
        m = decode(pull.recv_multipart())
        assert m.origin == "labelled" and m.header["ref_energy"] == pytest.approx(e_ref)
        assert m.header["reference"] == ref.describe()
        np.testing.assert_allclose(m.ref_forces, f_ref)
        # after a hot swap (the driver replaces .inner) the new model's offset applies
        swapped = _FixedPredictor([0.1])
        swapped.energy_offset = {1: 0.5, 8: 0.0}
        fp.inner = swapped
        assert fp.predict([water])[0].energy == pytest.approx(e_ref + 1.0, abs=1e-9)
        assert pull.poll(2000)
        m2 = decode(pull.recv_multipart())
        assert m2.frame_id != m.frame_id and m2.header["ref_energy"] == pytest.approx(e_ref)
        fp.close()
    finally:
        pull.close()


def _pull(endpoint):
    import zmq

    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(endpoint)
    return pull


def _received(pull, n):
    msgs = []
    while len(msgs) < n and pull.poll(2000):
        msgs.append(decode(pull.recv_multipart()))
    return msgs


def _uranium():  # EMT has no parameters for uranium: the reference fails on it
    return Structure(np.array([92, 92, 92]), np.array([[0.0, 0, 0], [2.5, 0, 0], [0, 2.5, 0]]))


def test_guarantee_mode_keeps_the_model_when_the_reference_fails_then_stops(tmp_path, caplog):
    from rarefly.client import DriverError
    from rarefly.flagging import FlagPolicy, FlaggingPredictor, ReferenceFailed
    from rarefly.trainer.reference import ReferenceSpec

    endpoint = f"ipc://{tmp_path}/learn"
    pull = _pull(endpoint)
    try:
        fp = FlaggingPredictor(_FixedPredictor([0.1] * 6), endpoint,
                               FlagPolicy(mode="guarantee", audit_fraction=0.0),
                               walker="wF", reference=ReferenceSpec("emt"))
        with caplog.at_level(logging.WARNING, logger="rarefly.flagging"):
            p = fp.predict([_uranium()])[0]
        # the step goes on with the model's prediction, and says so, in one line
        assert p.energy == -1.0 and p.extra["reference"] is False and p.extra["flagged"] is True
        assert len(caplog.records) == 1
        text = caplog.records[0].getMessage()
        assert "force call 1: the reference failed on flagged frame wF-" in text
        assert "this step uses the model's prediction" in text and "\n" not in text
        fp.predict([_uranium()])
        assert fp.predict([_water()])[0].extra["reference"] is True   # a success resets the count
        fp.predict([_uranium()])
        fp.predict([_uranium()])
        with pytest.raises(ReferenceFailed) as err:                   # the third in a row
            fp.predict([_uranium()])
        assert isinstance(err.value, DriverError) and err.value.exit_code == 1
        msg = err.value.message
        assert msg.startswith("the reference emt() failed on 3 flagged frames in a row, the "
                              "last wF-") and "(force call 6)" in msg and "\n" not in msg
        assert "check --reference" in msg
        assert fp.stats["reference_failed"] == 5 and fp.stats["guaranteed"] == 1
        fp.close()
        # nothing is lost: the failed frames went to the trainer unlabelled (it may label them),
        # the labelled one with its reference
        msgs = _received(pull, 5)
        assert [m.origin for m in msgs] == ["flagged", "flagged", "labelled", "flagged", "flagged"]
        assert all(m.ref_forces is None for m in msgs if m.origin == "flagged")
    finally:
        pull.close()


def test_guarantee_mode_reference_calls_stop_at_the_budget(tmp_path, caplog):
    from rarefly.flagging import FlagPolicy, FlaggingPredictor
    from rarefly.trainer.reference import ReferenceSpec

    endpoint = f"ipc://{tmp_path}/learn"
    pull = _pull(endpoint)
    try:
        fp = FlaggingPredictor(_FixedPredictor([0.1, 0.1, 0.1]), endpoint,
                               FlagPolicy(mode="guarantee", audit_fraction=0.0),
                               reference=ReferenceSpec("emt"), max_labels=1)
        with caplog.at_level(logging.WARNING, logger="rarefly.flagging"):
            refs = [fp.predict([_water((0.1 * i, 0, 0))])[0].extra["reference"] for i in range(3)]
        assert refs == [True, False, False]
        assert fp.stats["guaranteed"] == 1 and fp.stats["over_budget"] == 2
        assert [r.getMessage() for r in caplog.records] == [
            "the reference budget of this driver (1 calls) is spent: flagged steps use the "
            "model's prediction from now on and go to the trainer unlabelled"]
        fp.close()
        assert [m.origin for m in _received(pull, 3)] == ["labelled", "flagged", "flagged"]
    finally:
        pull.close()


def test_trainer_receive_takes_a_bounded_batch_and_stores_each_frame(tmp_path):
    import zmq

    from rarefly.trainer.inbox import FrameInbox
    from rarefly.trainer.loop import Trainer
    from rarefly.trainer.selection import Deduplicator, RateCap
    from rarefly.trainer.store import FrameStore

    endpoint = f"ipc://{tmp_path}/learn"
    trainer = Trainer.__new__(Trainer)           # only what receive() uses: socket and store
    trainer.inbox = FrameInbox(_pull(endpoint))
    trainer.store = FrameStore(tmp_path / "frames.db")
    trainer.dedup = Deduplicator(0.02)
    trainer.rate_cap = RateCap(0)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(endpoint)
    try:
        for i in range(30):
            push.send_multipart(encode(FrameMessage(_water((0.01 * i, 0, 0)),
                                                    _header(frame_id=f"f{i}", step=i))))
        time.sleep(0.5)                           # all 30 are in the trainer's zmq queue
        assert trainer.receive(max_messages=8) == 8
        assert trainer.store.count() == 8         # each taken frame is in the database
        assert trainer.receive(max_seconds=0.0) == 0    # the time bound holds too
        got = 8
        while got < 30:
            n = trainer.receive(timeout_ms=1000, max_messages=8)
            assert 0 < n <= 8
            got += n
        assert trainer.store.count(state="queued") == 30
        assert sorted(r.frame_id for r in trainer.store.rows()) == sorted(f"f{i}" for i in range(30))
        # a clean stop (SIGTERM) first stores what is still queued: a driver's last frames
        for i in range(30, 130):
            push.send_multipart(encode(FrameMessage(_water((0.01 * i, 0, 0)),
                                                    _header(frame_id=f"f{i}", step=i))))
        time.sleep(0.5)
        trainer._in_flight, trainer._new_since_update = {}, 0   # nothing to collect or publish
        trainer._stored_unlearned = []
        trainer._wind_down()
        assert trainer.store.count() == 130
    finally:
        push.close()
        trainer.inbox.close()


# ------------------------------------------------------------------ reference registry

def _cu_cluster():
    from ase.cluster import Octahedron

    return Octahedron("Cu", 3)


def test_emt_reference_on_a_copper_cluster():
    from rarefly.trainer.reference import ReferenceSpec, check_reference, label

    atoms = _cu_cluster()
    spec = ReferenceSpec("emt")
    check_reference(spec)
    e, f = label(spec, atoms.numbers, atoms.positions)
    from ase.calculators.emt import EMT

    atoms.calc = EMT()
    assert e == pytest.approx(atoms.get_potential_energy(), abs=1e-10)
    assert f.shape == (len(atoms), 3) and np.isfinite(f).all()
    np.testing.assert_allclose(f, atoms.get_forces(), atol=1e-10)
    np.testing.assert_allclose(f.sum(axis=0), 0.0, atol=1e-8)      # no net force on a cluster
    # periodic: the cell and pbc reach the calculator
    bulk = __import__("ase.build", fromlist=["bulk"]).bulk("Cu", "fcc", a=3.6, cubic=True)
    e_b, f_b = label(spec, bulk.numbers, bulk.positions, bulk.cell[:], (True, True, True))
    bulk.calc = EMT()
    assert e_b == pytest.approx(bulk.get_potential_energy(), abs=1e-10)


def test_xtb_reference_and_import_path():
    from rarefly.trainer.reference import ReferenceSpec, label

    w = _water()
    e, f = label(ReferenceSpec("xtb"), w.numbers, w.positions)
    e2, f2 = label(ReferenceSpec("_ref_calculators:LoggedXTB"), w.numbers, w.positions)
    assert e < -100 and e2 == pytest.approx(e, abs=1e-8)
    np.testing.assert_allclose(f2, f, atol=1e-8)
    e3, _ = label(ReferenceSpec("ase.calculators.emt:EMT"), w.numbers, w.positions)
    assert np.isfinite(e3)
    assert ReferenceSpec("xtb", {"method": "GFN1-xTB", "accuracy": 1.0}).describe() == \
        "xtb(accuracy=1.0, method=GFN1-xTB)"


@pytest.mark.parametrize("name, words", [
    ("vasp", "unknown reference calculator 'vasp'; use one of emt, xtb, pyscf or an import path"),
    ("no_such_module_xyz:Calc", "reference calculator 'no_such_module_xyz:Calc' cannot be imported"),
    ("ase.calculators.emt:NoSuchClass", "cannot be imported"),
])
def test_bad_reference_names_are_one_sentence(name, words):
    from rarefly.trainer.reference import ReferenceError, ReferenceSpec, check_reference

    with pytest.raises(ReferenceError) as err:
        check_reference(ReferenceSpec(name))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_reference_failure_on_a_structure_is_one_sentence():
    from rarefly.trainer.reference import ReferenceError, ReferenceSpec, label

    with pytest.raises(ReferenceError) as err:             # EMT has no parameters for uranium
        label(ReferenceSpec("emt"), [92, 92], [[0, 0, 0], [2.5, 0, 0]])
    assert str(err.value).startswith("reference emt() failed: ")


def test_label_problem_names_what_is_wrong_with_a_label():
    from rarefly.trainer.reference import DEFAULT_MAX_LABEL_FORCE, label_problem

    fine = np.full((3, 3), 3.0)
    assert label_problem(-10.0, fine, 3, DEFAULT_MAX_LABEL_FORCE) is None
    wreck = fine.copy()
    wreck[1, 2] = -45.8                                  # the blown-up frame of bench run 34
    assert "45.8 eV/A, above the limit of 25 eV/A" in label_problem(-10.0, wreck, 3, 25.0)
    assert label_problem(-10.0, wreck, 3, None) is None  # no limit
    assert label_problem(-10.0, wreck, 3, 0) is None
    assert "non-finite" in label_problem(float("nan"), fine, 3, 25.0)
    bad = fine.copy()
    bad[0, 0] = np.inf
    assert "non-finite" in label_problem(-10.0, bad, 3, None)
    assert "shape (2, 3) for 3 atoms" in label_problem(-10.0, fine[:2], 3, 25.0)


def test_a_refused_label_is_kept_in_its_row_and_not_learned(tmp_path):
    """A label above max_label_force becomes a ``failed`` row that keeps the energy, the forces
    and the reason; it is not learned and does not count against the budget; a sound label
    right after it is stored as usual."""
    from types import SimpleNamespace

    from rarefly.trainer.loop import Trainer
    from rarefly.trainer.store import FrameStore

    t = Trainer.__new__(Trainer)
    t.cfg = SimpleNamespace(max_label_force=25.0, database=str(tmp_path / "frames.db"))
    t.store = FrameStore(t.cfg.database)
    t.events_path = tmp_path / "frames.jsonl"
    t.posterior = SimpleNamespace(offset_energy=lambda numbers, energy: energy)
    t._refining, t._stored_unlearned = True, []      # stored now, learned after the refinement
    wreck, sound = (t.store.add(_water((x, 0, 0)), frame_id=f"f{x}", origin="flagged", step=i)
                    for i, x in enumerate((0.0, 0.5)))
    forces = np.zeros((3, 3))
    forces[2, 0] = 46.0
    t._record_label(wreck, _water(), -848.1, forces, "xtb()")
    t._record_label(sound, _water((0.5, 0, 0)), -896.2, np.ones((3, 3)), "xtb()")
    row = t.store.db.get(id=wreck)
    assert row.state == "failed" and "46.0 eV/A, above the limit of 25 eV/A" in row.reason
    assert row.rejected_energy == -848.1 and row.data["rejected_forces"][2, 0] == 46.0
    assert t.labels_done() == 1 and [r for r, *_ in t._stored_unlearned] == [sound]
    events = [json.loads(line) for line in open(t.events_path)]
    assert [e["event"] for e in events] == ["label_rejected"] and events[0]["row"] == wreck
    assert events[0]["step"] == 0
    assert [f.info["row"] for f in t.store.labelled_frames()] == [sound]


# ------------------------------------------------------------------ model hot swap

def _model(path, version):
    from rarefly.model_file import save_model_file

    save_model_file(path, {"model_version": version, "kind": "lastlayer", "weights": {}})


def _loader(path):
    from rarefly.model_file import load_model_file

    return types.SimpleNamespace(model_version=load_model_file(path)["model_version"])


def test_model_watcher_swaps_atomically_replaced_file_and_keeps_model_on_garbage(tmp_path, caplog):
    from rarefly.hotswap import ModelWatcher

    path = tmp_path / "model.rfly"
    _model(path, 1)
    swapped = []
    w = ModelWatcher(str(path), _loader(path), _loader, on_swap=lambda m: swapped.append(m) or m)
    first = w()
    assert first.model_version == 1 and w() is first and w.swaps == 0      # unchanged file
    _model(path, 2)                                                      # atomic rename
    new = w()
    assert new.model_version == 2 and w.swaps == 1 and swapped == [new]
    assert w() is new
    # a garbage file renamed into place: logged, current model kept
    tmp = tmp_path / "garbage.tmp"
    tmp.write_bytes(b"this is not a model" * 10)
    os.replace(tmp, path)
    with caplog.at_level(logging.WARNING, logger="rarefly.hotswap"):
        assert w() is new
    assert "could not be loaded" in caplog.text and "keeping model version 2" in caplog.text
    assert w() is new and w.swaps == 1                                  # not retried every call
    # the file disappearing keeps the model too, and a good file afterwards is picked up
    path.unlink()
    assert w() is new
    _model(path, 3)
    assert w().model_version == 3 and w.swaps == 2


def test_trainer_adds_learned_frames_to_the_feature_density_and_rebuilds_it_after_a_refinement(tmp_path):
    """A model with the misfit variance: labels the readout learns join the density; after a
    refinement the density is rebuilt from the replay frames and the labels (the features
    changed), or kept, with an event that says why, when there are too few of them."""
    from rarefly.posterior.backbone import Backbone
    from rarefly.posterior.base import LabelledFrame, PosteriorSettings
    from rarefly.posterior.lastlayer import LastLayerPosterior
    from rarefly.trainer.loop import Trainer

    from _models import random_mace

    rng = np.random.default_rng(0)

    def frame(k):
        s = _ethanol()
        return LabelledFrame(Structure(s.numbers, s.positions + rng.normal(0, 0.05, s.positions.shape)),
                             -4100.0 + 0.01 * k, rng.normal(0, 0.3, s.positions.shape))

    post = LastLayerPosterior.from_foundation(Backbone(random_mace()), PosteriorSettings())
    replay = [frame(k) for k in range(30)]
    post.fit_density(replay)
    atoms = len(replay[0].structure.numbers)
    t = Trainer.__new__(Trainer)
    t.posterior, t._replay, t.events_path = post, replay, tmp_path / "events.jsonl"
    labels = [frame(100 + k) for k in range(3)]
    t._add_to_density(labels)
    assert float(post.density.count.sum()) == 33 * atoms
    before = post.density.mean.clone()
    with torch_no_grad():
        for p in post.backbone.model.parameters():     # "refined": the features change
            p.add_(0.01)
    t._rebuild_density(labels)
    assert float(post.density.count.sum()) == 33 * atoms
    assert not np.allclose(post.density.mean.numpy(), before.numpy())
    t._replay = []                                     # 3 labels: too few for 16 features
    kept = post.density
    t._rebuild_density(labels)
    assert post.density is kept
    events = [json.loads(line) for line in t.events_path.read_text().splitlines()]
    assert [e["event"] for e in events] == ["density_rebuilt", "density_kept"]
    assert "backbone_replay" in events[-1]["reason"]


def torch_no_grad():
    import torch

    return torch.no_grad()
