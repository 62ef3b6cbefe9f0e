"""On-the-fly learning end to end: i-PI + `rarefly driver --learn` + `rarefly trainer`
(Parsl local workers, GFN2-xTB reference, ASE database), starting from the shipped model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from _trainer_io import socket_md_xml
from rarefly.foundation import DATA_DIR

pytestmark = pytest.mark.slow

OUTPUTS = """    <properties filename="out" stride="10"> [ step, temperature{kelvin}, potential{electronvolt} ] </properties>
    <trajectory filename="version" stride="1" extra_type="model_version"> extras </trajectory>"""


def _holdout(path, n=6):
    """Held-out reference frames: hot ethanol geometries labelled by GFN2-xTB."""
    from ase.io import read, write
    from tblite.ase import TBLite

    base = read(DATA_DIR / "ethanol.xyz")
    out = []
    for k in range(n):
        a = base.copy()
        a.rattle(0.04, seed=1000 + k)
        a.calc = TBLite(method="GFN2-xTB", verbosity=0)
        e, f = a.get_potential_energy(), a.get_forces()
        a.calc = None
        a.info["REF_energy"] = e
        a.arrays["REF_forces"] = f
        out.append(a)
    write(path, out)


def _events(path):
    return [json.loads(line) for line in open(path)] if path.exists() else []


def test_on_the_fly_learning_publishes_versions_the_driver_uses(tmp_path, model_file, child_env):
    model = tmp_path / "model.rfly"
    shutil.copy(model_file, model)
    holdout = tmp_path / "holdout.xyz"
    _holdout(holdout)
    name = f"rf_otf_{os.getpid()}_{int(time.time() * 1000) % 100000}"
    endpoint = f"ipc://{tmp_path}/learn"
    rarefly = [sys.executable, "-m", "rarefly.cli"]
    trainer = subprocess.Popen(
        rarefly + ["trainer", "--model", str(model), "--db", str(tmp_path / "frames.db"),
                   "--endpoint", endpoint, "--reference", "xtb", "--executor", "local",
                   "--max-labels", "4", "--holdout", str(holdout), "--no-align",
                   "--max-seconds", "240"],
        cwd=tmp_path, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (tmp_path / "input.xml").write_text(socket_md_xml(
        OUTPUTS, steps=400, socket=name, xyz=DATA_DIR / "ethanol.xyz", temperature=600, seed=7))
    ipi = subprocess.Popen([shutil.which("i-pi") or str(__import__("pathlib").Path(sys.executable).parent / "i-pi"),
                            "input.xml"], cwd=tmp_path, env=child_env,
                           stdout=open(tmp_path / "ipi.log", "w"), stderr=subprocess.STDOUT)
    try:
        time.sleep(2)
        drv = subprocess.run(
            rarefly + ["driver", "--model", str(model), "--template", str(DATA_DIR / "ethanol.xyz"),
                       "-u", "-a", name, "--learn", endpoint, "--exit-on-disconnect", "-q"],
            cwd=tmp_path, env=child_env, capture_output=True, text=True, timeout=300)
        assert drv.returncode == 0, drv.stderr[-6000:]
        out, _ = trainer.communicate(timeout=280)
    finally:
        for p in (ipi, trainer):
            if p.poll() is None:
                p.kill()
    assert trainer.returncode == 0, out
    events = _events(tmp_path / "frames.jsonl")
    labels = [e for e in events if e["event"] == "label"]
    publishes = [e for e in events if e["event"] == "publish"]
    assert len(labels) >= 4, out
    assert len(publishes) >= 2
    # the running driver picked the new versions up without reconnecting
    versions = [int(float(line.split()[0])) for line in open(tmp_path / "sim.version_0")
                if "#" not in line and line.strip()]
    from rarefly.model_file import load_model_file

    v0 = load_model_file(model_file)["model_version"]
    assert versions[0] == v0 and max(versions) >= v0 + 2
    assert versions == sorted(versions)
    # every label is in the database exactly once
    from ase.db import connect

    db = connect(str(tmp_path / "frames.db"))
    ids = [r.frame_id for r in db.select(state="labelled")]
    assert len(ids) == len(set(ids)) == len(labels)
    # each flagged frame carries the driver's criterion, so that a newer model can be asked
    flagged = list(db.select(origin="flagged"))
    assert flagged and all(r.get("flag_level") == 0.95 and r.get("flag_epsilon", 0.0) > 0.0
                           for r in flagged)
    for r in db.select(state="skipped"):
        assert r.reason == "near-duplicate" or r.reason.startswith("trusted by model version"), r.reason
    # the model got better on held-out reference frames
    start = next(e for e in events if e["event"] == "holdout")
    assert publishes[-1]["holdout_energy_rmse"] < start["holdout_energy_rmse"]
