"""The ``rarefly`` command: thin sub-commands over plain functions.

Each sub-command lives in its own module, which defines ``configure_parser(parser)`` and
``run(args) -> int``. The table below is the one registration mechanism; modules are imported
only when their sub-command runs, so ``rarefly --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: sub-command -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "driver": ("rarefly.driver_cli", "serve Bayesian MACE forces to an i-PI (or ASE) socket server"),
    "fit": ("rarefly.fit_cli", "build a posterior model file from a MACE checkpoint and labelled data"),
    "info": ("rarefly.info_cli", "show what a rarefly model file holds"),
    "demo": ("rarefly.demo", "run the shipped demo: on-the-fly learning on ethanol (--no-learning: plain i-PI MD)"),
    "cv-server": ("rarefly.cv_service", "serve the uncertainty CV to PLUMED (normally started by `driver`)"),
    "trainer": ("rarefly.trainer_cli", "label flagged frames and publish refined models (sidecar)"),
    "run": ("rarefly.run", "on-the-fly learning in one command: i-PI, driver and trainer from a TOML config"),
}

EPILOG = """\
examples:
  rarefly fit --foundation small --data train.xyz -o model.rfly --kind lastlayer
  rarefly driver --model model.rfly -u -a ethanol      # UNIX socket /tmp/ipi_ethanol
  rarefly driver --model model.rfly -a localhost -p 31415
  rarefly info model.rfly

Run `rarefly COMMAND --help` for the options of each command.
"""


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rarefly",
        description="Bayesian MACE potentials with calibrated uncertainties for i-PI.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only import the module of the requested command (its options are needed for --help too).
    wanted = next((a for a in (argv or []) if a in SUBCOMMANDS), None)
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == wanted:
            importlib.import_module(module).configure_parser(p)
    return parser


def _version() -> str:
    from rarefly import __version__

    return f"rarefly {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("rarefly: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
