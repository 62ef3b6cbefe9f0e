"""``rarefly info``: what a model file holds."""

from __future__ import annotations

import argparse
import json
import sys


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a rarefly model file (.rfly)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def summary(path) -> dict:
    from ase.data import chemical_symbols

    from rarefly.model_file import load_model_file

    pl = load_model_file(path)
    cfg = pl["architecture"]["config"]
    post = pl["posterior"]
    info = {
        "file": str(path),
        "format_version": pl["format_version"],
        "model_version": pl["model_version"],
        "kind": pl["kind"],
        "elements": [chemical_symbols[z] for z in cfg["atomic_numbers"]],
        "r_max_A": cfg["r_max"],
        "num_interactions": cfg["num_interactions"],
        "hidden_irreps": cfg["hidden_irreps"]["__irreps__"],
        "settings": pl["settings"],
        "calibration": pl["calibration"],
        "energy_offset_eV": pl.get("energy_offset", {}),
        "provenance": pl.get("provenance", {}),
    }
    if pl["kind"] == "sghmc":
        info["num_samples"] = int(next(iter(post["samples"].values())).shape[0])
        info["sghmc"] = post["config"]
    else:
        info["num_features"] = int(post["mean"].numel())
    return info


def run(args) -> int:
    from rarefly.model_file import ModelFileError

    try:
        info = summary(args.model)
    except ModelFileError as exc:
        print(f"rarefly info: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for k, v in info.items():
            print(f"{k:>18}: {v}")
    return 0
