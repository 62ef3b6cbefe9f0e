"""The trainer's inbox: its zmq PULL socket, emptied by a thread of its own.

The drivers push every flagged (and audit) frame to the trainer's endpoint without waiting
(a full queue drops the frame, with the driver's "trainer queue full" warning). The trainer's
main loop spends minutes inside a backbone refinement, and used to read its socket only
between two Adam steps, for 5 ms. In bench_onthefly's 6000-step runs 61-64 (paper scheme, 60 %
of the MD steps flagged) it stored 1-4 frames a second during refinements against the
driver's 10-20; the drivers of runs 62-64 dropped 767-1590 frames, and each trainer ended
with the first 2504 frames sent (MD steps up to 3150-4236 of 6000): no frame served by a
refined model reached it. Run 63's 2504 frames replayed twice at 20 a second into a real
``rarefly trainer`` with that run's options: 1.5 frames a second stored during its first
refinement and 1508 of 5008 dropped. A second replay of the old trainer, under a profiler,
kept up, but spent 92 of its 178 s selecting frames between Adam steps (a database count
per queued row, since fixed in ``select_and_submit``): how often the loop came back to the
socket depended on the queue, the labels and the machine.

Here a thread takes every message off the socket as it arrives and keeps it in memory, in
order, until the main loop stores it in the database (:meth:`Trainer.receive`), so what the
drivers send no longer depends on when the main loop comes back. The same replay with this
inbox: none dropped, at most about 340 frames waiting here at a time (while the loop designed
every label after a refinement), all 5008 stored by the time it was stopped. Memory is
bounded by ``max_bytes`` (beyond it the thread stops reading, and zmq's own limits apply
again). A message held here is lost on a SIGKILL exactly as one held in zmq's queue was; a
clean stop stores them (``_drain``). Messages are raw zmq frames: decoding and checking stay
with the trainer (nothing here unpickles or interprets them).
"""

from __future__ import annotations

import collections
import logging
import threading

log = logging.getLogger("rarefly.inbox")

#: the most message bytes held in memory (about 250,000 frames of a 22-atom molecule)
DEFAULT_MAX_BYTES = 256 * 2 ** 20
_POLL_MS = 50            # how often the thread looks at its stop flag when nothing arrives
_BATCH = 256             # messages taken off the socket per lock


class FrameInbox:
    """Reads ``sock`` (a bound or connected zmq PULL socket, handed over: only the inbox's
    thread uses it from now on, and closes it) into an in-memory queue."""

    def __init__(self, sock, max_bytes: int = DEFAULT_MAX_BYTES):
        self._sock = sock
        self.max_bytes = int(max_bytes)
        self._queue: collections.deque[list[bytes]] = collections.deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._full_logged = False
        self.received = 0
        self._thread = threading.Thread(target=self._run, name="rarefly-inbox", daemon=True)
        self._thread.start()

    @classmethod
    def bind(cls, endpoint: str, **kw) -> FrameInbox:
        """A PULL socket bound to ``endpoint`` (bind errors are raised here, in the caller's
        thread), read by a new inbox."""
        import zmq

        sock = zmq.Context.instance().socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError:
            sock.close()
            raise
        return cls(sock, **kw)

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        import zmq

        sock = self._sock
        try:
            while not self._stop.is_set():
                if self._bytes >= self.max_bytes:
                    if not self._full_logged:
                        log.warning("the trainer holds %d frames (%d MB) it has not stored yet; "
                                    "it reads no more until it has (the drivers' queues fill "
                                    "and drop frames meanwhile)", len(self._queue),
                                    self._bytes >> 20)
                        self._full_logged = True
                    self._stop.wait(_POLL_MS / 1000)
                    continue
                self._full_logged = False
                if not sock.poll(_POLL_MS):
                    continue
                taken = []
                for _ in range(_BATCH):
                    try:
                        taken.append(sock.recv_multipart(flags=zmq.NOBLOCK))
                    except zmq.Again:
                        break
                if taken:
                    with self._cond:
                        self._queue.extend(taken)
                        self._bytes += sum(len(f) for m in taken for f in m)
                        self.received += len(taken)
                        self._cond.notify_all()
        except Exception:  # noqa: BLE001 - the context went away under us: say so once
            if not self._stop.is_set():
                log.exception("the trainer's frame inbox stopped reading")
        finally:
            sock.close()

    # ------------------------------------------------------------------ the caller's side
    def wait(self, timeout_s: float) -> bool:
        """True when a message is waiting (after up to ``timeout_s`` seconds)."""
        with self._cond:
            if not self._queue and timeout_s > 0:
                self._cond.wait_for(lambda: bool(self._queue) or self._stop.is_set(), timeout_s)
            return bool(self._queue)

    def take(self) -> list[bytes] | None:
        """The oldest message, or None when none is waiting."""
        with self._cond:
            if not self._queue:
                return None
            msg = self._queue.popleft()
            self._bytes -= sum(len(f) for f in msg)
            return msg

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop reading and close the socket; messages not taken are dropped (store them
        first: :meth:`Trainer._drain`)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
