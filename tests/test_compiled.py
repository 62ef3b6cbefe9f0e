"""``torch.compile`` of a lastlayer posterior (``rarefly driver --compile``): same numbers as
the eager model, also when the neighbour list changes; clear refusal for sghmc."""

import numpy as np
import pytest

from rarefly.prediction import Structure


@pytest.mark.slow
def test_compiled_lastlayer_matches_eager(model_file, ethanol_xyz):
    from ase.io import read

    from rarefly.graph import build_graph
    from rarefly.posterior import load_posterior
    from rarefly.posterior.compiled import compile_posterior

    eager = load_posterior(model_file)
    compiled = compile_posterior(load_posterior(model_file))
    assert compiled.compiled and not getattr(eager, "compiled", False)
    atoms = read(ethanol_xyz)
    rng = np.random.default_rng(3)
    moved = atoms.positions + rng.normal(scale=0.05, size=atoms.positions.shape)
    moved[-1] += [6.0, 0.0, 0.0]  # one hydrogen out of reach: fewer edges
    geometries = [atoms.positions, moved]
    edges = []
    for pos in geometries:
        s = Structure(atoms.numbers, pos, None, (False, False, False))
        a, b = eager.predict([s])[0], compiled.predict([s])[0]
        assert b.energy == pytest.approx(a.energy, abs=1e-9)
        np.testing.assert_allclose(b.forces, a.forces, atol=1e-9)
        assert b.energy_sigma == pytest.approx(a.energy_sigma, rel=1e-9)
        np.testing.assert_allclose(b.energy_sigma_gradient, a.energy_sigma_gradient, atol=1e-9)
        np.testing.assert_allclose(b.forces_sigma, a.forces_sigma, rtol=1e-9)
        edges.append(build_graph([s], eager.r_max, eager.atomic_numbers, eager.dtype)["edge_index"].shape[1])
    assert edges[0] != edges[1]  # the second geometry has another neighbour list


def test_compile_refuses_sghmc():
    from rarefly.foundation import EMBEDDED
    from rarefly.posterior import create_posterior
    from rarefly.posterior.compiled import CompileError, compile_posterior

    post = create_posterior(str(EMBEDDED["small"]), "sghmc", num_samples=2)
    with pytest.raises(CompileError, match="--compile supports lastlayer models; this one is sghmc"):
        compile_posterior(post)


@pytest.mark.slow
def test_hot_swap_into_the_compiled_model_needs_no_recompilation(model_file, ethanol_xyz, tmp_path):
    """A new model version (other MACE weights, other readout posterior) served by the compiled
    model of the old one: the numbers are the new version's eager numbers, and torch does not
    compile again (``error_on_recompile``)."""
    import torch
    import torch._dynamo
    from ase.io import read

    from rarefly.posterior import load_posterior
    from rarefly.posterior.compiled import adopt_compiled, compile_posterior

    old = compile_posterior(load_posterior(model_file))
    s = Structure.from_atoms(read(ethanol_xyz))
    before = old.predict([s])[0]
    newer = load_posterior(model_file)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in newer.backbone.model.parameters():
            if p.is_floating_point():
                p.add_(1e-2 * p.abs().mean() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        newer.mean.add_(1e-2)
    path = tmp_path / "v2.rfly"
    newer.save(path)
    eager = load_posterior(path)
    expected = eager.predict([s])[0]
    assert abs(expected.energy - before.energy) > 1e-3  # the new version does differ
    new = load_posterior(path)
    assert adopt_compiled(new, old)
    assert new.compiled and new.backbone is old.backbone
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = new.predict([s])[0]
    assert got.energy == pytest.approx(expected.energy, abs=1e-9)
    np.testing.assert_allclose(got.forces, expected.forces, atol=1e-9)
    assert got.energy_sigma == pytest.approx(expected.energy_sigma, rel=1e-9)
    np.testing.assert_allclose(got.energy_sigma_gradient, expected.energy_sigma_gradient, atol=1e-9)


def test_adopt_compiled_declines_an_eager_or_sghmc_model(model_file):
    from rarefly.foundation import EMBEDDED
    from rarefly.posterior import create_posterior, load_posterior
    from rarefly.posterior.compiled import adopt_compiled

    eager_old = load_posterior(model_file)
    new = load_posterior(model_file)
    backbone = new.backbone
    assert not adopt_compiled(new, eager_old)  # nothing compiled to reuse
    sg = create_posterior(str(EMBEDDED["small"]), "sghmc", num_samples=2)
    assert not adopt_compiled(sg, eager_old)
    assert new.backbone is backbone
