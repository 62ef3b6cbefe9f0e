"""Finite-difference checks of forces, stress and d sigma_E / dR for both posterior kinds,
the backbone against mace's own forward, batching, and the model-file round trip."""

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from rarefly.graph import build_graph
from rarefly.posterior import KINDS, LabelledFrame, load_posterior
from rarefly.posterior.backbone import Backbone
from rarefly.posterior.base import PosteriorSettings
from rarefly.posterior.lastlayer import LastLayerPosterior
from rarefly.posterior.sghmc import SGHMCConfig, SGHMCPosterior
from rarefly.prediction import InputError, Structure

from _models import random_mace

torch.set_num_threads(1)


def _molecule(seed=0):
    a = molecule("CH3CH2OH")
    a.rattle(0.05, seed=seed)
    return Structure.from_atoms(a)


def _periodic(seed=0):
    rng = np.random.default_rng(seed)
    w = molecule("H2O")
    atoms = Atoms()
    for shift in ([0.5, 0.5, 0.5], [3.0, 3.2, 2.9], [1.0, 3.5, 3.8]):
        m = w.copy()
        m.positions += np.array(shift)
        atoms += m
    atoms.cell = [[5.0, 0.2, 0.0], [0.0, 5.2, 0.3], [0.1, 0.0, 4.9]]
    atoms.pbc = True
    atoms.positions += rng.normal(0, 0.03, atoms.positions.shape)
    return Structure.from_atoms(atoms)


def _frames(n=6):
    out = []
    for k in range(n):
        s = _molecule(seed=k + 10)
        out.append(LabelledFrame(s, -4100.0 + 0.05 * k, np.random.default_rng(k).normal(0, 0.3, (9, 3))))
    return out


@pytest.fixture(scope="module", params=["lastlayer", "lastlayer_rank0", "lastlayer_misfit", "sghmc"])
def posterior(request):
    bb = Backbone(random_mace())
    if request.param.startswith("lastlayer"):
        rank = 64 if request.param == "lastlayer" else 0  # 64 >= features: exact force variance
        post = LastLayerPosterior.from_foundation(bb, PosteriorSettings(), rank=rank)
        post.fit(_frames())
        if request.param.endswith("misfit"):
            # ethanol atoms near and beyond the fitted ones, water's far (the periodic case):
            # the FD checks cross all three pieces of the smoothed ramp
            post.fit_density(_frames())
    else:
        post = SGHMCPosterior(bb, PosteriorSettings(), SGHMCConfig(num_samples=3, cycle_steps=6, batch_size=2))
        post.fit(_frames())
    return post


def test_backbone_matches_mace():
    model = random_mace()
    s = _molecule()
    data = build_graph([s], model.r_max.item(), [1, 6, 7, 8], torch.float64)
    ref = model(dict(data), compute_force=True)
    bb = Backbone(model)
    pos = data["positions"].detach().clone().requires_grad_(True)
    out = bb(data, pos)
    e = out["energy"].sum()
    (g,) = torch.autograd.grad(e, pos)
    assert e.item() == pytest.approx(ref["energy"].item(), abs=1e-9)
    np.testing.assert_allclose(-g.numpy(), ref["forces"].detach().numpy(), atol=1e-9)
    lin = (out["fixed"] + out["phi"] @ bb.readout_weights()).sum()
    assert lin.item() == pytest.approx(e.item(), abs=1e-9)


def _fd(posterior, s, attr, i, a, h=1e-5):
    p = s.positions.copy()
    p[i, a] += h
    up = getattr(posterior.predict([Structure(s.numbers, p, s.cell, s.pbc)])[0], attr)
    p[i, a] -= 2 * h
    dn = getattr(posterior.predict([Structure(s.numbers, p, s.cell, s.pbc)])[0], attr)
    return (up - dn) / (2 * h)


@pytest.mark.parametrize("make", [_molecule, _periodic])
def test_forces_and_sigma_gradient_finite_differences(posterior, make):
    s = make()
    pred = posterior.predict([s])[0]
    assert pred.energy_sigma > 0 and 0 <= pred.confidence <= 1
    for i, a in [(0, 0), (3, 1), (len(s.numbers) - 1, 2)]:
        assert pred.forces[i, a] == pytest.approx(-_fd(posterior, s, "energy", i, a), abs=2e-6)
        assert pred.energy_sigma_gradient[i, a] == pytest.approx(
            _fd(posterior, s, "energy_sigma", i, a), abs=2e-6, rel=1e-4)


def test_stress_and_sigma_cell_gradient_finite_differences(posterior):
    s = _periodic()
    pred = posterior.predict([s])[0]
    h = 1e-5
    vol = abs(np.linalg.det(s.cell))
    for (i, j) in [(0, 0), (1, 2), (2, 1)]:
        vals = {}
        for sign in (+1, -1):
            eps = np.zeros((3, 3))
            eps[i, j] += 0.5 * sign * h
            eps[j, i] += 0.5 * sign * h
            deform = np.eye(3) + eps
            st = Structure(s.numbers, s.positions @ deform, s.cell @ deform, s.pbc)
            p = posterior.predict([st])[0]
            vals[sign] = (p.energy, p.energy_sigma)
        dE = (vals[1][0] - vals[-1][0]) / (2 * h)
        dS = (vals[1][1] - vals[-1][1]) / (2 * h)
        assert pred.stress[i, j] * vol == pytest.approx(dE, abs=2e-5)
        assert pred.energy_sigma_cell_gradient[i, j] == pytest.approx(dS, abs=2e-5, rel=1e-4)


def test_batch_equals_single(posterior):
    structs = [_molecule(1), _periodic(2), _molecule(3)]
    batched = posterior.predict(structs)
    for s, b in zip(structs, batched):
        (one,) = posterior.predict([s])
        assert b.energy == pytest.approx(one.energy, abs=1e-9)
        np.testing.assert_allclose(b.forces, one.forces, atol=1e-9)
        assert b.energy_sigma == pytest.approx(one.energy_sigma, rel=1e-8)
        np.testing.assert_allclose(b.energy_sigma_gradient, one.energy_sigma_gradient, atol=1e-9)
        np.testing.assert_allclose(b.forces_sigma, one.forces_sigma, rtol=1e-7)


def test_sghmc_sample_loop_equals_vmap():
    """On a CPU, large graphs evaluate the samples one after another: same numbers as vmap."""
    post = SGHMCPosterior(Backbone(random_mace()), PosteriorSettings(),
                          SGHMCConfig(num_samples=3, cycle_steps=6, batch_size=2))
    post.fit(_frames())
    structs = [_molecule(6), _periodic(7)]
    post.config.loop_min_edges = 10 ** 9
    via_vmap = post.predict(structs)
    post.config.loop_min_edges = 0
    via_loop = post.predict(structs)
    assert via_loop[0].energy_sigma > 1e-6  # the samples differ: the check has teeth
    for a, b in zip(via_vmap, via_loop):
        assert a.energy == pytest.approx(b.energy, abs=1e-10)
        np.testing.assert_allclose(a.forces, b.forces, atol=1e-10)
        assert a.energy_sigma == pytest.approx(b.energy_sigma, rel=1e-9)
        np.testing.assert_allclose(a.energy_sigma_gradient, b.energy_sigma_gradient, atol=1e-10)
        np.testing.assert_allclose(a.forces_sigma, b.forces_sigma, rtol=1e-9)
    np.testing.assert_allclose(via_vmap[1].stress, via_loop[1].stress, atol=1e-10)
    np.testing.assert_allclose(via_vmap[1].energy_sigma_cell_gradient,
                               via_loop[1].energy_sigma_cell_gradient, atol=1e-10)


def test_sigma_gradient_switch(posterior):
    """Without the sigma_E gradient (a driver without --cv) everything else is unchanged."""
    structs = [_molecule(4), _periodic(5)]
    full = posterior.predict(structs)
    posterior.sigma_gradient = False
    try:
        lean = posterior.predict(structs)
    finally:
        posterior.sigma_gradient = True
    for a, b in zip(full, lean):
        assert b.energy == pytest.approx(a.energy, abs=1e-10)
        np.testing.assert_allclose(b.forces, a.forces, atol=1e-10)
        assert b.energy_sigma == pytest.approx(a.energy_sigma, rel=1e-10)
        np.testing.assert_allclose(b.forces_sigma, a.forces_sigma, rtol=1e-10)
        assert b.confidence == pytest.approx(a.confidence, rel=1e-10)
        if a.stress is not None:
            np.testing.assert_allclose(b.stress, a.stress, atol=1e-10)
        if posterior.kind == "lastlayer":  # sghmc gets the gradient for free and keeps it
            assert b.energy_sigma_gradient is None and b.energy_sigma_cell_gradient is None
    assert full[0].energy_sigma_gradient is not None


def test_driver_asks_for_the_sigma_gradient_only_with_cv(posterior):
    import argparse

    from rarefly.driver_cli import _without_unused_gradient

    try:
        assert _without_unused_gradient(posterior, argparse.Namespace(cv=False)).sigma_gradient is False
        assert _without_unused_gradient(posterior, argparse.Namespace(cv=True)).sigma_gradient is True
    finally:
        posterior.sigma_gradient = True


def test_model_file_round_trip(posterior, tmp_path):
    path = tmp_path / "m.rfly"
    posterior.save(path)
    again = load_posterior(path)
    assert type(again) is KINDS[posterior.kind]
    s = _molecule(5)
    a, b = posterior.predict([s])[0], again.predict([s])[0]
    assert a.energy == pytest.approx(b.energy, abs=1e-10)
    assert a.energy_sigma == pytest.approx(b.energy_sigma, rel=1e-10)
    np.testing.assert_allclose(a.forces_sigma, b.forces_sigma, rtol=1e-10)


def test_unknown_species_and_bad_positions(posterior):
    s = _molecule()
    si = Structure(np.array([14] + list(s.numbers[1:])), s.positions)
    with pytest.raises(InputError, match="element\\(s\\) Si not in the model"):
        posterior.predict([si])
    bad = s.positions.copy()
    bad[2, 1] = np.nan
    with pytest.raises(InputError, match="atom 2 is not finite"):
        posterior.predict([Structure(s.numbers, bad)])
    close = s.positions.copy()
    close[1] = close[0] + 0.01
    with pytest.raises(InputError, match="atoms 0 and 1 overlap|atoms 1 and 0 overlap"):
        posterior.predict([Structure(s.numbers, close)])


def test_lastlayer_learns_and_shrinks_uncertainty():
    """Fitting on data must reduce the posterior variance at those points."""
    bb = Backbone(random_mace(seed=3))
    prior = LastLayerPosterior.from_foundation(bb, PosteriorSettings())
    frames = _frames(8)
    before = prior.predict([frames[0].structure])[0].extra["energy_sigma_raw"]
    prior.fit(frames)
    after = prior.predict([frames[0].structure])[0].extra["energy_sigma_raw"]
    assert after < before


def test_feature_density_adds_exactly_and_measures_distance_from_the_fitted_atoms():
    """The density's sums take atoms in any batches alike; a fitted atom is about 1 away
    (d^2 per feature), a far one much further; the ramp and its slope are continuous."""
    from rarefly.posterior.feature_density import FeatureDensity, smooth_ramp

    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.normal(size=(400, 5)) * [1.0, 2.0, 0.5, 3.0, 1.0] + 4.0)
    el = torch.as_tensor(rng.integers(0, 2, size=400))
    one, two = FeatureDensity(3, 5), FeatureDensity(3, 5)
    one.add(x, el)
    two.add(x[:150], el[:150])
    two.add(x[150:], el[150:])
    for k in ("count", "total", "outer"):
        torch.testing.assert_close(getattr(one, k), getattr(two, k))
    d2 = one.squared_distance(x, el)
    assert 0.9 < float(d2.mean()) <= 1.0                       # the ridge pulls it just below 1
    far = one.squared_distance(x[:4] + 20.0, el[:4])
    assert float(far.min()) > 10.0
    assert float(one.squared_distance(x[:3], torch.tensor([2, 2, 2])).abs().max()) == 0.0  # never seen
    again = FeatureDensity.from_dict(one.to_dict())
    torch.testing.assert_close(again.squared_distance(x, el), d2)
    t = torch.tensor([-0.5, 0.0, 0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    v = smooth_ramp(t)
    (g,) = torch.autograd.grad(v.sum(), t)
    torch.testing.assert_close(v.detach(), torch.tensor([0.0, 0.0, 0.125, 0.5, 1.5], dtype=torch.float64))
    torch.testing.assert_close(g, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0], dtype=torch.float64))


def test_misfit_variance_holds_the_fit_misfit_and_grows_away_from_the_fitted_frames():
    """With a feature density the raw energy variance is the weight variance plus
    s_E^2 (1 + excess): at least the fit's energy misfit, more for a distorted molecule than
    for one like the fitted frames, and without a density exactly the weight variance."""
    post = LastLayerPosterior.from_foundation(Backbone(random_mace(seed=2)), PosteriorSettings())
    frames = _frames(8)
    post.fit(frames)
    near, far = _molecule(seed=99), _molecule()
    far.positions[0] += [0.45, -0.3, 0.2]                    # a C-C bond stretched
    plain = [p.extra["energy_sigma_raw"] for p in post.predict([near, far])]
    post.fit_density(frames)
    s_e = post.fit_noise[0]
    with_misfit = [p.extra["energy_sigma_raw"] for p in post.predict([near, far])]
    for p, m in zip(plain, with_misfit):
        assert m ** 2 >= p ** 2 + s_e ** 2 * (1 - 1e-9)
    excess = [(m ** 2 - p ** 2) / s_e ** 2 - 1 for p, m in zip(plain, with_misfit)]
    assert excess[1] > 5 * max(excess[0], 0.1)
    post.density = None
    assert [p.extra["energy_sigma_raw"] for p in post.predict([near, far])] == pytest.approx(plain, rel=1e-12)
    with pytest.raises(ValueError, match="lastlayer"):
        from rarefly.posterior import build_posterior
        build_posterior("small", "sghmc", frames, misfit_variance=True)


def test_lastlayer_design_jacobian_matches_autograd_jacobian():
    """The per-column backward passes of ``design`` give the full d[fixed, Phi]/dR."""
    post = LastLayerPosterior.from_foundation(Backbone(random_mace()), PosteriorSettings())
    structs = [_molecule(8), _molecule(9)]
    data = build_graph(structs, post.r_max, post.atomic_numbers, post.dtype)
    pos = data["positions"].detach().clone().requires_grad_(True)

    def q_of(p):
        out = post.backbone(data, p, None)
        phi = torch.zeros(2, out["phi"].shape[1], dtype=p.dtype).index_add(0, data["batch"], out["phi"])
        fixed = torch.zeros(2, dtype=p.dtype).index_add(0, data["batch"], out["fixed"])
        return torch.cat([fixed[:, None], phi], dim=-1)

    J = post._jacobian(q_of(pos), pos)                               # (K, n, 3)
    full = torch.autograd.functional.jacobian(q_of, pos.detach())   # (G, K, n, 3)
    ref = full.sum(0)   # graphs are disjoint: each atom's column comes from its own graph
    assert float(J.abs().max()) > 1e-3
    torch.testing.assert_close(J, ref, atol=1e-10, rtol=1e-8)


def test_lastlayer_energy_only_design_is_the_energy_part_of_the_full_design():
    """``design(forces=False)`` (forward passes only: the trainer's replay energies after a
    refinement) gives the same energy blocks as the full design and no force blocks."""
    post = LastLayerPosterior.from_foundation(Backbone(random_mace()), PosteriorSettings())
    frames = _frames(5)
    GE, hE, GF, hF, yy, counts = post.design(frames, chunk=2)
    ge, he, gf, hf, yy_e, counts_e = post.design(frames, chunk=3, forces=False)
    assert float(GE.abs().max()) > 0 and float(GF.abs().max()) > 0
    torch.testing.assert_close(ge, GE, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(he, hE, atol=1e-12, rtol=1e-10)
    assert float(gf.abs().max()) == 0 and float(hf.abs().max()) == 0
    assert yy_e[0] == pytest.approx(yy[0], rel=1e-10) and yy_e[1] == 0
    assert counts_e == [5, 0] and counts[0] == 5 and counts[1] > 0


def test_backbone_refinement_replays_old_frames_in_every_batch(monkeypatch):
    import rarefly.graph

    post = LastLayerPosterior.from_foundation(Backbone(random_mace()), PosteriorSettings())
    new, old = _frames(3), _frames(6)[3:]
    seen = []
    real = rarefly.graph.build_graph

    def spy(structures, *a, **k):
        seen.append([any(s is f.structure for f in old) for s in structures])
        return real(structures, *a, **k)

    monkeypatch.setattr(rarefly.graph, "build_graph", spy)
    before = {k: v.clone() for k, v in post.backbone.model.state_dict().items()}
    calls = []
    stats = post.refine_backbone(new, 5, batch_size=4, replay=old,
                                 between_steps=lambda: calls.append(len(seen)))
    assert stats["gradient_steps"] == 5 and len(seen) == 5
    assert calls == [1, 2, 3, 4, 5]               # once after every step
    assert all(flags.count(True) == 2 and flags.count(False) == 2 for flags in seen)
    after = post.backbone.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
    assert not any(p.requires_grad for p in post.backbone.model.parameters())


def test_backbone_refinement_cosine_schedule_anneals_the_learning_rate(monkeypatch):
    """lr_schedule="cosine": the Adam step size falls from lr to 0 over the refinement (read
    off the optimiser at each step); an unknown schedule is one sentence naming the choices."""
    post = LastLayerPosterior.from_foundation(Backbone(random_mace()), PosteriorSettings())
    rates = []
    real_step = torch.optim.Adam.step

    def spy(self, *a, **k):
        rates.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    post.refine_backbone(_frames(3), 4, lr=1e-3, lr_schedule="cosine")
    assert rates == pytest.approx([1e-3, 0.5e-3 * (1 + np.cos(np.pi / 4)), 0.5e-3,
                                   0.5e-3 * (1 + np.cos(3 * np.pi / 4))])
    rates.clear()
    post.refine_backbone(_frames(3), 3, lr=1e-3)
    assert rates == [1e-3] * 3
    with pytest.raises(ValueError, match="unknown refinement learning-rate schedule 'step'.*cosine"):
        post.refine_backbone(_frames(3), 3, lr_schedule="step")


def test_backbone_refinement_trains_the_readout_only_when_asked():
    """train_readout=True: the readout's posterior mean moves with the other weights (the
    energy's constant for a fixed composition can change) and is the new posterior mean, the
    covariance kept; by default the posterior mean is left exactly as it was."""
    post = LastLayerPosterior.from_foundation(Backbone(random_mace()), PosteriorSettings())
    mean0, cov0 = post.mean.clone(), post.cov.clone()
    post.refine_backbone(_frames(3), 3, lr=1e-3)
    assert torch.equal(post.mean, mean0)
    post.refine_backbone(_frames(3), 3, lr=1e-3, train_readout=True)
    assert not torch.equal(post.mean, mean0) and not post.mean.requires_grad
    assert float((post.mean - mean0).abs().max()) <= 1.01 * 3e-3   # Adam: about lr per step at most
    torch.testing.assert_close(post.cov, cov0)
