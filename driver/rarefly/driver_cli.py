"""``rarefly driver``: serve a rarefly model to i-PI (or ASE) over the i-PI socket protocol.

A thin layer over :func:`rarefly.client.serve`: read the template structure, load the model,
check that the model knows every element of the template, then serve until i-PI sends EXIT.
Every failure is one line ``rarefly driver: <sentence>`` on stderr and an exit code (the
table is in :mod:`rarefly.client`).
"""

from __future__ import annotations

import argparse
import os
import logging
import re
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rarefly.client import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_PORT,
    DEFAULT_SOCKETS_PREFIX,
    EXIT_INPUT,
    DriverError,
    serve,
)
from rarefly.units import ENERGY_UNITS, energy_to_ev

#: ``loader(path, device=..., epsilon=...)`` -> predictor with ``.atomic_numbers``.
Loader = Callable[..., object]

EPILOG = """\
example, i-PI and the driver on one machine (UNIX socket, the fastest):

  in i-PI's input.xml:
    <ffsocket name="rarefly" mode="unix" pbc="true">
      <address>ethanol</address>          <!-- socket file /tmp/ipi_ethanol -->
    </ffsocket>
    ...
    <system> ... <forces><force forcefield="rarefly"/></forces> ... </system>
    <output>                              <!-- optional: the uncertainties, per step -->
      <trajectory filename="sigma_e" stride="1" extra_type="energy_uncertainty">
        extras </trajectory>
    </output>

  i-pi input.xml &
  rarefly driver --model model.rfly --template init.xyz -u -a ethanol

example, driver on another node (TCP):
    <ffsocket name="rarefly" mode="inet"><address>0.0.0.0</address>
      <port>31415</port></ffsocket>
  rarefly driver --model model.rfly --template init.xyz -a HOSTNAME -p 31415

notes:
  i-PI does not send species: --template must hold the same atoms in the same order as
  the file in i-PI's <initialize> (that file itself is a good template). Its periodicity
  (or --pbc) decides the virial: periodic systems get -stress*volume, molecules a zero
  virial (for molecules also set pbc="false" on <ffsocket>).
  <batch_size>N</batch_size> inside <ffsocket> lets i-PI send N structures (e.g. the
  beads) per request; the driver evaluates them in one model call.
  Each force reply carries JSON extras: energy_uncertainty (eV), forces_uncertainty
  (eV/A, per atom), confidence (P(|E error| < epsilon)) and model_version.

exit codes: 0 i-PI sent EXIT, 1 bad model/template/option (or, with --mode guarantee, a
  reference that failed on 3 flagged frames in a row), 2 bad command line,
  3 no server, 4 server disconnected without EXIT, 5 malformed message,
  6 a structure that cannot be evaluated (atom count, NaN, overlapping atoms, zero volume)
"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, metavar="FILE",
                       help="rarefly model file (.rfly) to serve")
    model.add_argument("--template", required=True, metavar="FILE",
                       help="any ASE-readable structure (first frame is used) with the "
                            "species and atom order of i-PI's system, e.g. the file of its "
                            "<initialize>; it also tells whether the system is periodic")
    model.add_argument("--pbc", choices=("auto", "yes", "no"), default="auto",
                       help="is the system periodic? auto: as the template says (a cell in "
                            "extxyz/POSCAR/CIF, or a CELL line in an i-PI .xyz); periodic "
                            "systems get a virial (default: %(default)s)")
    model.add_argument("--device", default="cpu", metavar="DEVICE",
                       help="torch device for the model: cpu, cuda or cuda:N "
                            "(default: %(default)s)")
    model.add_argument("--compile", action="store_true",
                       help="compile the model with torch.compile (lastlayer models): faster force "
                            "calls after a one-off compilation of about 30 s, done on the template "
                            "before connecting and again after each new model version "
                            "(benchmarks/bench_compile.out)")
    model.add_argument("--epsilon", type=_positive, default=None, metavar="VALUE",
                       help="energy tolerance of the reported confidence "
                            "P(|E error| < epsilon) (default: the model file's value)")
    model.add_argument("--epsilon-unit", default="eV", choices=list(ENERGY_UNITS),
                       help="unit of --epsilon (default: %(default)s)")
    conn = parser.add_argument_group("connection (as in i-PI's drivers)")
    conn.add_argument("-a", "--address", default="localhost",
                      help="host name of the i-PI server, or with -u the socket name "
                           "(file SOCKETS_PREFIX+ADDRESS) or an absolute socket path "
                           "(default: %(default)s)")
    conn.add_argument("-p", "--port", type=_port, default=DEFAULT_PORT,
                      help="TCP port of the i-PI server; ignored with -u "
                           "(default: %(default)s)")
    conn.add_argument("-u", "--unix", action="store_true",
                      help="connect to a UNIX domain socket instead of TCP")
    conn.add_argument("-S", "--sockets-prefix", default=DEFAULT_SOCKETS_PREFIX,
                      metavar="PREFIX",
                      help="prefix of UNIX socket files, as i-PI's <simulation "
                           "sockets_prefix> (default: %(default)s)")
    conn.add_argument("--connect-timeout", type=_seconds, default=DEFAULT_CONNECT_TIMEOUT,
                      metavar="SECONDS",
                      help="how long to keep trying to reach the server, at start and "
                           "after a disconnect (default: %(default)g)")
    conn.add_argument("--exit-on-disconnect", action="store_true",
                      help="exit at once when the server disconnects without sending EXIT, "
                           "instead of waiting --connect-timeout for it to come back")
    cv = parser.add_argument_group("uncertainty CV for PLUMED (see plumed_inputs/)")
    cv.add_argument("--cv", action="store_true",
                    help="serve sigma_E and its gradient to PLUMED's PyCV (rarefly.cv) over zmq; "
                         "forces just computed are answered from a cache, so the model runs "
                         "once per configuration")
    from rarefly.cv_service import CV_CALIBRATIONS

    cv.add_argument("--cv-calibration", choices=CV_CALIBRATIONS, default=CV_CALIBRATIONS[0],
                    help="which Student-t calibration the CV's sigma_E carries: `start` (default) "
                         "keeps that of the model the driver started with, so that new model "
                         "versions from the trainer do not rescale the CV under a running bias "
                         "(walls, METAD hills in eV keep their meaning); `current`: the model in "
                         "use, as in the extras")
    cv.add_argument("--cv-endpoint", metavar="URL",
                    help="zmq endpoint of the CV service (default: ipc:///tmp/rarefly-cv-ADDRESS); "
                         "set RAREFLY_CV_ENDPOINT to the same in i-PI's environment")
    learn = parser.add_argument_group("on-the-fly learning (with `rarefly trainer`)")
    learn.add_argument("--learn", metavar="URL",
                       help="send flagged and audit frames to the trainer at this zmq endpoint, "
                            "and pick up the new model versions it publishes to --model")
    learn.add_argument("--level", type=float, default=0.95,
                       help="flag a frame when P(|E error| < epsilon) is below this (default 0.95)")
    learn.add_argument("--force-threshold", type=float, metavar="EV_PER_A",
                       help="also flag when an atom's force uncertainty exceeds this (eV/A)")
    learn.add_argument("--audit-fraction", type=float, default=0.02,
                       help="random fraction of unflagged frames sent for calibration audit (default 0.02)")
    learn.add_argument("--mode", choices=["async", "guarantee"], default="async",
                       help="async: the MD goes on with the model; guarantee: a flagged step gets "
                            "the reference energy and forces (computed here; a step where the "
                            "reference fails keeps the model's, with a warning, and 3 failures "
                            "in a row stop the driver with exit status 1) (default async)")
    learn.add_argument("--reference", default="xtb",
                       help="reference calculator for guarantee mode: emt | xtb | pyscf | module:Class")
    learn.add_argument("--max-labels", type=_count, default=None, metavar="N",
                       help="guarantee mode: at most N reference calls in this driver (the "
                            "run's reference budget); then flagged steps use the model's "
                            "prediction (default: no limit)")
    learn.add_argument("--walker", default=None, help="name of this walker in the data set (default: ADDRESS)")
    learn.add_argument("--watch", action="store_true",
                       help="reload --model when it changes (on by default with --learn)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="print only errors, not connection progress")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is outside 1-65535")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def whole_number(minimum: int, what: str):
    """An argparse ``type``: a whole number >= ``minimum``; ``what`` names it in the error,
    e.g. "a number of calls (0 or more)"."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not {what}")
        return value
    return parse


_count = whole_number(0, "a number of calls (0 or more)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a non-negative number of seconds")
    return value


def read_template(path: str, pbc: str = "auto"):
    """The first structure of ``path`` as ASE Atoms, with its periodicity decided.

    ``pbc="auto"``: periodic as ASE reads the file (extxyz ``Lattice=``, POSCAR, CIF ...);
    an .xyz in i-PI's own format (``# CELL(abcABC): ...`` comment, which ASE ignores) is
    periodic when that cell has a volume. ``"yes"``/``"no"`` override. DriverError when the
    file cannot be used.
    """
    from ase.io import read

    p = Path(path)
    if not p.is_file():
        raise DriverError(f"the template file {path} does not exist")
    try:
        atoms = read(p, index=0)
    except Exception as exc:  # ASE raises many kinds for unreadable files
        raise DriverError(f"cannot read the template file {path} as a structure "
                          f"({_one_line(exc)})") from None
    if len(atoms) == 0:
        raise DriverError(f"the template file {path} holds no atoms")
    if pbc == "auto":
        ipi_cell = _ipi_xyz_cell(p)
        if ipi_cell is not None:
            atoms.cell = ipi_cell
            atoms.pbc = abs(np.linalg.det(ipi_cell)) > 1e-9
        if any(atoms.pbc) and atoms.cell.rank < 3:
            raise DriverError(f"the template file {path} is periodic but its cell has zero "
                              "volume; give it a full cell, or use --pbc no")
    else:
        atoms.pbc = pbc == "yes"
    return atoms


_IPI_CELL = re.compile(r"CELL[\(\[\{](abcABC|H|GENH)[\)\]\}]:\s*([-+0-9.Ee ]*)")


def _ipi_xyz_cell(path: Path):
    """The cell (rows, file units) in the comment of an i-PI-format xyz file, else None."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            f.readline()
            match = _IPI_CELL.search(f.readline())
    except OSError:
        return None
    if match is None:
        return None
    values = [float(x) for x in match.group(2).split()]
    if match.group(1) == "abcABC" and len(values) >= 6:
        from ase.geometry import cellpar_to_cell

        if min(values[:3]) <= 0:
            return np.zeros((3, 3))
        return cellpar_to_cell(values[:6])
    if len(values) >= 9:
        return np.array(values[:9]).reshape(3, 3).T  # i-PI's h: lattice vectors as columns
    return None


def load_model(path: str, device: str, epsilon: float | None, loader: Loader | None = None):
    """Load the model file; DriverError naming the file when that fails."""
    p = Path(path)
    if not p.is_file():
        raise DriverError(f"the model file {path} does not exist")
    if loader is None:
        try:
            from rarefly.posterior import load_posterior as loader
        except ImportError:
            raise DriverError("this rarefly installation cannot load model files "
                              "(rarefly.posterior.load_posterior is missing)") from None
    try:
        with warnings.catch_warnings():
            # Import-time noise of mace/e3nn/TorchScript that says nothing to a user.
            for text in _QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=text, category=UserWarning)
            return loader(str(p), device=device, epsilon=epsilon)
    except DriverError:
        raise
    except Exception as exc:
        detail = _one_line(exc)
        if str(p) in detail:  # the loader's message already names the file
            raise DriverError(detail) from None
        raise DriverError(f"cannot load the model file {path} ({detail})") from None


_QUIET_WARNINGS = ("The TorchScript type system",
                   "Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")


def check_species(numbers, predictor, model_path: str, template_path: str) -> None:
    """DriverError naming the elements of the template that the model does not know."""
    from ase.data import chemical_symbols

    known = getattr(predictor, "atomic_numbers", None)
    if known is None:
        return
    known = {int(z) for z in known}
    unknown = sorted({int(z) for z in numbers} - known)
    if unknown:
        names = ", ".join(chemical_symbols[z] for z in unknown)
        knows = ", ".join(chemical_symbols[z] for z in sorted(known))
        raise DriverError(f"the template {template_path} contains {names}, which the model "
                          f"{model_path} does not know (it knows {knows})")


def run(args: argparse.Namespace, *, loader: Loader | None = None) -> int:
    """Run ``rarefly driver``; ``loader`` replaces load_posterior (tests use a test double)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("rarefly driver: %(message)s"))
    logger = logging.getLogger("rarefly.client")
    # the layers' messages (a failed reference, a new model version) go to the same stream
    loggers = [logger] + [logging.getLogger(f"rarefly.{n}") for n in ("flagging", "hotswap")]
    previous_levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        template = read_template(args.template, args.pbc)
        try:
            epsilon = (None if args.epsilon is None
                       else energy_to_ev(args.epsilon, args.epsilon_unit))
        except ValueError as exc:
            raise DriverError(str(exc)) from None
        predictor = _without_unused_gradient(load_model(args.model, args.device, epsilon, loader), args)
        check_species(template.numbers, predictor, args.model, args.template)
        predictor = _compiled(predictor, args, template, logger)
        logger.info("model %s (version %s) ready for %d atoms, %s; connecting to i-PI",
                    args.model, getattr(predictor, "model_version", "?"), len(template),
                    "periodic" if any(template.pbc) else "not periodic")
        outer, on_prediction, provider, closers = _compose(args, predictor, template, loader, logger)
        try:
            serve(outer, template.numbers, address=args.address, port=args.port,
                  unix=args.unix, sockets_prefix=args.sockets_prefix,
                  connect_timeout=args.connect_timeout, pbc=tuple(template.pbc),
                  exit_on_disconnect=args.exit_on_disconnect,
                  template_name=f"the template {args.template}",
                  on_prediction=on_prediction, predictor_provider=provider)
        finally:
            for close in closers:
                close()
        return 0
    except DriverError as exc:
        print(f"rarefly driver: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        traceback.print_exc()
        print(f"rarefly driver: unexpected {type(exc).__name__} ({_one_line(exc)}); the "
              "traceback above is for a bug report", file=sys.stderr)
        return EXIT_INPUT
    finally:
        for lg, level in zip(loggers, previous_levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def _without_unused_gradient(predictor, args):
    """Without ``--cv`` nothing uses d sigma_E/dR: the posterior skips it (lastlayer: one
    backward pass fewer per call, measured in benchmarks/bench_driver.out)."""
    if hasattr(predictor, "sigma_gradient"):
        predictor.sigma_gradient = bool(args.cv)
    return predictor


def _compiled(predictor, args, template, logger, previous=None):
    """With ``--compile``: compile the model and make its first (compiling) call on the
    template, so that i-PI does not wait for the compilation. On a hot swap (``previous``:
    the compiled version being served) the new weights go into the compiled model instead,
    without a re-compilation, when the architecture is the same."""
    if not getattr(args, "compile", False):
        return predictor
    from rarefly.posterior.compiled import CompileError, adopt_compiled, compile_posterior
    from rarefly.prediction import Structure

    if previous is not None and adopt_compiled(predictor, previous):
        logger.info("model version %s: weights copied into the compiled model (no re-compilation)",
                    getattr(predictor, "model_version", "?"))
        return predictor
    try:
        compile_posterior(predictor)
    except CompileError as exc:
        raise DriverError(str(exc)) from None
    logger.info("compiling model version %s on the template %s (about 30 s, once) ...",
                getattr(predictor, "model_version", "?"), args.template)
    predictor.predict([Structure.from_atoms(template)])
    return predictor


def _compose(args, predictor, template, loader, logger):
    """Stack the optional layers around the model: flagging (--learn), the CV service (--cv)
    and the hot swap (--watch/--learn). Returns (predictor for serve, on_prediction hook,
    predictor_provider, closers)."""
    from rarefly.prediction import Structure

    flagger = service = None
    closers = []
    inner = predictor
    if args.learn:
        from rarefly.flagging import FlagPolicy, FlaggingPredictor
        from rarefly.trainer.reference import ReferenceSpec

        try:
            policy = FlagPolicy(level=args.level, force_threshold=args.force_threshold,
                                audit_fraction=args.audit_fraction, mode=args.mode)
        except ValueError as exc:
            raise DriverError(str(exc)) from None
        ref = ReferenceSpec(args.reference) if args.mode == "guarantee" else None
        flagger = FlaggingPredictor(predictor, args.learn, policy, walker=args.walker or args.address,
                                    reference=ref, max_labels=args.max_labels)
        closers.append(flagger.close)
        inner = flagger
        logger.info("flagging frames with confidence < %g to %s (%s mode)", args.level, args.learn, args.mode)
    outer = inner
    on_prediction = None
    if args.cv:
        from rarefly.cv_service import CVService, default_endpoint

        endpoint = args.cv_endpoint or default_endpoint(os.path.basename(args.address) or "driver")
        try:
            service = CVService(inner, endpoint, template=Structure.from_atoms(template),
                                calibration=args.cv_calibration).start()
        except OSError as exc:
            raise DriverError(str(exc)) from None
        closers.append(service.stop)
        outer = service.guarded()
        on_prediction = service.remember
        logger.info("uncertainty CV served on %s (calibration: %s)", service.endpoint,
                    args.cv_calibration)
    provider = None
    if args.watch or args.learn:
        from rarefly.hotswap import ModelWatcher

        def _swap(new):
            if flagger is not None:
                flagger.inner = new
            if service is not None:
                service.set_predictor(flagger or new)
            return new

        watcher = ModelWatcher(args.model, predictor,
                               lambda path: _compiled(_without_unused_gradient(
                                   load_model(path, args.device, None, loader), args),
                                   args, template, logger, previous=watcher.current),
                               on_swap=_swap)

        def provider():
            current = watcher()
            # wrapped (--learn, --cv): the wrappers hold the current model; bare: serve it
            return current if outer is predictor else outer
    return outer, on_prediction, provider, closers


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
