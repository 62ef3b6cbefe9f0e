"""The trainer's inbox thread (real zmq sockets): frames keep flowing out of the drivers'
queues while the trainer's main loop is busy elsewhere (a backbone refinement), so a driver
drops none and the trainer stores them all later."""

import time

import numpy as np
import pytest

from rarefly.prediction import Structure
from rarefly.trainer.messages import FrameMessage, decode, encode

zmq = pytest.importorskip("zmq")

HWM = 20                 # small queues on both sides (zmq's and the kernel's): without the
BUF = 4096               # thread they fill at once


def _frame(i: int) -> list[bytes]:
    s = Structure(np.array([8, 1, 1]), np.array([[0.0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
                  + 0.001 * i)
    return encode(FrameMessage(s, {"frame_id": f"w0-{i}", "origin": "flagged", "step": i,
                                   "walker": "w0", "model_version": 1, "sigma_E": 0.1,
                                   "sigma_E_raw": 0.01, "confidence": 0.5, "pred_energy": -1.0}))


def _sockets(tmp_path, name="learn"):
    ctx = zmq.Context.instance()
    endpoint = f"ipc://{tmp_path}/{name}"
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.setsockopt(zmq.RCVHWM, HWM)
    pull.setsockopt(zmq.RCVBUF, BUF)
    pull.bind(endpoint)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, HWM)
    push.setsockopt(zmq.SNDBUF, BUF)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(endpoint)
    return pull, push


def _send_like_a_driver(push, n) -> int:
    """Sends ``n`` frames without waiting, as the driver does; returns the frames dropped."""
    dropped = 0
    for i in range(n):
        try:
            push.send_multipart(_frame(i), flags=zmq.NOBLOCK)
        except zmq.Again:
            dropped += 1
        time.sleep(0.001)
    return dropped


def test_a_busy_reader_without_the_inbox_makes_the_driver_drop_frames(tmp_path):
    """The control: the same sockets, nobody reading for the duration, frames dropped."""
    pull, push = _sockets(tmp_path)
    try:
        time.sleep(0.2)
        assert _send_like_a_driver(push, 30 * HWM) > 0
    finally:
        push.close()
        pull.close()


def test_the_inbox_empties_the_socket_while_the_trainer_is_busy(tmp_path):
    from rarefly.trainer.inbox import FrameInbox

    pull, push = _sockets(tmp_path)
    inbox = FrameInbox(pull)
    try:
        time.sleep(0.2)
        n = 30 * HWM
        assert _send_like_a_driver(push, n) == 0       # nobody called take() meanwhile
        deadline = time.monotonic() + 5
        while inbox.received < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert inbox.received == n and len(inbox) == n
        steps = [decode(inbox.take()).header["step"] for _ in range(n)]
        assert steps == list(range(n))                  # in the order sent
        assert inbox.take() is None and not inbox.wait(0.05)
    finally:
        push.close()
        inbox.close()
    assert inbox.closed


def test_the_inbox_stops_reading_at_its_memory_bound_and_resumes(tmp_path):
    """Beyond ``max_bytes`` held, the thread leaves frames in zmq (whose limits then apply, and
    the driver warns); once the trainer has stored some, it reads again, losing none."""
    from rarefly.trainer.inbox import FrameInbox

    pull, push = _sockets(tmp_path)
    size = sum(len(f) for f in _frame(0))
    inbox = FrameInbox(pull, max_bytes=5 * size)
    try:
        time.sleep(0.2)
        n = HWM
        assert _send_like_a_driver(push, n) == 0        # 5 held, the rest in zmq's queues
        time.sleep(0.3)
        assert 5 <= len(inbox) < n
        got = []
        deadline = time.monotonic() + 10
        while len(got) < n and time.monotonic() < deadline:
            if inbox.wait(0.1):
                got.append(decode(inbox.take()).header["step"])
        assert got == list(range(n))
    finally:
        push.close()
        inbox.close()


def test_a_trainer_stores_what_arrived_during_a_long_step(tmp_path):
    """Trainer.receive reads the inbox: frames sent while the loop was away (here: sleeping as
    a refinement step would) are all in the database after it comes back."""
    from rarefly.trainer.inbox import FrameInbox
    from rarefly.trainer.loop import Trainer
    from rarefly.trainer.selection import Deduplicator, RateCap
    from rarefly.trainer.store import FrameStore

    pull, push = _sockets(tmp_path)
    trainer = Trainer.__new__(Trainer)
    trainer.inbox = FrameInbox(pull)
    trainer.store = FrameStore(tmp_path / "frames.db")
    trainer.dedup, trainer.rate_cap = Deduplicator(0.02), RateCap(0)
    try:
        time.sleep(0.2)
        n = 30 * HWM
        assert _send_like_a_driver(push, n) == 0
        stored = 0
        deadline = time.monotonic() + 10
        while stored < n and time.monotonic() < deadline:
            stored += trainer.receive(timeout_ms=200)
        assert stored == n and trainer.store.count(state="queued") == n
    finally:
        push.close()
        trainer.inbox.close()
