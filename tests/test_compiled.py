"""``torch.compile`` of a lastlayer posterior (``rarefly driver --compile``): same numbers as
the eager model, also when the neighbour list changes and after a hot swap; clear refusal for
sghmc."""

import numpy as np
import pytest

from rarefly.prediction import Structure


@pytest.mark.slow
def test_compiled_lastlayer_matches_eager_and_takes_a_hot_swap_without_recompiling(
        model_file, ethanol_xyz, tmp_path):
    """One compilation (it is the slow part), two checks: (1) the compiled model gives the eager
    numbers, also when the neighbour list changes; (2) a new model version (other MACE weights,
    other readout posterior) served by the compiled model of the old one gives the new version's
    eager numbers, and torch does not compile again (``error_on_recompile``)."""
    import torch
    import torch._dynamo
    from ase.io import read

    from rarefly.graph import build_graph
    from rarefly.posterior import load_posterior
    from rarefly.posterior.compiled import adopt_compiled, compile_posterior

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
        _assert_same_prediction(compiled.predict([s])[0], eager.predict([s])[0])
        edges.append(build_graph([s], eager.r_max, eager.atomic_numbers, eager.dtype)["edge_index"].shape[1])
    assert edges[0] != edges[1]  # the second geometry has another neighbour list

    # (2) hot swap into the compiled model
    s = Structure.from_atoms(atoms)
    before = compiled.predict([s])[0]
    newer = load_posterior(model_file)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in newer.backbone.model.parameters():
            if p.is_floating_point():
                p.add_(1e-2 * p.abs().mean() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        newer.mean.add_(1e-2)
    path = tmp_path / "v2.rfly"
    newer.save(path)
    expected = load_posterior(path).predict([s])[0]
    assert abs(expected.energy - before.energy) > 1e-3  # the new version does differ
    new = load_posterior(path)
    assert adopt_compiled(new, compiled)
    assert new.compiled and new.backbone is compiled.backbone
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = new.predict([s])[0]
    _assert_same_prediction(got, expected)


def _assert_same_prediction(got, expected):
    assert got.energy == pytest.approx(expected.energy, abs=1e-9)
    np.testing.assert_allclose(got.forces, expected.forces, atol=1e-9)
    assert got.energy_sigma == pytest.approx(expected.energy_sigma, rel=1e-9)
    np.testing.assert_allclose(got.energy_sigma_gradient, expected.energy_sigma_gradient, atol=1e-9)
    np.testing.assert_allclose(got.forces_sigma, expected.forces_sigma, rtol=1e-9)


def test_compile_refuses_sghmc():
    from rarefly.foundation import EMBEDDED
    from rarefly.posterior import create_posterior
    from rarefly.posterior.compiled import CompileError, compile_posterior

    post = create_posterior(str(EMBEDDED["small"]), "sghmc", num_samples=2)
    with pytest.raises(CompileError, match="--compile supports lastlayer models; this one is sghmc"):
        compile_posterior(post)


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
