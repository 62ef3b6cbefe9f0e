"""examples/metad_nvt end to end: run.sh with the real driver (--cv), i-PI, PLUMED + PyCV.

The example folder is copied next to a link to the repository's driver/ (its relative paths
stay valid), run for a few steps (STEPS) with the session's model (MODEL, see conftest.py),
and must leave COLVAR with finite sigma_E values, HILLS and the PNG plot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("mace")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
STEPS = 60  # PACE=10: six hills


def test_metad_nvt_example_runs_and_plots(tmp_path, model_file, child_env):
    if shutil.which("i-pi", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("i-pi is not installed next to this Python")
    examples = tmp_path / "examples"
    shutil.copytree(REPO / "examples" / "metad_nvt", examples / "metad_nvt",
                    ignore=shutil.ignore_patterns("model.rfly", "COLVAR", "HILLS", "bck.*",
                                                  "simulation.*", "*.png", "*.log"))
    shutil.copy(REPO / "examples" / "plot_colvar.py", examples / "plot_colvar.py")
    shutil.copy(REPO / "examples" / "cv_example.sh", examples / "cv_example.sh")
    (tmp_path / "driver").symlink_to(REPO / "driver")
    env = dict(child_env, STEPS=str(STEPS), MODEL=str(model_file),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{child_env.get('PATH', '')}")
    run = examples / "metad_nvt"
    proc = subprocess.run(["bash", "run.sh"], cwd=run, env=env, capture_output=True,
                          text=True, timeout=85)
    log = (run / "ipi.log").read_text() if (run / "ipi.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + log[-2000:]
    for name in ("COLVAR", "HILLS", "colvar.png"):
        assert (run / name).is_file(), name
        assert f"{run / name}" in proc.stdout  # run.sh says where each output is
    lines = (run / "COLVAR").read_text().splitlines()
    fields = next(ln for ln in lines if ln.startswith("#! FIELDS")).split()[2:]
    assert fields[:3] == ["time", "sigma", "tors"]
    data = np.loadtxt([ln for ln in lines if not ln.startswith("#")], ndmin=2)
    sigma = data[:, fields.index("sigma")]
    assert len(sigma) >= STEPS and np.all(np.isfinite(sigma)) and np.all(sigma > 0)
    hills = [ln for ln in (run / "HILLS").read_text().splitlines() if not ln.startswith("#")]
    assert len(hills) >= STEPS // 10
    assert (run / "colvar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
