"""`rarefly run` end to end: i-PI + driver + trainer from one config, the report, --restart.

The first invocation is the default `rarefly demo` (its shipped configuration, the folder
it writes, the summary it prints; the model cache is seeded, so nothing is fitted); the
restart continues that folder with `rarefly run DIR/config.toml --restart`. A tiny budget (2
reference calls with GFN2-xTB, then 1 more after the restart) keeps it around a minute and a
half on two shared cores.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

CONFIG = """\
[system]
structure = "{structure}"
temperature = "600 K"
timestep = "0.5 fs"
steps = {steps}

[model]
file = "{model}"

[learning]
epsilon = "0.5 kcal/mol"
audit_fraction = 0.2
holdout_frames = 2

[reference]
calculator = "xtb"

[budget]
max_reference_calls = {calls}
wall_time = "150 s"

[output]
directory = "run"
"""

PNGS = ("trajectory.png", "reference_calls.png", "calibration.png", "learning_curve.png")


def _run(config, env, *extra):
    return subprocess.run([sys.executable, "-m", "rarefly.cli", "run", str(config),
                           "--no-progress", *extra],
                          env=env, capture_output=True, text=True, timeout=240)


def _events(run_dir):
    return [json.loads(line) for line in open(run_dir / "frames.jsonl")]


def _rows(run_dir):
    from ase.db import connect

    db = connect(str(run_dir / "frames.db"))
    return [(r.frame_id, r.state) for r in db.select()]


def test_demo_learns_reports_and_restarts(tmp_path, model_file, child_env):
    import re
    import shutil

    run_dir = tmp_path / "demo-run"
    run_dir.mkdir()
    shutil.copy(model_file, run_dir / "model-lastlayer.rfly")  # the demo's cache: no fit here
    first = subprocess.run([sys.executable, "-m", "rarefly.cli", "demo", "--out", str(run_dir),
                            "--max-reference-calls", "2", "--no-progress"],
                           env=child_env, capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "reusing the model" in first.stdout
    assert "reference budget spent" in first.stdout, first.stdout
    assert f"rarefly run: report {run_dir / 'report.md'}" in first.stdout
    # the demo's summary: where things are, and how the held-out error changed
    assert f"trajectory        {run_dir / 'simulation.pos_0.xyz'}" in first.stdout
    assert f"uncertainty log   {run_dir / 'simulation.uncertainty_0'}" in first.stdout
    assert f"report            {run_dir / 'report.md'}" in first.stdout
    change = re.search(r"held-out error: energy RMSE ([\d.]+) -> ([\d.]+) meV, force RMSE "
                       r"([\d.]+) -> ([\d.]+) meV/A \(model v(\d+) -> v(\d+), 2 reference calls\)",
                       first.stdout)
    assert change, first.stdout
    assert int(change.group(6)) > int(change.group(5))
    config = run_dir / "config.toml"
    assert 'directory = "."' in config.read_text()
    page = (run_dir / "report.md").read_text()
    for png in PNGS:
        assert (run_dir / png).stat().st_size > 10_000, png
        assert f"]({png})" in page
    events = _events(run_dir)
    labels = [e for e in events if e["event"] == "label"]
    assert len(labels) == 2
    assert [e for e in events if e["event"] == "publish"], "no model version published"
    assert "| reference calls | 2 (" in page
    rows_before = _rows(run_dir)
    steps_before = json.loads((run_dir / "run.json").read_text())

    # a second start without --restart refuses to overwrite the run
    again = _run(config, child_env)
    assert again.returncode == 1
    assert "already holds a run; continue it with --restart" in again.stderr

    config.write_text(config.read_text().replace("max_reference_calls = 2",
                                                 "max_reference_calls = 3"))
    second = _run(config, child_env, "--restart")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "continuing in" in second.stdout
    events = _events(run_dir)
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 2 and starts[1]["labelled"] == 2
    assert len([e for e in events if e["event"] == "label"]) == 3
    rows = _rows(run_dir)
    ids = [frame_id for frame_id, _ in rows]
    assert len(ids) == len(set(ids)), "a frame is stored twice"
    assert {i for i, _ in rows_before} <= set(ids), "rows of the first run were lost"
    labelled_before = {i for i, s in rows_before if s == "labelled"}
    assert labelled_before <= {i for i, s in rows if s == "labelled"}
    manifest = json.loads((run_dir / "run.json").read_text())
    assert len(manifest["segments"]) == 2
    assert manifest["segments"][1]["start_step"] > 0, "i-PI did not continue from RESTART"
    assert len(steps_before["segments"]) == 1


BROKEN_TEMPLATE = """<simulation verbosity="low">
  ${output}
  <total_steps>${steps}</total_steps>
  ${forcefields}
  <system>
    <initialize nbeads="${beads}"><file mode="ase">${structure}</file>${cell}</initialize>
    <forces><force forcefield="rarefly"/></forces>
    <motion mode="no-such-motion"/>
  </system>
</simulation>
"""


def test_a_failing_process_stops_the_run_with_one_sentence(tmp_path, model_file, ethanol_xyz,
                                                            child_env):
    template = tmp_path / "broken.xml.in"
    template.write_text(BROKEN_TEMPLATE)
    config = tmp_path / "config.toml"
    config.write_text(CONFIG.format(structure=ethanol_xyz, model=model_file, steps=100, calls=2)
                      .replace('steps = 100\n', f'steps = 100\nipi_template = "{template}"\n'))
    proc = _run(config, child_env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    run_dir = tmp_path / "run"
    assert f"rarefly run: i-PI stopped with exit code 1" in proc.stderr, proc.stderr
    assert f"see {run_dir / 'ipi.log'}" in proc.stderr
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["segments"][0]["failure"].startswith("i-PI stopped")
    left = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True)
    assert left.stdout.strip() == "", "processes of the run are still alive"
