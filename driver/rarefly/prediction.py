"""The data that crosses every boundary inside rarefly: a structure in, a prediction out.

All arrays are numpy, float64, in eV / Angstrom. Cells are rows (ASE convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np


class InputError(ValueError):
    """A structure the model cannot evaluate; the message is one sentence for the user."""


@dataclass
class Structure:
    """One configuration.

    numbers: (N,) atomic numbers.
    positions: (N, 3) Angstrom.
    cell: (3, 3) Angstrom, lattice vectors as rows; ``None`` for a cluster/molecule.
    pbc: periodic directions; all False when ``cell`` is None.
    """

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray | None = None
    pbc: tuple[bool, bool, bool] = (False, False, False)

    @classmethod
    def from_atoms(cls, atoms) -> "Structure":
        pbc = tuple(bool(p) for p in atoms.pbc)
        cell = np.array(atoms.cell[:], dtype=float) if any(pbc) else None
        return cls(np.array(atoms.numbers, dtype=int), np.array(atoms.positions, dtype=float),
                   cell, pbc if cell is not None else (False, False, False))


@dataclass
class Prediction:
    """Posterior-predictive quantities for one structure.

    energy: posterior-mean total energy, eV.
    forces: (N, 3) posterior-mean forces, eV/Angstrom.
    stress: (3, 3) posterior-mean stress, eV/Angstrom^3, ASE sign convention
        (stress = (1/V) dE/d(strain)); ``None`` for non-periodic structures.
    energy_sigma: calibrated predictive standard deviation of the energy, eV.
    forces_sigma: (N,) per-atom predictive force standard deviation, eV/Angstrom
        (root of the mean of the three Cartesian variances, calibrated).
    energy_sigma_gradient: (N, 3) d energy_sigma / d positions, eV/Angstrom; ``None`` when the
        posterior was told not to compute it (``Posterior.sigma_gradient = False``: a driver
        without ``--cv``, where nothing uses it).
    energy_sigma_cell_gradient: (3, 3) d energy_sigma / d strain, eV (periodic only; ``None``
        also when ``sigma_gradient`` is off).
    confidence: P(|E error| < epsilon) under the Student-t calibration.
    model_version: version number of the model file that produced this.
    """

    energy: float
    forces: np.ndarray
    stress: np.ndarray | None
    energy_sigma: float
    forces_sigma: np.ndarray
    energy_sigma_gradient: np.ndarray | None
    confidence: float
    model_version: int
    energy_sigma_cell_gradient: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Predictor(Protocol):
    """Anything that turns structures into predictions (a posterior, a test double)."""

    model_version: int

    def predict(self, structures: Sequence[Structure]) -> list[Prediction]:
        """Evaluate all structures (batched where possible)."""
        ...
