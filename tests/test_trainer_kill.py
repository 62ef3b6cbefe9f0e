"""SIGKILL the trainer while reference labels are in flight, restart it on the same database
and model: no finished label is lost, nothing is labelled into the data set twice, the queue
is resumed and a new model version is published.

Real processes: `rarefly trainer` with Parsl local workers and a GFN2-xTB reference that
sleeps after each calculation (``tests/_ref_calculators.py``), so that the kill lands while
labels are being computed; the killed trainer's Parsl processes must not outlive it. A second
test builds the states a kill can leave between storing labels and publishing a model, and
checks which labels the restarted trainer learns."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _ref_calculators import read_log, structure_key
from _trainer_io import read_events, while_unlocked

pytestmark = pytest.mark.slow

N_FRAMES = 6
SLEEP = 1.5          # seconds per reference call (xTB itself takes ~0.1 s for ethanol)


def _frames(n):
    from ase.io import read

    from rarefly.foundation import DATA_DIR
    from rarefly.prediction import Structure

    base = read(DATA_DIR / "ethanol.xyz")
    out = []
    for k in range(n):
        a = base.copy()
        a.rattle(0.05, seed=200 + k)           # far apart for the near-duplicate filter
        out.append(Structure.from_atoms(a))
    return out


def _push(endpoint, frames, walker="wK"):
    """Send the frames as a driver would (flagged, decreasing sigma); returns the socket."""
    import zmq

    from rarefly.trainer.messages import FrameMessage, encode

    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.connect(endpoint)
    for k, s in enumerate(frames):
        header = {"frame_id": f"{walker}-{k}", "origin": "flagged", "step": k, "walker": walker,
                  "model_version": 1, "sigma_E": 1.0 - 0.1 * k, "sigma_E_raw": 0.1 - 0.01 * k,
                  "confidence": 0.5, "pred_energy": 0.0}
        sock.send_multipart(encode(FrameMessage(s, header)))
    return sock


def _db_rows(path):
    """(state, frame_id, id, ref_energy, labelled_at) of every row; retried while locked."""
    return while_unlocked(lambda db: [(r.state, r.frame_id, r.id, r.get("ref_energy"),
                                       r.get("labelled_at")) for r in db.select()], path)


def _xtb_config(tmp_path, model, ref, **kw):
    """A trainer on ``tmp_path``'s database and ``model``, labelling with ``ref`` in threads."""
    from rarefly.trainer.labelling import ExecutorSpec
    from rarefly.trainer.loop import TrainerConfig

    return TrainerConfig(model=str(model), database=str(tmp_path / "frames.db"),
                         endpoint=f"ipc://{tmp_path}/learn", reference=ref,
                         executor=ExecutorSpec("threads"), align_energies=False, **kw)


def _two_labels(tmp_path, model_file, frames):
    """``model_file`` copied into ``tmp_path`` and a frame store there holding ``frames[:2]``
    labelled by GFN2-xTB (frame ids f0, f1); returns the model path, the reference and the
    store."""
    from rarefly.trainer.reference import ReferenceSpec, label
    from rarefly.trainer.store import FrameStore

    model = tmp_path / "model.rfly"
    model.write_bytes(Path(model_file).read_bytes())
    ref = ReferenceSpec("xtb")
    st = FrameStore(tmp_path / "frames.db")
    for k, s in enumerate(frames[:2]):
        st.add_label(st.add(s, frame_id=f"f{k}", origin="flagged"),
                     *label(ref, s.numbers, s.positions), ref.describe())
    return model, ref, st


def _events(path):
    return read_events(path)


def _wait(predicate, timeout, proc, what):
    t_end = time.time() + timeout
    while time.time() < t_end:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the trainer ended (status {proc.returncode}) before {what}:\n"
                                 + proc.stdout.read()[-4000:])
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _parsl_pids(session):
    """Processes left by a trainer: everything in its session (it is started with a new one)
    and Parsl's worker pools, which the local provider puts into process groups of their own."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == session and int(d.name) != os.getpid():   # field 6: session id
            pids.append((int(d.name), cmd))
    return pids


def test_sigkill_during_labelling_loses_nothing_and_restart_resumes(tmp_path, model_file, child_env):
    from rarefly.model_file import load_model_file

    model = tmp_path / "model.rfly"
    model.write_bytes(Path(model_file).read_bytes())
    v0 = load_model_file(model)["model_version"]
    db = tmp_path / "frames.db"
    jsonl = tmp_path / "frames.jsonl"
    calls = tmp_path / "calls.jsonl"
    endpoint = f"ipc://{tmp_path}/learn"
    env = dict(child_env, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parent)] + [p for p in [child_env.get("PYTHONPATH")] if p]))
    cmd = [sys.executable, "-m", "rarefly.cli", "trainer", "--model", str(model), "--db", str(db),
           "--endpoint", endpoint, "--reference", "_ref_calculators:LoggedXTB",
           "--reference-option", f"sleep={SLEEP}", "--reference-option", f"log={calls}",
           "--executor", "local", "--workers", "1", "--max-labels", str(N_FRAMES),
           "--no-align", "--max-seconds", "80"]
    frames = _frames(N_FRAMES)
    keys = {structure_key(s.numbers, s.positions): f"wK-{k}" for k, s in enumerate(frames)}
    t0 = time.time()
    procs = []
    try:
        first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
        procs.append(first)
        sock = _push(endpoint, frames)
        # wait until one label is stored and more are being computed, then kill
        _wait(lambda: (lambda st: st.count("labelled") >= 1 and st.count("labelling") >= 1)(
            [r[0] for r in _db_rows(db)] if db.exists() else []), 60, first,
            "a first label with more in flight")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        sock.close()
        rows = _db_rows(db)
        events = _events(jsonl)
        labelled = {r[1]: r for r in rows if r[0] == "labelled"}
        in_flight = [r[1] for r in rows if r[0] == "labelling"]
        assert len(rows) == N_FRAMES                         # every pushed frame was stored
        assert labelled and in_flight, rows
        # every label the trainer finished (its "label" event follows the commit) is stored
        done_rows = {e["row"] for e in events if e["event"] == "label"}
        assert done_rows <= {r[2] for r in labelled.values()}, (done_rows, rows)
        assert not any(e["event"] == "stop" for e in events)   # it really died
        # its Parsl interchange and worker pool (with the label in progress) die with it
        _wait(lambda: not _parsl_pids(first.pid), 10, None,
              "the killed trainer's Parsl processes to end")

        second = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
        procs.append(second)
        out, _ = second.communicate(timeout=max(10.0, 85 - (time.time() - t0)))
        assert second.returncode == 0, out[-4000:]
        # the trainer that stopped normally took its Parsl processes along
        _wait(lambda: not _parsl_pids(second.pid), 10, None, "the trainer's Parsl processes to end")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            for pid, cmd in _parsl_pids(p.pid):      # leftovers of this test's trainers only
                if "parsl" in cmd or "process_worker_pool" in cmd or "interchange" in cmd:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
    rows = _db_rows(db)
    events = _events(jsonl)
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 2 and starts[1]["recovered"] == len(in_flight)
    assert starts[1]["labelled"] == len(labelled)
    # no frame twice, every frame labelled once, the first run's labels untouched
    ids = [r[1] for r in rows]
    assert len(ids) == len(set(ids)) == N_FRAMES
    assert all(r[0] == "labelled" for r in rows), rows
    for r in rows:
        if r[1] in labelled:
            assert r[3] == labelled[r[1]][3] and r[4] == labelled[r[1]][4]
    # each stored energy is the reference's for that very structure
    log = read_log(calls)
    by_key = {}
    for c in log:
        by_key.setdefault(keys[c["key"]], []).append(c["energy"])
    for r in rows:
        assert r[3] == pytest.approx(by_key[r[1]][-1], abs=1e-8)
    # only frames in flight at the kill may have been computed twice
    twice = {fid for fid, es in by_key.items() if len(es) > 1}
    assert twice <= set(in_flight)
    assert sum(len(es) for es in by_key.values()) <= N_FRAMES + len(in_flight)
    # label events (written after the commit; the kill may fall in between): at most one a
    # row, every row labelled after the restart has one
    label_rows = [e["row"] for e in events if e["event"] == "label"]
    assert len(label_rows) == len(set(label_rows))
    assert {r[2] for r in rows if r[1] not in labelled} <= set(label_rows)
    # the restarted trainer published a model that the file holds
    publishes = [e for e in events if e["event"] == "publish"]
    assert publishes and publishes[-1]["labels"] == N_FRAMES
    assert any(e["t"] > starts[1]["t"] for e in publishes)
    v = load_model_file(model)
    assert v["model_version"] == publishes[-1]["model_version"] > v0
    assert v["provenance"]["trainer_labels"] == N_FRAMES
    assert time.time() - t0 < 90


def test_restart_relearns_exactly_the_labels_the_model_file_lacks(tmp_path, model_file):
    """The states a SIGKILL can leave between storing labels and publishing: a label already
    in the model file, one marked for a version whose file was never written, one stored but
    not yet learned, one in flight. The restarted trainer learns the middle two, once."""
    from rarefly.model_file import load_model_file
    from rarefly.trainer.loop import Trainer
    from rarefly.trainer.reference import ReferenceSpec, label
    from rarefly.trainer.store import FrameStore

    model = tmp_path / "model.rfly"
    model.write_bytes(Path(model_file).read_bytes())
    v0 = load_model_file(model)["model_version"]
    st = FrameStore(tmp_path / "frames.db")
    ref = ReferenceSpec("xtb")
    used = {"f0": v0, "f1": v0 + 1, "f2": None}
    for k, s in enumerate(_frames(4)):
        rid = st.add(s, frame_id=f"f{k}", origin="flagged")
        if k < 3:
            st.add_label(rid, *label(ref, s.numbers, s.positions), ref.describe())
            if used[f"f{k}"] is not None:
                st.db.update(rid, used_in_version=used[f"f{k}"])
        else:
            st.set_state(rid, "labelling")
    del st
    tr = Trainer(_xtb_config(tmp_path, model, ref))
    try:
        assert sorted(f.info["frame_id"] for f in tr._new_frames) == ["f1", "f2"]
        assert len(tr._pending_cal) == 2
        assert tr.store.count(state="queued") == 1 and tr.store.count(state="labelling") == 0
        assert tr.maybe_update()
        assert not tr.maybe_update()                      # nothing new: no second version
    finally:
        tr.close()
    assert load_model_file(model)["model_version"] == v0 + 1
    st = FrameStore(tmp_path / "frames.db")
    assert {r.frame_id: r.get("used_in_version") for r in st.rows(state="labelled")} == \
        {"f0": v0, "f1": v0 + 1, "f2": v0 + 1}
    start = [e for e in _events(tmp_path / "frames.jsonl") if e["event"] == "start"][0]
    assert start["recovered"] == 1 and start["labelled"] == 3


def test_backbone_refinement_learns_all_weights_and_restarts_from_the_same_prior(tmp_path, model_file):
    """With --backbone-steps the trainer refines every MACE weight (old fit frames replayed),
    conditions the readout posterior again on every label from a prior centred at the readout
    the backbone was refined with (the first prior's covariance), stores that prior in the
    model file, and a restarted trainer takes it from there (real xTB labels, real MACE)."""
    import numpy as np
    import torch

    from rarefly.posterior import load_posterior
    from rarefly.trainer.loop import Trainer
    from rarefly.trainer.reference import ReferenceSpec, label
    from rarefly.trainer.store import FrameStore

    model = tmp_path / "model.rfly"
    model.write_bytes(Path(model_file).read_bytes())
    start = load_posterior(model)
    st = FrameStore(tmp_path / "frames.db")
    ref = ReferenceSpec("xtb")
    frames = _frames(4)
    labels = {}
    for k, s in enumerate(frames[:3]):
        rid = st.add(s, frame_id=f"f{k}", origin="flagged")
        labels[k] = label(ref, s.numbers, s.positions)
        st.add_label(rid, *labels[k], ref.describe())
    del st

    from ase.io import read, write

    from rarefly.foundation import DATA_DIR

    replay = tmp_path / "replay.xyz"   # frames of the kind the model was fitted on
    write(replay, read(DATA_DIR / "foundation_train.xyz", index=":4"))

    def config():
        return _xtb_config(tmp_path, model, ref, backbone_steps=40, backbone_every=2,
                           backbone_replay=str(replay), replay_energies=True,
                           served_calibration=False)      # versions one by one here

    def force_rmse(post):
        preds = post.predict(frames[:3])
        return float(np.sqrt(np.mean([(p.forces - labels[k][1]) ** 2 for k, p in enumerate(preds)])))

    tr = Trainer(config())
    try:
        post = tr.posterior          # as after readout-only updates: the readout knows a label
        post.condition(post.design(tr._new_frames[:1]), tr._start_mean, tr._start_cov)
        readout = post.mean.clone()
        assert not torch.equal(readout, start.mean)
        assert tr.maybe_update()
    finally:
        tr.close()
    refined = load_posterior(model)
    publish = [e for e in _events(tmp_path / "frames.jsonl") if e["event"] == "publish"][-1]
    assert publish["gradient_steps"] == 40
    moved = [k for k, v in refined.backbone.model.state_dict().items()
             if v.is_floating_point() and not torch.equal(v, start.backbone.model.state_dict()[k])]
    assert any(k.startswith("interactions.0.") for k in moved)        # not only the readout
    # the readout prior from now on: centred at the readout the backbone was refined with,
    # the first prior's covariance
    torch.testing.assert_close(refined.base_posterior[0], readout)
    torch.testing.assert_close(refined.base_posterior[1], start.cov)
    assert force_rmse(refined) < 0.8 * force_rmse(start)
    # the readout is conditioned again on the 3 labels and on the 4 replay frames' energies
    assert refined.provenance["backbone_refined"]
    assert tr._blocks[5][0] == 3 + 4 and tr._blocks[5][1] == 3 * 3 * len(frames[0].numbers)

    st = FrameStore(tmp_path / "frames.db")
    rid = st.add(frames[3], frame_id="f3", origin="flagged")
    st.add_label(rid, *label(ref, frames[3].numbers, frames[3].positions), ref.describe())
    del st
    tr = Trainer(config())                      # restart: the same prior again
    try:
        torch.testing.assert_close(tr._start_mean, readout)
        assert tr._redesign and len(tr._new_frames) == 1
        assert tr.maybe_update()
        assert len(tr.store.labelled_frames()) == 4
        assert tr._blocks[5][0] == 4 + 4                   # the restart's design: the same rule
    finally:
        tr.close()
    assert load_posterior(model).model_version == refined.model_version + 1


def test_restart_between_refinements_does_not_count_labels_twice(tmp_path, model_file):
    """Versions published before the first refinement already hold the first prior, so a
    trainer restarted then conditions that prior, not the published posterior, on every label."""
    import torch

    from rarefly.posterior import load_posterior
    from rarefly.trainer.loop import Trainer
    from rarefly.trainer.reference import ReferenceSpec, label
    from rarefly.trainer.store import FrameStore

    model = tmp_path / "model.rfly"
    model.write_bytes(Path(model_file).read_bytes())
    start = load_posterior(model)
    st = FrameStore(tmp_path / "frames.db")
    ref = ReferenceSpec("xtb")
    s = _frames(1)[0]
    st.add_label(st.add(s, frame_id="f0", origin="flagged"), *label(ref, s.numbers, s.positions),
                 ref.describe())
    del st
    cfg = _xtb_config(tmp_path, model, ref, backbone_steps=5, backbone_every=100)
    tr = Trainer(cfg)
    try:
        assert tr.maybe_update()                   # readout-only: no refinement due yet
    finally:
        tr.close()
    published = load_posterior(model)
    assert not torch.equal(published.mean, start.mean)   # it learned the label
    torch.testing.assert_close(published.base_posterior[0], start.mean)
    tr = Trainer(cfg)
    try:
        torch.testing.assert_close(tr._start_mean, start.mean)
        assert tr._redesign
    finally:
        tr.close()


def test_a_stopping_trainer_publishes_every_label_without_waiting_for_a_refinement(tmp_path, model_file):
    """A refinement takes minutes on a CPU and `rarefly run` gives a stopping trainer
    TRAINER_STOP_SECONDS. The --max-seconds deadline (as SIGTERM) ends a running refinement
    after its current Adam step; the refinement is then abandoned (the weights go back, since
    designing every label again on new features costs about a second per label) and the
    readout posterior takes the labels. A refinement that falls due while the trainer winds
    down is deferred to the next start in the same way. Either way the published model holds
    every label (real xTB, real MACE). A refinement that completes restarts the calibration
    when asked to."""
    import dataclasses

    import torch

    from rarefly.calibration import PRIOR_A, PRIOR_B
    from rarefly.posterior import load_posterior
    from rarefly.trainer.loop import Trainer
    from rarefly.trainer.reference import ReferenceSpec, label
    from rarefly.trainer.store import FrameStore

    model = tmp_path / "model.rfly"
    model.write_bytes(Path(model_file).read_bytes())
    start = load_posterior(model)
    ref = ReferenceSpec("xtb")
    frames = _frames(4)

    def add_labels(batch, first):
        st = FrameStore(tmp_path / "frames.db")
        for k, s in enumerate(batch, start=first):
            st.add_label(st.add(s, frame_id=f"f{k}", origin="flagged"),
                         *label(ref, s.numbers, s.positions), ref.describe())

    cfg = _xtb_config(tmp_path, model, ref, backbone_steps=1500, backbone_every=2,
                      recalibrate_after_refinement=True,
                      served_calibration=False)           # versions one by one here

    def weights(post):
        return {k: v.clone() for k, v in post.backbone.model.state_dict().items() if v.is_floating_point()}

    def publishes():
        return [e for e in _events(tmp_path / "frames.jsonl") if e["event"] == "publish"]

    def used_versions():
        return [r.get("used_in_version") for r in FrameStore(tmp_path / "frames.db").rows(state="labelled")]

    add_labels(frames[:2], 0)
    tr = Trainer(dataclasses.replace(cfg, backbone_steps=3))   # a refinement that completes
    try:
        assert tr.maybe_update()
    finally:
        tr.close()
    first = publishes()[-1]
    assert first["gradient_steps"] == 3 and first["calibration_restarted"], first
    refined = load_posterior(model)
    moved = weights(refined)
    assert any(not torch.equal(v, weights(start)[k]) for k, v in moved.items())
    # the refined model's calibration starts again from the prior (its residuals are to come)
    assert start.calibration.energy.a > PRIOR_A
    assert (refined.calibration.energy.a, refined.calibration.energy.b) == (PRIOR_A, PRIOR_B)
    assert (refined.calibration.forces.a, refined.calibration.forces.b) == (PRIOR_A, PRIOR_B)

    add_labels(frames[2:3], 2)
    t0 = time.time()
    tr = Trainer(cfg)                            # restarted: a refinement is due (redesign)
    tr.run(max_seconds=6.0)                      # ... and the deadline ends it
    took = time.time() - t0
    second = publishes()[-1]
    assert 0 < second["refinement_abandoned_after"] < 1500, second
    assert second["refinement_deferred"] and second["gradient_steps"] == 0, second
    assert "calibration_restarted" not in second                 # no refinement, no restart
    assert took < 60, f"the trainer took {took:.0f} s to stop"
    abandoned = load_posterior(model)
    assert abandoned.model_version == refined.model_version + 1
    assert all(torch.equal(v, moved[k]) for k, v in weights(abandoned).items())  # weights back
    assert not torch.equal(abandoned.mean, refined.mean)                         # label learned
    assert abandoned.calibration.energy.a == PRIOR_A + 0.5       # its pre-update residual
    assert used_versions() == [refined.model_version] * 2 + [abandoned.model_version]

    add_labels(frames[3:], 3)
    tr = Trainer(cfg)                            # restarted: a refinement is due again
    try:
        t0 = time.time()
        tr._wind_down()                          # the stop path of run(): SIGTERM or deadline
        took = time.time() - t0
    finally:
        tr.close()
    last = publishes()[-1]
    assert last["refinement_deferred"] and last["gradient_steps"] == 0, last
    assert "refinement_abandoned_after" not in last              # never started
    assert took < 30, f"winding down took {took:.0f} s"
    deferred = load_posterior(model)
    assert deferred.model_version == abandoned.model_version + 1
    assert all(torch.equal(v, moved[k]) for k, v in weights(deferred).items())  # no Adam step
    assert not torch.equal(deferred.mean, abandoned.mean)                        # the label learned
    assert deferred.calibration.energy.a == PRIOR_A + 1.0        # one more pre-update residual
    assert len(used_versions()) == 4 and None not in used_versions()
    tr = Trainer(cfg)                            # and the next start refines first
    try:
        assert tr._redesign
    finally:
        tr.close()


def test_a_label_finished_during_a_refinement_is_stored_at_once_and_learned_before_publishing(
        tmp_path, model_file):
    """A refinement takes minutes; a reference result that finishes meanwhile is in the
    database before the refinement ends (a SIGKILL then loses it not), its residual is the
    refined model's (not a half-updated one's), and the refined version is published with it
    learned and in its calibration: the first evidence of how wrong the refined model is
    (real xTB, real MACE)."""
    from concurrent.futures import Future

    from rarefly.posterior import load_posterior
    from rarefly.trainer.loop import Trainer
    from rarefly.trainer.reference import label
    from rarefly.trainer.store import FrameStore

    frames = _frames(3)
    model, ref, st = _two_labels(tmp_path, model_file, frames)
    served = load_posterior(model).predict([frames[2]])[0]     # what the driver sent with it
    late = st.add(frames[2], frame_id="f2", origin="flagged", model_version=1,
                  pred_energy=served.energy, confidence=served.confidence,
                  sigma_E_raw=served.extra["energy_sigma_raw"])
    del st
    cfg = _xtb_config(tmp_path, model, ref, backbone_steps=3, backbone_every=2,
                      served_calibration=False)   # its patches: the next test
    result = label(ref, frames[2].numbers, frames[2].positions)
    start = load_posterior(model)
    tr = Trainer(cfg)
    try:
        done = Future()                        # the reference finishes during the first step
        tr.store.set_state(late, "labelling")
        tr._in_flight[late] = (done, frames[2])
        real = tr._keep_labelling
        seen = []

        def between():
            done.set_result(result) if not done.done() else None
            out = real()
            row = FrameStore(tmp_path / "frames.db").db.get(id=late)
            seen.append((row.state, row.get("used_in_version")))
            return out

        tr._keep_labelling = between
        assert tr.maybe_update()               # the refinement (3 steps) and its version
        assert seen[0] == ("labelled", None)   # in the database during the refinement
        refined = tr.posterior.model_version
        assert refined == start.model_version + 1
        row = FrameStore(tmp_path / "frames.db").db.get(id=late)
        assert row.state == "labelled" and row.ref_energy == pytest.approx(result[0])
        assert [r.get("used_in_version") for r in FrameStore(tmp_path / "frames.db").rows(
            state="labelled")] == [refined] * 3                 # the late label is in it too
        events = _events(tmp_path / "frames.jsonl")
        labels = [e for e in events if e["event"] == "label"]
        assert [e["row"] for e in labels][-1] == late and labels[-1]["refined"] is True
        assert sum(e["row"] == late for e in labels) == 1
        assert all(not e.get("refined") for e in labels[:-1])
        # its error as the refined model predicts it, and as the model that served it did
        assert labels[-1]["served_error"] == pytest.approx(served.energy - labels[-1]["ref_energy"])
        assert labels[-1]["served_version"] == 1
        assert labels[-1]["served_error"] != pytest.approx(labels[-1]["error"], abs=1e-9)
        publish = [e for e in events if e["event"] == "publish"][-1]
        assert publish["learned_after_refinement"] == 1 and publish["gradient_steps"] == 3
        # its residual is in the published calibration (one residual per label since start)
        assert publish["calibration"]["energy"]["n"] == start.calibration.energy.n + 3
        assert not tr.maybe_update()           # nothing left to learn
        assert tr._labels_since_refine == 1    # it counts toward the next refinement
    finally:
        tr.close()
    assert load_posterior(model).model_version == refined


def test_during_a_refinement_the_served_models_calibration_takes_the_served_residuals(
        tmp_path, model_file, monkeypatch):
    """[learning] served_calibration: while a refinement runs, the served version is
    republished with the same weights and a calibration that holds the residuals of the labels
    learned at its start and of a label that finished meanwhile (the served model's own
    prediction, sent with the frame); the refined version comes after the patches. A frame
    served by another version does not count. Real xTB, real MACE."""
    from concurrent.futures import Future

    import torch

    from rarefly.model_file import load_model_file
    from rarefly.posterior import load_posterior
    from rarefly.trainer import loop
    from rarefly.trainer.reference import label

    monkeypatch.setattr(loop, "SERVED_PATCH_SECONDS", 0.0)   # a patch at every chance
    frames = _frames(4)
    model, ref, st = _two_labels(tmp_path, model_file, frames)
    start = load_posterior(model)
    served = start.predict(frames[2:])                  # what the driver sent with them
    late = [st.add(s, frame_id=f"f{k}", origin="flagged", model_version=v, pred_energy=p.energy,
                   confidence=p.confidence, sigma_E_raw=p.extra["energy_sigma_raw"])
            for k, (s, p, v) in enumerate(zip(frames[2:], served, (1, 0)), 2)]
    del st
    results = [label(ref, s.numbers, s.positions) for s in frames[2:]]
    tr = loop.Trainer(_xtb_config(tmp_path, model, ref, backbone_steps=3, backbone_every=2))
    on_disk = []
    try:
        futures = []
        for row, s in zip(late, frames[2:]):
            f = Future()
            tr.store.set_state(row, "labelling")
            tr._in_flight[row] = (f, s)
            futures.append(f)
        real = tr._keep_labelling

        def between():                     # both labels finish at the second step
            if len(on_disk) == 1:
                for f, result in zip(futures, results):
                    f.set_result(result)
            out = real()
            on_disk.append(load_model_file(model))
            return out

        tr._keep_labelling = between
        assert tr.maybe_update()
    finally:
        tr.close()
    v0 = start.model_version
    assert [p["model_version"] for p in on_disk] == [v0 + 1, v0 + 2, v0 + 2]
    for p in on_disk:                                   # the served weights, patched
        assert p["provenance"]["calibration_patch_of"] == v0
        assert p["provenance"][loop.UNPATCHED_CALIBRATION] == start.calibration.to_dict()
        assert all(torch.equal(p["weights"][k], w) for k, w in
                   start.backbone.model.state_dict().items())
    cal = [p["calibration"]["energy"] for p in on_disk]
    a0 = start.calibration.energy.a
    assert cal[0]["a"] == pytest.approx(a0 + 1.0)       # the two labels learned at its start
    events = _events(tmp_path / "frames.jsonl")
    done = {e["row"]: e for e in events if e["event"] == "label" and e.get("refined")}
    r = done[late[0]]["served_error"] / done[late[0]]["served_sigma_raw"]
    assert cal[1]["a"] == pytest.approx(cal[0]["a"] + 0.5)   # the late label of version 1,
    assert cal[1]["b"] == pytest.approx(cal[0]["b"] + 0.5 * r * r)   # not the one of 0
    publish = [e for e in events if e["event"] == "publish"]
    assert [(e["model_version"], e.get("calibration_only", False), e["gradient_steps"])
            for e in publish] == [(v0 + 1, True, 0), (v0 + 2, True, 0), (v0 + 3, False, 3)]
    final = load_posterior(model)
    assert final.model_version == v0 + 3 and "calibration_patch_of" not in final.provenance


def test_a_trainer_stopped_after_a_calibration_patch_learns_its_labels_once_on_restart(
        tmp_path, model_file):
    """A trainer killed during a refinement, after a calibration patch: the restarted one
    starts from the patched version with the calibration the served version was published
    with (the patch's residuals are of labels not yet marked learned, which it learns again),
    so every residual counts once; its first update publishes the next version. Real xTB,
    real MACE."""
    import dataclasses

    from rarefly.model_file import load_model_file
    from rarefly.posterior import load_posterior
    from rarefly.trainer import loop

    model, ref, st = _two_labels(tmp_path, model_file, _frames(2))
    del st
    start = load_posterior(model)
    cfg = _xtb_config(tmp_path, model, ref, backbone_steps=3, backbone_every=2)

    class Killed(Exception):
        pass

    tr = loop.Trainer(cfg)
    try:
        real = tr._keep_labelling

        def between():
            real()
            raise Killed                       # after the first patch
        tr._keep_labelling = between
        with pytest.raises(Killed):
            tr.maybe_update()
    finally:
        tr.close()
    patched = load_model_file(model)
    assert patched["model_version"] == start.model_version + 1
    assert patched["calibration"]["energy"]["a"] == pytest.approx(start.calibration.energy.a + 1.0)
    tr = loop.Trainer(dataclasses.replace(cfg, backbone_steps=0))   # readout-only, quick
    try:
        assert tr.posterior.model_version == start.model_version + 1
        assert tr.posterior.calibration.to_dict() == start.calibration.to_dict()
        assert loop.UNPATCHED_CALIBRATION not in tr.posterior.provenance
        assert tr.maybe_update()
    finally:
        tr.close()
    final = load_posterior(model)
    assert final.model_version == start.model_version + 2
    assert final.calibration.energy.a == pytest.approx(start.calibration.energy.a + 1.0)   # once
    assert final.calibration.energy.n == start.calibration.energy.n + 2
    assert "calibration_patch_of" not in final.provenance


def test_labels_finished_during_a_refinement_get_their_own_refinement_without_a_new_label(
        tmp_path, model_file):
    """When as many labels finished during a refinement as make the next one due, the trainer
    refines on them at its next update, not only after one more label, and does so before it
    stops at its budget: once the budget is spent or the MD is done no label follows, and the
    final model was refined on a few of its labels (bench_onthefly's forty-first and
    forty-second runs: 5 of 26 and of 30). Real xTB, real MACE."""
    from concurrent.futures import Future

    from rarefly.trainer.loop import Trainer
    from rarefly.trainer.reference import ReferenceSpec, label
    from rarefly.trainer.store import FrameStore

    model = tmp_path / "model.rfly"
    model.write_bytes(Path(model_file).read_bytes())
    ref = ReferenceSpec("xtb")
    frames = _frames(3)
    st = FrameStore(tmp_path / "frames.db")
    st.add_label(st.add(frames[0], frame_id="f0", origin="flagged"),
                 *label(ref, frames[0].numbers, frames[0].positions), ref.describe())
    late = [st.add(s, frame_id=f"f{k}", origin="flagged") for k, s in enumerate(frames[1:], 1)]
    del st
    cfg = _xtb_config(tmp_path, model, ref, backbone_steps=3, backbone_every=2)
    tr = Trainer(cfg)
    try:
        futures = []
        for row, s in zip(late, frames[1:]):   # both finish during the first refinement
            f = Future()
            tr.store.set_state(row, "labelling")
            tr._in_flight[row] = (f, s)
            futures.append((f, label(ref, s.numbers, s.positions)))
        real = tr._keep_labelling

        def between():
            for f, result in futures:
                f.set_result(result) if not f.done() else None
            return real()

        tr._keep_labelling = between
        tr._labels_since_refine = 1            # with the stored label: the first is due
        tr.cfg.max_labels = 3                  # the two in flight spend the budget
        tr.run(max_seconds=300)                # refines on 1 label, 2 finish meanwhile: then
        assert not tr._refinement_owed()       # no label will come, and yet it refines on 3
        events = _events(tmp_path / "frames.jsonl")
        assert [e["event"] for e in events][-3:] == ["publish", "budget", "stop"]
        refines = [e for e in events if e["event"] == "refine"]
        assert [e["labels"] for e in refines] == [1, 3]
        publish = [e for e in events if e["event"] == "publish"]
        assert [e["gradient_steps"] for e in publish[-2:]] == [3, 3]
        used = [r.get("used_in_version") for r in FrameStore(tmp_path / "frames.db").rows(
            state="labelled")]
        assert len(used) == 3 and None not in used   # every label is in a published model
    finally:
        if not tr.inbox.closed:
            tr.close()


def test_sigusr1_finishes_labels_in_flight_and_the_refinement_due(tmp_path, model_file, child_env):
    """`rarefly run` sends SIGUSR1 when i-PI has done its steps. The real `rarefly trainer`
    (Parsl local worker, GFN2-xTB that sleeps) then starts no new reference call, collects the
    label in flight, runs the backbone refinement that label makes due (a SIGTERM would leave it
    to a restart) and publishes a model holding every label, then exits 0; frames still queued
    stay queued for a restart."""
    from rarefly.model_file import load_model_file

    model = tmp_path / "model.rfly"
    model.write_bytes(Path(model_file).read_bytes())
    db, jsonl = tmp_path / "frames.db", tmp_path / "frames.jsonl"
    endpoint = f"ipc://{tmp_path}/learn"
    env = dict(child_env, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parent)] + [p for p in [child_env.get("PYTHONPATH")] if p]))
    steps = 4
    cmd = [sys.executable, "-m", "rarefly.cli", "trainer", "--model", str(model), "--db", str(db),
           "--endpoint", endpoint, "--reference", "_ref_calculators:LoggedXTB",
           "--reference-option", "sleep=2.5", "--executor", "local", "--workers", "1",
           "--no-align", "--backbone-steps", str(steps), "--backbone-every", "2",
           "--max-seconds", "120"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        sock = _push(endpoint, _frames(N_FRAMES))
        # the first label stored (readout update), the second one being computed
        _wait(lambda: (lambda st: st.count("labelled") == 1 and st.count("labelling") == 1)(
            [r[0] for r in _db_rows(db)] if db.exists() else []), 60, proc,
            "one label stored and one in flight")
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=90)
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid, cmd_line in _parsl_pids(proc.pid):
            if "parsl" in cmd_line or "process_worker_pool" in cmd_line or "interchange" in cmd_line:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
    assert proc.returncode == 0, out[-4000:]
    rows = _db_rows(db)
    states = sorted(r[0] for r in rows)
    assert states == ["labelled"] * 2 + ["queued"] * (N_FRAMES - 2), rows   # no new call
    events = _events(jsonl)
    assert [e["event"] for e in events][-2:] == ["finished", "stop"], events[-3:]
    assert events[-2]["labels"] == 2 and events[-2]["queued"] == N_FRAMES - 2
    last = [e for e in events if e["event"] == "publish"][-1]
    assert last["labels"] == 2 and last["gradient_steps"] == steps, last   # refined, not deferred
    assert "refinement_deferred" not in last and "refinement_abandoned_after" not in last
    v = load_model_file(model)
    assert v["model_version"] == last["model_version"]
    assert v["provenance"]["trainer_labels"] == 2 and v["provenance"]["backbone_refined"]


def test_a_finishing_trainer_stores_the_frames_still_in_the_pipe(tmp_path, model_file):
    """When the run ends (SIGUSR1 from `rarefly run`), the frames the drivers sent but the
    trainer had not yet received are stored as queued, for a restart, not lost with the
    socket: one receive takes at most 64 of them (real zmq, real database)."""
    from rarefly.trainer.loop import RECEIVE_BATCH, Trainer
    from rarefly.trainer.reference import ReferenceSpec
    from rarefly.trainer.store import FrameStore

    model = tmp_path / "model.rfly"
    model.write_bytes(Path(model_file).read_bytes())
    cfg = _xtb_config(tmp_path, model, ReferenceSpec("xtb"))
    tr = Trainer(cfg)
    n = 3 * RECEIVE_BATCH + 7
    sock = _push(cfg.endpoint, _frames(1) * n)
    try:
        time.sleep(1.0)                       # in the pipe, not yet received
        tr.finish()
        assert tr.run(max_seconds=60) == 0
    finally:
        sock.close()
    assert FrameStore(tmp_path / "frames.db").count(state="queued") == n
    finished = [e for e in _events(tmp_path / "frames.jsonl") if e["event"] == "finished"]
    assert finished and finished[-1]["queued"] == n
