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
