"""Plot sigma_E and a physical CV over time from PLUMED COLVAR files (rarefly examples).

    python plot_colvar.py COLVAR [COLVAR ...] -o colvar.png [--sigma sigma] [--phys tors]
           [--labels walker0,walker1]

Reads the '#! FIELDS' header of each COLVAR; PLUMED's time column under i-PI is the MD step.
The upper panel is sigma_E (eV), the lower one the physical CV (a torsion, in degrees when
its values lie within [-pi, pi]). Writes a PNG with matplotlib's Agg backend (no display).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def read_colvar(path: Path) -> dict[str, np.ndarray]:
    lines = Path(path).read_text().splitlines()
    header = next((ln for ln in lines if ln.startswith("#! FIELDS")), None)
    if header is None:
        raise SystemExit(f"{path}: no '#! FIELDS' header (empty COLVAR?)")
    fields = header.split()[2:]
    rows = [ln for ln in lines if ln.strip() and not ln.startswith("#")]
    if not rows:
        raise SystemExit(f"{path}: no data lines")
    data = np.loadtxt(rows, ndmin=2)
    return dict(zip(fields, data.T))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("colvar", nargs="+", type=Path)
    ap.add_argument("-o", "--output", type=Path, default=Path("colvar.png"))
    ap.add_argument("--sigma", default="sigma", help="COLVAR field of sigma_E (eV)")
    ap.add_argument("--phys", default="tors", help="COLVAR field of the physical CV")
    ap.add_argument("--phys-label", default="C-C-O-H torsion (deg)")
    ap.add_argument("--labels", help="comma-separated legend labels, one per COLVAR")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = args.labels.split(",") if args.labels else [p.parent.name or str(p)
                                                         for p in args.colvar]
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(7, 5))
    for path, label in zip(args.colvar, labels):
        cv = read_colvar(path)
        step = cv["time"]
        for name in (args.sigma, args.phys):
            if name not in cv:
                raise SystemExit(f"{path}: no field {name!r} (fields: {', '.join(cv)})")
        ax1.plot(step, cv[args.sigma], lw=0.8, label=label)
        phys = cv[args.phys]
        if np.all(np.abs(phys) <= np.pi + 1e-6):
            phys = np.degrees(phys)
            ax2.set_ylim(-180, 180)
            ax2.set_yticks([-180, -90, 0, 90, 180])
        ax2.plot(step, phys, ".", ms=1.5, label=label)
    ax1.set_ylabel("sigma_E (eV)")
    ax2.set_ylabel(args.phys_label)
    ax2.set_xlabel("MD step")
    if len(args.colvar) > 1:
        ax1.legend(fontsize=8)
    if args.title:
        ax1.set_title(args.title)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"plot: {args.output.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
