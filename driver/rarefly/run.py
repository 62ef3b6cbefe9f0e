"""``rarefly run CONFIG``: on-the-fly learning in one command.

From one TOML configuration (:mod:`rarefly.run_config`), in its ``[output] directory``:

1. copies the model (or fits one from the foundation model) to ``model.rfly``, the file the
   trainer publishes new versions to and the driver reloads between two force calls;
   writes ``input.xml`` for i-PI (from ``data/run_template.xml.in`` or the user's template),
   ``plumed.dat`` when the run has a ``[bias]``, ``holdout.xyz`` when asked for;
2. starts three processes, each in its own session, logs in the output directory:
   ``rarefly trainer`` (``trainer.log``; frames in ``frames.db``, events in
   ``frames.jsonl``), ``i-pi`` (``ipi.log``) and ``rarefly driver --learn`` (``driver.log``).
   They talk over a private UNIX socket (``/tmp/ipi_rarefly-PID-XXXXXXXX``) and zmq ``ipc://``
   endpoints under /tmp: nothing listens beyond this machine;
3. supervises them with a progress bar (i-PI's step; flagged frames, labels, model version,
   coverage on audit frames) until i-PI has done its steps, the reference budget is spent,
   the wall time is up, or Ctrl-C/SIGTERM; a process that dies ends the run with one
   sentence naming it and its log;
4. stops everything cleanly (i-PI softly, so that it writes ``RESTART``), writes the report
   (:mod:`rarefly.report`) and prints its path.

``--restart`` continues a stopped run from i-PI's ``RESTART``, the frame database and the
latest published model; ``--report-only`` writes the report of what is there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from string import Template
from xml.sax.saxutils import escape

from rarefly.report import LiveStatus
from rarefly.run_config import ConfigError, RunConfig, load_config

#: i-PI's <output prefix>
PREFIX = "simulation"
TEMPLATE = Path(__file__).parent / "data" / "run_template.xml.in"
#: keys of the driver's extras written every step to PREFIX.uncertainty_<bead>
EXTRAS = ("energy_uncertainty", "confidence", "model_version", "flagged")
#: Angstrom; the box i-PI needs for a molecule (the forcefield ignores it: pbc="false")
MOLECULE_BOX = 20.0
#: how often a trainer that left its loop early is started again
MAX_TRAINER_RESTARTS = 2
#: how long a stopping run waits for the trainer (SIGTERM: it records the labels that are done
#: and publishes them; conditioning the readout takes about a second per label on a CPU) before
#: SIGKILL; nothing is lost either way (the database holds every label, a restart learns them)
TRAINER_STOP_SECONDS = 120.0
#: how long a run whose MD is done waits for the trainer to finish (SIGUSR1: the labels in
#: flight, then the update they make due, a backbone refinement too: minutes on a CPU)
TRAINER_FINISH_SECONDS = 900.0
#: MD steps on the reference between two generated held-out frames
HOLDOUT_STRIDE = 40


class RunError(RuntimeError):
    """Something that ends a run; the message is one sentence for the user."""


@dataclass(frozen=True)
class Files:
    """The files of a run, all in its output directory."""

    root: Path

    model = property(lambda self: self.root / "model.rfly")
    database = property(lambda self: self.root / "frames.db")
    events = property(lambda self: self.root / "frames.jsonl")
    ipi_input = property(lambda self: self.root / "input.xml")
    restart = property(lambda self: self.root / "RESTART")
    plumed = property(lambda self: self.root / "plumed.dat")
    holdout = property(lambda self: self.root / "holdout.xyz")
    manifest = property(lambda self: self.root / "run.json")
    properties = property(lambda self: self.root / f"{PREFIX}.out")
    extras = property(lambda self: self.root / f"{PREFIX}.uncertainty_0")
    colvar = property(lambda self: self.root / "COLVAR")
    report = property(lambda self: self.root / "report.md")

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"


# ----------------------------------------------------------------------------- the i-PI input

def output_xml(bias: bool) -> str:
    """i-PI's <output>: properties every step, positions every 10, the driver's extras."""
    props = "step, time{picosecond}, temperature{kelvin}, potential{electronvolt}"
    if bias:
        props += ", ensemble_bias{electronvolt}"
    return (f'<output prefix="{PREFIX}">\n'
            f'    <properties filename="out" stride="1"> [ {props} ] </properties>\n'
            f'    <trajectory filename="pos" stride="10" format="xyz" cell_units="angstrom">'
            f" positions{{angstrom}} </trajectory>\n"
            f'    <trajectory filename="uncertainty" stride="1" extra_type="{",".join(EXTRAS)}">'
            f" extras </trajectory>\n"
            f'    <checkpoint stride="100"/>\n'
            f"  </output>")


def forcefields_xml(address: str, periodic: bool, beads: int, plumed: bool,
                    structure: str) -> str:
    """The <ffsocket name="rarefly"> on the UNIX socket /tmp/ipi_<address> (+ <ffplumed>)."""
    text = (f'<ffsocket name="rarefly" mode="unix" pbc="{str(periodic).lower()}">\n'
            f"    <address>{escape(address)}</address>\n"
            f"    <latency>1e-4</latency>\n"
            f"    <timeout>600</timeout>\n"
            f"    <batch_size>{int(beads)}</batch_size>\n"
            f"  </ffsocket>")
    if plumed:
        text += (f'\n  <ffplumed name="plumed"><file mode="ase">{escape(structure)}</file>'
                 f"<plumed_dat>plumed.dat</plumed_dat></ffplumed>")
    return text


def render_input(cfg: RunConfig, address: str, structure: str, periodic: bool) -> str:
    """The i-PI input of a fresh run: the template with its ${placeholders} filled."""
    path = cfg.system.ipi_template or TEMPLATE
    text = re.sub(r"<!--.*?-->\s*", "", path.read_text(), flags=re.S)
    s = cfg.system
    values = {
        "output": output_xml(cfg.has_bias),
        "steps": str(s.steps),
        "seed": str(s.seed),
        "forcefields": forcefields_xml(address, periodic, s.beads, cfg.has_bias, structure),
        "beads": str(s.beads),
        "structure": escape(structure),
        "cell": ("" if periodic else
                 f'\n      <cell mode="abc" units="angstrom"> [{MOLECULE_BOX:g}, '
                 f"{MOLECULE_BOX:g}, {MOLECULE_BOX:g}] </cell>"),
        "temperature": f"{s.temperature:g}",
        "timestep": f"{s.timestep:g}",
        "thermostat": "pile_l" if s.beads > 1 else "svr",
        "bias": ('<bias><force forcefield="plumed" nbeads="1"/></bias>' if cfg.has_bias else ""),
        "smotion": ('<smotion mode="metad"><metad><metaff>[plumed]</metaff></metad></smotion>'
                    if cfg.has_bias else ""),
    }
    try:
        return Template(text).substitute(values)
    except (KeyError, ValueError) as exc:
        raise RunError(f"the i-PI template {path} has an unknown placeholder ({exc}); the "
                       f"placeholders are {', '.join('${' + k + '}' for k in values)}") from None


def restart_input(restart_text: str, address: str, steps: int) -> tuple[str, int]:
    """i-PI's RESTART with the new socket address and total steps; and its current step."""
    try:
        root = ET.fromstring(restart_text)
    except ET.ParseError as exc:
        raise RunError(f"i-PI's RESTART file cannot be read ({exc})") from None
    sock = root.find("ffsocket[@name='rarefly']/address")
    total = root.find("total_steps")
    step = root.find("step")
    if sock is None:
        raise RunError("i-PI's RESTART file has no <ffsocket name=\"rarefly\">; it is not "
                       "from `rarefly run`")
    if total is None:  # i-PI leaves out values equal to its defaults (total_steps 1000)
        total = ET.SubElement(root, "total_steps")
    sock.text = address
    total.text = str(int(steps))
    return ET.tostring(root, encoding="unicode"), int(step.text) if step is not None else 0


def render_plumed(cfg: RunConfig, restart: bool) -> str:
    """The [bias] PLUMED input with its placeholders filled (RESTART first when continuing)."""
    from rarefly.cv import CVError, render_plumed_input

    try:
        text = render_plumed_input(cfg.bias.plumed_file.read_text(), cfg.bias.values,
                                   structure=cfg.system.structure)
    except CVError as exc:
        raise RunError(f"[bias] plumed_file {cfg.bias.plumed_file}: {exc}") from None
    if restart:  # METAD/OPES read back their hills, PRINT appends
        text = "RESTART\n" + text
    return text


# ----------------------------------------------------------------------------- preparing

def prepare_model(cfg: RunConfig, files: Files, fresh: bool) -> None:
    """The model copy the trainer publishes to; [learning] epsilon and the calibration's
    Boltzmann tilt ([learning] calibration_tilt) written into it."""
    if fresh:
        if cfg.model.file is not None:
            shutil.copyfile(cfg.model.file, files.model)
        else:
            from rarefly.demo import build_model

            print(f"rarefly run: fitting a {cfg.model.kind} posterior on the "
                  f"{cfg.model.foundation} foundation model (once, into {files.model})")
            build_model(files.model, cfg.model.kind, cfg.model.foundation, progress=True)
    from ase.units import kB

    from rarefly.calibration import Calibration
    from rarefly.model_file import load_model_file, save_model_file

    payload = load_model_file(files.model)
    changed = False
    if cfg.learning.epsilon is not None and payload["settings"].get("epsilon") != cfg.learning.epsilon:
        payload["settings"] = dict(payload["settings"], epsilon=cfg.learning.epsilon)
        changed = True
    # the Boltzmann tilt of the calibration: k_B T per bead's weight (T times the beads)
    tilt = kB * cfg.system.temperature * cfg.system.beads if cfg.learning.calibration_tilt else None
    cal = Calibration.from_dict(payload["calibration"])
    cal.set_tilt(tilt)
    if cal.to_dict() != payload["calibration"]:
        payload["calibration"] = cal.to_dict()
        changed = True
    if changed:
        save_model_file(files.model, payload)


def prepare_holdout(cfg: RunConfig, files: Files, atoms) -> Path | None:
    """The held-out reference frames: the user's file, or generated once.

    Generated frames are snapshots, every :data:`HOLDOUT_STRIDE` steps, of a Langevin MD on
    the reference itself at [system] temperature from the starting structure: frames like
    those the run visits (random displacements are far from them), for
    ``holdout_frames * HOLDOUT_STRIDE`` reference calls: a few seconds with xTB.
    """
    if cfg.learning.holdout_file is not None:
        return cfg.learning.holdout_file
    n = cfg.learning.holdout_frames
    if n == 0:
        return None
    if files.holdout.exists():
        return files.holdout
    import numpy as np
    from ase import units
    from ase.io import write
    from ase.md.langevin import Langevin

    from rarefly.trainer.reference import ReferenceSpec, make_calculator

    print(f"rarefly run: labelling {n} held-out frames (a short Langevin MD on the reference)",
          flush=True)
    md = atoms.copy()
    md.calc = make_calculator(ReferenceSpec(cfg.reference.calculator,
                                            dict(cfg.reference.options)))
    rng = np.random.default_rng(cfg.system.seed)
    kT = units.kB * cfg.system.temperature
    md.set_momenta(rng.normal(size=(len(md), 3)) * np.sqrt(md.get_masses() * kT)[:, None])
    dyn = Langevin(md, cfg.system.timestep * units.fs, temperature_K=cfg.system.temperature,
                   friction=0.02, fixcm=False, rng=rng)
    frames = []
    try:
        for _ in range(n):
            dyn.run(HOLDOUT_STRIDE)
            frame = md.copy()
            frame.info["REF_energy"] = float(md.get_potential_energy())
            frame.arrays["REF_forces"] = np.asarray(md.get_forces(), dtype=float)
            frames.append(frame)
    except Exception as exc:  # noqa: BLE001 - the reference's own error, in one sentence
        raise RunError(f"labelling the held-out frames with the reference failed "
                       f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    tmp = files.holdout.with_suffix(".tmp.xyz")
    write(tmp, frames, format="extxyz")
    os.replace(tmp, files.holdout)
    return files.holdout


def _labels_done(files: Files) -> int:
    """Reference labels recorded so far in the run's directory (all invocations)."""
    if not files.events.exists():
        return 0
    from rarefly.report import read_events

    return sum(e["event"] == "label" for e in read_events(files.events))


def _budget_spent(cfg: RunConfig, files: Files) -> bool:
    limit = cfg.budget.max_reference_calls
    return limit is not None and _labels_done(files) >= limit


# ----------------------------------------------------------------------------- processes

def _child_env(**extra) -> dict[str, str]:
    """One torch/OpenMP thread unless the user set one; unbuffered Python logs."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", env["OMP_NUM_THREADS"])
    return env


def _ipi_command() -> list[str]:
    beside = Path(sys.executable).parent / "i-pi"
    if beside.exists():
        return [sys.executable, str(beside)]
    found = shutil.which("i-pi")
    if not found:
        raise RunError("the i-pi command was not found; install i-PI (pip install ipi)")
    return [found]


class Child:
    """One supervised process in its own session, output to ``<name>.log``."""

    def __init__(self, name: str, label: str, cmd: list[str], files: Files, env: dict):
        self.name, self.label = name, label
        self.log = files.log(name)
        self._fh = open(self.log, "a")
        self._fh.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        self._fh.flush()
        self.proc = subprocess.Popen(cmd, cwd=files.root, stdout=self._fh,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)

    def poll(self):
        return self.proc.poll()

    def signal(self, sig: int, group: bool = True) -> None:
        """``sig`` to the process group (or only to the process)."""
        try:
            if group:
                os.killpg(self.proc.pid, sig)
            else:
                os.kill(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout=max(0.05, timeout))
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self, sig: int, grace: float) -> None:
        """``sig`` to the process group if it still runs, SIGKILL after ``grace`` seconds;
        closes the log."""
        if self.poll() is None:
            self.signal(sig)
            if not self.wait(grace):
                self.signal(signal.SIGKILL)
                self.proc.wait()
        self._fh.close()

    def last_words(self) -> str:
        """The process's own last message (``rarefly NAME: ...`` or an error line)."""
        try:
            lines = [ln.strip() for ln in self.log.read_text(errors="replace").splitlines()
                     if ln.strip() and not ln.startswith("=====")]
        except OSError:
            return ""
        own = [ln for ln in lines if ln.startswith(("rarefly ", "Error", "ERROR"))
               or "Error:" in ln or "error:" in ln]
        text = (own or lines or [""])[-1]
        return text if len(text) <= 300 else text[:297] + "..."

    def died(self, code: int) -> str:
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"{self.label} was killed by {name}; see {self.log}"
        words = self.last_words()
        said = f' ("{words}")' if words else ""
        return f"{self.label} stopped with exit code {code}{said}; see {self.log}"


# ----------------------------------------------------------------------------- the run

class OnTheFlyRun:
    """Prepare, start, supervise and stop one invocation of ``rarefly run``."""

    def __init__(self, cfg: RunConfig, restart: bool = False, progress: bool = True):
        self.cfg = cfg
        self.restart = restart
        self.progress = progress
        self.files = Files(cfg.output.directory)
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.address = f"rarefly-{self.token}"
        self.learn_endpoint = f"ipc:///tmp/rarefly-learn-{self.token}"
        self.cv_endpoint = f"ipc:///tmp/rarefly-cv-{self.token}"
        self.children: dict[str, Child] = {}
        self.start_step = 0
        self.started_at = time.time()
        self.trainer_restarts = 0
        self.status: LiveStatus | None = None

    # -------------------------------------------------------------- preparation
    def prepare(self) -> None:
        from ase.io import read

        cfg, f = self.cfg, self.files
        started = f.database.exists() or f.restart.exists() or f.ipi_input.exists()
        if self.restart and not f.restart.exists():
            raise RunError(f"there is no run to restart in {f.root} (no i-PI RESTART file); "
                           "start it without --restart")
        if not self.restart and started:
            raise RunError(f"{f.root} already holds a run; continue it with --restart, or set "
                           "another [output] directory")
        f.root.mkdir(parents=True, exist_ok=True)
        atoms = read(cfg.system.structure, index=0)
        periodic = bool(any(atoms.pbc))
        init = f.root / f"init{cfg.system.structure.suffix or '.xyz'}"
        if not self.restart:
            shutil.copyfile(cfg.system.structure, init)
        prepare_model(cfg, f, fresh=not self.restart)
        self.holdout = prepare_holdout(cfg, f, atoms)
        if self.restart:
            if _budget_spent(cfg, f):
                raise RunError(f"the reference budget of {cfg.budget.max_reference_calls} calls "
                               f"is already spent in {f.root}; raise [budget] "
                               "max_reference_calls to continue")
            text, self.start_step = restart_input(f.restart.read_text(), self.address,
                                                  cfg.system.steps)
            if self.start_step >= cfg.system.steps:
                raise RunError(f"the run in {f.root} already did its {cfg.system.steps} steps; "
                               "raise [system] steps to continue it")
            shutil.copyfile(f.restart, f.root / "RESTART.previous")
        else:
            text = render_input(cfg, self.address, init.name, periodic)
        f.ipi_input.write_text(text)
        if cfg.has_bias:
            f.plumed.write_text(render_plumed(cfg, self.restart))
        self.init = init
        self._manifest(start=True)

    def _manifest(self, start: bool = False, **end) -> None:
        """run.json: settings the report needs, and one entry per invocation."""
        f = self.files
        try:
            data = json.loads(f.manifest.read_text())
        except (OSError, ValueError):
            data = {"segments": []}
        from rarefly.model_file import load_model_file

        eps = load_model_file(f.model)["settings"].get("epsilon")
        data.update(config=str(self.cfg.source), epsilon_eV=eps, level=self.cfg.learning.level,
                    steps=self.cfg.system.steps, timestep_fs=self.cfg.system.timestep,
                    temperature_K=self.cfg.system.temperature,
                    bias=str(self.cfg.bias.plumed_file) if self.cfg.has_bias else None,
                    reference=self.cfg.reference.calculator,
                    max_reference_calls=self.cfg.budget.max_reference_calls)
        if start:
            data["segments"].append({"started": time.time(), "start_step": self.start_step,
                                     "restart": self.restart})
        else:
            data["segments"][-1].update(ended=time.time(), **end)
        tmp = f.manifest.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, f.manifest)

    # -------------------------------------------------------------- commands
    def trainer_command(self) -> list[str]:
        from rarefly.trainer.reference import DEFAULT_MAX_LABEL_FORCE
        from rarefly.trainer.selection import SelectionPolicy

        cfg, f = self.cfg, self.files
        cmd = [sys.executable, "-m", "rarefly.cli", "trainer", "--model", str(f.model),
               "--db", str(f.database), "--endpoint", self.learn_endpoint,
               "--reference", cfg.reference.calculator,
               "--executor", cfg.labelling.executor, "--workers", str(cfg.labelling.workers),
               "--update-every", str(cfg.learning.update_every)]
        if cfg.learning.backbone_steps:
            cmd += ["--backbone-steps", str(cfg.learning.backbone_steps),
                    "--backbone-every", str(cfg.learning.backbone_every)]
            if cfg.learning.calls_while_refining is not None:
                cmd += ["--calls-while-refining", str(cfg.learning.calls_while_refining)]
            if cfg.learning.backbone_replay is not None:
                cmd += ["--backbone-replay", str(cfg.learning.backbone_replay)]
        if cfg.learning.min_step_gap:
            cmd += ["--min-step-gap", str(cfg.learning.min_step_gap)]
        if cfg.learning.audit_share != SelectionPolicy.audit_share:
            cmd += ["--audit-share", repr(cfg.learning.audit_share)]
        if cfg.learning.duplicate_distance != SelectionPolicy.dedup_tol:
            cmd += ["--duplicate-distance", repr(cfg.learning.duplicate_distance)]
        if not cfg.learning.rescore_flagged:
            cmd += ["--no-rescore-flagged"]
        if not cfg.learning.served_calibration:
            cmd += ["--no-served-calibration"]
        if cfg.learning.calibration_memory:
            cmd += ["--calibration-memory", str(cfg.learning.calibration_memory)]
        if cfg.learning.recalibrate_after_refinement:
            cmd += ["--recalibrate-after-refinement"]
        if cfg.learning.replay_energies:
            cmd += ["--replay-energies"]
        if cfg.learning.max_label_force != DEFAULT_MAX_LABEL_FORCE:
            cmd += ["--max-label-force", repr(cfg.learning.max_label_force)]
        for k, v in cfg.reference.options.items():
            cmd += ["--reference-option", f"{k}={v}"]
        for k, v in cfg.labelling.options.items():
            cmd += ["--executor-option", f"{k}={v}"]
        if cfg.budget.max_reference_calls is not None:
            cmd += ["--max-labels", str(cfg.budget.max_reference_calls)]
        if self.holdout is not None:
            cmd += ["--holdout", str(self.holdout)]
        if not cfg.learning.align_energies:
            cmd.append("--no-align")
        return cmd

    def driver_command(self) -> list[str]:
        cfg, f, lr = self.cfg, self.files, self.cfg.learning
        cmd = [sys.executable, "-m", "rarefly.cli", "driver", "--model", str(f.model),
               "--template", str(self.init), "--device", cfg.model.device,
               "-u", "-a", self.address, "--exit-on-disconnect",
               "--learn", self.learn_endpoint, "--level", repr(lr.level),
               "--audit-fraction", repr(lr.audit_fraction), "--mode", lr.mode,
               "--walker", "walker0"]
        if lr.force_threshold is not None:
            cmd += ["--force-threshold", repr(lr.force_threshold)]
        if lr.mode == "guarantee":
            cmd += ["--reference", cfg.reference.calculator]
            budget = cfg.budget.max_reference_calls
            if budget is not None:
                # the driver's own reference calls count toward the run's budget: it may
                # make what the labels already recorded (earlier invocations) leave of it
                cmd += ["--max-labels", str(max(0, budget - _labels_done(f)))]
        if cfg.has_bias:
            cmd += ["--cv", "--cv-endpoint", self.cv_endpoint,
                    "--cv-calibration", self.cfg.bias.cv_calibration]
        return cmd

    def start(self) -> None:
        f = self.files
        if self.cfg.labelling.options and not _trainer_takes("--executor-option"):
            raise RunError("[labelling] options cannot be passed on: this rarefly's trainer "
                           "has no --executor-option")
        self.start_trainer()
        ipi_env = _child_env(RAREFLY_CV_ENDPOINT=self.cv_endpoint)
        self.children["ipi"] = Child("ipi", "i-PI", _ipi_command() + [f.ipi_input.name], f,
                                     ipi_env)

    def start_trainer(self) -> Child:
        self.children["trainer"] = Child("trainer", "the trainer", self.trainer_command(),
                                         self.files, _child_env())
        return self.children["trainer"]

    def start_driver(self) -> None:
        """The driver, once the trainer listens: no step runs before learning can happen."""
        self.children["driver"] = Child("driver", "the driver", self.driver_command(),
                                        self.files, _child_env())

    # -------------------------------------------------------------- supervision
    def supervise(self, bar=None, poll: float = 0.5) -> tuple[str, str | None]:
        """Wait until the run ends; returns (why, failure sentence or None)."""
        status = self.status = LiveStatus(self.files, since=self.started_at)
        wall = self.cfg.budget.wall_time
        deadline = None if wall is None else time.monotonic() + wall
        ipi, trainer = self.children["ipi"], self.children["trainer"]
        budget = self.cfg.budget.max_reference_calls
        driver = None
        while True:
            state = status.poll()
            if bar is not None:
                _show(bar, state, self.cfg)
            if driver is None and state["started"]:
                self.start_driver()
                driver = self.children["driver"]
            code = ipi.poll()
            if code is not None:
                return ("steps done", None) if code == 0 else ("failed", ipi.died(code))
            code = driver.poll() if driver is not None else None
            if code is not None:
                return "failed", driver.died(code)
            if state["budget"]:  # the trainer still tidies up (Parsl); stop() waits for it
                return "reference budget spent", None
            if (self.cfg.learning.mode == "guarantee" and budget is not None
                    and state["labelled"] >= budget):
                # the driver labels flagged steps itself: the trainer cannot hold it back
                return "reference budget spent", None
            code = trainer.poll()
            if code not in (None, 0):
                return "failed", trainer.died(code)
            if state["stopped"] or code == 0:
                # it left its loop before the budget without an error (seen once: a SIGTERM
                # from outside); it resumes from the database, so start it again
                if self.trainer_restarts >= MAX_TRAINER_RESTARTS:
                    return "failed", (f"the trainer stopped before the budget "
                                      f"{self.trainer_restarts + 1} times "
                                      f"(\"{trainer.last_words()}\"); see {trainer.log}")
                self.trainer_restarts += 1
                print("\nrarefly run: the trainer stopped before the budget; starting it "
                      f"again (it resumes from the database; see {trainer.log})",
                      file=sys.stderr, flush=True)
                trainer.stop(signal.SIGKILL, grace=5.0)
                status.since = time.time()
                status.state["stopped"] = False
                trainer = self.start_trainer()
            if deadline is not None and time.monotonic() > deadline:
                return "wall time", None
            time.sleep(poll)

    def stop(self, finish: bool = False) -> None:
        """i-PI softly (SIGINT: RESTART written, EXIT sent to the driver), then, once the
        driver has exited (its last frames sent), the trainer (SIGTERM: it stores the frames
        still queued and the labels already finished, then shuts Parsl down); then wait.
        ``finish`` (i-PI has done its steps): the trainer first gets SIGUSR1 and up to
        TRAINER_FINISH_SECONDS to collect the labels in flight and publish the update they make
        due, a backbone refinement included, so the run's last model holds all it learned
        (with SIGTERM a refinement due is left to a restart); Ctrl-C ends that wait."""
        ipi, driver, trainer = (self.children.get(k) for k in ("ipi", "driver", "trainer"))
        if ipi is not None and ipi.poll() is None:
            ipi.signal(signal.SIGINT)
        budget = self.status is not None and self.status.poll()["budget"]
        if ipi is not None:
            ipi.wait(30.0)
            ipi.stop(signal.SIGKILL, grace=5.0)
        if driver is not None:
            if driver.poll() is None:
                driver.wait(10.0)
            driver.stop(signal.SIGTERM, grace=10.0)
        if trainer is not None:
            if finish and trainer.poll() is None and not budget:
                trainer.signal(signal.SIGUSR1, group=False)
                if not trainer.wait(5.0):
                    print(f"rarefly run: i-PI has done its steps; the trainer collects the labels "
                          f"in flight and publishes the update due (a backbone refinement takes "
                          f"minutes on a CPU; see {trainer.log}); Ctrl-C stops it sooner",
                          file=sys.stderr, flush=True)
                    try:
                        trainer.wait(TRAINER_FINISH_SECONDS)
                    except KeyboardInterrupt:
                        print("\nrarefly run: stopping the trainer", file=sys.stderr, flush=True)
            if trainer.poll() is None and not budget:
                # to the trainer only: it shuts its Parsl interchange (same group) down itself
                trainer.signal(signal.SIGTERM, group=False)
            if not trainer.wait(5.0):
                print(f"rarefly run: waiting up to {TRAINER_STOP_SECONDS:.0f} s for the trainer to "
                      f"publish the labels it holds (see {trainer.log}); Ctrl-C again stops it "
                      f"now, and `--restart` learns them then", file=sys.stderr, flush=True)
                trainer.wait(TRAINER_STOP_SECONDS - 5.0)
            trainer.stop(signal.SIGKILL, grace=5.0)

    def remove_sockets(self) -> None:
        """The socket files of this run under /tmp (a killed process leaves its own)."""
        for path in (f"/tmp/ipi_{self.address}", self.learn_endpoint[len("ipc://"):],
                     self.cv_endpoint[len("ipc://"):]):
            try:
                os.unlink(path)
            except OSError:
                pass

    def execute(self) -> int:
        """The whole invocation; the exit status of ``rarefly run``."""
        from tqdm import tqdm

        cfg, f = self.cfg, self.files
        self.prepare()
        what = "continuing" if self.restart else "starting"
        print(f"rarefly run: {what} in {f.root} at step {self.start_step} of {cfg.system.steps}; "
              f"logs {f.log('ipi').name}, {f.log('driver').name}, {f.log('trainer').name}",
              flush=True)
        started = time.monotonic()
        why, failure = "interrupted", None
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            with tqdm(total=cfg.system.steps, initial=self.start_step, unit="step",
                      desc="i-PI MD", dynamic_ncols=True, disable=not self.progress,
                      mininterval=1.0) as bar:
                self.start()
                why, failure = self.supervise(bar)
        except KeyboardInterrupt:
            print("\nrarefly run: interrupted; stopping i-PI, the driver and the trainer",
                  file=sys.stderr)
        finally:
            try:
                self.stop(finish=why == "steps done")
            except KeyboardInterrupt:  # a second Ctrl-C: do not leave anything behind
                for child in self.children.values():
                    child.signal(signal.SIGKILL)
            finally:
                self.remove_sockets()
                signal.signal(signal.SIGTERM, previous)
        self._manifest(reason=why, failure=failure, trainer_restarts=self.trainer_restarts)
        seconds = time.monotonic() - started
        if failure:
            print(f"rarefly run: {failure}", file=sys.stderr)
        else:
            raise_first = ("raise [budget] max_reference_calls in it and "
                           if why == "reference budget spent" else "")
            print(f"rarefly run: stopped after {seconds:.0f} s ({why}); {raise_first}continue "
                  f"with `rarefly run {cfg.source} --restart`" if why != "steps done" else
                  f"rarefly run: finished after {seconds:.0f} s ({why})")
        report = _write_report(cfg)
        if report is not None:
            print(f"rarefly run: report {report}")
        if failure:
            return 1
        return 130 if why == "interrupted" else 0


def _show(bar, s: dict, cfg: RunConfig) -> None:
    if s["step"] > bar.n:
        bar.update(min(s["step"], bar.total) - bar.n)
    budget = cfg.budget.max_reference_calls
    post = {"flagged": s["flagged"],
            "labelled": f"{s['labelled']}/{budget}" if budget else s["labelled"],
            "model": f"v{s['version']}" if s["version"] is not None else "-"}
    if s["audit"]:
        post["audit cov"] = f"{s['coverage']:.2f} ({s['audit']})"
    bar.set_postfix(post, refresh=False)


def _write_report(cfg: RunConfig) -> Path | None:
    from rarefly.report import ReportError, write_report

    try:
        return write_report(cfg.output.directory)
    except ReportError:  # nothing to report on (a run that failed at its start)
        return None
    except Exception as exc:  # noqa: BLE001 - the run's result stands without a report
        print(f"rarefly run: the report could not be written ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return None


def _trainer_takes(flag: str) -> bool:
    from rarefly import trainer_cli

    parser = argparse.ArgumentParser()
    trainer_cli.configure_parser(parser)
    return any(flag in a.option_strings for a in parser._actions)


def _raise_interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


# ----------------------------------------------------------------------------- the command

EPILOG = """\
example:
  rarefly run examples/onthefly/config.toml           # ~2 minutes on 2 cores
  rarefly run examples/onthefly/config.toml --restart # continue where it stopped
  rarefly run examples/onthefly/config.toml --report-only

The configuration is documented in examples/onthefly/README.md (and rarefly/run_config.py).
Stops when i-PI has done [system] steps, when [budget] max_reference_calls labels are in the
database, after [budget] wall_time, or on Ctrl-C; then writes report.md in the output
directory. When the steps are done the trainer first finishes: it collects the labels in
flight and publishes the update they make due (a backbone refinement takes minutes on a
CPU; Ctrl-C cuts that short and --restart does it later).
Exit status: 0 done, 1 a process failed, 2 bad configuration, 130 interrupted.
"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Run i-PI on a rarefly model with on-the-fly learning: the driver "
                          "flags uncertain frames, the trainer labels them with the reference "
                          "and publishes refined models, which the driver picks up.")
    parser.epilog = EPILOG
    parser.add_argument("config", metavar="CONFIG", help="the run's TOML configuration")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--restart", action="store_true",
                      help="continue the run in the output directory (i-PI's RESTART, the "
                           "frame database, the latest model)")
    mode.add_argument("--report-only", action="store_true",
                      help="only write the report of the run in the output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, check_code=not args.report_only)
    except ConfigError as exc:
        print(f"rarefly run: {exc}", file=sys.stderr)
        return 2
    if args.report_only:
        from rarefly.report import ReportError, write_report

        try:
            path = write_report(cfg.output.directory)
        except ReportError as exc:
            print(f"rarefly run: {exc}", file=sys.stderr)
            return 1
        print(f"rarefly run: report {path}")
        return 0
    try:
        return OnTheFlyRun(cfg, restart=args.restart, progress=not args.no_progress).execute()
    except RunError as exc:
        print(f"rarefly run: {exc}", file=sys.stderr)
        return 1
