"""Replay on-the-fly runs' calibration offline: the seed paper's zero-mean Student-t against
the same with a learned location and centred on the Boltzmann tilt, and the start model's
error on the runs' audit frames.

Why: target 2 of issue 4 (coverage >= 0.95 on audit frames) is missed on the runs' own audit
frames, and every miss has one sign (the model's energy too low, ``pool_onthefly.out``). MD on
a model visits configurations in proportion to exp(-E_model/kT), so it over-samples frames
where the model's energy is too low; a zero-mean error model cannot see that. Two error
models with a location are replayed. The *tilted* one is ``rarefly.calibration``'s
``tilt_kT`` (``[learning] calibration_tilt``): given that MD visited a frame, its error is
expected at -sigma_raw^2/kT, with no parameter learned. The *located* one learns a location:
it models the standardized residuals r = (reference - prediction) / sigma as
N(m, s^2) with the conjugate Normal-Inverse-Gamma prior m | s^2 ~ N(0, s^2 / kappa0),
s^2 ~ InvGamma(a, b) (kappa0 = 1; a, b as the zero-mean scale's). After residuals r_1..r_n
(mean rbar):

    kappa -> kappa + n,  m -> (kappa m + n rbar) / (kappa + n),  a -> a + n/2,
    b -> b + sum (r_i - rbar)^2 / 2 + kappa n (rbar - m)^2 / (2 (kappa + n)),

and the predictive error is Student-t with 2a degrees of freedom, location sigma m and scale
sigma sqrt(b (kappa + 1) / (a kappa)). Forgetting (``calibration_memory``) discounts
kappa - kappa0 like a - a0 and b - b0 and keeps m.

Usage::

    python benchmarks/replay_calibration.py /tmp/b52 /tmp/b53 ... [--model START.rfly]

Each FOLDER is a ``bench_onthefly.py`` run folder (``FOLDER/SCHEME/frames.jsonl``, the
trainer's events, and ``FOLDER/SCHEME/simulation.uncertainty_0``, i-PI's extras of every MD
step). Every calibration (zero-mean, located, tilted) takes the same residuals in the same
updates as the run's trainer did (the labels logged since the previous ``publish``,
discounted with the run's ``calibration_memory``), from the start model's calibration. The
replay of the run's own calibration (zero-mean, or tilted for runs made with
``calibration_tilt``) must reproduce the ``a``, ``b`` each ``publish`` event logged and the
labels' and the steps' confidence; the command exits 1 when it does not.

Printed per run and pooled: the audit frames each calibration would still trust and how many
of those were within epsilon. Each audit frame is taken as the model that served it saw it:
its error and raw sigma as the driver sent them with the frame (``pool_onthefly.audit_labels``;
the trainer's own error of a label that finished during a refinement is the refined model's),
judged with that model version's calibration (trusted: confidence >= the run's level); and the fraction of the run's MD steps each would have flagged
(a step's raw sigma is its logged calibrated sigma over the version's variance factor). With
``--start-model-errors``, also the start model's energy error on every audit frame (from
``FOLDER/SCHEME/frames.db``) beside its error on the frames a reference MD sampled (the 35
held-out frames of its fit set).

This is a counterfactual on fixed trajectories: a calibration that flags more frames would
have sent other frames to the reference, and the run would have gone on differently. Live
runs decide; this only says whether one is worth making.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tomllib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "driver"))

from pool_onthefly import audit_labels, coverage_interval  # noqa: E402
from rarefly.calibration import PRIOR_A, PRIOR_B, Calibration, keep_fraction  # noqa: E402
from rarefly.report import read_events, read_step_extras  # noqa: E402
from rarefly.run_config import TEMPERATURE_UNITS, quantity  # noqa: E402
from rarefly.units import ENERGY_UNITS  # noqa: E402

DEFAULT_MODEL = os.path.join(HERE, "data", "ala2_c7eq_thermal_ft2000_misfit.rfly")
HELD_OUT = os.path.join(HERE, "data", "ala2_c7eq_thermal_xtb.xyz")   # the last 35: not fitted
PRIOR_KAPPA = 1.0


class LocatedScale:
    """The located (Normal-Inverse-Gamma) calibration of one kind of prediction; starts from
    a zero-mean scale's ``a``, ``b`` with m = 0 at the prior weight (the residuals behind
    them did not record their mean)."""

    def __init__(self, a: float, b: float):
        self.a, self.b, self.m, self.kappa = float(a), float(b), 0.0, PRIOR_KAPPA

    def forget(self, labels: int, memory: int) -> None:
        if memory:
            keep = keep_fraction(labels, memory)
            self.a = PRIOR_A + keep * (self.a - PRIOR_A)
            self.b = PRIOR_B + keep * (self.b - PRIOR_B)
            self.kappa = PRIOR_KAPPA + keep * (self.kappa - PRIOR_KAPPA)

    def update(self, residuals, sigmas) -> None:
        r = np.asarray(residuals, dtype=float).ravel() / np.asarray(sigmas, dtype=float).ravel()
        r = r[np.isfinite(r)]
        if not r.size:
            return
        rbar, k_new = float(np.mean(r)), self.kappa + r.size
        self.b += 0.5 * float(np.sum((r - rbar) ** 2)) + 0.5 * self.kappa * r.size * (rbar - self.m) ** 2 / k_new
        self.m = (self.kappa * self.m + r.size * rbar) / k_new
        self.kappa = k_new
        self.a += 0.5 * r.size

    def confidence(self, raw_sigma: float, epsilon: float) -> float:
        """P(|e| < epsilon), e / sigma Student-t (2a dof, location m, scale c)."""
        from scipy.stats import t as student_t

        x = epsilon / max(float(raw_sigma), 1e-300)
        c = np.sqrt(self.b * (self.kappa + 1.0) / (self.a * self.kappa))
        nu = 2.0 * self.a
        return float(student_t.cdf((x - self.m) / c, nu) - student_t.cdf((-x - self.m) / c, nu))


def start_calibration(model: str) -> Calibration:
    from rarefly.model_file import load_model_file

    return Calibration.from_dict(load_model_file(model)["calibration"])


class ZeroMean:
    """The runs' own calibration (``rarefly.calibration``), behind the replay's interface."""

    def __init__(self, start: Calibration):
        self.cal = copy.deepcopy(start)

    def forget(self, labels: int, memory: int) -> None:
        self.cal.forget(labels, memory)

    def update(self, residuals, sigmas) -> None:
        self.cal.energy.update(residuals, sigmas)

    def confidence(self, raw_sigma: float, epsilon: float) -> float:
        return self.cal.energy.confidence(raw_sigma, epsilon)


class Tilted(ZeroMean):
    """The zero-mean Student-t centred on the Boltzmann tilt -sigma_raw^2/kT
    (``rarefly.calibration``, ``[learning] calibration_tilt``)."""

    def __init__(self, start: Calibration, kT: float):
        super().__init__(start)
        self.cal.set_tilt(kT)


def replay(folder: str, scheme: str, start: Calibration) -> dict | None:
    events_path = os.path.join(folder, scheme, "frames.jsonl")
    if not os.path.exists(events_path):
        return None
    with open(os.path.join(folder, f"{scheme}.toml"), "rb") as fh:
        config = tomllib.load(fh)
    learning = config["learning"]
    where = os.path.join(folder, f"{scheme}.toml")
    eps = quantity(learning["epsilon"], ENERGY_UNITS, "eV", f"{where} [learning] epsilon")
    from ase.units import kB           # as rarefly run writes the tilt

    system = config.get("system", {})
    kT = kB * quantity(system.get("temperature", "300 K"), TEMPERATURE_UNITS, "K",
                       f"{where} [system] temperature") * int(system.get("beads", 1))
    level = float(learning.get("level", 0.95))
    memory = int(learning.get("calibration_memory", 0))
    if learning.get("recalibrate_after_refinement"):
        raise SystemExit(f"{folder}/{scheme}: recalibrate_after_refinement is not replayed")
    cals = {"paper": ZeroMean(start), "located": LocatedScale(start.energy.a, start.energy.b),
            "tilted": Tilted(start, kT)}
    own = "tilted" if learning.get("calibration_tilt") else "paper"   # the run's calibration
    states = {1: copy.deepcopy(cals)}
    pending, deviation, conf_dev = [], 0.0, 0.0

    def flush():
        # one update_calibration of the trainer: discount, then the residuals
        for cal in cals.values():
            cal.forget(len(pending), memory)
            if pending:
                cal.update(np.array([-p["error"] for p in pending]),
                           np.array([p["sigma_raw"] for p in pending]))
        pending.clear()

    for e in read_events(events_path):
        if e["event"] == "label":
            if e.get("refined") and pending and not pending[-1].get("refined"):
                flush()     # the labels before a refinement update the calibration first;
                            # those that finished during it (``refined``), predicted by the
                            # refined model, update it again before its version is published
            pending.append(e)
            # the calibration of the model that predicted the label, as the trainer logged it
            conf_dev = max(conf_dev, abs(cals[own].confidence(e["sigma_raw"], eps) - e["confidence"]))
        elif e["event"] == "publish":
            flush()
            logged, replayed = e["calibration"]["energy"], cals[own].cal.energy
            deviation = max(deviation, abs(replayed.a - logged["a"]) / logged["a"],
                            abs(replayed.b - logged["b"]) / logged["b"])
            states[int(e["model_version"])] = copy.deepcopy(cals)
    out = {"eps": eps, "level": level, "deviation": deviation, "own": own}
    # each audit frame as the model that served it saw it: its error and raw sigma (sent by
    # the driver with the frame), judged with each calibration's state of that model version
    audits = audit_labels(folder, scheme)
    served_dev = 0.0
    for name in NAMES:
        trusted = within = 0
        for a in audits:
            state = states.get(int(a["served_version"]), states[max(states)])
            c = state[name].confidence(float(a["served_sigma_raw"]), eps)
            if name == own and a.get("served_confidence") is not None:
                served_dev = max(served_dev, abs(c - float(a["served_confidence"])))
            if c >= level:
                trusted += 1
                within += abs(float(a["served_error"])) < eps
        out[name] = {"trusted": trusted, "within": within}
    out["served_deviation"] = served_dev   # audit frames' confidence, replayed against the driver's
    _, steps = read_step_extras(os.path.join(folder, scheme, "simulation.uncertainty_0"))
    flagged = dict.fromkeys(cals, 0)
    step_dev = 0.0
    for sigma, conf, version, _ in steps:
        state = states.get(int(version), states[max(states)])
        raw = sigma / np.sqrt(state[own].cal.energy.variance_factor)
        for name, cal in state.items():
            c = cal.confidence(raw, eps)
            flagged[name] += c < level
            if name == own:
                step_dev = max(step_dev, abs(c - conf))
    out["steps"] = len(steps)
    out["conf_deviation"] = conf_dev       # labels' confidence, replayed against logged
    out["step_deviation"] = step_dev       # MD steps' confidence, replayed against i-PI's
    for name in flagged:
        out[name]["flagged_steps"] = flagged[name]
    out["audits"] = len(audits)
    out["final_location"] = (cals["located"].m, cals["located"].kappa)
    return out


NAMES = {"paper": "zero-mean (the seed paper's)", "located": "located",
         "tilted": "about the Boltzmann tilt -sigma_raw^2/kT"}
REPLAY_TOLERANCE = 1e-6   # the replay of the run's own calibration against the runs' logged a, b and confidences


def start_model_errors(folders, schemes, model: str, eps: float) -> None:
    """The start model's energy error on the runs' audit frames and on reference-MD frames."""
    from rarefly.data_io import read_frames
    from rarefly.posterior import load_posterior
    from rarefly.trainer.store import FrameStore

    post = load_posterior(model, epsilon=eps)

    def line(what, err):
        err = np.asarray(err)
        print(f"  {what}: {len(err)} frames, mean {err.mean():+.3f} eV, spread {err.std():.3f} eV, "
              f"within epsilon {int(np.sum(np.abs(err) < eps))}/{len(err)}")

    print(f"\nthe start model's energy error (prediction - reference), epsilon {eps:.3f} eV")
    held = read_frames(HELD_OUT)[-35:]
    line("held-out frames of its fit set (GFN2-xTB MD at 300 K)",
         [p.energy - f.energy for p, f in zip(post.predict([f.structure for f in held]), held)])
    for scheme in schemes:
        start, served = [], []
        for folder in folders:
            db = os.path.join(folder, scheme, "frames.db")
            if not os.path.exists(db):
                continue
            frames = FrameStore(db).labelled_frames(origin="audit")
            by_row = {e["row"]: e for e in audit_labels(folder, scheme)}
            for f in frames:
                if f.info["row"] in by_row:
                    start.append(post.predict([f.structure])[0].energy - f.energy)
                    served.append(by_row[f.info["row"]]["served_error"])
        if start:
            line(f"{scheme}'s audit frames (MD on the model), start model", start)
            line(f"{scheme}'s audit frames, the model that served each", served)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="bench_onthefly.py run folders")
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help="the runs' start model (its calibration is the replay's start)")
    ap.add_argument("--schemes", nargs="+", default=["a_paper", "c_ts"])
    ap.add_argument("--start-model-errors", action="store_true",
                    help="also the start model's energy error on every audit frame (reads "
                         "FOLDER/SCHEME/frames.db, ~10 s a run)")
    args = ap.parse_args(argv)
    start = start_calibration(args.model)
    print(f"replay_calibration: start model {os.path.relpath(args.model, os.path.dirname(HERE))}, "
          f"energy a={start.energy.a:.2f} b={start.energy.b:.2f}; located prior kappa0={PRIOR_KAPPA}")
    print("per run: audit frames within epsilon / audit frames trusted (confidence >= level) of "
          "the run's audit frames; share of MD steps flagged (energy confidence < level)")
    eps, worst = None, 0.0
    for scheme in args.schemes:
        tot = {name: [0, 0, 0] for name in NAMES}
        steps = 0
        for folder in args.folders:
            r = replay(folder, scheme, start)
            if r is None:
                continue
            eps = r["eps"]
            worst = max(worst, r["deviation"], r["conf_deviation"], r["step_deviation"],
                        r["served_deviation"])
            steps += r["steps"]
            parts = []
            for name in NAMES:
                d = r[name]
                tot[name][0] += d["within"]
                tot[name][1] += d["trusted"]
                tot[name][2] += d["flagged_steps"]
                flagged = f", {d['flagged_steps'] / max(r['steps'], 1):.2f} of steps flagged"
                parts.append(f"{name} {d['within']}/{d['trusted']} of {r['audits']}{flagged}")
            print(f"  {scheme} {folder} (run with {r['own']}): " + "; ".join(parts)
                  + f"  (located's final m={r['final_location'][0]:+.2f}, kappa={r['final_location'][1]:.1f})")
        for name, what in NAMES.items():
            w, t, f = tot[name]
            cov = f"{w / t:.2f} ({coverage_interval(w, t)})" if t else "n/a"
            flagged = f"; {f / max(steps, 1):.2f} of {steps} MD steps flagged"
            print(f"{scheme} pooled, {what}: audit coverage {w}/{t} = {cov}{flagged}")
    print(f"replay check: the replay of each run's own calibration reproduces its logged a, b and "
          f"the confidence of its labels, its steps and its audit frames as served within {worst:.1e} (tolerance {REPLAY_TOLERANCE:.0e})")
    if worst > REPLAY_TOLERANCE:
        print("replay_calibration: the replay does not reproduce the runs' calibration; "
              "its figures are not the runs' counterfactuals", file=sys.stderr)
        return 1
    if args.start_model_errors and eps is not None:
        start_model_errors(args.folders, args.schemes, args.model, eps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
