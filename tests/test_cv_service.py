"""The driver side of the uncertainty CV (rarefly.cv_service): wire format, cache, errors.

Real zmq sockets, a real service thread. The predictor is :class:`AnalyticSigma`, an
analytic sigma(R) with an exact gradient, also used by the i-PI tests (test_cv_ipi.py).
Run as a script, this module serves that double (the i-PI tests kill it mid-run).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from itertools import count

import numpy as np
import pytest

from rarefly import cv_service as cs
from rarefly.prediction import Prediction, Structure

_ids = count()


class AnalyticSigma:
    """sigma(R) = s0 sqrt(1 + sum_{i<j} ((d_ij - d0_ij) / ell)^2), eV, d0 from a reference.

    Distances are minimum-image ones for a periodic reference. The gradient and the strain
    derivative (ASE row convention) are exact. ``calls`` counts evaluated structures.
    """

    model_version = 7

    def __init__(self, reference: Structure, s0: float = 0.01, ell: float = 0.1,
                 delay_s: float = 0.0):
        self.reference = reference
        self.s0, self.ell, self.delay_s = s0, ell, delay_s
        self.d0 = self._pairs(reference)[1]
        self.calls = 0

    @staticmethod
    def _pairs(s: Structure):
        i, j = np.triu_indices(len(s.numbers), 1)
        v = s.positions[i] - s.positions[j]
        if s.cell is not None and any(s.pbc):
            frac = v @ np.linalg.inv(s.cell)
            v = (frac - np.round(frac)) @ s.cell
        return (i, j, v), np.linalg.norm(v, axis=1)

    def sigma(self, s: Structure):
        (i, j, v), d = self._pairs(s)
        x = (d - self.d0) / self.ell
        sigma = self.s0 * np.sqrt(1.0 + np.sum(x * x))
        dsig_dd = self.s0**2 * x / (self.ell * sigma)
        pair = (dsig_dd / d)[:, None] * v
        grad = np.zeros_like(s.positions)
        np.add.at(grad, i, pair)
        np.add.at(grad, j, -pair)
        cell_grad = np.einsum("p,pa,pb->ab", dsig_dd / d, v, v)
        return float(sigma), grad, cell_grad

    def predict(self, structures):
        out = []
        for s in structures:
            self.calls += 1
            if self.delay_s:
                time.sleep(self.delay_s)
            sigma, grad, cell_grad = self.sigma(s)
            n = len(s.numbers)
            periodic = s.cell is not None and any(s.pbc)
            out.append(Prediction(energy=0.0, forces=np.zeros((n, 3)), stress=None,
                                  energy_sigma=sigma, forces_sigma=np.zeros(n),
                                  energy_sigma_gradient=grad, confidence=1.0,
                                  model_version=self.model_version,
                                  energy_sigma_cell_gradient=cell_grad if periodic else None))
        return out


def ethanol(cell: float | None = None) -> Structure:
    from ase.build import molecule

    atoms = molecule("CH3CH2OH")
    if cell:
        atoms.cell = [cell, cell, cell]
        atoms.pbc = True
        atoms.center()
    return Structure.from_atoms(atoms)


def unique_endpoint() -> str:
    return f"ipc:///tmp/rarefly-cv-test-{os.getpid()}-{next(_ids)}"


@pytest.fixture
def service():
    ref = ethanol()
    with cs.CVService(AnalyticSigma(ref), unique_endpoint(), template=ref) as svc:
        yield svc


def ask(endpoint, frames, timeout=5.0):
    return cs.request(endpoint, frames, timeout)


def test_sigma_matches_the_double_and_gradient_is_exact():
    ref = ethanol()
    model = AnalyticSigma(ref)
    rng = np.random.default_rng(0)
    s = Structure(ref.numbers, ref.positions + 0.05 * rng.standard_normal(ref.positions.shape))
    sigma, grad, _ = model.sigma(s)
    h = 1e-6
    fd = np.zeros_like(grad)
    for k in range(grad.size):
        p = s.positions.copy().ravel(); p[k] += h
        m = s.positions.copy().ravel(); m[k] -= h
        fd.ravel()[k] = (model.sigma(Structure(s.numbers, p.reshape(-1, 3)))[0]
                         - model.sigma(Structure(s.numbers, m.reshape(-1, 3)))[0]) / (2 * h)
    assert sigma > model.s0
    np.testing.assert_allclose(grad, fd, atol=1e-8)


def test_request_evaluates_once_then_hits_the_cache(service):
    pos = service._template.positions + 0.01
    reply = cs.decode_reply(ask(service.endpoint, cs.encode_request(pos)), len(pos))
    assert not reply.cached and reply.model_version == 7
    sigma, grad, _ = service.predictor.sigma(Structure(service._template.numbers, pos))
    assert reply.sigma == pytest.approx(sigma, rel=1e-12)
    np.testing.assert_allclose(reply.gradient, grad, rtol=1e-12)
    again = cs.decode_reply(ask(service.endpoint, cs.encode_request(pos + 5e-9)), len(pos))
    assert again.cached and again.sigma == reply.sigma
    assert service.predictor.calls == 1
    assert service.stats["evaluations"] == 1 and service.stats["hits"] == 1


def test_remembered_structure_is_served_without_evaluating(service):
    ref = service._template
    # what the driver evaluated, in ase.units.Bohr; what PLUMED sends, with i-PI's 0.52917721
    bohr = ref.positions / 0.5291772105638411 + 40.0
    driver_pos = bohr * 0.5291772105638411
    plumed_pos = bohr * 0.52917721
    assert np.abs(driver_pos - plumed_pos).max() > 1e-8  # an absolute 1e-8 A would miss
    pred = service.predictor.predict([Structure(ref.numbers, driver_pos)])[0]
    service.predictor.calls = 0
    service.remember(Structure(ref.numbers, driver_pos), pred)
    reply = cs.decode_reply(ask(service.endpoint, cs.encode_request(plumed_pos)), len(bohr))
    assert reply.cached and service.predictor.calls == 0
    assert reply.sigma == pred.energy_sigma
    miss = cs.decode_reply(ask(service.endpoint, cs.encode_request(driver_pos + 1e-6)), len(bohr))
    assert not miss.cached and service.predictor.calls == 1


def test_periodic_cache_matches_modulo_lattice_and_sends_cell_gradient():
    ref = ethanol(cell=8.0)
    with cs.CVService(AnalyticSigma(ref), unique_endpoint(), template=ref) as svc:
        pred = svc.predictor.predict([ref])[0]
        svc.remember(ref, pred)
        shifted = ref.positions.copy()
        shifted[2] += ref.cell[0] - 2 * ref.cell[2]  # the same structure, one atom unwrapped
        reply = cs.decode_reply(ask(svc.endpoint, cs.encode_request(shifted, ref.cell)), 9)
        assert reply.cached and reply.periodic
        np.testing.assert_allclose(reply.cell_gradient, pred.energy_sigma_cell_gradient)
        no_cell = json.loads(ask(svc.endpoint, cs.encode_request(shifted))[0])
        assert not no_cell["ok"] and "periodic" in no_cell["error"]


@pytest.mark.parametrize("frames, words", [
    ([b"not json"], "JSON"),
    ([b"[1, 2]"], "JSON"),
    ([json.dumps({"op": "pickle"}).encode()], "unknown op"),
    ([json.dumps({"op": "sigma", "natoms": 9, "units": "bohr/Ha"}).encode(), bytes(216)], "units"),
    ([json.dumps({"op": "sigma", "natoms": -1, "units": cs.WIRE_UNITS}).encode()], "natoms"),
    ([json.dumps({"op": "sigma", "natoms": 9, "units": cs.WIRE_UNITS}).encode(), bytes(10)],
     "bytes"),
    ([json.dumps({"op": "sigma", "natoms": 9, "units": cs.WIRE_UNITS}).encode(), bytes(216),
      bytes(7)], "cell"),
    ([json.dumps({"op": "sigma", "natoms": 10, "units": cs.WIRE_UNITS}).encode(), bytes(240)],
     "9"),
    ([json.dumps({"op": "sigma", "natoms": 9, "units": cs.WIRE_UNITS}).encode(),
      np.full(27, np.nan).tobytes()], "NaN"),
    ([b"{}"] * 4, "frames"),
])
def test_garbage_gets_a_sentence_and_the_service_survives(service, frames, words):
    reply = json.loads(ask(service.endpoint, frames)[0])
    assert reply["ok"] is False and words in reply["error"]
    assert reply["error"][0].islower() or reply["error"][0].isupper()
    pong = json.loads(ask(service.endpoint, cs.encode_op("ping"))[0])
    assert pong == {"ok": True, "natoms": 9, "model_version": 7}


def test_model_exception_becomes_an_error_reply():
    class Broken(AnalyticSigma):
        def predict(self, structures):
            raise RuntimeError("out of memory")

    ref = ethanol()
    with cs.CVService(Broken(ref), unique_endpoint(), template=ref) as svc:
        reply = json.loads(ask(svc.endpoint, cs.encode_request(ref.positions))[0])
        assert not reply["ok"] and "out of memory" in reply["error"]
        assert svc.running


def test_miss_waits_for_the_force_loop_and_reuses_its_result():
    ref = ethanol()
    lock = threading.Lock()
    model = AnalyticSigma(ref)
    with cs.CVService(model, unique_endpoint(), template=ref, model_lock=lock) as svc:
        pred = model.predict([ref])[0]
        result = {}
        with lock:  # the driver is evaluating these positions right now
            t = threading.Thread(target=lambda: result.update(
                frames=ask(svc.endpoint, cs.encode_request(ref.positions))))
            t.start()
            time.sleep(0.3)
            assert t.is_alive()  # a cache miss waits for the model lock
            svc.remember(ref, pred)  # the force loop's on_prediction, before releasing
        t.join(5)
        reply = cs.decode_reply(result["frames"], 9)
        assert reply.cached and model.calls == 1


def test_guarded_predictor_shares_the_lock_and_follows_a_hot_swap(service):
    guarded = service.guarded()
    assert guarded.model_version == 7 and guarded.s0 == 0.01  # the wrapped model's attributes
    ref = service._template
    with service.model_lock:
        t = threading.Thread(target=guarded.predict, args=([ref],))
        t.start()
        t.join(0.2)
        assert t.is_alive()  # the force loop waits while the CV evaluates, and vice versa
    t.join(5)
    service.remember(ref, guarded.predict([ref])[0])
    assert len(service.cache) == 1

    class Newer(AnalyticSigma):
        model_version = 8

    service.set_predictor(Newer(ref, s0=0.02))
    assert len(service.cache) == 0 and guarded.model_version == 8
    reply = cs.decode_reply(ask(service.endpoint, cs.encode_request(ref.positions)), 9)
    assert reply.model_version == 8 and reply.sigma == pytest.approx(0.02) and not reply.cached


def test_no_template_and_no_structure_is_a_clear_error():
    ref = ethanol()
    with cs.CVService(AnalyticSigma(ref), unique_endpoint(), first_structure_wait_s=0.2) as svc:
        reply = json.loads(ask(svc.endpoint, cs.encode_request(ref.positions))[0])
        assert not reply["ok"] and "species" in reply["error"]


def test_endpoints():
    assert cs.default_endpoint("ethanol") == "ipc:///tmp/rarefly-cv-ethanol"
    assert cs.is_loopback("tcp://127.0.0.1:5555") and not cs.is_loopback("tcp://0.0.0.0:5555")
    with pytest.raises(ValueError):
        cs.default_endpoint("../etc")
    with pytest.raises(ValueError):
        cs.check_endpoint("udp://x:1")
    assert cs.check_endpoint("tcp://[::1]:5555") and cs.is_loopback("tcp://[::1]:5555")
    ref = ethanol()
    with cs.CVService(AnalyticSigma(ref), "tcp://127.0.0.1:*", template=ref) as svc:
        assert svc.endpoint.startswith("tcp://127.0.0.1:") and not svc.endpoint.endswith("*")
        assert json.loads(ask(svc.endpoint, cs.encode_op("ping"))[0])["ok"]
    endpoint = unique_endpoint()
    with cs.CVService(AnalyticSigma(ref), endpoint, template=ref):
        with pytest.raises(OSError, match="already answers"):
            cs.CVService(AnalyticSigma(ref), endpoint, template=ref).start()
    assert not os.path.exists(endpoint[len("ipc://"):])  # the socket file goes with it


def serve_double(endpoint: str) -> int:
    """Serve AnalyticSigma for an ethanol template until SIGTERM (used by test_cv_ipi)."""
    ref = ethanol()
    return cs.serve(cs.CVService(AnalyticSigma(ref), endpoint, template=ref))


def drive_double(endpoint: str, ipi_socket: str) -> int:
    """A driver process as `rarefly driver --cv` builds it, on AnalyticSigma: forces (zero)
    for i-PI's UNIX socket ``ipi_socket`` plus the CV service (used by test_cv_ipi)."""
    from rarefly.client import serve

    ref = ethanol()
    with cs.CVService(AnalyticSigma(ref), endpoint, template=ref) as service:
        serve(service.guarded(), ref.numbers, address=ipi_socket, unix=True,
              connect_timeout=30, on_prediction=service.remember)
    return 0


if __name__ == "__main__":
    sys.exit(drive_double(*sys.argv[1:3]) if len(sys.argv) > 2 else serve_double(sys.argv[1]))
