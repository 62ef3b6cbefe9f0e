"""Does the trainer keep up with the drivers while it refines its backbone?

A backbone refinement keeps the trainer's main loop busy for minutes; until 2026-12-07 it
read its zmq socket only between two Adam steps, for 5 ms. In bench_onthefly's 6000-step runs
61-64 (paper scheme, 60 % of the MD steps flagged) it stored 1-4 frames a second during
refinements against the driver's 10-20, and the drivers dropped up to 1590 frames a run
(:mod:`rarefly.trainer.inbox` has the account). Now a thread empties the socket all the time.

This benchmark isolates the intake: a driver-like sender (a separate process pushing
alanine-dipeptide frames at ``--rate`` a second through zmq without waiting, as ``rarefly
driver`` does) against a loop whose "Adam steps" are ``--step-seconds`` of torch work, with
reference labels computed alongside through the trainer's Parsl executor, storing frames
between the steps with ``Trainer.receive`` into a database already holding ``--existing``
rows. Measured in one run, same sender, same database size:

- baseline: the socket read by the main loop for a fixed 5 ms between two steps (the old way);
- now: the inbox thread, and ``refinement_receive_seconds`` (5 % of the step) of storing.

It does not reproduce the runs' failure: with nothing else between two steps the baseline
stored 17 of 20 frames a second and dropped none (the committed output). In the runs the loop also selected
frames between two steps, which cost up to 0.24 s a step with 3000 frames queued (fixed
separately in ``select_and_submit``); the inbox makes the intake independent of that.

Printed: frames stored (a second of sending) by the time the sender stops, frames it dropped,
and the ratio of stored rates, now over baseline.

    python benchmarks/bench_intake_during_refinement.py [--rate 20] [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_frame_intake import fill, frames, header  # noqa: E402


def feed(endpoint: str, rate: float, seconds: float) -> None:
    """The sender (run in its own process): frames at ``rate`` a second, dropped when zmq's
    queue is full, as the driver does; prints its counts as JSON."""
    import zmq

    from rarefly.trainer.messages import FrameMessage, encode

    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 1000)                    # the driver's
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    time.sleep(0.5)
    n = int(rate * seconds)
    msgs = [encode(FrameMessage(s, header(i))) for i, s in frames(n)]
    sent = dropped = 0
    t0 = time.monotonic()
    for i, m in enumerate(msgs):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        try:
            sock.send_multipart(m, flags=zmq.NOBLOCK)
            sent += 1
        except zmq.Again:
            dropped += 1
    print(json.dumps({"sent": sent, "dropped": dropped, "seconds": time.monotonic() - t0}),
          flush=True)
    sock.close()


class SocketReader:
    """The baseline: the main loop reads the zmq socket itself (the interface of FrameInbox)."""

    def __init__(self, sock):
        self.sock = sock

    def wait(self, timeout_s: float) -> bool:
        return bool(self.sock.poll(int(timeout_s * 1000)))

    def take(self):
        import zmq

        try:
            return self.sock.recv_multipart(flags=zmq.NOBLOCK)
        except zmq.Again:
            return None

    def close(self) -> None:
        self.sock.close()


def busy(seconds: float, a) -> None:
    """An "Adam step": torch work on the process's threads for ``seconds``."""
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        a = (a @ a).tanh_()


def one(name: str, tmp: str, args, labeller) -> dict:
    import torch
    import zmq

    from rarefly.trainer.inbox import FrameInbox
    from rarefly.trainer.loop import Trainer, refinement_receive_seconds
    from rarefly.trainer.selection import Deduplicator, RateCap
    from rarefly.trainer.store import FrameStore

    endpoint = f"ipc://{tmp}/{name}"
    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    tr = Trainer.__new__(Trainer)                        # what receive() uses
    tr.store = FrameStore(Path(tmp) / f"{name}.db")
    fill(tr.store, args.existing)
    tr.store.add(next(frames(1))[1], frame_id="probe", origin="flagged")  # ids loaded
    tr.dedup, tr.rate_cap = Deduplicator(0.02), RateCap(0)
    tr.inbox = FrameInbox(sock) if name == "now" else SocketReader(sock)
    sender = subprocess.Popen([sys.executable, __file__, "--feed", endpoint, "--rate",
                               str(args.rate), "--seconds", str(args.seconds)],
                              stdout=subprocess.PIPE, text=True)
    a = torch.randn(256, 256) / 16
    stored, steps = 0, 0
    t0 = time.monotonic()
    last = time.monotonic()
    labels, pending = 0, None
    while sender.poll() is None:
        if labeller is not None:                         # one reference call at a time
            if pending is not None and pending.done():
                pending.result()
                labels, pending = labels + 1, None
            if pending is None:
                pending = labeller.submit(next(frames(1))[1])
        busy(args.step_seconds, a)
        now = time.monotonic()
        budget = 0.005 if name == "baseline" else refinement_receive_seconds(now - last)
        stored += tr.receive(timeout_ms=0, max_seconds=budget)
        last = time.monotonic()
        steps += 1
    dt = time.monotonic() - t0
    counts = json.loads(sender.stdout.read())
    tr.inbox.close()
    # per second of sending (the loop also ran while the sender started)
    return {"stored": stored, "steps": steps, "seconds": dt, "rate": stored / counts["seconds"],
            "labels": labels, **counts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=20.0,
                    help="frames a second the sender pushes (default 20: the paper scheme's "
                         "driver in runs 61-64, 60 %% of the steps flagged at ~16 steps/s)")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long the sender sends")
    ap.add_argument("--step-seconds", type=float, default=0.35,
                    help="one Adam step of the refinement (0.23-0.5 s for alanine dipeptide "
                         "on 2 cores in runs 61-64)")
    ap.add_argument("--existing", type=int, default=2500, help="rows already in the database")
    ap.add_argument("--reference", default="xtb",
                    help="reference labelling alongside, one call at a time, through the trainer's "
                         "Parsl executor (local worker process), as in a run (default xtb; none: "
                         "no labelling and no Parsl threads)")
    ap.add_argument("--feed", metavar="ENDPOINT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.feed:
        feed(args.feed, args.rate, args.seconds)
        return 0
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        labeller = None
        if args.reference != "none":
            from rarefly.trainer.labelling import ExecutorSpec, Labeller
            from rarefly.trainer.reference import ReferenceSpec

            labeller = Labeller(ReferenceSpec(args.reference), ExecutorSpec("local", 1),
                                str(Path(tmp) / "parsl"))
        try:
            for name in ("baseline", "now"):
                out[name] = one(name, tmp, args, labeller)
        finally:
            if labeller is not None:
                labeller.close()
    print(f"bench_intake_during_refinement: sender {args.rate:g} frames/s for {args.seconds:g} s; "
          f"'Adam steps' of {args.step_seconds:g} s; database of {args.existing} rows; reference "
          f"{args.reference} alongside; {os.cpu_count()} CPUs")
    for name, label in (("baseline", "baseline (socket read 5 ms a step)"),
                        ("now", "now (inbox thread, 5% of a step)")):
        r = out[name]
        print(f"{label:38s} stored {r['stored']:5d} ({r['rate']:5.1f}/s) of {r['sent']:5d} "
              f"sent; sender dropped {r['dropped']:5d}; {r['steps']} steps, {r['labels']} labels")
    b, n = out["baseline"], out["now"]
    print(f"ratio stored/s now / baseline: {n['rate'] / b['rate']:.2f}; "
          f"dropped: {n['dropped']} against {b['dropped']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
