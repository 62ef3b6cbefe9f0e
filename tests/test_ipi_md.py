"""Real i-PI + ``rarefly driver`` over a UNIX socket, on the shipped model and ethanol.

One NVT run (a few hundred 0.5 fs steps) is shared by the tests that check that it
completes and that the extras i-PI wrote hold the uncertainties; one NVE run checks that
the posterior-mean forces conserve energy.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.io import read

from rarefly.demo import (
    PREFIX,
    IPIRun,
    ffsocket_xml,
    input_xml,
    read_extras,
    read_properties,
    unique_address,
)

pytestmark = pytest.mark.slow

NVT_STEPS = 200
NVE_STEPS = 200
TIMESTEP_FS = 0.5
#: a guard against hangs, not a speed target: a quiet 2-core machine needs a third of it
RUN_TIMEOUT = 300


def _socket_run(workdir, model_file, ethanol_xyz, steps, ensemble, extras=True):
    """Write the input, run i-PI and the driver to the end; return the workdir."""
    address = unique_address("rarefly-test")
    (workdir / "input.xml").write_text(
        input_xml(ffsocket_xml(address, timeout=120), ethanol_xyz, steps, ensemble=ensemble,
                  timestep_fs=TIMESTEP_FS, extras=extras))
    driver = ["--model", str(model_file), "--template", str(ethanol_xyz), "-u", "-a", address,
              "--connect-timeout", "60", "--exit-on-disconnect"]
    with IPIRun(workdir, driver) as sim:
        sim.wait(timeout=RUN_TIMEOUT)
    return workdir


@pytest.fixture(scope="module")
def nvt_run(tmp_path_factory, model_file, ethanol_xyz):
    return _socket_run(tmp_path_factory.mktemp("nvt"), model_file, ethanol_xyz, NVT_STEPS,
                       "nvt")


def test_nvt_md_over_unix_socket_completes(nvt_run):
    props = read_properties(nvt_run / f"{PREFIX}.out")
    # i-PI writes step 0 (the initial forces) and then every step
    assert props["step"].tolist() == list(range(NVT_STEPS + 1))
    assert np.all(np.isfinite(props["potential"]))
    # 9 atoms at 300 K: the instantaneous temperature of 21 degrees of freedom fluctuates by
    # ~300*sqrt(2/21) = 90 K; the SVR thermostat keeps it near 300 K, a blow-up would not.
    assert 50.0 < props["temperature"][NVT_STEPS // 2:].mean() < 900.0
    frames = read(nvt_run / f"{PREFIX}.pos_0.xyz", index=":")
    assert len(frames) == NVT_STEPS // 10 + 1
    log = (nvt_run / "driver.log").read_text()
    assert f"sent EXIT after {NVT_STEPS + 1} force requests" in log


def test_extras_trajectory_holds_the_uncertainties(nvt_run):
    unc = read_extras(nvt_run / f"{PREFIX}.uncertainty_0")   # energy_uncertainty, confidence
    assert unc.shape == (NVT_STEPS + 1, 2)
    sigma_e, confidence = unc[:, 0], unc[:, 1]
    assert np.all(np.isfinite(sigma_e)) and np.all(sigma_e > 0)
    assert np.all((confidence >= 0) & (confidence <= 1))
    # the structure changes along the trajectory, and so does the uncertainty
    assert np.ptp(sigma_e) > 0
    fsig = read_extras(nvt_run / f"{PREFIX}.forces_sigma_0")  # forces_uncertainty per atom
    assert fsig.shape == (NVT_STEPS + 1, 9)
    assert np.all(np.isfinite(fsig)) and np.all(fsig > 0)
    raw = (nvt_run / f"{PREFIX}.uncertainty_0").read_text()
    assert "#EXTRAS(energy_uncertainty,confidence)# Step:" in raw


def test_nve_energy_is_conserved(tmp_path, model_file, ethanol_xyz):
    run = _socket_run(tmp_path, model_file, ethanol_xyz, NVE_STEPS, "nve", extras=False)
    props = read_properties(run / f"{PREFIX}.out")
    assert len(props["step"]) == NVE_STEPS + 1
    conserved, potential = props["conserved"], props["potential"]
    time_fs = props["time"]
    # Scale of the run: the energy that flows between kinetic and potential energy.
    exchanged = np.std(potential)
    assert exchanged > 1e-3  # the molecule does move (300 K: ~0.1 eV for ethanol)
    # Velocity Verlet on conservative forces: the conserved quantity only oscillates, with a
    # relative amplitude ~(omega*dt)^2/4 of the exchanged energy; for the fastest mode (C-H
    # stretch, period ~11 fs) at dt = 0.5 fs, omega*dt = 0.29, i.e. ~2%. Allow 10%.
    fluctuation = np.std(conserved - np.polyval(np.polyfit(time_fs, conserved, 1), time_fs))
    assert fluctuation < 0.1 * exchanged, (fluctuation, exchanged)
    # Forces that were not the gradient of the energy would feed or drain energy steadily:
    # a non-conservative part of x% of the forces drifts by ~x% of the exchanged energy over
    # the run. Require the linear drift over the whole run to stay below 10% of it.
    drift = abs(np.polyfit(time_fs, conserved, 1)[0]) * (time_fs[-1] - time_fs[0])
    assert drift < 0.1 * exchanged, (drift, exchanged)
