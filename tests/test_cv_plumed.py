"""The PLUMED side of the uncertainty CV (rarefly.cv): units, waiting, rendering, and the
real PLUMED kernel + PyCV driven directly (the box derivatives of a periodic system)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rarefly import cv as rcv
from rarefly import cv_service as cs
from rarefly.prediction import Structure
from rarefly.units import KJ_MOL_TO_EV
from test_cv_service import AnalyticSigma, ethanol, unique_endpoint

INPUTS = Path(__file__).resolve().parents[1] / "plumed_inputs"


# ------------------------------------------------------------------------ rendering


def test_render_fills_the_plugin_and_the_walker_placeholders(tmp_path):
    text = (INPUTS / "metad_walkers.dat").read_text()
    with pytest.raises(rcv.CVError, match="WALKERS_N, WALKER_ID"):
        rcv.render_plumed_input(text)
    out = rcv.render_plumed_input(text, {"WALKERS_N": 4, "walker_id": 2})
    assert "WALKERS_ID=2" in out and "WALKERS_N=4" in out and "__" not in out
    plugin = rcv.pycv_plugin_path()
    assert f"LOAD FILE={plugin}" in out and plugin.name == "PythonCVInterface.so"
    assert rcv.main(["render", str(INPUTS / "metad.dat"), "-o", str(tmp_path / "p.dat")]) == 0
    assert f"LOAD FILE={plugin}" in (tmp_path / "p.dat").read_text()
    assert rcv.main(["render", str(INPUTS / "metad_walkers.dat")]) == 2


def test_render_lists_the_bonds_of_the_starting_structure(tmp_path, capsys):
    """metad_bond_walls.dat: __RAREFLY_XH_BONDS__ and __RAREFLY_HEAVY_BONDS__ become the
    DISTANCES atom lists of the structure's covalent bonds (1-based); without a structure, or
    with one that has no bond of a kind, one sentence."""
    from ase.build import molecule
    from ase.io import write

    text = (INPUTS / "metad_bond_walls.dat").read_text()
    with pytest.raises(rcv.CVError, match="give the starting structure"):
        rcv.render_plumed_input(text)
    ethanol = molecule("CH3CH2OH")              # C C O H H H H H H
    write(tmp_path / "ethanol.xyz", ethanol)
    out = rcv.render_plumed_input(text, structure=tmp_path / "ethanol.xyz")
    assert "__" not in out
    xh = next(line for line in out.splitlines() if line.startswith("xh:"))
    heavy = next(line for line in out.splitlines() if line.startswith("heavy:"))
    pairs = lambda line: sorted(tuple(int(x) for x in p.split("=")[1].split(","))  # noqa: E731
                                for p in line.split() if p.startswith("ATOMS"))
    symbols = ethanol.get_chemical_symbols()
    assert len(pairs(xh)) == 6 and all("H" in (symbols[i - 1], symbols[j - 1]) for i, j in pairs(xh))
    assert {(symbols[i - 1], symbols[j - 1]) for i, j in pairs(heavy)} == {("C", "C"), ("C", "O")}
    assert rcv.main(["render", str(INPUTS / "metad_bond_walls.dat"), "--structure",
                     str(tmp_path / "ethanol.xyz"), "-o", str(tmp_path / "p.dat")]) == 0
    assert (tmp_path / "p.dat").read_text() == out
    assert rcv.main(["render", str(INPUTS / "metad_bond_walls.dat")]) == 2
    assert "--structure FILE" in capsys.readouterr().err
    with pytest.raises(rcv.CVError, match="no X-H bond"):
        rcv.render_plumed_input(text, structure=molecule("CO2"))
    with pytest.raises(rcv.CVError, match="cannot read the structure"):
        rcv.render_plumed_input(text, structure=tmp_path / "missing.xyz")


def test_plumed_units():
    assert rcv.plumed_units("A,eV") == (1.0, 1.0)
    length, energy = rcv.plumed_units("nm,kj/mol")
    assert length == pytest.approx(10.0) and energy == pytest.approx(KJ_MOL_TO_EV)
    with pytest.raises(rcv.CVError, match="RAREFLY_CV_PLUMED_UNITS"):
        rcv.plumed_units("furlong,eV")


# ------------------------------------------------------------------ waiting, errors


def test_no_driver_fails_in_bounded_time_naming_the_endpoint():
    endpoint = unique_endpoint()
    client = rcv.CVClient(endpoint, timeout_s=0.6, resend_s=0.25)
    positions = ethanol().positions
    start = time.monotonic()
    with pytest.raises(rcv.CVError) as err:
        client.sigma(positions)
    assert 0.55 < time.monotonic() - start < 1.5
    assert f"no answer from the rarefly driver at {endpoint} within 0.6 s" in str(err.value)
    client.close()


def test_a_driver_that_comes_back_gets_the_request_again():
    ref = ethanol()
    endpoint = unique_endpoint()
    client = rcv.CVClient(endpoint, timeout_s=5.0, resend_s=0.2)
    svc = cs.CVService(AnalyticSigma(ref), endpoint, template=ref)
    timer = threading.Timer(0.5, svc.start)
    timer.start()
    try:
        reply = client.sigma(ref.positions)
        assert reply.sigma == pytest.approx(0.01)
    finally:
        timer.join()
        svc.stop()
        client.close()


def test_error_reply_becomes_one_sentence():
    ref = ethanol()
    with cs.CVService(AnalyticSigma(ref), unique_endpoint(), template=ref) as svc:
        client = rcv.CVClient(svc.endpoint, timeout_s=2.0)
        with pytest.raises(rcv.CVError, match=r"could not compute sigma_E: the CV asked for 3 "):
            client.sigma(np.zeros((3, 3)))
        client.close()


def test_positions_in_nm_are_caught(monkeypatch):
    ref = ethanol()
    with cs.CVService(AnalyticSigma(ref), unique_endpoint(), template=ref) as svc:
        cv = rcv.UncertaintyCV(svc.endpoint, timeout_s=2.0)
        with pytest.raises(rcv.CVError, match="UNITS LENGTH=A ENERGY=eV"):
            cv.compute(ref.positions / 10.0, np.eye(3))  # nm read as Angstrom
        assert svc.stats["requests"] == 0


def test_units_conversion_and_local_cache():
    ref = ethanol()
    model = AnalyticSigma(ref)
    pos = ref.positions + 0.03
    sigma, grad, _ = model.sigma(Structure(ref.numbers, pos))
    with cs.CVService(model, unique_endpoint(), template=ref) as svc:
        cv = rcv.UncertaintyCV(svc.endpoint, timeout_s=2.0, units="nm,kJ/mol")
        value, g, box = cv.compute(pos / 10.0, np.zeros((3, 3)))
        assert value == pytest.approx(sigma / KJ_MOL_TO_EV)
        np.testing.assert_allclose(g, grad * 10.0 / KJ_MOL_TO_EV, rtol=1e-10)
        np.testing.assert_allclose(box, -np.einsum("ia,ib->ab", pos / 10.0, g))
        cv.compute(pos / 10.0, np.zeros((3, 3)))  # i-PI's second call at the same positions
        assert svc.stats["requests"] == 1 and cv.requests == 1


# ---------------------------------------------- the real kernel: periodic box derivatives


def _plumed(tmp_path: Path, text: str, natoms: int, length_nm: float, energy_kjmol: float):
    import plumed

    (tmp_path / "plumed.dat").write_text(rcv.render_plumed_input(text))
    p = plumed.Plumed()
    p.cmd("setRealPrecision", 8)
    p.cmd("setMDEngine", "python")
    p.cmd("setNatoms", natoms)
    p.cmd("setMDLengthUnits", length_nm)
    p.cmd("setMDEnergyUnits", energy_kjmol)
    p.cmd("setTimestep", 1.0)
    p.cmd("setLogFile", str(tmp_path / "plumed.log"))
    p.cmd("setPlumedDat", str(tmp_path / "plumed.dat"))
    p.cmd("init")
    return p


def _evaluate(p, step, pos, box):
    n = len(pos)
    forces, virial, bias = np.zeros((n, 3)), np.zeros((3, 3)), np.zeros(1)
    pos, box = np.ascontiguousarray(pos, dtype=float), np.ascontiguousarray(box, dtype=float)
    p.cmd("setStep", step)
    p.cmd("setBox", box)
    p.cmd("setMasses", np.ones(n))
    p.cmd("setCharges", np.zeros(n))
    p.cmd("setPositions", pos)
    p.cmd("setForces", forces)
    p.cmd("setVirial", virial)
    p.cmd("calc")
    p.cmd("getBias", bias)
    return bias[0], forces, virial


RESTRAINT = """UNITS LENGTH=A ENERGY=eV
LOAD FILE=__RAREFLY_PYCV__
sigma: PYCVINTERFACE ATOMS=@mdatoms IMPORT=rarefly.cv INIT=init CALCULATE=calculate
RESTRAINT ARG=sigma AT=0.0 KAPPA=40.0
"""


@pytest.mark.parametrize("units", ["A,eV", "nm,kJ/mol"])
def test_periodic_forces_and_virial_match_finite_differences(tmp_path, monkeypatch, units):
    """V = 20 sigma^2 on a periodic ethanol split across the box: forces -dV/dR and virial
    dV/d(strain) from the real kernel match finite differences (MD engine in A/eV)."""
    cell = 7.0
    ref = ethanol(cell=cell)
    # split the molecule across the boundary: the minimum image matters
    ref.positions = ref.positions - np.array([ref.positions[:, 0].mean(), 0.0, 0.0])
    ref.positions[:, 0] %= cell
    rng = np.random.default_rng(5)
    pos = ref.positions + 0.03 * rng.standard_normal(ref.positions.shape)
    box = ref.cell.copy()
    text = RESTRAINT
    if units != "A,eV":  # PLUMED's default units, converted by rarefly.cv
        text = text.replace("UNITS LENGTH=A ENERGY=eV\n", "")
        text = text.replace("KAPPA=40.0", f"KAPPA={40.0 * KJ_MOL_TO_EV!r}")  # (kJ/mol)^-1
    monkeypatch.setenv(rcv.ENV_PLUMED_UNITS, units)
    with cs.CVService(AnalyticSigma(ref), unique_endpoint(), template=ref) as svc:
        monkeypatch.setenv(rcv.ENV_ENDPOINT, svc.endpoint)
        p = _plumed(tmp_path, text, len(pos), 0.1, 1.0 / KJ_MOL_TO_EV)  # MD units: A, eV
        try:
            v0, forces, virial = _evaluate(p, 0, pos, box)
            sigma, grad, _ = svc.predictor.sigma(Structure(ref.numbers, pos, box, (True,) * 3))
            assert v0 == pytest.approx(20.0 * sigma**2, rel=1e-6)  # PLUMED's eV: 2.6e-7 off ASE's
            np.testing.assert_allclose(forces, -40.0 * sigma * grad, rtol=1e-6, atol=1e-12)
            h, fd = 1e-5, np.zeros((3, 3))
            for a in range(3):
                for b in range(3):
                    vals = []
                    for sign in (1, -1):
                        strain = np.eye(3)
                        strain[a, b] += sign * h
                        vals.append(_evaluate(p, 1, pos @ strain, box @ strain)[0])
                    fd[a, b] = (vals[0] - vals[1]) / (2 * h)
        finally:
            p.finalize()
    # PLUMED's virial is +dV/d(strain), as for its own CVs (DISTANCE checked the same way)
    np.testing.assert_allclose(virial, fd, atol=1e-6 * np.abs(fd).max())
    naive = np.einsum("ia,ib->ab", pos, -forces)  # atom derivatives alone, unwrapped positions
    assert np.abs(naive - fd).max() > 0.1 * np.abs(fd).max()  # so the cell gradient mattered
