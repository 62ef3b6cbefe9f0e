"""rarefly as an in-process i-PI potential: ``<ffdirect>`` with ``<pes>custom</pes>``.

i-PI imports this file by path and instantiates :class:`RareflyPES` with the
``<parameters>`` dictionary of the forcefield; the class follows the contract of
``ipi.pes.dummy.Dummy_driver`` (called with ``(cell, pos)``, returns ``(energy, forces,
virial, extras)`` in i-PI's atomic units)::

    <ffdirect name="rarefly" pbc="false">
      <pes>custom</pes>
      <pes_path>/path/to/rarefly/pes.py</pes_path>   <!-- python -m rarefly.pes prints it -->
      <parameters>{template: ethanol.xyz, model: model.rfly}</parameters>
      <batch_size>4</batch_size>                      <!-- e.g. the number of beads -->
    </ffdirect>

Parameters (keys of ``<parameters>``; relative paths are relative to where i-PI runs):

- ``template`` (path): any ASE-readable structure with the species and atom order of i-PI's
  system (i-PI passes no species); its periodicity decides whether a cell and a virial are
  used, exactly as ``rarefly driver --template`` (an i-PI-format xyz with a
  ``# CELL(...)`` line counts as periodic: set ``pbc: false`` for a molecule in a box).
- ``pbc`` (optional): ``auto`` (default: the template decides), ``true`` or ``false``, as
  ``rarefly driver --pbc``.
- ``model`` (path): the rarefly model file.
- ``epsilon`` (number, optional): energy tolerance of the reported confidence, in
  ``epsilon_unit`` (default eV); default: the model file's value.
- ``device`` (optional): torch device, ``cpu`` (default), ``cuda`` or ``cuda:N``.

With ``<batch_size>B</batch_size>`` i-PI hands B structures (e.g. all beads of a
path-integral step) to one call; they are evaluated in ONE ``predict`` call of the
posterior. The extras are the JSON object of the socket driver (keys ``energy_uncertainty``,
``forces_uncertainty``, ``confidence``, ``model_version``; see :mod:`rarefly.client`), so
``<trajectory extra_type="energy_uncertainty">extras</trajectory>`` works with either.

Units are converted only with the functions of the wire code: :func:`rarefly.protocol.
ipi_transpose` for i-PI's column-vector cells and virials, the constants of
:mod:`rarefly.units`, and :func:`rarefly.client.virial_from_stress` /
:func:`rarefly.client.extras_json`. Torch's thread count is not touched here: set
``OMP_NUM_THREADS`` for the i-PI process.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from ipi.pes.dummy import Dummy_driver

from rarefly.client import (
    DEFAULT_MIN_DISTANCE,
    DriverError,
    close_pairs,
    extras_json,
    virial_from_stress,
)
from rarefly.prediction import InputError, Prediction, Structure
from rarefly.protocol import ipi_transpose
from rarefly.units import BOHR_TO_ANGSTROM, EV_TO_HARTREE, FORCE_EV_A_TO_AU, energy_to_ev

# i-PI finds the class through these two string literals (ipi.pes.scan_pes_file).
__DRIVER_NAME__ = "rarefly"
__DRIVER_CLASS__ = "RareflyPES"

#: (energy Hartree, forces (N, 3) Hartree/Bohr, virial (3, 3) Hartree in i-PI layout, extras)
Result = tuple[float, np.ndarray, np.ndarray, str]


class RareflyPES(Dummy_driver):
    """Posterior-mean forces and calibrated uncertainties of a rarefly model, for i-PI.

    template: path of the structure that gives species, atom order and periodicity.
    model: path of the rarefly model file.
    pbc: "auto" (the template decides), True/"yes" or False/"no".
    epsilon: confidence tolerance in ``epsilon_unit`` (None: the model file's value).
    device: torch device of the model.

    ``calls`` and ``structures`` count the calls and the structures evaluated.
    """

    def __init__(self, template, model, epsilon=None, epsilon_unit="eV", device="cpu",
                 pbc="auto", *args, **kwargs):
        self.template = str(template)
        self.model = str(model)
        self.pbc_mode = {True: "yes", False: "no"}.get(pbc, str(pbc).lower())
        self.epsilon = None if epsilon is None else float(epsilon)
        self.epsilon_unit = str(epsilon_unit)
        self.device = str(device)
        self.calls = 0
        self.structures = 0
        super().__init__(*args, **kwargs)  # calls check_parameters()

    def check_parameters(self):
        """Read the template and load the model; DriverError (one sentence) when they fail."""
        from rarefly.driver_cli import check_species, load_model, read_template

        if self.pbc_mode not in ("auto", "yes", "no"):
            raise DriverError(f"the rarefly PES parameter pbc is {self.pbc_mode!r}; use auto, "
                              "true or false")
        atoms = read_template(self.template, self.pbc_mode)
        try:
            epsilon = (None if self.epsilon is None
                       else energy_to_ev(self.epsilon, self.epsilon_unit))
        except ValueError as exc:
            raise DriverError(str(exc)) from None
        self.posterior = load_model(self.model, self.device, epsilon)
        check_species(atoms.numbers, self.posterior, self.model, self.template)
        self.numbers = np.array(atoms.numbers, dtype=int)
        self.pbc = tuple(bool(p) for p in atoms.pbc)
        self.periodic = any(self.pbc)

    # ------------------------------------------------------------------ the i-PI call
    def compute(self, cell, pos):
        """One structure (``cell`` (3, 3), ``pos`` (N, 3), Bohr) or lists of them (batched).

        Returns ``(energy, forces, virial, extras)``, or a list of such tuples for lists.
        """
        if isinstance(cell, list):
            if not isinstance(pos, list) or len(cell) != len(pos):
                raise ValueError("a batched call needs lists of cells and positions of the "
                                 "same length")
            return self.evaluate(cell, pos)
        return self.evaluate([cell], [pos])[0]

    def evaluate(self, cells: Sequence[np.ndarray], positions: Sequence[np.ndarray]) -> list[Result]:
        """All structures in one ``predict`` call; arguments and results in atomic units."""
        self.calls += 1
        structures = [self._structure(c, p) for c, p in zip(cells, positions)]
        try:
            predictions = self.posterior.predict(structures)
        except InputError as exc:
            raise DriverError(f"the model cannot evaluate a structure in call {self.calls} of "
                              f"the rarefly PES: {exc}") from None
        self.structures += len(structures)
        return [self._result(s, p) for s, p in zip(structures, predictions)]

    # ------------------------------------------------------------------ boundary
    def _structure(self, cell_au: np.ndarray, pos_au: np.ndarray) -> Structure:
        """i-PI's (cell columns, Bohr) -> rarefly Structure (rows, Angstrom), validated."""
        positions = np.asarray(pos_au, dtype=float).reshape(-1, 3) * BOHR_TO_ANGSTROM
        where = f"in call {self.calls} of the rarefly PES"
        if len(positions) != len(self.numbers):
            raise DriverError(f"i-PI passed {len(positions)} atoms but the template "
                              f"{self.template} has {len(self.numbers)} ({where}); use the same "
                              "structure for the template as for i-PI's <initialize>")
        if not np.isfinite(positions).all():
            raise DriverError(f"i-PI passed non-finite positions {where}; the dynamics has "
                              "blown up, restart with a smaller time step")
        cell = None
        if self.periodic:
            cell = ipi_transpose(cell_au) * BOHR_TO_ANGSTROM
            if not (np.isfinite(cell).all() and abs(np.linalg.det(cell)) > 1e-6):
                raise DriverError(f"i-PI passed a cell of zero volume {where}, but the template "
                                  f"{self.template} is periodic")
        pairs = close_pairs(positions, cell, self.pbc, DEFAULT_MIN_DISTANCE)
        if pairs:
            i, j, d = pairs[0]
            raise DriverError(f"atoms {i} and {j} are {d:.3f} A apart {where}; the structure "
                              "has collapsed, restart with a smaller time step")
        return Structure(self.numbers.copy(), positions, cell,
                         self.pbc if cell is not None else (False, False, False))

    def _result(self, structure: Structure, prediction: Prediction) -> Result:
        """rarefly Prediction (eV, Angstrom, rows) -> i-PI's tuple (Hartree, Bohr, columns)."""
        virial = np.zeros((3, 3))  # molecules (and a model without stress) have none
        if structure.cell is not None and prediction.stress is not None:
            virial = virial_from_stress(prediction.stress, structure.cell)
        return (float(prediction.energy) * EV_TO_HARTREE,
                np.asarray(prediction.forces, dtype=float) * FORCE_EV_A_TO_AU,
                ipi_transpose(virial) * EV_TO_HARTREE,
                extras_json(prediction))


if __name__ == "__main__":  # `python -m rarefly.pes`: the path to give i-PI's <pes_path>
    print(__file__)
