"""rarefly.pes in-process, without i-PI's engine: the Dummy_driver contract and its units."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase import units
from ase.io import read
from ipi.pes import load_pes, scan_pes_file
from ipi.pes.dummy import Dummy_driver

import rarefly.pes
from rarefly.client import DriverError
from rarefly.prediction import Structure


@pytest.fixture(scope="module")
def pes(model_file, ethanol_xyz):
    # the way i-PI builds it: <parameters> as keyword arguments, plus i-PI's own "verbosity"
    return load_pes("custom", rarefly.pes.__file__)(template=str(ethanol_xyz),
                                                   model=str(model_file), verbosity=False)


@pytest.fixture(scope="module")
def posterior(pes):
    """The reference: the same posterior, called directly in rarefly's units."""
    return pes.posterior


def test_module_declares_the_driver_the_way_ipi_scans_it():
    assert scan_pes_file(rarefly.pes.__file__) == ("RareflyPES", "rarefly")
    assert issubclass(rarefly.pes.RareflyPES, Dummy_driver)


def _ipi_args(atoms, cell_rows):
    """What i-PI passes: cell with lattice vectors as columns, both in Bohr."""
    return np.array(cell_rows).T / units.Bohr, atoms.positions / units.Bohr


def test_single_structure_in_atomic_units(pes, posterior, ethanol_xyz):
    atoms = read(ethanol_xyz)
    atoms.positions[0] += 0.05
    cell, pos = _ipi_args(atoms, 20.0 * np.eye(3))
    energy, forces, virial, extras = pes(cell, pos)
    ref = posterior.predict([Structure.from_atoms(atoms)])[0]
    assert energy == pytest.approx(ref.energy / units.Hartree, rel=1e-10)
    np.testing.assert_allclose(forces, ref.forces * units.Bohr / units.Hartree, rtol=1e-8,
                               atol=1e-12)
    np.testing.assert_array_equal(virial, np.zeros((3, 3)))  # a molecule: no virial
    data = json.loads(extras)
    assert data["energy_uncertainty"] == pytest.approx(ref.energy_sigma)
    np.testing.assert_allclose(data["forces_uncertainty"], ref.forces_sigma)
    assert data["confidence"] == pytest.approx(ref.confidence)
    assert data["model_version"] == ref.model_version


def test_batched_call_evaluates_all_structures_in_one_predict(pes, posterior, ethanol_xyz,
                                                               monkeypatch):
    atoms = read(ethanol_xyz)
    rng = np.random.default_rng(0)
    batch = [atoms.copy() for _ in range(3)]
    for a in batch:
        a.positions += rng.normal(scale=0.03, size=a.positions.shape)
    seen = []
    predict = pes.posterior.predict
    monkeypatch.setattr(pes.posterior, "predict", lambda s: seen.append(len(s)) or predict(s))
    args = [_ipi_args(a, 20.0 * np.eye(3)) for a in batch]
    results = pes([c for c, _ in args], [p for _, p in args])
    assert seen == [3]
    assert isinstance(results, list) and len(results) == 3
    refs = posterior.predict([Structure.from_atoms(a) for a in batch])
    for (energy, forces, _, extras), ref in zip(results, refs):
        assert energy == pytest.approx(ref.energy / units.Hartree, rel=1e-10)
        np.testing.assert_allclose(forces, ref.forces * units.Bohr / units.Hartree, rtol=1e-8,
                                   atol=1e-12)
        assert json.loads(extras)["energy_uncertainty"] == pytest.approx(ref.energy_sigma)
    # a batch of one (i-PI flushing an incomplete batch) is still a list
    single = pes([args[0][0]], [args[0][1]])
    assert isinstance(single, list) and len(single) == 1


@pytest.mark.slow
def test_periodic_template_uses_the_cell_and_returns_the_virial(tmp_path, model_file,
                                                                ethanol_xyz):
    atoms = read(ethanol_xyz)
    # triclinic: a wrong row/column convention would give a different structure
    cell = np.array([[9.0, 0.0, 0.0], [1.5, 9.5, 0.0], [0.7, -1.1, 10.0]])
    atoms.set_cell(cell)
    atoms.set_pbc(True)
    atoms.center()
    template = tmp_path / "periodic.xyz"
    atoms.write(template)
    pes = rarefly.pes.RareflyPES(template=str(template), model=str(model_file))
    energy, forces, virial, _ = pes(*_ipi_args(atoms, cell))
    ref = pes.posterior.predict([Structure.from_atoms(atoms)])[0]
    assert energy == pytest.approx(ref.energy / units.Hartree, rel=1e-10)
    expected = -ref.stress * abs(np.linalg.det(cell))         # eV, rows
    np.testing.assert_allclose(virial, expected.T / units.Hartree, rtol=1e-8, atol=1e-12)
    assert np.abs(virial).max() > 0


def test_wrong_atom_count_is_one_sentence(pes, ethanol_xyz):
    atoms = read(ethanol_xyz)
    cell, pos = _ipi_args(atoms, 20.0 * np.eye(3))
    with pytest.raises(DriverError, match=r"i-PI passed 8 atoms but the template .* has 9"):
        pes(cell, pos[:8])


def test_missing_model_file_is_one_sentence(tmp_path, ethanol_xyz):
    with pytest.raises(DriverError, match=r"the model file .*nothing.rfly does not exist"):
        rarefly.pes.RareflyPES(template=str(ethanol_xyz), model=str(tmp_path / "nothing.rfly"))
