"""The report of a ``rarefly run``: ``report.md`` and its PNG plots, from the run's files.

Everything is read from the output directory, so the report can be written at any time
(``rarefly run CONFIG --report-only``), also of a run that is still going or that failed:

- ``simulation.out``: i-PI's properties (step, time/ps, temperature/K, potential/eV);
- ``simulation.uncertainty_0``: the driver's extras per step (energy_uncertainty/eV,
  confidence, model_version, flagged), each block headed by i-PI's ``Step:`` line;
- ``COLVAR``: PLUMED's output when the run has a bias (its physical CVs are plotted);
- ``frames.jsonl``: the trainer's events (``label``: pred/ref energy, error, sigma,
  confidence, within_eps, origin, model_version, and the served_* keys of the model that
  served the frame, whose audit coverage the report gives; ``publish``; ``holdout``; ...);
- ``run.json``: what ``rarefly run`` recorded (epsilon, level, one entry per invocation).

A restart appends to i-PI's files and may repeat the steps after its last checkpoint; the
readers keep the last occurrence of each step.

Plots: ``trajectory.png`` (sigma_E and the physical CV, or the potential energy, along the
trajectory), ``reference_calls.png`` (labels over wall time, model versions),
``calibration.png`` (observed coverage of |error| < k sigma for audit and flagged frames;
|error| against sigma), ``learning_curve.png`` (held-out errors per model version).
:class:`LiveStatus` reads the same files incrementally for ``rarefly run``'s progress bar.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np

#: k values of the calibration curve (coverage of |err| < k sigma)
KS = np.array([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
_STEP = re.compile(r"Step:\s*(\d+)")


class ReportError(RuntimeError):
    """No report can be written; the message is one sentence."""


# ----------------------------------------------------------------------------- readers

def read_events(path: str | os.PathLike) -> list[dict]:
    """The trainer's JSON events (a line still being written is skipped)."""
    out = []
    try:
        with open(path) as fh:
            for line in fh:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    except FileNotFoundError:
        pass
    return out


def read_step_extras(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of an i-PI extras trajectory with numeric keys; last wins per step."""
    rows: dict[int, list[float]] = {}
    step = None
    try:
        with open(path) as fh:
            for line in fh:
                if "Step:" in line:
                    m = _STEP.search(line)
                    step = int(m.group(1)) if m else None
                    continue
                if not line.strip() or line.lstrip().startswith("#") or step is None:
                    continue
                try:
                    rows[step] = [float(v) for v in line.split()]
                except ValueError:
                    continue
    except FileNotFoundError:
        pass
    if not rows:
        return np.zeros(0, int), np.zeros((0, 0))
    width = max(len(v) for v in rows.values())
    steps = np.array(sorted(k for k, v in rows.items() if len(v) == width), dtype=int)
    return steps, np.array([rows[s] for s in steps], dtype=float).reshape(len(steps), width)


def read_properties(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """i-PI's properties as {name: column}, one row per step (last occurrence wins)."""
    from rarefly.demo import read_properties as _read

    try:
        data = _read(path)
    except (FileNotFoundError, ValueError):
        return {}
    if "step" not in data or not len(data["step"]):
        return {}
    steps = data["step"].astype(int)
    _, last = np.unique(steps[::-1], return_index=True)
    keep = np.sort(len(steps) - 1 - last)
    return {k: v[keep] for k, v in data.items()}


def read_colvar(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """PLUMED's COLVAR as {field: column} (the fields of its first ``#! FIELDS`` line)."""
    fields: list[str] = []
    rows = []
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith("#! FIELDS"):
                    if not fields:
                        fields = line.split()[2:]
                    continue
                if line.startswith("#") or not line.strip():
                    continue
                values = line.split()
                if fields and len(values) == len(fields):
                    try:
                        rows.append([float(v) for v in values])
                    except ValueError:
                        continue
    except FileNotFoundError:
        return {}
    if not rows:
        return {}
    data = np.array(rows)
    return {f: data[:, i] for i, f in enumerate(fields)}


def physical_cvs(colvar: dict[str, np.ndarray]) -> list[str]:
    """COLVAR fields that are neither time, rarefly's sigma, nor a bias."""
    return [f for f in colvar if f != "time" and not f.startswith("sigma")
            and not f.endswith(".bias") and ".bias" not in f and not f.endswith("bias")]


def last_step(path: str | os.PathLike) -> int:
    from rarefly.demo import last_step as _last

    return _last(path)


# ----------------------------------------------------------------------------- live status

class _Tail:
    """New complete lines of a growing file since the last call."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.rest = b""

    def lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        data = self.rest + chunk
        *complete, self.rest = data.split(b"\n")
        return [c.decode("utf-8", errors="replace") for c in complete]


class LiveStatus:
    """What ``rarefly run`` shows while it runs, read incrementally from the run's files."""

    def __init__(self, files, since: float = 0.0):
        """since: unix time; ``budget``/``stopped`` count only the trainer's events after it."""
        self.files = files
        self.since = since
        self._events = _Tail(files.events)
        self._extras = _Tail(files.extras)
        self.state = {"step": 0, "flagged": 0, "labelled": 0, "version": None, "audit": 0,
                      "coverage": float("nan"), "started": False, "budget": False,
                      "stopped": False}
        self._within = 0

    def poll(self) -> dict:
        s = self.state
        for line in self._extras.lines():
            if line.strip() and not line.lstrip().startswith("#"):
                values = line.split()
                if len(values) >= 4:
                    try:
                        s["flagged"] += float(values[3]) > 0.5
                    except ValueError:
                        pass
        for line in self._events.lines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            kind = e.get("event")
            if kind == "label":
                s["labelled"] += 1
                if e.get("origin") == "audit":
                    s["audit"] += 1
                    self._within += bool(e.get("served_within_eps", e.get("within_eps")))
                    s["coverage"] = self._within / s["audit"]
            elif kind in ("start", "publish", "stop") and e.get("model_version") is not None:
                s["version"] = int(e["model_version"])
            if kind in ("start", "budget", "stop") and e.get("t", 0.0) >= self.since:
                s[{"start": "started", "budget": "budget", "stop": "stopped"}[kind]] = True
        s["step"] = max(s["step"], last_step(self.files.properties))
        return dict(s)


# ----------------------------------------------------------------------------- the report

class RunData:
    """Everything the report plots, read from ``root``."""

    def __init__(self, root: Path):
        self.root = root
        try:
            self.manifest = json.loads((root / "run.json").read_text())
        except (OSError, ValueError):
            self.manifest = {"segments": []}
        self.events = read_events(root / "frames.jsonl")
        self.props = read_properties(root / "simulation.out")
        self.extras_steps, self.extras = read_step_extras(root / "simulation.uncertainty_0")
        self.colvar = read_colvar(root / "COLVAR")
        self.labels = [e for e in self.events if e["event"] == "label"]
        self.publishes = [e for e in self.events if e["event"] == "publish"]
        self.failed = [e for e in self.events if e["event"] == "label_failed"]
        self.rejected = [e for e in self.events if e["event"] == "label_rejected"]
        self.epsilon = self.manifest.get("epsilon_eV")
        self.timestep_fs = self.manifest.get("timestep_fs")

    def origin(self, name: str) -> list[dict]:
        return [e for e in self.labels if e.get("origin") == name]

    def versions(self) -> tuple[int | None, int | None]:
        vs = [int(e["model_version"]) for e in self.events
              if e["event"] in ("start", "holdout", "publish")
              and e.get("model_version") is not None]
        return (min(vs), max(vs)) if vs else (None, None)

    def holdout_curve(self) -> list[tuple[int, float, float]]:
        """(model version, energy RMSE eV, force RMSE eV/A), one per version (last wins)."""
        points = {}
        for e in self.events:
            if e["event"] in ("holdout", "publish") and e.get("holdout_energy_rmse") is not None:
                points[int(e["model_version"])] = (float(e["holdout_energy_rmse"]),
                                                   float(e["holdout_force_rmse"]))
        return [(v, *points[v]) for v in sorted(points)]

    def t0(self) -> float | None:
        times = [s["started"] for s in self.manifest.get("segments", []) if "started" in s]
        times += [e["t"] for e in self.events if "t" in e]
        return min(times) if times else None


def coverage(labels: list[dict], ks=KS) -> np.ndarray:
    """Observed fraction of |error| < k sigma for each k (NaN without labels)."""
    if not labels:
        return np.full(len(ks), np.nan)
    err = np.abs([float(e["error"]) for e in labels])
    sig = np.array([float(e["sigma"]) for e in labels])
    return np.array([np.mean(err < k * sig) for k in ks])


def gaussian_coverage(ks=KS) -> np.ndarray:
    return np.array([math.erf(k / math.sqrt(2.0)) for k in ks])


def write_report(root: str | os.PathLike) -> Path:
    """Write ``report.md`` and its PNGs in the run directory ``root``; return the page's path."""
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"there is no run in {root} to report on")
    data = RunData(root)
    if not data.events and not data.props:
        raise ReportError(f"{root} holds no output of a run yet (no frames.jsonl, no "
                          "simulation.out)")
    import matplotlib

    matplotlib.use("Agg")
    figures = {}
    for name, plot in (("trajectory", _plot_trajectory), ("reference_calls", _plot_calls),
                       ("calibration", _plot_calibration), ("learning_curve", _plot_learning)):
        path = root / f"{name}.png"
        note = plot(data, path)
        figures[name] = (path if path.exists() and note is None else None, note)
    page = _markdown(data, figures)
    tmp = root / ".report.md.tmp"
    tmp.write_text(page)
    os.replace(tmp, root / "report.md")
    return root / "report.md"


# ----------------------------------------------------------------------------- plots

def _figure(rows=1, cols=1, size=(8.0, 4.5), **kw):
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=size, constrained_layout=True, **kw)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)


def _time_ps(data: RunData, steps: np.ndarray) -> np.ndarray:
    props = data.props
    if "time" in props and len(props["time"]) > 1:
        return np.interp(steps, props["step"], props["time"])
    return steps * (data.timestep_fs or 1.0) / 1000.0


def _plot_trajectory(data: RunData, path: Path) -> str | None:
    if not len(data.extras_steps) and not data.props:
        return "no i-PI output yet"
    cvs = physical_cvs(data.colvar)
    fig, (ax, bx) = _figure(2, 1, size=(8.0, 5.5), sharex=True)
    if len(data.extras_steps):
        t = _time_ps(data, data.extras_steps)
        sigma = data.extras[:, 0] * 1000.0
        ax.plot(t, sigma, lw=0.8, color="tab:blue", label=r"$\sigma_E$")
        if data.extras.shape[1] >= 4:
            flag = data.extras[:, 3] > 0.5
            if flag.any():
                ax.plot(t[flag], sigma[flag], "o", ms=3, color="tab:red", label="flagged")
            versions = data.extras[:, 2]
            changes = np.flatnonzero(np.diff(versions) != 0) + 1
            span = max(float(t[-1] - t[0]), 1e-12)
            for i in changes:
                for a in (ax, bx):
                    a.axvline(t[i], color="0.5", ls=":", lw=0.8)
            # one label per cluster of changes closer than 6 % of the time axis
            clusters: list[list[int]] = []
            for i in changes:
                if clusters and (t[i] - t[clusters[-1][-1]]) / span < 0.06:
                    clusters[-1].append(i)
                else:
                    clusters.append([i])
            for c in clusters:
                first, last = int(versions[c[0]]), int(versions[c[-1]])
                text = f"v{first}" if first == last else f"v{first}-v{last}"
                ax.annotate(text, (t[c[0]], 1.0), xycoords=("data", "axes fraction"),
                            xytext=(2, -10), textcoords="offset points", fontsize=8,
                            color="0.3", ha="right" if t[c[0]] - t[0] > 0.9 * span else "left")
        if data.epsilon:
            ax.axhline(data.epsilon * 1000.0, color="tab:green", ls="--", lw=0.8,
                       label=r"$\epsilon$")
        ax.legend(loc="upper left", fontsize=8, ncol=3)
    ax.set_ylabel(r"$\sigma_E$ (meV)")
    ax.set_title("Energy uncertainty along the trajectory (dotted: new model version in use)",
                 fontsize=10)
    if cvs and "time" in data.colvar:
        # i-PI's <ffplumed> sets PLUMED's time step to 1: COLVAR's time is the MD step
        t_cv = _time_ps(data, data.colvar["time"])
        for name in cvs[:2]:
            bx.plot(t_cv, data.colvar[name], lw=0.8, label=name)
        bx.set_ylabel("physical CV (PLUMED units)")
        bx.legend(loc="upper left", fontsize=8)
    elif "potential" in data.props:
        bx.plot(data.props["time"] if "time" in data.props else data.props["step"],
                data.props["potential"], lw=0.8, color="tab:purple")
        bx.set_ylabel("potential energy (eV)")
    bx.set_xlabel("simulated time (ps)")
    _save(fig, path)
    return None


def _plot_calls(data: RunData, path: Path) -> str | None:
    t0 = data.t0()
    if not data.labels or t0 is None:
        return "no reference calls yet"
    fig, ax = _figure()
    t = np.array([(e["t"] - t0) / 60.0 for e in data.labels])
    n = np.arange(1, len(t) + 1)
    ax.step(t, n, where="post", color="0.3", lw=1.0)
    for origin, color in (("flagged", "tab:red"), ("audit", "tab:blue")):
        sel = np.array([e.get("origin") == origin for e in data.labels])
        if sel.any():
            ax.plot(t[sel], n[sel], "o", ms=5, color=color, label=f"{origin} ({sel.sum()})")
    ax.set_xlabel("wall time since the start of the run (min)")
    ax.set_ylabel("reference calls (cumulative)")
    ax.set_ylim(0, len(t) + 1)
    for s in data.manifest.get("segments", [])[1:]:
        ax.axvline((s["started"] - t0) / 60.0, color="0.5", ls="--", lw=0.8)
    vx = ax.twinx()
    pub = [(e["t"], int(e["model_version"])) for e in data.events
           if e["event"] in ("start", "publish") and e.get("model_version") is not None]
    if pub:
        pt = np.array([(p[0] - t0) / 60.0 for p in pub] + [max(t.max(), (pub[-1][0] - t0) / 60.0)])
        pv = np.array([p[1] for p in pub] + [pub[-1][1]])
        vx.step(pt, pv, where="post", color="tab:green", lw=1.2, label="model version")
        vx.set_ylabel("model version", color="tab:green")
        vx.yaxis.get_major_locator().set_params(integer=True)
    lines, names = ax.get_legend_handles_labels()
    l2, n2 = vx.get_legend_handles_labels()
    ax.legend(lines + l2, names + n2, loc="upper left", fontsize=8)
    ax.set_title("Reference calls and published model versions (dashed: restart)", fontsize=10)
    _save(fig, path)
    return None


def _plot_calibration(data: RunData, path: Path) -> str | None:
    if not data.labels:
        return "no labelled frames yet"
    fig, (ax, bx) = _figure(1, 2, size=(10.0, 4.3))
    ax.plot(KS, gaussian_coverage(), "--", color="0.5", label="ideal (Gaussian)")
    for origin, color, marker in (("audit", "tab:blue", "o"), ("flagged", "tab:red", "s")):
        sel = data.origin(origin)
        if sel:
            ax.plot(KS, coverage(sel), marker=marker, color=color,
                    label=f"{origin} frames (n={len(sel)})")
    ax.set_xlabel(r"k")
    ax.set_ylabel(r"observed fraction with $|E_\mathrm{err}| < k\,\sigma_E$")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Calibration curve", fontsize=10)
    sig = np.array([float(e["sigma"]) for e in data.labels]) * 1000.0
    err = np.abs([float(e["error"]) for e in data.labels]) * 1000.0
    top = max(sig.max(), err.max(), (data.epsilon or 0.0) * 1000.0) * 1.15
    grid = np.array([0.0, top])
    bx.plot(grid, grid, "-", color="0.5", lw=0.8, label=r"$|err| = \sigma$")
    bx.plot(grid, 2 * grid, ":", color="0.5", lw=0.8, label=r"$|err| = 2\sigma$")
    for origin, color, marker in (("audit", "tab:blue", "o"), ("flagged", "tab:red", "s")):
        sel = np.array([e.get("origin") == origin for e in data.labels])
        if sel.any():
            bx.plot(sig[sel], err[sel], marker, color=color, ms=5, alpha=0.8, ls="none",
                    label=origin)
    if data.epsilon:
        bx.axhline(data.epsilon * 1000.0, color="tab:green", ls="--", lw=0.8,
                   label=r"$\epsilon$")
    bx.set_xlim(0, top)
    bx.set_ylim(0, top)
    bx.set_xlabel(r"predicted $\sigma_E$ (meV)")
    bx.set_ylabel(r"observed $|E_\mathrm{pred} - E_\mathrm{ref}|$ (meV)")
    bx.legend(loc="upper left", fontsize=8)
    bx.set_title("Predicted vs observed error (model before it saw the frame)", fontsize=10)
    _save(fig, path)
    return None


def _plot_learning(data: RunData, path: Path) -> str | None:
    curve = data.holdout_curve()
    if not curve and not data.labels:
        return "no held-out errors and no labels yet"
    fig, (ax, bx) = _figure(1, 2, size=(10.0, 4.0))
    if curve:
        v = [c[0] for c in curve]
        ax.plot(v, [c[1] * 1000 for c in curve], "o-", color="tab:blue", label="energy (meV)")
        fx = ax.twinx()
        fx.plot(v, [c[2] * 1000 for c in curve], "s--", color="tab:orange",
                label=r"forces (meV/$\AA$)")
        fx.set_ylabel(r"force RMSE (meV/$\AA$)", color="tab:orange")
        ax.set_ylabel("energy RMSE (meV)", color="tab:blue")
        lines, names = ax.get_legend_handles_labels()
        l2, n2 = fx.get_legend_handles_labels()
        ax.legend(lines + l2, names + n2, loc="best", fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    else:
        ax.text(0.5, 0.5, "no held-out set\n([learning] holdout_frames\nor holdout_file)",
                ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xlabel("model version")
    ax.set_title("Held-out reference frames", fontsize=10)
    for origin, color, marker in (("audit", "tab:blue", "o"), ("flagged", "tab:red", "s")):
        sel = data.origin(origin)
        if sel:
            bx.plot([int(e["model_version"]) for e in sel],
                    [abs(float(e["error"])) * 1000 for e in sel], marker, color=color, ms=5,
                    ls="none", alpha=0.8, label=origin)
    if data.epsilon:
        bx.axhline(data.epsilon * 1000.0, color="tab:green", ls="--", lw=0.8, label=r"$\epsilon$")
    bx.set_xlabel("model version that predicted the frame")
    bx.set_ylabel(r"$|E_\mathrm{pred} - E_\mathrm{ref}|$ (meV)")
    bx.set_title("Error on each new reference frame, before learning it", fontsize=10)
    if data.labels:
        bx.legend(loc="best", fontsize=8)
        bx.xaxis.get_major_locator().set_params(integer=True)
    _save(fig, path)
    return None


# ----------------------------------------------------------------------------- the page

def _fmt(x, scale=1.0, digits=1, unit=""):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x * scale:.{digits}f}{unit}"


def _markdown(data: RunData, figures: dict) -> str:
    m = data.manifest
    steps = int(data.props["step"].max()) if "step" in data.props else 0
    sim_ps = float(data.props["time"].max()) if "time" in data.props else None
    audit, flagged = data.origin("audit"), data.origin("flagged")
    # the model that served each audit frame (older event files: the trainer's prediction)
    cov = np.mean([bool(e.get("served_within_eps", e["within_eps"])) for e in audit]) if audit else None
    pred = np.mean([float(e.get("served_confidence") or e["confidence"]) for e in audit]) if audit else None
    v0, v1 = data.versions()
    curve = data.holdout_curve()
    n_flag = int((data.extras[:, 3] > 0.5).sum()) if data.extras.shape[1:] and \
        data.extras.shape[1] >= 4 else 0
    segs = m.get("segments", [])
    eps = data.epsilon
    rows = [
        ("configuration", f"`{m.get('config', '-')}`"),
        ("MD steps done", f"{steps} of {m.get('steps', '-')}"
         + (f" ({sim_ps:.3f} ps)" if sim_ps is not None else "")),
        ("invocations", "; ".join(
            f"{i + 1}: from step {s.get('start_step', 0)}, "
            f"{_fmt(s.get('ended', time.time()) - s['started'], digits=0)} s, "
            f"{s.get('reason', 'running')}" for i, s in enumerate(segs)) or "-"),
        ("frames flagged by the driver", f"{n_flag} of {len(data.extras_steps)} steps "
         f"(confidence < {m.get('level', '-')})"),
        ("reference calls", f"{len(data.labels)} ({len(flagged)} flagged, {len(audit)} audit"
         + (f", {len(data.failed)} failed" if data.failed else "")
         + (f", {len(data.rejected)} refused ([learning] max_label_force)" if data.rejected else "")
         + ")"
         + (f"; budget {m['max_reference_calls']}" if m.get("max_reference_calls") else "")),
        ("reference", f"{m.get('reference', '-')}"),
        ("model versions", f"{v0} → {v1} ({len(data.publishes)} published)"
         if v0 is not None else "-"),
        ("epsilon", _fmt(eps, 1000, 1, " meV")),
        ("coverage P(|err| < epsilon), audit frames",
         f"{_fmt(cov, digits=2)} observed vs {_fmt(pred, digits=2)} predicted "
         f"(n={len(audit)}; target {m.get('level', '-')})" if audit else "no audit frames yet"),
        ("held-out energy RMSE", f"{_fmt(curve[0][1], 1000)} → {_fmt(curve[-1][1], 1000)} meV "
         f"(v{curve[0][0]} → v{curve[-1][0]})" if curve else "no held-out set"),
        ("held-out force RMSE", f"{_fmt(curve[0][2], 1000)} → {_fmt(curve[-1][2], 1000)} meV/Å"
         if curve else "-"),
    ]
    out = ["# rarefly run report", "",
           f"Run directory `{data.root}`, written {time.strftime('%Y-%m-%d %H:%M:%S')}.", "",
           "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    captions = {
        "trajectory": ("Trajectory",
                       "Calibrated energy uncertainty sigma_E at every step (red: frames the "
                       "driver flagged; dotted lines: the driver switched to a newly published "
                       "model version) and, below, "
                       + ("the physical CV of the PLUMED bias." if physical_cvs(data.colvar)
                          else "the potential energy.")),
        "reference_calls": ("Reference calls",
                            "Cumulative reference calls over wall time by origin (flagged by "
                            "the uncertainty, or a random audit of unflagged frames) and the "
                            "model version the trainer has published."),
        "calibration": ("Calibration",
                        "Left: fraction of labelled frames whose energy error is below k times "
                        "the predicted sigma_E, on audit frames (an unbiased sample) and on "
                        "flagged frames separately; the dashed curve is what a Gaussian error "
                        "with standard deviation sigma_E would give. Right: each frame's error "
                        "against its predicted sigma_E, for the model version that flagged it, "
                        "before it learned from the frame."),
        "learning_curve": ("Learning curve",
                           "Left: RMSE on the held-out reference frames for every published "
                           "model version. Right: error on each newly labelled frame, for the "
                           "model version that had not seen it yet."),
    }
    for name, (title, text) in captions.items():
        png, note = figures[name]
        out += ["", f"## {title}", ""]
        if png is None:
            out.append(f"_Not plotted: {note}._")
        else:
            out += [f"![{title}]({png.name})", "", text]
    out += ["", "## Files", "",
            "- `frames.db`: every frame received and every label (ASE database); "
            "`frames.jsonl`: the trainer's events",
            "- `model.rfly`: the latest published model",
            "- `simulation.*`: i-PI's outputs; `RESTART`: its checkpoint",
            "- `ipi.log`, `driver.log`, `trainer.log`: the processes' logs", ""]
    return "\n".join(out)
