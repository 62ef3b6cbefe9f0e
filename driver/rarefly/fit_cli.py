"""``rarefly fit``: build a posterior model file from a MACE checkpoint and labelled data."""

from __future__ import annotations

import argparse
import sys
import time

EPILOG = """\
The posterior is centred on the foundation weights (a Gaussian prior of width --prior-sigma)
and conditioned on the labelled frames (energies and forces). After the fit, the Student-t
calibration is updated with the residuals on --calibration-data (held-out frames), if given.

examples:
  # the embedded small model, last-layer posterior, 0.5 kcal/mol threshold
  rarefly fit --foundation small --data driver/rarefly/data/foundation_train.xyz \\
      --calibration-data driver/rarefly/data/foundation_valid.xyz -o model.rfly
  # fine-tune all weights first (300 Adam steps), then the last-layer posterior on top
  rarefly fit --foundation small --data my_frames.xyz --finetune-steps 300 -o model.rfly
  # the same, with the misfit term in the energy variance (sigma_E grows away from the data)
  rarefly fit --foundation small --data my_frames.xyz --finetune-steps 300 --misfit-variance -o model.rfly
  # all-weights posterior by cyclical SGHMC (8 samples), MACE-MP-0 small (needs the internet once)
  rarefly fit --foundation mace-mp-0:small --data dft.extxyz --kind sghmc -o model.rfly
"""


def configure_parser(p: argparse.ArgumentParser) -> None:
    from rarefly.driver_cli import whole_number

    p.epilog = EPILOG
    p.add_argument("--foundation", default="small",
                   help="MACE checkpoint: a .model file, `small` (embedded) or a name such as "
                        "mace-mp-0:small / mace-off:small (default: small)")
    p.add_argument("--data", required=True, help="labelled frames: extxyz (REF_energy/REF_forces or "
                   "energy/forces) or an ASE database (.db)")
    p.add_argument("--calibration-data", help="held-out labelled frames for the Student-t calibration")
    p.add_argument("-o", "--output", required=True, help="model file to write (.rfly)")
    p.add_argument("--kind", choices=["lastlayer", "sghmc"], default="lastlayer",
                   help="posterior kind (default: lastlayer)")
    p.add_argument("--epsilon", type=float, default=0.5,
                   help="error threshold on the total energy (default 0.5, in --epsilon-unit)")
    p.add_argument("--epsilon-unit", default="kcal/mol", help="eV, meV, kcal/mol, kJ/mol (default kcal/mol)")
    p.add_argument("--prior-sigma", type=float, default=0.5, help="prior width around the foundation weights")
    p.add_argument("--energy-key", help="info key of the reference energy")
    p.add_argument("--forces-key", help="array key of the reference forces")
    p.add_argument("--max-frames", type=int, help="use only the first N frames")
    p.add_argument("--finetune-steps", type=whole_number(0, "a number of steps (0 or more)"),
                   default=0, metavar="N",
                   help="lastlayer: fine-tune all MACE weights on --data for N Adam steps "
                        "(anchored to the foundation weights) before the readout posterior is "
                        "fitted on the fine-tuned features (default 0: the foundation's features)")
    p.add_argument("--misfit-variance", action="store_true",
                   help="lastlayer: keep the density of the fitted atoms' readout features and add "
                        "the fit's misfit to the energy variance, growing where an atom's features "
                        "leave the fitted ones; without it sigma_E holds the readout weights' "
                        "uncertainty only, which can be the same on every frame of a well-fitted "
                        "molecule (then the calibration cannot tell near from far frames)")
    p.add_argument("--finetune-lr", type=float, default=1e-3, help="Adam learning rate of --finetune-steps")
    p.add_argument("--samples", type=int, default=8, help="sghmc: posterior samples (chains)")
    p.add_argument("--cycle-steps", type=int, default=200, help="sghmc: gradient steps per cycle")
    p.add_argument("--align-energies", action="store_true",
                   help="fit per-element offsets so the reference energies line up with the "
                        "foundation model's zero (needed when the reference code differs from "
                        "the foundation model's training data)")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run(args) -> int:
    import torch

    from rarefly.data_io import DataError, read_frames
    from rarefly.foundation import FoundationError
    from rarefly.posterior import build_posterior
    from rarefly.posterior.base import PosteriorSettings
    from rarefly.units import energy_to_ev

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        eps = energy_to_ev(args.epsilon, args.epsilon_unit)
        frames = read_frames(args.data, args.energy_key, args.forces_key)
        if args.max_frames:
            frames = frames[: args.max_frames]
        cal = read_frames(args.calibration_data, args.energy_key, args.forces_key) \
            if args.calibration_data else None
        settings = PosteriorSettings(epsilon=eps, prior_sigma=args.prior_sigma, energy_noise=0.1 * eps)
        opts = {} if args.kind == "lastlayer" else {"num_samples": args.samples,
                                                     "cycle_steps": args.cycle_steps}
        t0 = time.time()
        print(f"rarefly fit: {len(frames)} frames from {args.data}, posterior {args.kind}, "
              f"epsilon {eps * 1000:.2f} meV" + ("" if cal else "; the last fifth is held out "
                                                 "for calibration (give --calibration-data to use all)"))
        post = build_posterior(args.foundation, args.kind, frames, cal, settings, dtype=args.dtype,
                               progress=True, align_energies=args.align_energies,
                               finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
                               misfit_variance=args.misfit_variance, **opts)
    except (DataError, FoundationError, ValueError) as exc:
        print(f"rarefly fit: {exc}", file=sys.stderr)
        return 2
    stats = post.provenance["fit_stats"]
    post.provenance.update({"data": str(args.data), "calibration_data": args.calibration_data,
                            "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    post.save(args.output)
    c = post.calibration.energy
    print(f"rarefly fit: wrote {args.output} (model version 1) in {time.time() - t0:.1f} s; "
          f"fit {stats}; energy calibration a={c.a:.2f} b={c.b:.2f} "
          f"(variance factor {c.variance_factor:.2f})")
    return 0
