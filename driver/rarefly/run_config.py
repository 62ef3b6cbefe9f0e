"""The configuration of ``rarefly run``: one TOML file, typed, documented, validated at load.

Every section is a dataclass below; the string under each field is its documentation (the
table in ``examples/onthefly/README.md`` repeats it). :func:`load_config` reads the file and
returns a :class:`RunConfig` with every quantity in rarefly's units (K, fs, s, eV, eV/A) and
every path absolute, or raises :class:`ConfigError` with one sentence naming the bad key::

    unknown option 'temprature' in [system]; the options are structure, temperature, ...
    [learning] epsilon = "0.5 kcal/mole": unknown unit 'kcal/mole'; use one of eV, meV, ...

Quantities are written as ``"VALUE UNIT"`` strings (``temperature = "600 K"``,
``epsilon = "0.5 kcal/mol"``) or as plain numbers in the default unit of the field.
Relative paths are relative to the folder of the configuration file.

Checks done here, before anything starts: unknown sections and options, types, ranges and
units; that the structure, model, template and PLUMED files exist; that the reference code
can be created (:func:`rarefly.trainer.reference.check_reference`); that the Parsl executor
and its provider options make sense on this machine (Slurm: ``sbatch`` on PATH, an
``address`` of this machine, options the provider takes).
"""

from __future__ import annotations

import dataclasses
import inspect
import shutil
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ase import units as _ase_units

from rarefly.cv_service import CV_CALIBRATIONS
from rarefly.trainer.reference import DEFAULT_MAX_LABEL_FORCE
from rarefly.trainer.selection import SelectionPolicy
from rarefly.units import ENERGY_UNITS, energy_to_ev

#: folder of the PLUMED inputs shipped with rarefly (a [bias] plumed_file may name one)
PLUMED_INPUTS = Path(__file__).resolve().parents[2] / "plumed_inputs"

TEMPERATURE_UNITS = {"K": 1.0}
#: -> fs
TIME_UNITS = {"fs": 1.0, "ps": 1000.0}
#: -> s
WALL_TIME_UNITS = {"s": 1.0, "min": 60.0, "h": 3600.0}
#: -> Angstrom (force units are ENERGY/LENGTH, e.g. "eV/A", "kcal/mol/A")
LENGTH_UNITS = {"A": 1.0, "Angstrom": 1.0, "Bohr": _ase_units.Bohr, "nm": _ase_units.nm}

EXECUTORS = ("local", "threads", "slurm")
MODES = ("async", "guarantee")
KINDS = ("lastlayer", "sghmc")


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one sentence naming the key."""


# ----------------------------------------------------------------------------- sections

@dataclass
class SystemConfig:
    """[system]: what i-PI simulates (NVT, SVR thermostat; PILE-L with beads > 1)."""

    structure: Path = None  # type: ignore[assignment]
    """Required. The starting structure, any ASE-readable file (extxyz, POSCAR, CIF ...);
    its atoms, in this order, are the system. A molecule (no cell) gets a 20 A box."""
    temperature: float = 300.0
    """Thermostat and initial-velocity temperature; unit K (default "300 K")."""
    timestep: float = 0.5
    """MD time step; units fs or ps (default "0.5 fs")."""
    steps: int = 1000
    """Total MD steps of the run, counted from step 0 across restarts (default 1000)."""
    beads: int = 1
    """Path-integral beads; the driver evaluates all beads in one batched call (default 1)."""
    seed: int = 31415
    """Seed of i-PI's random numbers (initial velocities, thermostat) (default 31415)."""
    ipi_template: Path | None = None
    """Optional i-PI input template replacing rarefly's ``data/run_template.xml.in``; it
    must contain the ${forcefields} and ${output} placeholders (see that file)."""


@dataclass
class ModelConfig:
    """[model]: the posterior the run starts from (copied into [output] directory)."""

    file: Path | None = None
    """A rarefly model file (.rfly, from `rarefly fit`). When absent, a `kind` posterior is
    fitted on the foundation model's shipped data once, as `rarefly demo` does."""
    foundation: str = "small"
    """MACE foundation checkpoint for that fit, when `file` is absent (default "small",
    the embedded GFN2-xTB model)."""
    kind: str = "lastlayer"
    """Posterior kind for that fit: lastlayer or sghmc (default lastlayer)."""
    device: str = "cpu"
    """Torch device of the driver: cpu, cuda or cuda:N (default cpu)."""


@dataclass
class BiasConfig:
    """[bias]: an optional PLUMED bias on the uncertainty CV (i-PI's <ffplumed> + PyCV)."""

    plumed_file: Path | None = None
    """A PLUMED input using rarefly's CV: a path, or the name of a file in plumed_inputs/
    (e.g. "metad.dat"). Absent: unbiased MD."""
    values: dict[str, str] = field(default_factory=dict)
    """Values of the input's __KEY__ placeholders other than __RAREFLY_PYCV__ and the bond
    lists of metad_bond_walls.dat (filled from [system] structure)."""
    cv_calibration: str = "start"
    """Which Student-t calibration the CV sigma_E carries: "start" keeps that of the model the
    run (or its restart) began with, so that the trainer's new versions do not rescale the CV
    under the bias; "current" follows the model in use, like the extras (default start)."""


@dataclass
class LearningConfig:
    """[learning]: which frames the driver flags, and how the trainer learns from them."""

    epsilon: float | None = None
    """Energy tolerance of the confidence P(|E error| < epsilon); energy units eV, meV,
    kcal/mol, kJ/mol, Ha (default: the model file's value, 0.5 kcal/mol for fresh fits)."""
    level: float = 0.95
    """Flag a frame when its confidence is below this (default 0.95)."""
    force_threshold: float | None = None
    """Also flag a frame when an atom's force uncertainty exceeds this; units ENERGY/LENGTH,
    e.g. "1.0 eV/A" (default: off)."""
    audit_fraction: float = 0.02
    """Random fraction of unflagged frames sent to the trainer to measure calibration
    (default 0.02)."""
    audit_share: float = SelectionPolicy.audit_share
    """At most this fraction of the reference calls go to those audit frames, the newest
    first; the others wait (default 0.2; 1: no bound; 0: none labelled). Ranked first and
    unbounded, they took 38 of 46 calls in benchmarks/bench_onthefly.out run 73."""
    mode: str = "async"
    """async: the MD goes on with the current model; guarantee: a flagged step gets the
    reference energy and forces, computed by the driver (default async)."""
    update_every: int = 1
    """Labels per posterior update and published model version (default 1)."""
    backbone_steps: int = 0
    """lastlayer models: Adam steps on all MACE weights every ``backbone_every`` labels, after
    which the readout posterior is conditioned on every label again (default 0: readout-only
    learning, exact and fast; a few hundred to 1500 let the model learn what its readout
    cannot: on alanine dipeptide 1500 at lr 1e-3 beat 150, benchmarks/bench_onthefly.out run
    28)."""
    backbone_every: int = 10
    """Labels between backbone refinements (default 10)."""
    calls_while_refining: int | None = None
    """At most this many flagged frames go to the reference while a backbone refinement runs;
    the others stay queued and the refined model asks them again (``rescore_flagged``), so a
    frame it trusts costs no call (default: ``backbone_every``, the labels the next refinement
    takes; 0: none; audit frames are not held). Without it the calls outran the learning: in
    benchmarks/bench_onthefly.out runs 46-47 a 90 s refinement saw 14-25 calls."""
    backbone_replay: Path | None = None
    """extxyz or ASE db of the frames the starting model was fitted on: half of every
    refinement batch, so that new labels do not undo the old fit (default: none)."""
    duplicate_distance: float = SelectionPolicy.dedup_tol
    """Near-duplicate test: a queued frame is not labelled when its sorted interatomic distances
    differ from those of a frame already chosen by less than this, RMS; length units A, Bohr,
    nm (default 0.02 A). At 300 K MD frames 10 fs apart differ by ~0.05 A and uncorrelated
    frames of one basin by ~0.1 A, so 0.05 A drops the frames of one vibration."""
    min_step_gap: int = 0
    """Rate cap: the trainer labels at most one flagged frame per this many MD steps of a
    walker, the most uncertain one of each window: frames closer than this to the last label
    are refused; the window is this many steps from the first flagged frame after that, and
    its most uncertain frame is taken once the walker is past it (default 0: no cap; audit
    frames are not capped)."""
    rescore_flagged: bool = True
    """A frame flagged by an older model version goes to the reference only if the model the
    trainer holds still flags it (by the driver's level, force threshold and epsilon); during a
    backbone refinement flagged frames are labelled as they come (default true; false: every
    flagged frame is labelled, as the seed paper does)."""
    served_calibration: bool = True
    """While a backbone refinement runs (minutes on a CPU), the served version's energy
    calibration takes the residuals of the labels that finish meanwhile (the served model's
    own predictions, sent with the frames) and is republished as a new version with the same
    weights, at most every 10 s; the refined model follows it (default true; false: the
    calibration waits for the refinement). In bench_onthefly's runs 74-81 the start model
    trusted frames it was 0.19-0.35 eV wrong on while the first refinement ran."""
    calibration_memory: int = 0
    """Forget old residuals: about the last this-many labels set the Student-t calibration
    (older evidence discounted by (1 - 1/N) per label; default 0: remember all, as the seed
    paper does, which keeps the scale wide after the first bad predictions are learned)."""
    calibration_tilt: bool = False
    """Centre the energy error model on the Boltzmann tilt: MD on the model over-samples the
    configurations where the model's energy is too low, so the error of a frame it visits is
    expected at -sigma_E^2/kT (sigma_E the raw posterior sigma, T the [system] temperature
    times the beads), not at zero. The confidence and the Student-t updates use that location
    (``rarefly.calibration``; default false: the seed paper's zero-mean error). Measured on
    bench_onthefly's runs: the start model was -0.007 eV off on GFN2-xTB MD frames and
    -0.178 eV on the frames its own MD met (``benchmarks/replay_calibration.out``), but with
    the tilt it was no more often right on the frames it trusted (bench_onthefly's runs
    65-72), so it stays off by default."""
    recalibrate_after_refinement: bool = False
    """After each backbone refinement, restart the Student-t calibration from its prior: the
    residuals so far are of the model the refinement replaced (default false: kept). Measured
    in bench_onthefly's seventeenth run: right where the refinement fixed the errors, over-
    confident where it did not, until the next labels rescale it."""
    replay_energies: bool = False
    """After each backbone refinement, condition the readout on the energies of the
    ``backbone_replay`` frames as well as on the labels (default false: the labels only). Keeps
    the energies of the fit's region from shifting with the new labels' errors; measured in
    bench_onthefly's twentieth run: held-out TS energies better, the run's own frames worse."""
    max_label_force: float = DEFAULT_MAX_LABEL_FORCE
    """A label whose largest force component exceeds this is kept in the database (state
    failed, with the reason) but not learned: the reference labels a blown-up walker too, and
    one such label spoilt a refinement (bench_onthefly's thirty-fourth run); units
    ENERGY/LENGTH, e.g. "25 eV/A" (default 25 eV/A; 0: no limit)."""
    align_energies: bool = True
    """Align the reference's energy zero to the model's at the first label (default true)."""
    holdout_file: Path | None = None
    """Optional extxyz of held-out reference frames (REF_energy, REF_forces) whose errors
    the trainer logs for every model version (the report's learning curve)."""
    holdout_frames: int = 0
    """When no holdout_file: generate this many held-out frames at the start, snapshots of a
    short Langevin MD on the reference itself at [system] temperature (40 reference calls
    per frame, not counted in the budget: for cheap references; default 0)."""


@dataclass
class ReferenceConfig:
    """[reference]: the reference calculator that labels flagged frames."""

    calculator: str = "xtb"
    """emt, xtb (GFN2-xTB via tblite), pyscf, or any ASE calculator as "module:Class"."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the calculator (numbers or strings), e.g. { method = "GFN1-xTB" }."""


@dataclass
class LabellingConfig:
    """[labelling]: where reference calculations run (Parsl)."""

    executor: str = "local"
    """local (worker processes here), threads, or slurm (default local)."""
    workers: int = 1
    """Reference calculations running at once (default 1)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Provider options: local takes worker_init; slurm takes `address` (of this machine,
    reachable from the compute nodes; required) and Parsl SlurmProvider's keywords
    (partition, account, walltime, nodes_per_block, worker_init ...)."""


@dataclass
class BudgetConfig:
    """[budget]: when the run stops (also when [system] steps are done, or on Ctrl-C)."""

    max_reference_calls: int | None = None
    """Stop after this many labelled frames in the database, restarts included (default:
    no limit). In guarantee mode the driver's own reference calls count toward it: it makes
    at most what is left of it, then flagged steps keep the model's prediction."""
    wall_time: float | None = None
    """Stop after this much wall time per invocation; units s, min, h (default: no limit)."""


@dataclass
class OutputConfig:
    """[output]: where everything goes."""

    directory: Path = Path("rarefly-run")
    """Folder for the i-PI input, the model copy the trainer publishes to, the frame
    database, logs and the report (default "rarefly-run", beside the configuration)."""


@dataclass
class RunConfig:
    """The whole configuration (``source``: the file it was read from)."""

    system: SystemConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    bias: BiasConfig = field(default_factory=BiasConfig)
    learning: LearningConfig = field(default_factory=LearningConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    labelling: LabellingConfig = field(default_factory=LabellingConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    source: Path | None = None

    @property
    def has_bias(self) -> bool:
        return self.bias.plumed_file is not None


#: section name -> its dataclass
SECTIONS: dict[str, type] = {"system": SystemConfig, "model": ModelConfig, "bias": BiasConfig,
            "learning": LearningConfig, "reference": ReferenceConfig,
            "labelling": LabellingConfig, "budget": BudgetConfig, "output": OutputConfig}


# ----------------------------------------------------------------------------- loading

def load_config(path: str | Path, *, check_code: bool = True) -> RunConfig:
    """Read, convert and validate ``path``; ConfigError with one sentence when it is wrong.

    check_code: also create the reference calculator once and check the Parsl executor
    (what makes a missing code or an unreachable provider fail before the run starts).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"the configuration file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration file {path} ({exc.strerror})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc})") from None
    cfg = parse_config(raw, base=path.resolve().parent)
    cfg.source = path.resolve()
    validate(cfg, check_code=check_code)
    return cfg


def parse_config(raw: dict, base: Path) -> RunConfig:
    """Turn the TOML tables into a RunConfig (types, units, ranges, paths); no code checks."""
    for key, value in raw.items():
        if key in SECTIONS:
            continue
        if isinstance(value, dict):
            raise ConfigError(f"unknown section [{key}]; the sections are "
                              f"{', '.join(SECTIONS)}")
        raise ConfigError(f"unknown option '{key}' outside any section; options go into one "
                          f"of the sections {', '.join(f'[{s}]' for s in SECTIONS)}")
    if "system" not in raw:
        raise ConfigError("the [system] section is missing; it needs at least "
                          "structure = \"FILE\"")
    sections = {}
    for name, cls in SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{name}] must be a section (a TOML table), not a value")
        sections[name] = _section(name, cls, table, base)
    cfg = RunConfig(**sections)
    cfg.output.directory = (base / cfg.output.directory).resolve()  # the default is relative
    return cfg


def _section(name: str, cls: type, table: dict, base: Path):
    names = [f.name for f in dataclasses.fields(cls)]
    for key in table:
        if key not in names:
            raise ConfigError(f"unknown option '{key}' in [{name}]; the options are "
                              f"{', '.join(names)}")
    values = {}
    for key, value in table.items():
        where = f"[{name}] {key}"
        values[key] = _CONVERT.get((name, key), _plain(cls, key))(value, where, base)
    return cls(**values)


def _plain(cls, key):
    """A converter from the field's annotation (int, float, str, bool, dict)."""
    annotation = {f.name: f.type for f in dataclasses.fields(cls)}[key]

    def convert(value, where, base):  # noqa: ARG001
        if annotation.startswith("int"):
            return _int(value, where)
        if annotation.startswith("float"):
            return _float(value, where)
        if annotation.startswith("bool"):
            if not isinstance(value, bool):
                raise ConfigError(f"{where} must be true or false, not {value!r}")
            return value
        if annotation.startswith("dict"):
            if not isinstance(value, dict):
                raise ConfigError(f"{where} must be a table such as {{ key = \"value\" }}, "
                                  f"not {value!r}")
            return dict(value)
        return _str(value, where)
    return convert


def _int(value, where):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be a whole number, not {value!r}")
    return value


def _float(value, where):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number, not {value!r}")
    return float(value)


def _str(value, where):
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} must be a non-empty string, not {value!r}")
    return value.strip()


def _path(value, where, base):
    return (base / Path(_str(value, where)).expanduser()).resolve()


def quantity(value, units: dict[str, float], default_unit: str, where: str) -> float:
    """``"0.5 kcal/mol"`` (or a plain number, in ``default_unit``) times its unit's factor."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) * units[default_unit]
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a quantity such as \"1.0 {default_unit}\", "
                          f"not {value!r}")
    number, _, unit = value.strip().partition(" ")
    unit = unit.strip() or default_unit
    try:
        x = float(number)
    except ValueError:
        raise ConfigError(f"{where} = {value!r} does not start with a number; write it as "
                          f"\"1.0 {default_unit}\"") from None
    factor = units.get(unit)
    if factor is None:
        lowered = {k.lower(): v for k, v in units.items()}
        factor = lowered.get(unit.lower())
    if factor is None:
        raise ConfigError(f"{where} = {value!r}: unknown unit '{unit}'; use one of "
                          f"{', '.join(units)}")
    return x * factor


def _force_units() -> dict[str, float]:
    """ENERGY/LENGTH -> eV/A for every pair of known units."""
    return {f"{e}/{length}": energy_to_ev(1.0, e) / a
            for e in ENERGY_UNITS for length, a in LENGTH_UNITS.items()}


def _positive(convert, strict=True):
    def check(value, where, base):
        x = convert(value, where, base)
        if x is not None and (x <= 0 if strict else x < 0):
            raise ConfigError(f"{where} must be {'positive' if strict else 'zero or more'}, "
                              f"not {value!r}")
        return x
    return check


def _fraction(open_low: bool):
    def check(value, where, base):  # noqa: ARG001
        x = _float(value, where)
        ok = (0.0 < x < 1.0) if open_low else (0.0 <= x <= 1.0)
        if not ok:
            span = "between 0 and 1 (exclusive)" if open_low else "between 0 and 1"
            raise ConfigError(f"{where} must be {span}, not {value!r}")
        return x
    return check


def _choice(options):
    def check(value, where, base):  # noqa: ARG001
        x = _str(value, where)
        if x not in options:
            raise ConfigError(f"{where} = {value!r} is not one of {', '.join(options)}")
        return x
    return check


def _q(units, default):
    return lambda value, where, base: quantity(value, units, default, where)


def _table_of(kinds, what):
    def check(value, where, base):  # noqa: ARG001
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table such as {{ key = value }}, not {value!r}")
        for k, v in value.items():
            if isinstance(v, bool) or not isinstance(v, kinds):
                raise ConfigError(f"{where}.{k} must be {what}, not {v!r}")
        return dict(value)
    return check


#: (section, option) -> converter(value, where, base) for options beyond plain types
_CONVERT = {
    ("system", "structure"): _path,
    ("system", "temperature"): _positive(_q(TEMPERATURE_UNITS, "K")),
    ("system", "timestep"): _positive(_q(TIME_UNITS, "fs")),
    ("system", "steps"): _positive(lambda v, w, b: _int(v, w)),
    ("system", "beads"): _positive(lambda v, w, b: _int(v, w)),
    ("system", "ipi_template"): _path,
    ("model", "file"): _path,
    ("model", "kind"): _choice(KINDS),
    ("bias", "plumed_file"): lambda v, w, base: _plumed_path(v, w, base),
    ("bias", "cv_calibration"): _choice(CV_CALIBRATIONS),
    ("bias", "values"): _table_of((str, int, float), "a string or a number"),
    ("learning", "epsilon"): _positive(_q(ENERGY_UNITS, "eV")),
    ("learning", "level"): _fraction(open_low=True),
    ("learning", "force_threshold"): _positive(_q(_force_units(), "eV/A")),
    ("learning", "audit_fraction"): _fraction(open_low=False),
    ("learning", "audit_share"): _fraction(open_low=False),
    ("learning", "mode"): _choice(MODES),
    ("learning", "update_every"): _positive(lambda v, w, b: _int(v, w)),
    ("learning", "backbone_steps"): _positive(lambda v, w, b: _int(v, w), strict=False),
    ("learning", "backbone_every"): _positive(lambda v, w, b: _int(v, w)),
    ("learning", "calls_while_refining"): _positive(lambda v, w, b: _int(v, w), strict=False),
    ("learning", "backbone_replay"): _path,
    ("learning", "duplicate_distance"): _positive(_q(LENGTH_UNITS, "A"), strict=False),
    ("learning", "min_step_gap"): _positive(lambda v, w, b: _int(v, w), strict=False),
    ("learning", "max_label_force"): _positive(_q(_force_units(), "eV/A"), strict=False),
    ("learning", "calibration_memory"): _positive(lambda v, w, b: _int(v, w), strict=False),
    ("learning", "holdout_file"): _path,
    ("learning", "holdout_frames"): _positive(lambda v, w, b: _int(v, w), strict=False),
    ("reference", "options"): _table_of((str, int, float),
                                        "a number or a string (the trainer takes KEY=VALUE)"),
    ("labelling", "executor"): _choice(EXECUTORS),
    ("labelling", "workers"): _positive(lambda v, w, b: _int(v, w)),
    ("budget", "max_reference_calls"): _positive(lambda v, w, b: _int(v, w)),
    ("budget", "wall_time"): _positive(_q(WALL_TIME_UNITS, "s")),
    ("output", "directory"): _path,
}


def _plumed_path(value, where, base) -> Path:
    text = _str(value, where)
    here = (base / Path(text).expanduser()).resolve()
    if here.exists() or "/" in text:
        return here
    shipped = PLUMED_INPUTS / text
    return shipped if shipped.exists() else here


# ----------------------------------------------------------------------------- checks

def validate(cfg: RunConfig, *, check_code: bool = True) -> None:
    """Cross-field and environment checks; ConfigError naming the key."""
    s = cfg.system
    if s.structure is None:
        raise ConfigError("[system] structure is missing; give the structure file to simulate")
    _exists(s.structure, "[system] structure")
    try:
        from ase.io import read

        atoms = read(s.structure, index=0)
    except Exception as exc:  # noqa: BLE001 - ASE raises many kinds for unreadable files
        raise ConfigError(f"[system] structure {s.structure} cannot be read as a structure "
                          f"({_one_line(exc)})") from None
    if len(atoms) == 0:
        raise ConfigError(f"[system] structure {s.structure} holds no atoms")
    if s.ipi_template is not None:
        _exists(s.ipi_template, "[system] ipi_template")
        text = s.ipi_template.read_text()
        for name in ("forcefields", "output"):
            if "${" + name + "}" not in text:
                raise ConfigError(f"[system] ipi_template {s.ipi_template} lacks the ${{{name}}} "
                                  "placeholder, where rarefly puts its "
                                  + ("<ffsocket> (and <ffplumed>)" if name == "forcefields"
                                     else "<output> (read for progress and the report)"))
        if cfg.has_bias:
            for name in ("bias", "smotion"):
                if "${" + name + "}" not in text:
                    raise ConfigError(f"[system] ipi_template {s.ipi_template} lacks the "
                                      f"${{{name}}} placeholder that the [bias] needs")
    if cfg.model.file is not None:
        _exists(cfg.model.file, "[model] file")
        if check_code:
            from rarefly.model_file import ModelFileError, load_model_file

            try:
                load_model_file(cfg.model.file)
            except ModelFileError as exc:
                raise ConfigError(f"[model] file: {exc}") from None
    if cfg.bias.plumed_file is not None:
        _exists(cfg.bias.plumed_file, "[bias] plumed_file")
    if cfg.learning.holdout_file is not None:
        _exists(cfg.learning.holdout_file, "[learning] holdout_file")
    if cfg.learning.backbone_replay is not None:
        _exists(cfg.learning.backbone_replay, "[learning] backbone_replay")
    if cfg.learning.mode == "guarantee" and cfg.reference.options:
        raise ConfigError("[learning] mode = \"guarantee\" labels in the driver, which takes no "
                          "[reference] options; remove them or use mode = \"async\"")
    _check_labelling(cfg.labelling, check_code)
    if check_code:
        _check_reference(cfg.reference)


def _exists(path: Path, where: str) -> None:
    if not path.is_file():
        raise ConfigError(f"{where} {path} does not exist")


def _check_reference(ref: ReferenceConfig) -> None:
    from rarefly.trainer.reference import ReferenceError, ReferenceSpec, check_reference

    try:
        check_reference(ReferenceSpec(ref.calculator, dict(ref.options)))
    except ReferenceError as exc:
        raise ConfigError(f"[reference] calculator: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a calculator refusing its options
        raise ConfigError(f"[reference] options do not suit the calculator {ref.calculator!r} "
                          f"({type(exc).__name__}: {_one_line(exc)})") from None


#: options each executor takes besides the provider's own keywords
_LOCAL_OPTIONS = ("worker_init",)


def _check_labelling(lab: LabellingConfig, check_code: bool) -> None:
    if lab.executor == "threads" and lab.options:
        raise ConfigError(f"unknown option '{next(iter(lab.options))}' in [labelling.options]; "
                          "the threads executor takes no options")
    if lab.executor == "local":
        for key in lab.options:
            if key not in _LOCAL_OPTIONS:
                raise ConfigError(f"unknown option '{key}' in [labelling.options]; the local "
                                  f"executor takes {', '.join(_LOCAL_OPTIONS)}")
    if not check_code:
        return
    try:
        import parsl  # noqa: F401
    except ImportError:
        raise ConfigError("[labelling] needs Parsl, which is not installed: "
                          "reinstall with `make setup` (parsl is a dependency of rarefly)") from None
    if lab.executor == "slurm":
        from parsl.providers import SlurmProvider

        takes = [p for p in inspect.signature(SlurmProvider.__init__).parameters if p != "self"]
        for key in lab.options:
            if key != "address" and key not in takes:
                raise ConfigError(f"unknown option '{key}' in [labelling.options]; the slurm "
                                  f"provider takes address, {', '.join(takes)}")
        address = lab.options.get("address")
        if not address:
            raise ConfigError("[labelling.options] address is missing: the slurm executor needs "
                              "the address of this machine that the compute nodes can reach")
        if not _can_listen(str(address)):
            raise ConfigError(f"[labelling.options] address = {address!r} is not an address of "
                              "this machine, so the compute nodes could not reach the trainer")
        if shutil.which("sbatch") is None:
            raise ConfigError("[labelling] executor = \"slurm\" but Slurm is unreachable from "
                              "this machine (no sbatch on PATH)")


def _can_listen(address: str) -> bool:
    """Whether a socket can be bound to ``address`` here (it is one of this host's)."""
    try:
        infos = socket.getaddrinfo(address, 0, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.bind(sockaddr)
                return True
        except OSError:
            continue
    return False


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def field_docs(cls: type) -> dict[str, str]:
    """{field: docstring} of a section dataclass (the strings under its fields)."""
    import ast
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(getattr(nxt, "value", None), ast.Constant)):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs
