"""``rarefly demo`` (and ``make demo``): the shipped demo, end to end, in ``--out`` (``demo-run/``).

Default: **on-the-fly learning** on ethanol, from the configuration shipped as package data
(``rarefly/data/demo.toml``; so it works from an installed package too):

1. builds a posterior model file from the embedded foundation model and ~30 frames of the
   shipped GFN2-xTB training data (``model-<kind>.rfly``; reused on the next run);
2. writes ``config.toml`` (demo.toml made to run in ``--out``) and runs it with
   :class:`rarefly.run.OnTheFlyRun`, exactly as ``rarefly run DIR/config.toml``: i-PI, the
   driver flagging uncertain frames, the trainer labelling them with GFN2-xTB (tblite) and
   publishing refined models; then ``report.md`` with its plots;
3. prints where the trajectory, the uncertainty log (i-PI's extras: sigma_E, confidence,
   model version, flagged) and the report are, and one line saying how the error on the
   held-out reference frames changed from the first to the last model version.

A folder that holds an earlier run is moved aside to ``DIR.previous`` first (:func:`set_aside`).

``--no-learning``: the earlier demo, plain NVT MD on the same posterior:

1. writes an i-PI input (``input.xml``: NVT, 0.5 fs, 300 K, the ethanol molecule) whose
   forcefield is an ``<ffsocket>`` on a UNIX socket;
2. starts the ``i-pi`` server and ``rarefly driver``, follows i-PI's property output with a
   progress bar, and stops both cleanly at the end (or on Ctrl-C);
3. prints where the trajectory and the uncertainty log are, and a one-line summary.

The pieces are plain functions reused by the tests: :func:`input_xml` (with
:func:`ffsocket_xml` / :func:`ffdirect_xml`), :class:`IPIRun` (an i-PI server process plus
an optional ``rarefly driver`` process), :func:`read_properties` and :func:`read_extras`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Sequence
from xml.sax.saxutils import escape

import numpy as np

DEFAULT_OUT = "demo-run"
DEFAULT_STEPS = 500
DEFAULT_FRAMES = 30
#: i-PI's <output prefix>: its files are PREFIX.out, PREFIX.pos_0.xyz, PREFIX.uncertainty_0 ...
PREFIX = "simulation"
#: the extras trajectories written by :func:`input_xml` (file stem -> extras keys)
EXTRAS_FILES = {"uncertainty": ("energy_uncertainty", "confidence"),
                "forces_sigma": ("forces_uncertainty",)}
#: Angstrom; a box for molecules: i-PI wants a cell, the forcefield ignores it (pbc="false")
MOLECULE_BOX = 20.0


class DemoError(RuntimeError):
    """Something that ends a run; the message is one sentence for the user."""


# ------------------------------------------------------------------------ i-PI input

def ffsocket_xml(address: str, name: str = "rarefly", timeout: float = 600.0) -> str:
    """An ``<ffsocket>`` on the UNIX socket ``/tmp/ipi_<address>`` (molecule: no pbc)."""
    return (f'<ffsocket name="{name}" mode="unix" pbc="false">\n'
            f"    <address>{escape(address)}</address>\n"
            f"    <latency>1e-4</latency>\n"
            f"    <timeout>{timeout:g}</timeout>\n"
            f"  </ffsocket>")


def ffdirect_xml(template: str | os.PathLike, model: str | os.PathLike, batch_size: int = 1,
                 name: str = "rarefly", pes_path: str | os.PathLike | None = None,
                 **parameters) -> str:
    """An in-process ``<ffdirect>`` running :mod:`rarefly.pes` (``pes_path``: that file).

    ``parameters`` go to the PES as well (e.g. ``pbc="false"``, ``epsilon=0.02``).
    """
    if pes_path is None:
        from rarefly import pes

        pes_path = pes.__file__
    params = {"template": template, "model": model, **parameters}
    for key, value in params.items():
        if any(c in str(value) for c in ",:{}"):
            raise DemoError(f"the {key} {value} contains one of , : {{ }}, which i-PI's "
                            "<parameters> cannot hold")
    text = ", ".join(f"{k}: {escape(str(v))}" for k, v in params.items())
    return (f'<ffdirect name="{name}" pbc="false">\n'
            f"    <pes>custom</pes>\n"
            f"    <pes_path>{escape(str(pes_path))}</pes_path>\n"
            f"    <parameters>{{{text}}}</parameters>\n"
            f"    <batch_size>{int(batch_size)}</batch_size>\n"
            f"  </ffdirect>")


def input_xml(forcefield: str, init: str | os.PathLike, steps: int, *, ensemble: str = "nvt",
              nbeads: int = 1, timestep_fs: float = 0.5, temperature_K: float = 300.0,
              tau_fs: float = 20.0, seed: int = 31415, traj_stride: int = 10,
              extras: bool = True, box: float | None = MOLECULE_BOX) -> str:
    """A complete i-PI input for MD (``ensemble`` "nvt" or "nve") of the system in ``init``.

    forcefield: an ``<ffsocket>``/``<ffdirect>`` element named "rarefly".
    init: any ASE-readable structure file (i-PI reads it with ``mode="ase"``, Angstrom),
        absolute or relative to i-PI's folder; the same file serves as the driver's template.
    box: edge (Angstrom) of the cubic cell that i-PI needs for a molecule; None for a
        periodic ``init`` that has its own cell.
    nbeads > 1 gives path-integral MD (PILE-L thermostat for NVT).
    Outputs (prefix :data:`PREFIX`): properties ``.out`` every step (step, time/fs,
    conserved/eV, temperature/K, kinetic/eV, potential/eV), positions every
    ``traj_stride`` steps, and with ``extras`` the extras files of :data:`EXTRAS_FILES`.
    """
    if ensemble not in ("nvt", "nve"):
        raise ValueError(f"unknown ensemble {ensemble!r}; use nvt or nve")
    if ensemble == "nvt":
        mode = "pile_l" if nbeads > 1 else "svr"
        thermostat = (f'<thermostat mode="{mode}"><tau units="femtosecond">{tau_fs:g}</tau>'
                      f"</thermostat>")
    else:
        thermostat = ""
    extras_out = ""
    if extras:
        extras_out = "".join(
            f'\n    <trajectory filename="{stem}" stride="1" '
            f'extra_type="{",".join(keys)}"> extras </trajectory>'
            for stem, keys in EXTRAS_FILES.items())
    cell = ("" if box is None else
            f'\n      <cell mode="abc" units="angstrom"> [{box:g}, {box:g}, {box:g}] </cell>')
    return f"""<simulation verbosity="low" safe_stride="100">
  <output prefix="{PREFIX}">
    <properties filename="out" stride="1"> [ step, time{{femtosecond}}, conserved{{electronvolt}}, temperature{{kelvin}}, kinetic_md{{electronvolt}}, potential{{electronvolt}} ] </properties>
    <trajectory filename="pos" stride="{traj_stride}" format="xyz" cell_units="angstrom"> positions{{angstrom}} </trajectory>{extras_out}
    <checkpoint stride="1000"/>
  </output>
  <total_steps>{int(steps)}</total_steps>
  <prng><seed>{int(seed)}</seed></prng>
  {forcefield}
  <system>
    <initialize nbeads="{int(nbeads)}">
      <file mode="ase">{escape(str(init))}</file>{cell}
      <velocities mode="thermal" units="kelvin">{temperature_K:g}</velocities>
    </initialize>
    <forces><force forcefield="rarefly"/></forces>
    <ensemble><temperature units="kelvin">{temperature_K:g}</temperature></ensemble>
    <motion mode="dynamics">
      <dynamics mode="{ensemble}">
        <timestep units="femtosecond">{timestep_fs:g}</timestep>
        {thermostat}
      </dynamics>
    </motion>
  </system>
</simulation>
"""


# ------------------------------------------------------------------------ i-PI output

def read_properties(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """i-PI's properties file as {name: column}; names without units (``conserved``)."""
    names: list[str] = []
    rows: list[list[float]] = []
    with open(path) as fh:
        for line in fh:
            if line.startswith("#"):
                # "# column   3     --> conserved{electronvolt} : ..."
                if "-->" in line:
                    names.append(line.split("-->")[1].split()[0].split("{")[0])
                continue
            values = line.split()
            if len(values) == len(names) and names:
                rows.append([float(v) for v in values])
    data = np.array(rows, dtype=float).reshape(-1, len(names))
    return {n: data[:, i] for i, n in enumerate(names)}


def read_extras(path: str | os.PathLike) -> np.ndarray:
    """An i-PI extras trajectory (``extra_type`` with numeric keys) as (steps, values)."""
    rows: list[list[float]] = []
    with open(path) as fh:
        for line in fh:
            if line.lstrip().startswith("#") or not line.strip():
                continue
            rows.append([float(v) for v in line.split()])
    width = len(rows[0]) if rows else 0
    return np.array([r for r in rows if len(r) == width], dtype=float).reshape(-1, width)


def last_step(path: str | os.PathLike) -> int:
    """The last complete step in a growing properties file (-1 before the first)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 4096))
            tail = fh.read().decode("ascii", errors="replace")
    except FileNotFoundError:
        return -1
    lines = tail.split("\n")[:-1]  # the last piece is incomplete (or empty)
    for line in reversed(lines):
        if line.strip() and not line.startswith("#"):
            try:
                return int(float(line.split()[0]))
            except (ValueError, IndexError):
                return -1
    return -1


# ------------------------------------------------------------------------ processes

def _ipi_command() -> list[str]:
    """The ``i-pi`` script of this Python environment (else the one on PATH)."""
    beside = Path(sys.executable).parent / "i-pi"
    found = str(beside) if beside.exists() else shutil.which("i-pi")
    if not found:
        raise DemoError("the i-pi command was not found; install i-PI (pip install ipi)")
    return [sys.executable, found] if beside.exists() else [found]


def _child_env() -> dict[str, str]:
    """Environment for the children: one torch/OpenMP thread unless the user set one."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", env["OMP_NUM_THREADS"])
    return env


def unique_address(tag: str = "rarefly") -> str:
    """A UNIX socket name no other run uses (i-PI's file is /tmp/ipi_<name>)."""
    return f"{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class IPIRun:
    """An i-PI server on ``input.xml`` in ``workdir``, plus an optional ``rarefly driver``.

    Use as a context manager; leaving it stops whatever still runs (:meth:`stop`). Both
    processes get their own session, so a Ctrl-C in the terminal reaches only the caller,
    which then stops i-PI softly (SIGINT: i-PI writes its files and sends EXIT to drivers).
    Logs: ``ipi.log`` and ``driver.log`` in ``workdir``.
    """

    def __init__(self, workdir: str | os.PathLike, driver_args: Sequence[str] | None = None,
                 input_name: str = "input.xml"):
        self.workdir = Path(workdir)
        self.driver_args = list(driver_args) if driver_args is not None else None
        self.input_name = input_name
        self.ipi: subprocess.Popen | None = None
        self.driver: subprocess.Popen | None = None
        self._logs: list = []

    @property
    def properties_file(self) -> Path:
        return self.workdir / f"{PREFIX}.out"

    def __enter__(self) -> "IPIRun":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, cmd: list[str], log: str) -> subprocess.Popen:
        fh = open(self.workdir / log, "w")
        self._logs.append(fh)
        return subprocess.Popen(cmd, cwd=self.workdir, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=_child_env(),
                                start_new_session=True)

    def start(self) -> None:
        self.ipi = self._spawn(_ipi_command() + [self.input_name], "ipi.log")
        if self.driver_args is not None:
            self.driver = self._spawn([sys.executable, "-m", "rarefly.cli", "driver",
                                       *self.driver_args], "driver.log")

    def log_tail(self, name: str, lines: int = 15) -> str:
        """The end of a log; for the driver, its own messages when it wrote any."""
        try:
            text = (self.workdir / name).read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        own = [line for line in text if line.startswith("rarefly driver:")]
        return "\n".join((own or text)[-lines:])

    def wait(self, timeout: float, progress=None, total_steps: int | None = None,
             poll: float = 0.2) -> None:
        """Wait for i-PI to finish; DemoError when a process fails or ``timeout`` passes.

        progress: a tqdm-like bar, updated with the step count of the properties file.
        """
        deadline = time.monotonic() + timeout
        shown = -1
        while True:
            if progress is not None:
                shown = self._advance(progress, shown, total_steps)
            if self.ipi.poll() is not None:
                break
            if self.driver is not None and self.driver.poll() not in (None, 0):
                raise DemoError(f"rarefly driver stopped with exit code "
                                f"{self.driver.returncode}:\n{self.log_tail('driver.log')}")
            if time.monotonic() > deadline:
                raise DemoError(f"i-PI did not finish within {timeout:g} s; see "
                                f"{self.workdir / 'ipi.log'}")
            time.sleep(poll)
        if self.ipi.returncode != 0:
            raise DemoError(f"i-PI stopped with exit code {self.ipi.returncode}:\n"
                            f"{self.log_tail('ipi.log')}")
        if self.driver is not None:
            try:  # i-PI sent EXIT; the driver ends by itself
                code = self.driver.wait(timeout=30)
            except subprocess.TimeoutExpired:
                raise DemoError("rarefly driver did not exit after i-PI finished") from None
            if code != 0:
                raise DemoError(f"rarefly driver stopped with exit code {code}:\n"
                                f"{self.log_tail('driver.log')}")
        if progress is not None:
            self._advance(progress, shown, total_steps)

    def _advance(self, progress, shown: int, total_steps: int | None) -> int:
        """Move the bar to i-PI's current step; its clock starts at step 0 (after start-up)."""
        step = last_step(self.properties_file)
        if total_steps is not None:
            step = min(step, total_steps)
        if step >= 0 and shown < 0:
            progress.reset(total=total_steps)
            shown = 0
        if step > shown:
            progress.update(step - shown)
            shown = step
        return shown

    def stop(self, grace: float = 15.0) -> None:
        """Stop what still runs: i-PI softly (SIGINT), then the driver; kill as a last resort."""
        procs = [p for p in (self.ipi, self.driver) if p is not None]
        if self.ipi is not None and self.ipi.poll() is None:
            _signal(self.ipi, signal.SIGINT)
        deadline = time.monotonic() + grace
        for p in procs:
            if p is self.driver and p.poll() is None:
                # i-PI's soft exit sends EXIT; give the driver a moment, then SIGTERM
                try:
                    p.wait(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    _signal(p, signal.SIGTERM)
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(p, signal.SIGKILL)
                p.wait()
        for fh in self._logs:
            fh.close()
        self._logs = []


def _signal(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the process group of ``proc`` (its own session; see IPIRun)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------------ the model

def select_frames(path: str | os.PathLike, count: int):
    """``count`` labelled frames spread evenly over the extxyz file ``path``."""
    from ase.io import read

    from rarefly.posterior import LabelledFrame
    from rarefly.prediction import Structure

    atoms = read(path, index=":")
    if not atoms:
        raise DemoError(f"{path} holds no structures")
    picks = np.unique(np.linspace(0, len(atoms) - 1, min(count, len(atoms))).round().astype(int))
    return [LabelledFrame(Structure.from_atoms(a), float(a.info["REF_energy"]),
                          np.asarray(a.arrays["REF_forces"], dtype=float))
            for a in (atoms[i] for i in picks)]


def build_model(path: str | os.PathLike, kind: str = "lastlayer", foundation: str = "small",
                data: str | os.PathLike | None = None, frames: int = DEFAULT_FRAMES,
                progress: bool = False, dtype: str = "float32") -> Path:
    """Fit a ``kind`` posterior on ``frames`` frames of ``data`` and save it to ``path``.

    data: extxyz with ``REF_energy``/``REF_forces`` in eV, eV/A (default: the shipped
    GFN2-xTB training set, the foundation model's own reference, so no energy offset).
    dtype: float32 (the demo's default) fits and runs about 1.7x faster than float64 and
    changes forces and sigmas by ~1e-4 relative, which MD with a thermostat does not notice.
    """
    from rarefly.foundation import DATA_DIR
    from rarefly.posterior import build_posterior

    data = Path(data) if data is not None else DATA_DIR / "foundation_train.xyz"
    if not data.exists():
        raise DemoError(f"the training data {data} is missing; regenerate it with "
                        "`python scripts/make_foundation.py`")
    from rarefly.driver_cli import _QUIET_WARNINGS

    labelled = select_frames(data, frames)
    options = {"cycle_steps": 50} if kind == "sghmc" else {}  # a demo, not a production fit
    with warnings.catch_warnings():
        for text in _QUIET_WARNINGS:  # import-time noise of mace/e3nn/TorchScript
            warnings.filterwarnings("ignore", message=text, category=UserWarning)
        calibration = select_frames(DATA_DIR / "foundation_valid.xyz", max(5, frames // 2))
        posterior = build_posterior(foundation, kind, labelled, calibration, dtype=dtype,
                                    progress=progress, **options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    posterior.save(path)
    return path


def _usable_model(path: Path, kind: str) -> bool:
    """Whether ``path`` is a readable model file of ``kind`` (else the cache is rebuilt)."""
    if not path.exists():
        return False
    try:
        from rarefly.model_file import load_model_file

        return load_model_file(path)["kind"] == kind
    except Exception:  # noqa: BLE001 - an old or broken cache: rebuild it
        return False


# ------------------------------------------------------------------------ the command

#: the on-the-fly configuration of the demo (package data; a copy goes into --out)
DEMO_CONFIG = "demo.toml"
#: files that mark a folder as holding an earlier run (the model cache alone does not)
_RUN_MARKERS = ("config.toml", "run.json", "input.xml", "frames.db", "RESTART", f"{PREFIX}.out")

EPILOG = """\
what it does (default: on-the-fly learning, the configuration rarefly/data/demo.toml):
  1. fits a lastlayer posterior on the embedded foundation model and 30 frames of its
     GFN2-xTB data (~15 s; cached as DIR/model-lastlayer.rfly and reused by later runs);
  2. writes DIR/config.toml, a copy of demo.toml for this folder, and runs it as
     `rarefly run DIR/config.toml` does: i-PI NVT MD of ethanol at 600 K, `rarefly driver`
     flagging uncertain frames, `rarefly trainer` labelling them with GFN2-xTB (tblite),
     refining all MACE weights every 8 labels (replaying the embedded model's training
     frames) and publishing refined models that the driver picks up; until 24 reference calls are
     spent (under a minute on two cores) or the 1000 steps are done;
  3. writes DIR/report.md with its plots and prints where the trajectory, the uncertainty
     log and the report are, and how the error on 8 held-out GFN2-xTB frames changed from
     the first to the last model version.

running it again: a folder DIR that holds an earlier run (of either kind) is moved aside
  to DIR.previous (an older DIR.previous is deleted; the line "moved the previous run ..."
  says so) and a fresh run starts in DIR, reusing the cached model. To continue a run instead, raise
  [budget] max_reference_calls in DIR/config.toml and use `rarefly run DIR/config.toml
  --restart`.

--no-learning runs the earlier demo: plain i-PI NVT MD at 300 K (default 500 steps) on the
  same posterior, nothing labelled.

Ctrl-C stops everything cleanly (exit status 130). Exit status 1: something failed (one
sentence says what and names the log).
"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run the shipped demo: on-the-fly learning on ethanol. i-PI runs MD on a Bayesian\n"
        "MACE posterior of the embedded foundation model; frames the model is unsure of are\n"
        "labelled with GFN2-xTB and learned while the MD goes on, and a report shows the\n"
        "model improving. One to two minutes on two CPU cores.")
    parser.epilog = EPILOG
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help="folder for the model, the run's inputs, outputs and report "
                             "(default: %(default)s)")
    parser.add_argument("--steps", type=_positive_count, default=None,
                        help="MD steps of 0.5 fs (default: 1000 for the learning run, "
                             f"{DEFAULT_STEPS} with --no-learning)")
    parser.add_argument("--max-reference-calls", type=_positive_count, default=None, metavar="N",
                        help="reference calls after which the learning run stops "
                             "(default: 24, as in demo.toml)")
    parser.add_argument("--no-learning", action="store_true",
                        help="plain NVT MD at 300 K on the fitted posterior, without the "
                             "trainer (the earlier demo)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar for the learning run")
    parser.add_argument("--kind", default="lastlayer", choices=["lastlayer", "sghmc"],
                        help="posterior kind of the demo model (default: %(default)s)")
    parser.add_argument("--foundation", default="small", metavar="MODEL",
                        help="MACE foundation checkpoint (default: the embedded `small`)")
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="labelled extxyz for the fit (default: the shipped "
                             "foundation_train.xyz)")
    parser.add_argument("--structure", default=None, metavar="FILE",
                        help="the molecule to simulate (default: the shipped ethanol.xyz)")


def _positive_count(text: str) -> int:
    from rarefly.driver_cli import whole_number

    return whole_number(1, "a positive number")(text)


def run(args: argparse.Namespace) -> int:
    try:
        return _run_md(args) if args.no_learning else _run_learning(args)
    except DemoError as exc:
        print(f"rarefly demo: {exc}", file=sys.stderr)
        return 1


def _structure(args: argparse.Namespace) -> Path:
    from rarefly.foundation import DATA_DIR

    structure = Path(args.structure).resolve() if args.structure else DATA_DIR / "ethanol.xyz"
    if not structure.exists():
        if args.structure:
            raise DemoError(f"the structure file {args.structure} does not exist")
        raise DemoError(f"the demo structure {structure} is missing; regenerate it with "
                        "`python scripts/make_foundation.py`")
    return structure


def _model(out: Path, args: argparse.Namespace, previous: Path | None = None) -> Path:
    """The demo's posterior in ``out``: reused when there (or in ``previous``), else fitted."""
    model = out / f"model-{args.kind}.rfly"
    if previous is not None and not model.exists():
        cached = previous / model.name
        if _usable_model(cached, args.kind):
            shutil.copyfile(cached, model)
    if _usable_model(model, args.kind):
        print(f"rarefly demo: reusing the model {model}")
    else:
        print(f"rarefly demo: fitting a {args.kind} posterior on {DEFAULT_FRAMES} frames "
              f"(once; cached in {model})", flush=True)
        t0 = time.monotonic()
        build_model(model, args.kind, args.foundation, args.data, progress=True)
        print(f"rarefly demo: model ready in {time.monotonic() - t0:.0f} s")
    return model


def set_aside(out: Path) -> Path | None:
    """Move an earlier run in ``out`` to ``out.previous`` (deleting an older one there).

    Returns the folder it went to, or None when ``out`` holds no run (missing, empty, or only
    the model cache). DemoError when ``out.previous`` exists but is not an earlier demo run,
    which is never deleted.
    """
    if not out.is_dir() or not any((out / m).exists() for m in _RUN_MARKERS):
        return None
    previous = out.with_name(out.name + ".previous")
    if previous.exists():
        if not previous.is_dir() or not any((previous / m).exists() for m in _RUN_MARKERS):
            raise DemoError(f"{out} holds an earlier run, and {previous}, where it would be "
                            "moved, exists but is not an earlier demo run; move or delete "
                            "one of them, or give another --out")
        shutil.rmtree(previous)
    os.replace(out, previous)
    return previous


def _set_aside_and_say(out: Path) -> Path | None:
    older = out.with_name(out.name + ".previous").exists()
    previous = set_aside(out)
    if previous is not None:
        print(f"rarefly demo: moved the previous run to {previous}"
              + (" (replacing the older one there)" if older else "")
              + f"; starting afresh in {out}")
    return previous


def _toml_set(text: str, section: str, key: str, value: str) -> str:
    """``text`` with ``key = value`` in ``[section]`` (replacing that line, or added)."""
    import re

    head = re.search(rf"(?m)^\[{re.escape(section)}\][^\n]*\n", text)
    if head is None:
        return text.rstrip("\n") + f"\n\n[{section}]\n{key} = {value}\n"
    nxt = re.search(r"(?m)^\[", text[head.end():])
    end = head.end() + (nxt.start() if nxt else len(text) - head.end())
    body, n = re.subn(rf"(?m)^{re.escape(key)}\s*=.*$", f"{key} = {value}",
                      text[head.end():end], count=1)
    if n == 0:
        body = f"{key} = {value}\n" + body
    return text[:head.end()] + body + text[end:]


def demo_config(structure: Path, model_name: str, *, steps: int | None = None,
                max_reference_calls: int | None = None, foundation: str = "small") -> str:
    """The text of DIR/config.toml: the shipped demo.toml, made to run in DIR."""
    import json
    import tomllib

    from rarefly.foundation import DATA_DIR

    text = (DATA_DIR / DEMO_CONFIG).read_text()
    text = _toml_set(text, "system", "structure", json.dumps(str(structure)))
    text = _toml_set(text, "model", "file", json.dumps(model_name))
    text = _toml_set(text, "output", "directory", '"."')
    replay = tomllib.loads(text).get("learning", {}).get("backbone_replay")
    if replay:  # a package-data file: its path must not depend on DIR
        text = _toml_set(text, "learning", "backbone_replay", json.dumps(str(DATA_DIR / replay)))
    if steps is not None:
        text = _toml_set(text, "system", "steps", str(int(steps)))
    if max_reference_calls is not None:
        text = _toml_set(text, "budget", "max_reference_calls", str(int(max_reference_calls)))
    if foundation != "small":  # another model's energy zero is not GFN2-xTB's
        text = _toml_set(text, "learning", "align_energies", "true")
    return ("# written by `rarefly demo` from rarefly/data/demo.toml; a `rarefly run` "
            "configuration\n" + text)


def _run_learning(args: argparse.Namespace) -> int:
    """The default: `rarefly run` on demo.toml in ``--out``, then the summary."""
    from rarefly.run import OnTheFlyRun, RunError
    from rarefly.run_config import ConfigError, load_config

    out = Path(args.out).resolve()
    structure = _structure(args)
    previous = _set_aside_and_say(out)
    out.mkdir(parents=True, exist_ok=True)
    model = _model(out, args, previous)
    config = out / "config.toml"
    config.write_text(demo_config(structure, model.name, steps=args.steps,
                                  max_reference_calls=args.max_reference_calls,
                                  foundation=args.foundation))
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise DemoError(f"{config}: {exc}") from None
    print(f"rarefly demo: on-the-fly learning: i-PI MD of ethanol at "
          f"{cfg.system.temperature:g} K, frames with confidence < {cfg.learning.level:g} "
          f"labelled with GFN2-xTB, until {cfg.budget.max_reference_calls} reference calls "
          f"or {cfg.system.steps} steps", flush=True)
    try:
        code = OnTheFlyRun(cfg, progress=not args.no_progress).execute()
    except RunError as exc:
        raise DemoError(str(exc)) from None
    _report_learning(out)
    return code


def held_out_change(out: Path) -> str | None:
    """One line: how the held-out errors changed from the first to the last model version."""
    from rarefly.report import RunData

    data = RunData(out)
    curve = data.holdout_curve()
    calls = len(data.labels)
    if not curve:
        return None
    (v0, e0, f0), (v1, e1, f1) = curve[0], curve[-1]
    if v0 == v1:
        return (f"held-out error: energy RMSE {e0 * 1000:.1f} meV, force RMSE {f0 * 1000:.1f} "
                f"meV/A; only model v{v0} was evaluated ({calls} reference calls, no new "
                "version published)")
    return (f"held-out error: energy RMSE {e0 * 1000:.1f} -> {e1 * 1000:.1f} meV, force RMSE "
            f"{f0 * 1000:.1f} -> {f1 * 1000:.1f} meV/A (model v{v0} -> v{v1}, "
            f"{calls} reference calls)")


def _report_learning(out: Path) -> None:
    files = [("trajectory", out / f"{PREFIX}.pos_0.xyz", ""),
             ("uncertainty log", out / f"{PREFIX}.uncertainty_0",
              "   (i-PI extras per step: energy_uncertainty/eV, confidence, model_version, "
              "flagged)"),
             ("report", out / "report.md", "   (with trajectory, reference-call, calibration "
              "and learning-curve plots)")]
    print("rarefly demo: where things are")
    for name, path, note in files:
        if path.exists():
            print(f"  {name:<17} {path}{note}")
    print(f"  {'frames, labels':<17} {out / 'frames.db'}, {out / 'frames.jsonl'}")
    print(f"  {'config, logs':<17} {out / 'config.toml'}, {out / 'ipi.log'}, "
          f"{out / 'driver.log'}, {out / 'trainer.log'}")
    line = held_out_change(out)
    if line:
        print(line)


def _run_md(args: argparse.Namespace) -> int:
    """``--no-learning``: plain i-PI NVT MD on the fitted posterior, nothing learned."""
    from ase.io import read
    from tqdm import tqdm

    out = Path(args.out).resolve()
    structure = _structure(args)
    previous = _set_aside_and_say(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = args.steps or DEFAULT_STEPS
    model = _model(out, args, previous)

    atoms = read(structure, index=0)
    if any(atoms.pbc):
        raise DemoError(f"the demo simulates a molecule, but {structure} is periodic")
    init = out / structure.name  # i-PI's start and the driver's template
    if init.resolve() != structure.resolve():
        shutil.copyfile(structure, init)
    for pattern in (f"{PREFIX}.*", "RESTART", "#*#"):  # earlier runs, and i-PI's backups
        for old in out.glob(pattern):
            old.unlink()
    address = unique_address("rarefly-demo")
    (out / "input.xml").write_text(input_xml(ffsocket_xml(address), init.name, steps))
    driver_args = ["--model", str(model), "--template", str(init), "-q", "-u", "-a", address]

    print(f"rarefly demo: i-PI NVT MD of {atoms.get_chemical_formula()}, {steps} steps "
          f"of 0.5 fs at 300 K, forces from `rarefly driver` on /tmp/ipi_{address}")
    print("rarefly demo: starting i-PI and the driver (loading the model takes a few seconds)")
    started = time.monotonic()
    sim = IPIRun(out, driver_args)
    interrupted = False
    # The children run in their own sessions (see IPIRun): a SIGTERM to the demo must stop
    # them as Ctrl-C does, so it is turned into KeyboardInterrupt while they run.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with tqdm(total=steps, unit="step", desc="i-PI MD", dynamic_ncols=True) as bar:
            sim.start()
            sim.wait(timeout=max(600.0, 2.0 * steps), progress=bar,
                     total_steps=steps)
    except KeyboardInterrupt:
        interrupted = True
        print("\nrarefly demo: interrupted; stopping i-PI and the driver", file=sys.stderr)
    finally:
        sim.stop()
        signal.signal(signal.SIGTERM, previous)
    _report_md(out, time.monotonic() - started, interrupted)
    return 130 if interrupted else 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _report_md(out: Path, seconds: float, interrupted: bool) -> None:
    traj = out / f"{PREFIX}.pos_0.xyz"
    unc = out / f"{PREFIX}.uncertainty_0"
    fsig = out / f"{PREFIX}.forces_sigma_0"
    props = out / f"{PREFIX}.out"
    print(f"rarefly demo: {'stopped' if interrupted else 'finished'} after {seconds:.0f} s")
    print(f"  trajectory        {traj}")
    print(f"  uncertainty log   {unc}   (per step: energy_uncertainty/eV, confidence)")
    print(f"  force sigmas      {fsig}   (per step: forces_uncertainty/(eV/A) per atom)")
    print(f"  properties        {props}")
    print(f"  i-PI input, logs  {out / 'input.xml'}, {out / 'ipi.log'}, {out / 'driver.log'}")
    try:
        values = read_extras(unc)
        temps = read_properties(props).get("temperature", np.zeros(0))
    except (FileNotFoundError, ValueError):
        return
    if len(values):
        t_mean = f", mean T {temps.mean():.0f} K" if len(temps) else ""
        print(f"summary: {len(values)} steps, mean sigma_E {values[:, 0].mean() * 1000:.1f} meV, "
              f"min confidence {values[:, 1].min():.3f}{t_mean}")
