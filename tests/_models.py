"""Small MACE models built on the spot for pure-math tests of the posteriors."""

import numpy as np
import torch

import rarefly  # noqa: F401


def random_mace(seed: int = 0, r_max: float = 4.0):
    from e3nn import o3
    from mace import modules

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
        return modules.ScaleShiftMACE(
            r_max=r_max, num_bessel=6, num_polynomial_cutoff=5, max_ell=2, interaction_cls=block,
            interaction_cls_first=block, num_interactions=2, num_elements=4,
            hidden_irreps=o3.Irreps("8x0e+8x1o"), MLP_irreps=o3.Irreps("8x0e"),
            gate=torch.nn.functional.silu, atomic_energies=np.array([-13.6, -1030.0, -1480.0, -2040.0]),
            avg_num_neighbors=6.0, atomic_numbers=[1, 6, 7, 8], correlation=2, radial_type="bessel",
            atomic_inter_scale=1.0, atomic_inter_shift=0.0)
    finally:
        torch.set_default_dtype(old)
