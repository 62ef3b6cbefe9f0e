"""``rarefly trainer``: the sidecar trainer (normally started by ``rarefly run``)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

EPILOG = """\
The trainer binds a zmq PULL endpoint; drivers started with --learn ENDPOINT push the frames
they flag (and a small random audit sample) there. Every frame and label goes to the ASE
database (--db); each new label first updates the Student-t calibration with the error of
the model that had not seen it, then the posterior is refined and published to --model
(atomic rename), where the drivers pick it up between two force calls.

signals: SIGTERM stops soon (labels already computed are published; a refinement due or
running is left to the next start). SIGUSR1 finishes: no new reference calls, the labels in
flight are collected and the update they make due (a refinement too) is published, then the
trainer exits (`rarefly run` sends it when i-PI has done its steps).

example:
  rarefly trainer --model model.rfly --db run/frames.db --endpoint ipc:///tmp/rarefly-learn \\
      --reference xtb --executor local --workers 1 --max-labels 50
"""


def configure_parser(p: argparse.ArgumentParser) -> None:
    from rarefly.driver_cli import whole_number
    from rarefly.trainer.loop import SERVED_PATCH_SECONDS
    from rarefly.trainer.reference import DEFAULT_MAX_LABEL_FORCE
    from rarefly.trainer.selection import SelectionPolicy

    p.epilog = EPILOG
    p.add_argument("--model", required=True, help="model file: read at start, new versions written here")
    p.add_argument("--db", required=True, help="ASE database (SQLite) of frames and labels; resumed if it exists")
    p.add_argument("--endpoint", default="ipc:///tmp/rarefly-learn",
                   help="zmq endpoint to bind for frames (ipc:// or tcp://127.0.0.1:PORT)")
    p.add_argument("--reference", default="xtb", help="emt | xtb | pyscf | module:Class (default xtb)")
    p.add_argument("--reference-option", action="append", default=[], metavar="KEY=VALUE",
                   help="option for the reference calculator (repeatable), e.g. method=GFN1-xTB")
    p.add_argument("--executor", default="local", choices=["local", "threads", "slurm"],
                   help="Parsl executor for labelling (default local processes)")
    p.add_argument("--workers", type=int, default=1, help="labelling workers")
    p.add_argument("--executor-option", action="append", default=[], metavar="KEY=VALUE",
                   help="option for the Parsl executor/provider (repeatable), e.g. partition=short, "
                        "address=10.0.0.5 for slurm, worker_init='module load xtb' for local")
    p.add_argument("--max-labels", type=int, help="budget of reference calls")
    p.add_argument("--update-every", type=int, default=1, help="labels per posterior update")
    p.add_argument("--backbone-steps", type=whole_number(0, "a number of steps (0 or more)"),
                   default=0, metavar="N",
                   help="lastlayer models: every --backbone-every labels, N Adam steps on all MACE "
                        "weights, then the readout posterior is conditioned on every label again "
                        "(default 0: readout-only learning; 1500 measured best on "
                        "alanine dipeptide, 150 too few)")
    p.add_argument("--backbone-every", type=whole_number(1, "a positive number of labels"),
                   default=10, metavar="K",
                   help="labels between backbone refinements (default 10)")
    p.add_argument("--calls-while-refining", type=whole_number(0, "a number of calls (0 or more)"),
                   default=None, metavar="N",
                   help="at most N flagged frames go to the reference while a backbone refinement "
                        "runs; the others wait for the refined model, which asks them again "
                        "(default: --backbone-every, the labels the next refinement takes; audit "
                        "frames are not held)")
    p.add_argument("--backbone-replay", metavar="FILE",
                   help="frames the starting model was fitted on (extxyz or ASE db): half of every "
                        "refinement batch, so that new labels do not undo the old fit")
    p.add_argument("--backbone-lr", type=float, default=1e-3, help="Adam learning rate of the refinement")
    p.add_argument("--duplicate-distance", type=_distance, default=SelectionPolicy.dedup_tol,
                   metavar="ANGSTROM",
                   help="near-duplicate test: a queued frame whose sorted interatomic distances "
                        "differ from a chosen frame's by less than this RMS is not labelled "
                        f"(default {SelectionPolicy.dedup_tol} A; 300 K MD frames 10 fs apart "
                        "differ by ~0.05 A)")
    p.add_argument("--min-step-gap", type=whole_number(0, "a number of MD steps (0 or more)"),
                   default=0, metavar="STEPS",
                   help="rate cap: label at most one flagged frame per STEPS MD steps of a walker, "
                        "the most uncertain one of each window, chosen once the walker has gone STEPS "
                        "further (default 0: no cap; audit frames are never "
                        "capped). Spreads a reference budget over the run instead of spending it "
                        "on the first flagged steps")
    p.add_argument("--no-rescore-flagged", action="store_true",
                   help="label every flagged frame, as the seed paper does (default: a frame "
                        "flagged by an older model version goes to the reference only if the "
                        "trainer's current model still flags it by the driver's criterion; during "
                        "a backbone refinement flagged frames are labelled as they come)")
    p.add_argument("--no-served-calibration", action="store_true",
                   help="keep the served model's calibration until a backbone refinement is "
                        "published (default: while one runs, the served version's energy "
                        "calibration takes the residuals of the labels that finish meanwhile "
                        "and is republished with the same weights, at most every "
                        f"{SERVED_PATCH_SECONDS:g} s)")
    p.add_argument("--audit-share", type=_share, default=SelectionPolicy.audit_share,
                   metavar="FRACTION",
                   help="at most this fraction of the reference calls go to audit frames (the "
                        "drivers' random sample of trusted frames that measures calibration), the "
                        f"newest first; the others wait (default {SelectionPolicy.audit_share}; 1: "
                        "no bound, 0: none labelled)")
    p.add_argument("--calibration-memory", type=whole_number(0, "a number of labels (0 or more)"),
                   default=0, metavar="LABELS",
                   help="forget old residuals: about the last LABELS labels set the Student-t "
                        "calibration (older evidence discounted by (1 - 1/LABELS) per label; "
                        "default 0: remember all, as the seed paper). Lets the scale shrink once "
                        "the model has learned what its first, bad predictions missed")
    p.add_argument("--recalibrate-after-refinement", action="store_true",
                   help="restart the Student-t calibration from its prior after each backbone "
                        "refinement: the residuals so far are of the model it replaced, and "
                        "their scale would keep the refined model flagging frames it gets right "
                        "(the next labels and audit frames measure it again; over-confident "
                        "meanwhile where the refined model is still wrong: "
                        "benchmarks/bench_onthefly.out, seventeenth run)")
    p.add_argument("--replay-energies", action="store_true",
                   help="after a backbone refinement condition the readout on the replay frames' "
                        "energies too, not only on the labels: keeps energies of the fit's "
                        "region from shifting with the new labels' errors, at some cost to the "
                        "frames the run samples (benchmarks/bench_onthefly.out, twentieth run)")
    p.add_argument("--max-label-force", type=_force, default=DEFAULT_MAX_LABEL_FORCE, metavar="EV_PER_A",
                   help="a label whose largest force component exceeds this is kept in the database "
                        "(state failed, with the reason) but not learned: a walker that blew up "
                        f"still gets labelled by the reference (default {DEFAULT_MAX_LABEL_FORCE:g} eV/A; "
                        "0: no limit)")
    p.add_argument("--holdout", help="extxyz of held-out reference frames: errors logged per version")
    p.add_argument("--max-seconds", type=float, help="stop after this wall time")
    p.add_argument("--no-align", action="store_true", help="do not align reference energies at the first label")


def _non_negative(what: str):
    """An argparse type: a finite number, 0 or more; ``what`` names it in the error."""
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            x = float("nan")
        if not 0.0 <= x < float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return x
    return parse


_distance = _non_negative("a distance in Angstrom (0 or more)")


def _share(text: str) -> float:
    x = _non_negative("a fraction between 0 and 1")(text)
    if x > 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction between 0 and 1")
    return x


_force = _non_negative("a force in eV/A (0 or more; 0: no limit)")


def _options(items):
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep:
            raise ValueError(f"--reference-option {it!r} is not KEY=VALUE")
        for conv in (int, float):
            try:
                v = conv(v)
                break
            except ValueError:
                continue
        out[k] = v
    return out


def run(args) -> int:
    # SIGUSR1: finish (see Trainer.finish); installed first, so that one sent while torch and
    # the model load does not take the default action (ending the process) and is honoured
    # once the trainer is built
    finishing: dict = {}

    def _finish(signum, frame):  # noqa: ARG001
        finishing["asked"] = True
        if "trainer" in finishing:
            finishing["trainer"].finish()

    signal.signal(signal.SIGUSR1, _finish)
    from rarefly.trainer.labelling import ExecutorSpec, LabellingError
    from rarefly.trainer.loop import Trainer, TrainerConfig
    from rarefly.trainer.reference import ReferenceError, ReferenceSpec, check_reference
    from rarefly.trainer.selection import SelectionPolicy

    logging.basicConfig(level=logging.WARNING, format="rarefly trainer: %(message)s", stream=sys.stderr)
    logging.getLogger("rarefly").setLevel(logging.INFO)
    try:
        ref = ReferenceSpec(args.reference, _options(args.reference_option))
        check_reference(ref)
        cfg = TrainerConfig(model=args.model, database=args.db, endpoint=args.endpoint, reference=ref,
                            executor=ExecutorSpec(args.executor, args.workers,
                                                  _options(args.executor_option)),
                            update_every=args.update_every, max_labels=args.max_labels,
                            align_energies=not args.no_align, holdout=args.holdout,
                            backbone_steps=args.backbone_steps, backbone_every=args.backbone_every,
                            backbone_lr=args.backbone_lr, backbone_replay=args.backbone_replay,
                            calls_while_refining=args.calls_while_refining,
                            calibration_memory=args.calibration_memory,
                            served_calibration=not args.no_served_calibration,
                            recalibrate_after_refinement=args.recalibrate_after_refinement,
                            replay_energies=args.replay_energies,
                            max_label_force=args.max_label_force or None,
                            selection=SelectionPolicy(dedup_tol=args.duplicate_distance,
                                                      min_step_gap=args.min_step_gap,
                                                      audit_share=args.audit_share,
                                                      rescore_flagged=not args.no_rescore_flagged))
        trainer = finishing["trainer"] = Trainer(cfg)
        if finishing.get("asked"):
            trainer.finish()
    except (ReferenceError, LabellingError, ValueError, FileNotFoundError) as exc:
        print(f"rarefly trainer: {exc}", file=sys.stderr)
        return 2
    return trainer.run(max_seconds=args.max_seconds)
