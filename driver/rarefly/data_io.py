"""Reading labelled reference data (extxyz or ASE database) into :class:`LabelledFrame` s.

Energies and forces are looked up under the usual names, in this order: the key the user
gives, then ``REF_energy``/``REF_forces`` (mace's convention), ``energy``/``forces`` (info or
arrays), then an attached single-point calculator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rarefly.posterior.base import LabelledFrame
from rarefly.prediction import Structure


class DataError(ValueError):
    pass


def read_frames(path: str | Path, energy_key: str | None = None, forces_key: str | None = None,
                index: str = ":") -> list[LabelledFrame]:
    from ase.io import read

    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    try:
        if path.suffix == ".db":
            from ase.db import connect

            atoms_list = [row.toatoms(add_additional_information=True) for row in connect(path).select()]
            for a in atoms_list:
                a.info.update(a.info.pop("key_value_pairs", {}))
        else:
            atoms_list = read(path, index=index)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot read {path}: {exc}") from exc
    frames = []
    for i, a in enumerate(atoms_list):
        e = _get(a, [energy_key, "REF_energy", "energy"], info=True)
        f = _get(a, [forces_key, "REF_forces", "forces"], info=False)
        if e is None or f is None:
            calc = a.calc
            try:
                e = e if e is not None else calc.get_potential_energy()
                f = f if f is not None else calc.get_forces()
            except Exception:  # noqa: BLE001
                raise DataError(f"{path}: frame {i} has no reference energy and forces (looked for "
                                "REF_energy/energy and REF_forces/forces)") from None
        frames.append(LabelledFrame(Structure.from_atoms(a), float(e), np.asarray(f, float),
                                    info={"source": str(path), "index": i}))
    if not frames:
        raise DataError(f"{path} holds no structures")
    return frames


def _get(atoms, keys, info: bool):
    for k in keys:
        if not k:
            continue
        if info and k in atoms.info:
            return atoms.info[k]
        if not info and k in atoms.arrays:
            return atoms.arrays[k]
    return None
