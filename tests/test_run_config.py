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
