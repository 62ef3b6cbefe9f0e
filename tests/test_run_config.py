"""`rarefly run` configurations: bad ones fail fast with one sentence naming the problem."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from rarefly.run_config import ConfigError, load_config, quantity
from rarefly.units import KCAL_MOL_TO_EV


def write(tmp_path, body: str, structure=None) -> str:
    head = f'[system]\nstructure = "{structure}"\n' if structure else ""
    path = tmp_path / "config.toml"
    path.write_text(head + textwrap.dedent(body))
    return str(path)


def fails(path: str, *words: str, check_code: bool = True) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, check_code=check_code)
    message = str(info.value)
    assert "\n" not in message, message
    for w in words:
        assert w in message, message
    return message


def test_a_good_config_converts_units_and_paths(tmp_path, ethanol_xyz):
    path = write(tmp_path, """
        temperature = "600 K"
        timestep = "0.001 ps"
        steps = 400
        [learning]
        epsilon = "0.5 kcal/mol"
        force_threshold = "23.06 kcal/mol/A"
        [budget]
        max_reference_calls = 6
        wall_time = "2 min"
        [output]
        directory = "out"
    """, ethanol_xyz)
    cfg = load_config(path, check_code=False)
    assert cfg.system.temperature == 600.0
    assert cfg.system.timestep == pytest.approx(1.0)
    assert cfg.learning.epsilon == pytest.approx(0.5 * KCAL_MOL_TO_EV)
    assert cfg.learning.force_threshold == pytest.approx(23.06 * KCAL_MOL_TO_EV)
    assert cfg.budget.wall_time == 120.0
    assert cfg.output.directory == tmp_path / "out"
    assert cfg.system.structure == ethanol_xyz.resolve()
    assert not cfg.has_bias


def test_plain_numbers_take_the_default_unit():
    assert quantity(600, {"K": 1.0}, "K", "[system] temperature") == 600.0


def test_unknown_option_is_named_with_its_section(tmp_path, ethanol_xyz):
    path = write(tmp_path, 'temprature = "600 K"\n', ethanol_xyz)
    msg = fails(path, "unknown option 'temprature' in [system]", "temperature")
    assert msg.startswith("unknown option")


def test_unknown_section(tmp_path, ethanol_xyz):
    fails(write(tmp_path, "[trainer]\nx = 1\n", ethanol_xyz), "unknown section [trainer]")


def test_wrong_energy_unit(tmp_path, ethanol_xyz):
    path = write(tmp_path, '[learning]\nepsilon = "0.5 kcal/mole"\n', ethanol_xyz)
    fails(path, "[learning] epsilon", "unknown unit 'kcal/mole'", "kcal/mol")


def test_wrong_temperature_unit(tmp_path, ethanol_xyz):
    path = write(tmp_path, 'temperature = "300 C"\n', ethanol_xyz)
    fails(path, "[system] temperature", "unknown unit 'C'", "use one of K")


def test_wrong_type_and_range(tmp_path, ethanol_xyz):
    fails(write(tmp_path, 'steps = "400"\n', ethanol_xyz), "[system] steps", "whole number")
    fails(write(tmp_path, "[learning]\nlevel = 1.5\n", ethanol_xyz), "[learning] level",
          "between 0 and 1")


def test_missing_structure(tmp_path):
    fails(write(tmp_path, "[system]\nsteps = 10\n"), "[system] structure is missing")
    fails(write(tmp_path, '[system]\nstructure = "nowhere.xyz"\n'), "[system] structure",
          "nowhere.xyz", "does not exist")


def test_missing_reference_code(tmp_path, ethanol_xyz):
    path = write(tmp_path, '[reference]\ncalculator = "nonexistent.module:Calc"\n', ethanol_xyz)
    fails(path, "[reference] calculator", "nonexistent.module:Calc", "cannot be imported")


def test_unknown_reference_name(tmp_path, ethanol_xyz):
    path = write(tmp_path, '[reference]\ncalculator = "vasp"\n', ethanol_xyz)
    fails(path, "[reference] calculator", "'vasp'", "module:Class")


def test_invalid_executor(tmp_path, ethanol_xyz):
    path = write(tmp_path, '[labelling]\nexecutor = "dask"\n', ethanol_xyz)
    fails(path, "[labelling] executor = 'dask'", "local, threads, slurm", check_code=False)


def test_unknown_provider_option(tmp_path, ethanol_xyz):
    path = write(tmp_path, '[labelling]\nexecutor = "local"\noptions = { partition = "x" }\n',
                 ethanol_xyz)
    fails(path, "unknown option 'partition' in [labelling.options]", "worker_init",
          check_code=False)


def test_unreachable_slurm_provider(tmp_path, ethanol_xyz):
    pytest.importorskip("parsl")
    no_address = write(tmp_path, '[labelling]\nexecutor = "slurm"\n', ethanol_xyz)
    fails(no_address, "[labelling.options] address is missing")
    foreign = write(tmp_path, '[labelling]\nexecutor = "slurm"\n'
                              'options = { address = "192.0.2.1" }\n', ethanol_xyz)
    fails(foreign, "address = '192.0.2.1' is not an address of this machine")
    typo = write(tmp_path, '[labelling]\nexecutor = "slurm"\n'
                           'options = { address = "127.0.0.1", partiton = "cpu" }\n', ethanol_xyz)
    fails(typo, "unknown option 'partiton' in [labelling.options]", "partition")


def test_not_toml(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[system\nstructure = 1\n")
    fails(str(path), "is not valid TOML")


def test_cli_prints_one_sentence_and_exits_2(tmp_path, ethanol_xyz, child_env):
    path = write(tmp_path, '[learning]\nepsilon = "1 kcal"\n', ethanol_xyz)
    proc = subprocess.run([sys.executable, "-m", "rarefly.cli", "run", path], env=child_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"rarefly run: [learning] epsilon = '1 kcal': unknown unit 'kcal'; use one "
                     f"of eV, meV, kcal/mol, kJ/mol, Ha, hartree"], proc.stderr
    assert not (tmp_path / "rarefly-run").exists()


def test_a_file_that_is_not_a_model(tmp_path, ethanol_xyz):
    fake = tmp_path / "model.rfly"
    fake.write_text("not a model")
    path = write(tmp_path, f'[model]\nfile = "{fake}"\n', ethanol_xyz)
    fails(path, "[model] file", str(fake), "not a rarefly model file")


def test_the_example_readme_documents_every_key():
    from pathlib import Path

    from rarefly.run_config import SECTIONS, field_docs

    readme = (Path(__file__).parents[1] / "examples" / "onthefly" / "README.md").read_text()
    for name, cls in SECTIONS.items():
        assert f"**[{name}]**" in readme, name
        for key in field_docs(cls):
            assert f"| `{key}` |" in readme, f"[{name}] {key}"


def test_the_example_config_is_valid():
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "examples" / "onthefly" / "config.toml",
                      check_code=False)
    assert cfg.reference.calculator == "xtb" and cfg.budget.max_reference_calls


# ------------------------------------------------------------------ the demo's configuration

def test_demo_config_is_a_valid_run_config_for_its_folder(tmp_path):
    from rarefly.demo import demo_config
    from rarefly.foundation import DATA_DIR

    (tmp_path / "model-lastlayer.rfly").write_bytes(b"")  # only its existence is checked
    config = tmp_path / "config.toml"
    config.write_text(demo_config(DATA_DIR / "ethanol.xyz", "model-lastlayer.rfly", steps=50,
                                  max_reference_calls=2))
    cfg = load_config(config, check_code=False)
    assert cfg.output.directory == tmp_path
    assert cfg.model.file == tmp_path / "model-lastlayer.rfly"
    assert cfg.system.structure == DATA_DIR / "ethanol.xyz"
    assert cfg.system.steps == 50 and cfg.budget.max_reference_calls == 2
    assert cfg.reference.calculator == "xtb" and cfg.learning.holdout_frames > 0
    assert not cfg.learning.align_energies
    assert cfg.learning.backbone_steps > 0
    assert cfg.learning.backbone_replay == DATA_DIR / "foundation_train.xyz"
    # the shipped file itself is a valid configuration too
    shipped = load_config(DATA_DIR / "demo.toml", check_code=False)
    assert shipped.budget.max_reference_calls == 24 and shipped.model.file is None


def test_demo_moves_an_earlier_run_aside(tmp_path):
    from rarefly.demo import DemoError, set_aside

    out = tmp_path / "demo-run"
    assert set_aside(out) is None                      # nothing there
    out.mkdir()
    (out / "model-lastlayer.rfly").write_text("cache")
    assert set_aside(out) is None                      # only the model cache: not a run
    (out / "run.json").write_text("{}")
    assert set_aside(out) == tmp_path / "demo-run.previous"
    assert not out.exists() and (tmp_path / "demo-run.previous" / "run.json").exists()
    out.mkdir()
    (out / "simulation.out").write_text("# i-PI")
    assert set_aside(out) == tmp_path / "demo-run.previous"   # the older one is replaced
    assert sorted(p.name for p in (tmp_path / "demo-run.previous").iterdir()) == ["simulation.out"]
    # a DIR.previous that is not an earlier run is never deleted
    out.mkdir()
    (out / "run.json").write_text("{}")
    other = tmp_path / "demo-run.previous"
    for p in other.iterdir():
        p.unlink()
    (other / "thesis.tex").write_text("keep me")
    with pytest.raises(DemoError, match="exists but is not an earlier demo run"):
        set_aside(out)
    assert (other / "thesis.tex").exists() and (out / "run.json").exists()


def test_restart_input_adds_total_steps_that_ipi_left_out():
    # i-PI writes no <total_steps> into RESTART when it equals its default, 1000
    from rarefly.run import RunError, restart_input

    text = ("<simulation verbosity='low'><step>90</step><ffsocket mode='unix' name='rarefly'>"
            "<address>old</address></ffsocket></simulation>")
    new, step = restart_input(text, "new-address", 1000)
    assert step == 90
    assert "<address>new-address</address>" in new and "<total_steps>1000</total_steps>" in new
    new, _ = restart_input(new, "again", 2000)
    assert new.count("<total_steps>") == 1 and "<total_steps>2000</total_steps>" in new
    with pytest.raises(RunError, match="not from `rarefly run`"):
        restart_input("<simulation><step>3</step></simulation>", "x", 10)


def test_guarantee_mode_driver_gets_what_is_left_of_the_reference_budget(tmp_path, ethanol_xyz):
    # the driver labels flagged steps itself: its reference calls count toward the budget
    import json

    from rarefly.run import OnTheFlyRun

    cfg = load_config(write(tmp_path, """
        [learning]
        mode = "guarantee"
        [budget]
        max_reference_calls = 5
    """, structure=ethanol_xyz), check_code=False)
    run = OnTheFlyRun(cfg)
    run.init = ethanol_xyz
    cmd = run.driver_command()
    assert cmd[cmd.index("--mode") + 1] == "guarantee"
    assert cmd[cmd.index("--max-labels") + 1] == "5"
    run.files.root.mkdir(parents=True)
    run.files.events.write_text("".join(json.dumps({"event": e}) + "\n"
                                        for e in ("start", "label", "label", "publish")))
    cmd = run.driver_command()                      # a restart: 2 labels already recorded
    assert cmd[cmd.index("--max-labels") + 1] == "3"
    cfg.learning.mode = "async"
    assert "--max-labels" not in run.driver_command()


def test_backbone_refinement_reaches_the_trainer_and_bad_values_are_refused(tmp_path, ethanol_xyz):
    from rarefly.run import OnTheFlyRun

    cfg = load_config(write(tmp_path, f"""
        [learning]
        backbone_steps = 150
        backbone_every = 5
        backbone_replay = "{ethanol_xyz}"
    """, structure=ethanol_xyz), check_code=False)
    run = OnTheFlyRun(cfg)
    run.holdout = None                          # set when the run starts
    cmd = run.trainer_command()
    assert cmd[cmd.index("--backbone-steps") + 1] == "150"
    assert cmd[cmd.index("--backbone-every") + 1] == "5"
    assert cmd[cmd.index("--backbone-replay") + 1] == str(ethanol_xyz)
    cfg.learning.backbone_steps = 0
    assert "--backbone-steps" not in run.trainer_command()
    fails(write(tmp_path, "[learning]\nbackbone_steps = -1\n", structure=ethanol_xyz),
          "[learning] backbone_steps", "zero or more", check_code=False)
    fails(write(tmp_path, "[learning]\nbackbone_every = 0\n", structure=ethanol_xyz),
          "[learning] backbone_every", "positive", check_code=False)
    fails(write(tmp_path, "[learning]\nbackbone_replay = \"nowhere.xyz\"\n", structure=ethanol_xyz),
          "[learning] backbone_replay", check_code=False)


def test_calls_while_refining_reaches_the_trainer_and_its_parser(tmp_path, ethanol_xyz):
    run, cmd, args = _trainer_command(tmp_path, ethanol_xyz,
                                      "backbone_steps = 10\ncalls_while_refining = 0")
    assert cmd[cmd.index("--calls-while-refining") + 1] == "0"
    assert args.calls_while_refining == 0
    run, cmd, args = _trainer_command(tmp_path, ethanol_xyz, "backbone_steps = 10")
    assert "--calls-while-refining" not in cmd and args.calls_while_refining is None
    fails(write(tmp_path, "[learning]\ncalls_while_refining = -1\n", structure=ethanol_xyz),
          "[learning] calls_while_refining", "zero or more", check_code=False)


def _trainer_command(tmp_path, ethanol_xyz, learning: str):
    """The config's [learning] lines -> (run, trainer command line, what `rarefly trainer` parses)."""
    import argparse

    from rarefly.run import OnTheFlyRun
    from rarefly.trainer_cli import configure_parser

    cfg = load_config(write(tmp_path, f"[learning]\n{learning}\n", structure=ethanol_xyz),
                      check_code=False)
    run = OnTheFlyRun(cfg)
    run.holdout = None
    cmd = run.trainer_command()
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return run, cmd, parser.parse_args(cmd[cmd.index("trainer") + 1:])


def test_rate_cap_reaches_the_trainer_and_its_parser(tmp_path, ethanol_xyz):
    run, cmd, args = _trainer_command(tmp_path, ethanol_xyz, "min_step_gap = 40")
    assert cmd[cmd.index("--min-step-gap") + 1] == "40"
    assert args.min_step_gap == 40
    run.cfg.learning.min_step_gap = 0
    assert "--min-step-gap" not in run.trainer_command()
    fails(write(tmp_path, "[learning]\nmin_step_gap = -5\n", structure=ethanol_xyz),
          "[learning] min_step_gap", "zero or more", check_code=False)


def test_audit_share_reaches_the_trainer_and_its_parser(tmp_path, ethanol_xyz):
    import argparse

    from rarefly.trainer.selection import SelectionPolicy
    from rarefly.trainer_cli import configure_parser

    run, cmd, args = _trainer_command(tmp_path, ethanol_xyz, "audit_share = 0.5")
    assert cmd[cmd.index("--audit-share") + 1] == "0.5" and args.audit_share == 0.5
    run.cfg.learning.audit_share = SelectionPolicy.audit_share
    assert "--audit-share" not in run.trainer_command()
    fails(write(tmp_path, "[learning]\naudit_share = 1.5\n", structure=ethanol_xyz),
          "[learning] audit_share", "between 0 and 1", check_code=False)
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--db", "d", "--audit-share", "2"])


def test_duplicate_distance_reaches_the_trainer_in_angstrom(tmp_path, ethanol_xyz):
    from rarefly.trainer.selection import SelectionPolicy

    run, cmd, args = _trainer_command(tmp_path, ethanol_xyz, 'duplicate_distance = "0.1 Bohr"')
    assert args.duplicate_distance == pytest.approx(0.1 * 0.529177, rel=1e-5)
    run, cmd, args = _trainer_command(tmp_path, ethanol_xyz, "duplicate_distance = 0.05")
    assert args.duplicate_distance == 0.05
    run.cfg.learning.duplicate_distance = SelectionPolicy.dedup_tol
    assert "--duplicate-distance" not in run.trainer_command()
    fails(write(tmp_path, "[learning]\nduplicate_distance = -0.1\n", structure=ethanol_xyz),
          "[learning] duplicate_distance", "zero or more", check_code=False)
    fails(write(tmp_path, '[learning]\nduplicate_distance = "0.1 eV"\n', structure=ethanol_xyz),
          "[learning] duplicate_distance", "eV", check_code=False)


def test_calibration_memory_reaches_the_trainer_and_its_config(tmp_path, ethanol_xyz):
    from rarefly.trainer.loop import TrainerConfig

    run, cmd, args = _trainer_command(tmp_path, ethanol_xyz, "calibration_memory = 15")
    assert cmd[cmd.index("--calibration-memory") + 1] == "15"
    assert args.calibration_memory == 15
    assert TrainerConfig(model="m", database="d", endpoint="e").calibration_memory == 0
    run.cfg.learning.calibration_memory = 0
    assert "--calibration-memory" not in run.trainer_command()
    fails(write(tmp_path, "[learning]\ncalibration_memory = -1\n", structure=ethanol_xyz),
          "[learning] calibration_memory", "zero or more", check_code=False)


def test_max_label_force_reaches_the_trainer_in_ev_per_angstrom(tmp_path, ethanol_xyz):
    from rarefly.trainer.loop import TrainerConfig
    from rarefly.trainer.reference import DEFAULT_MAX_LABEL_FORCE

    run, cmd, args = _trainer_command(tmp_path, ethanol_xyz, 'max_label_force = "1 Ha/Bohr"')
    assert args.max_label_force == pytest.approx(51.422, rel=1e-4)
    run, cmd, args = _trainer_command(tmp_path, ethanol_xyz, "max_label_force = 0")
    assert args.max_label_force == 0                  # 0: no limit (None in TrainerConfig)
    assert TrainerConfig(model="m", database="d", endpoint="e").max_label_force == DEFAULT_MAX_LABEL_FORCE
    run.cfg.learning.max_label_force = DEFAULT_MAX_LABEL_FORCE
    assert "--max-label-force" not in run.trainer_command()
    fails(write(tmp_path, "[learning]\nmax_label_force = -1\n", structure=ethanol_xyz),
          "[learning] max_label_force", "zero or more", check_code=False)
    fails(write(tmp_path, '[learning]\nmax_label_force = "3 eV"\n', structure=ethanol_xyz),
          "[learning] max_label_force", "eV", check_code=False)


def test_a_shipped_bond_wall_input_gets_the_bonds_of_the_system_structure(tmp_path, ethanol_xyz):
    """[bias] plumed_file = "metad_bond_walls.dat" (a name in plumed_inputs/): `rarefly run`
    fills its bond lists from [system] structure."""
    from rarefly.run import render_plumed

    cfg = load_config(write(tmp_path, '[bias]\nplumed_file = "metad_bond_walls.dat"\n',
                            structure=ethanol_xyz), check_code=False)
    assert cfg.bias.plumed_file.parent.name == "plumed_inputs"
    text = render_plumed(cfg, restart=False)
    xh = next(line for line in text.splitlines() if line.startswith("xh: DISTANCES"))
    heavy = next(line for line in text.splitlines() if line.startswith("heavy: DISTANCES"))
    assert xh.count("ATOMS") == 6 and heavy.count("ATOMS") == 2 and "__" not in text
    assert render_plumed(cfg, restart=True).startswith("RESTART\n")


def test_cv_calibration_reaches_the_driver_and_is_validated(tmp_path, ethanol_xyz):
    from pathlib import Path

    from rarefly.run import OnTheFlyRun

    plumed = Path(__file__).parents[1] / "plumed_inputs" / "metad.dat"
    for line, want in (("", "start"), ('cv_calibration = "current"', "current")):
        cfg = load_config(write(tmp_path, f'[bias]\nplumed_file = "{plumed}"\n{line}\n',
                                structure=ethanol_xyz), check_code=False)
        run = OnTheFlyRun(cfg)
        run.init = ethanol_xyz
        cmd = run.driver_command()
        assert cmd[cmd.index("--cv-calibration") + 1] == want
    fails(write(tmp_path, f'[bias]\nplumed_file = "{plumed}"\ncv_calibration = "frozen"\n',
                structure=ethanol_xyz), "[bias] cv_calibration", "frozen", check_code=False)


@pytest.mark.parametrize("key, bad", [("rescore_flagged", "0"), ("served_calibration", '"yes"')])
def test_trainer_switches_are_on_by_default_and_can_be_switched_off(tmp_path, ethanol_xyz, key, bad):
    flag = "--no-" + key.replace("_", "-")
    run, cmd, args = _trainer_command(tmp_path, ethanol_xyz, f"{key} = false")
    assert flag in cmd and getattr(args, "no_" + key)
    setattr(run.cfg.learning, key, True)
    assert flag not in run.trainer_command()
    fails(write(tmp_path, f"[learning]\n{key} = {bad}\n", structure=ethanol_xyz),
          f"[learning] {key}", check_code=False)


@pytest.mark.parametrize("key, flag, bad", [
    ("replay_energies", "--replay-energies", "1"),
    ("recalibrate_after_refinement", "--recalibrate-after-refinement", '"yes"'),
])
def test_learning_switches_reach_the_trainer(tmp_path, ethanol_xyz, key, flag, bad):
    run, cmd, args = _trainer_command(tmp_path, ethanol_xyz, f"{key} = true")
    assert flag in cmd and getattr(args, key)
    setattr(run.cfg.learning, key, False)
    assert flag not in run.trainer_command()
    fails(write(tmp_path, f"[learning]\n{key} = {bad}\n", structure=ethanol_xyz),
          f"[learning] {key}", check_code=False)


def test_calibration_tilt_is_written_into_the_runs_model(tmp_path, ethanol_xyz, model_file):
    """[learning] calibration_tilt puts k_B T x beads into the run's model file, where the
    driver's confidence and the trainer's updates read it; switched off, it is taken out."""
    from ase.units import kB

    from rarefly.model_file import load_model_file
    from rarefly.posterior import load_posterior
    from rarefly.run import Files, prepare_model

    def cfg(tilt: bool):
        return load_config(write(tmp_path, f"""
            temperature = "400 K"
            beads = 2
            [model]
            file = "{model_file}"
            [learning]
            calibration_tilt = {"true" if tilt else "false"}
            [output]
            directory = "out"
        """, ethanol_xyz), check_code=False)

    files = Files(tmp_path / "out")
    files.root.mkdir()
    prepare_model(cfg(True), files, fresh=True)
    assert load_model_file(files.model)["calibration"]["energy"]["tilt_kT"] == pytest.approx(kB * 800)
    post = load_posterior(files.model)
    assert post.calibration.energy.tilt_kT == pytest.approx(kB * 800)
    plain = load_posterior(model_file)
    assert plain.calibration.energy.tilt_kT is None
    from ase.io import read

    from rarefly.prediction import Structure
    s = Structure.from_atoms(read(ethanol_xyz))
    assert post.predict([s])[0].confidence < plain.predict([s])[0].confidence
    prepare_model(cfg(False), files, fresh=False)
    assert "tilt_kT" not in load_model_file(files.model)["calibration"]["energy"]
