"""rarefly: Bayesian MACE forces, uncertainty collective variables and on-the-fly
fine-tuning for the i-PI molecular-dynamics server.

Units inside the package are eV, Angstrom and fs; cells are stored with lattice vectors
as rows (ASE's convention). Atomic units exist only in :mod:`rarefly.protocol`, PLUMED
units only in :mod:`rarefly.cv`.
"""

from rarefly._compat import fix_e3nn_safe_load as _fix_e3nn_safe_load

_fix_e3nn_safe_load()

__version__ = "0.1.0"

__all__ = ["RareflyCalculator", "__version__"]


def __getattr__(name):  # lazy: importing rarefly must not import torch/mace eagerly
    if name == "RareflyCalculator":
        from rarefly.calculator import RareflyCalculator

        return RareflyCalculator
    raise AttributeError(name)
