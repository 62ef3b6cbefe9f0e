"""The shipped examples and ``rarefly demo --no-learning`` run as documented (a few steps each;
the default, on-the-fly ``rarefly demo`` is tested in test_run_e2e.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import rarefly.pes
from rarefly.demo import PREFIX, IPIRun, read_extras, read_properties, unique_address
from rarefly.foundation import DATA_DIR

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STEPS = 3


def _prepare(example: str, workdir: Path, model_file: Path) -> str:
    """The example's input.xml in ``workdir``, with absolute paths and a few steps."""
    text = (EXAMPLES / example / "input.xml").read_text()
    text = text.replace("../../driver/rarefly/data/", f"{DATA_DIR}/")
    text = text.replace("../../driver/rarefly/pes.py", rarefly.pes.__file__)
    text = text.replace("model: model.rfly", f"model: {model_file}")
    text, n = re.subn(r"<total_steps>\d+</total_steps>", f"<total_steps>{STEPS}</total_steps>",
                      text)
    assert n == 1
    (workdir / "input.xml").write_text(text)
    return text


def _check_outputs(workdir: Path, beads: int) -> None:
    props = read_properties(workdir / f"{PREFIX}.out")
    assert props["step"].tolist() == list(range(STEPS + 1))
    for bead in range(beads):
        unc = read_extras(workdir / f"{PREFIX}.uncertainty_{bead}")
        assert unc.shape == (STEPS + 1, 2) and np.all(unc[:, 0] > 0)


def test_md_nvt_example(tmp_path, model_file, ethanol_xyz):
    text = _prepare("md_nvt", tmp_path, model_file)
    assert "../../" not in text
    address = unique_address("rarefly-example")
    (tmp_path / "input.xml").write_text(
        text.replace("<address>rarefly_md_nvt</address>", f"<address>{address}</address>"))
    # the driver command of the README, with this run's socket name
    readme = (EXAMPLES / "md_nvt" / "README.md").read_text()
    assert ("rarefly driver --model model.rfly --template ../../driver/rarefly/data/ethanol.xyz"
            " -u -a rarefly_md_nvt") in readme
    with IPIRun(tmp_path, ["--model", str(model_file), "--template", str(ethanol_xyz), "-u",
                           "-a", address, "--exit-on-disconnect"]) as sim:
        sim.wait(timeout=300)
    _check_outputs(tmp_path, beads=1)


def test_pimd_ffdirect_example(tmp_path, model_file):
    text = _prepare("pimd_ffdirect", tmp_path, model_file)
    assert "../../" not in text and "<batch_size>4</batch_size>" in text
    with IPIRun(tmp_path) as sim:
        sim.wait(timeout=300)
    _check_outputs(tmp_path, beads=4)


def test_pes_module_prints_its_path():
    out = subprocess.run([sys.executable, "-m", "rarefly.pes"], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert Path(out).resolve() == Path(rarefly.pes.__file__).resolve()


def test_demo_command(tmp_path, model_file, child_env):
    out = tmp_path / "demo"
    out.mkdir()
    shutil.copy(model_file, out / "model-lastlayer.rfly")  # the demo's cache: no fit here
    proc = subprocess.run([sys.executable, "-m", "rarefly.cli", "demo", "--no-learning",
                           "--steps", str(STEPS), "--out", str(out)], capture_output=True, text=True, env=child_env,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reusing the model" in proc.stdout
    assert f"trajectory        {out / (PREFIX + '.pos_0.xyz')}" in proc.stdout
    assert f"uncertainty log   {out / (PREFIX + '.uncertainty_0')}" in proc.stdout
    summary = re.search(r"summary: (\d+) steps, mean sigma_E ([\d.]+) meV, "
                        r"min confidence ([\d.]+)", proc.stdout)
    assert summary, proc.stdout
    assert int(summary.group(1)) == STEPS + 1
    assert float(summary.group(2)) > 0 and 0 <= float(summary.group(3)) <= 1
    socket_file = re.search(r"on (/tmp/ipi_rarefly-demo-\S+)", proc.stdout).group(1)
    assert not Path(socket_file).exists()  # i-PI removed its socket: nothing left running


def test_demo_stops_everything_when_the_driver_fails(tmp_path, model_file, child_env):
    from ase import Atoms

    out = tmp_path / "demo"
    out.mkdir()
    shutil.copy(model_file, out / "model-lastlayer.rfly")
    structure = tmp_path / "h2s.xyz"
    Atoms("SH2", positions=[[0, 0, 0], [0.97, 0.0, 0.9], [-0.97, 0.0, 0.9]]).write(structure)
    proc = subprocess.run([sys.executable, "-m", "rarefly.cli", "demo", "--no-learning",
                           "--steps", str(STEPS), "--out", str(out), "--structure", str(structure)],
                          capture_output=True, text=True, env=child_env, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "rarefly demo: rarefly driver stopped with exit code 1" in proc.stderr
    assert "contains S, which the model" in proc.stderr  # sulfur: not an element of the model
    socket_file = re.search(r"on (/tmp/ipi_rarefly-demo-\S+)", proc.stdout).group(1)
    assert not Path(socket_file).exists()  # i-PI was stopped too
