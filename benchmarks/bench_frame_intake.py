"""How fast does the trainer store the frames the drivers send? During a backbone refinement
it receives for at most 5 ms between two Adam steps, so its intake, not the reference, can
decide which frames get labelled: in bench_onthefly's forty-first run the biased scheme's
drivers flagged ~6 frames a second and the trainer, committing each frame on its own (18 ms a frame on that run's database),
was labelling frames over 1000 MD steps old by the end of its first refinement.

Measured in one run, on the same alanine-dipeptide frames through a real zmq PUSH/PULL pair:
- baseline: each frame decoded and committed on its own (``FrameStore.add`` outside a
  transaction, what ``Trainer.receive`` did until 2026-12-07);
- now: ``Trainer.receive`` (the frames of one call committed in one transaction).
Both write into a database that already holds ``--existing`` rows, as a run's does.

    python benchmarks/bench_frame_intake.py [--frames 300] [--existing 900]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def frames(n: int):
    from ase.io import read

    from rarefly.prediction import Structure

    a = read(HERE / "data" / "ala2_c7eq_thermal_xtb.xyz", index=0)
    rng = np.random.default_rng(0)
    for i in range(n):
        yield i, Structure(a.numbers, a.positions + rng.normal(0, 0.01, a.positions.shape))


def header(i: int) -> dict:
    return {"frame_id": f"w0-1-{i}", "origin": "flagged", "step": i, "walker": "w0",
            "model_version": 1, "sigma_E": 0.1, "sigma_E_raw": 0.07, "confidence": 0.5,
            "pred_energy": -896.0}


def fill(store, existing: int) -> None:
    with store.db:
        for i, s in frames(existing):
            store.add(s, frame_id=f"old-{i}", origin="flagged", step=i, walker="w0")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--existing", type=int, default=900)
    args = ap.parse_args()

    import zmq

    from rarefly.trainer.inbox import FrameInbox
    from rarefly.trainer.loop import Trainer
    from rarefly.trainer.messages import FrameMessage, decode, encode
    from rarefly.trainer.selection import Deduplicator, RateCap
    from rarefly.trainer.store import FrameStore

    ctx = zmq.Context.instance()
    msgs = [encode(FrameMessage(s, header(i))) for i, s in frames(args.frames)]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("baseline", "receive"):
            endpoint = f"ipc://{tmp}/{name}"
            pull = ctx.socket(zmq.PULL)
            pull.setsockopt(zmq.LINGER, 0)
            pull.bind(endpoint)
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 1000)
            push.connect(endpoint)
            store = FrameStore(Path(tmp) / f"{name}.db")
            fill(store, args.existing)
            for m in msgs:
                push.send_multipart(m)
            time.sleep(0.5)                              # all of them in the PULL queue
            t0 = time.perf_counter()
            if name == "baseline":
                for _ in msgs:
                    msg = decode(pull.recv_multipart())
                    h = msg.header
                    store.add(msg.structure, frame_id=msg.frame_id, origin=msg.origin,
                              **{k: h[k] for k in ("step", "walker", "model_version", "sigma_E",
                                                   "sigma_E_raw", "confidence", "pred_energy")})
            else:
                tr = Trainer.__new__(Trainer)            # what receive() uses: socket and store
                tr.inbox, tr.store = FrameInbox(pull), store
                tr.dedup, tr.rate_cap = Deduplicator(0.02), RateCap(0)
                got = 0
                while got < len(msgs):
                    got += tr.receive(timeout_ms=1000)
            dt = time.perf_counter() - t0
            assert store.count(state="queued") == args.existing + len(msgs), name
            out[name] = dt / len(msgs)
            push.close()
            if name == "baseline":
                pull.close()
            else:
                tr.inbox.close()                         # its thread closes the socket
    print(f"bench_frame_intake: {args.frames} alanine-dipeptide frames into a database of "
          f"{args.existing} rows; {os.cpu_count()} CPUs")
    print(f"baseline (one commit per frame): {out['baseline'] * 1e3:7.2f} ms a frame")
    print(f"Trainer.receive (one per call):  {out['receive'] * 1e3:7.2f} ms a frame")
    print(f"ratio receive / baseline: {out['receive'] / out['baseline']:.3f} "
          f"({out['baseline'] / out['receive']:.1f}x faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
