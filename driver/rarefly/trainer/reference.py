"""Reference calculators, registered once, by name.

A reference is described by a name and options (from the run config)::

    [reference]
    calculator = "xtb"                       # emt | xtb | pyscf | "module:Class"
    options = { method = "GFN2-xTB" }

``make_calculator(spec)`` returns a fresh ASE calculator; ``check_reference(spec)`` fails
fast, with one sentence, when the code behind it is not installed. For VASP, CP2K, ORCA,
Quantum ESPRESSO, FHI-aims ... use their ASE calculators by import path, e.g.
``calculator = "ase.calculators.vasp:Vasp"`` with their keyword arguments as options.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


class ReferenceError(RuntimeError):
    """A reference calculator that cannot be created or failed on a structure."""


@dataclass
class ReferenceSpec:
    calculator: str = "xtb"
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.calculator}({opts})"


def _emt(**opts):
    from ase.calculators.emt import EMT

    return EMT(**opts)


def _xtb(method: str = "GFN2-xTB", **opts):
    try:
        from tblite.ase import TBLite
    except ImportError as exc:
        raise ReferenceError("the xtb reference needs tblite: pip install tblite") from exc
    opts.setdefault("verbosity", 0)
    return TBLite(method=method, **opts)


def _pyscf(xc: str = "PBE", basis: str = "6-31G*", charge: int = 0, spin: int = 0, **opts):
    try:
        import pyscf  # noqa: F401
    except ImportError as exc:
        raise ReferenceError("the pyscf reference needs PySCF: pip install pyscf") from exc
    return PySCFCalculator(xc=xc, basis=basis, charge=charge, spin=spin, **opts)


#: the one registry: name -> factory(**options) -> ASE calculator
REGISTRY: dict[str, Callable[..., Any]] = {"emt": _emt, "xtb": _xtb, "pyscf": _pyscf}


def make_calculator(spec: ReferenceSpec):
    name = spec.calculator
    if name in REGISTRY:
        return REGISTRY[name](**spec.options)
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ReferenceError(f"reference calculator {name!r} cannot be imported ({exc}); "
                                 "check the module path and that the code is installed") from exc
        return cls(**spec.options)
    raise ReferenceError(f"unknown reference calculator {name!r}; use one of "
                         f"{', '.join(REGISTRY)} or an import path 'module:Class'")


def check_reference(spec: ReferenceSpec) -> None:
    """Create the calculator once, so that a missing code is reported before the run."""
    make_calculator(spec)


def label(spec: ReferenceSpec, numbers, positions, cell=None, pbc=(False, False, False)):
    """Reference energy (eV) and forces (eV/A) of one structure. A pure function of its
    arguments (arrays in, arrays out), so it can run in another process or on another machine."""
    from ase import Atoms

    atoms = Atoms(numbers=np.asarray(numbers), positions=np.asarray(positions),
                  cell=None if cell is None else np.asarray(cell), pbc=pbc)
    atoms.calc = make_calculator(spec)
    try:
        energy = float(atoms.get_potential_energy())
        forces = np.asarray(atoms.get_forces(), dtype=float)
    except Exception as exc:  # noqa: BLE001 - one sentence, the cause kept
        raise ReferenceError(f"reference {spec.describe()} failed: {type(exc).__name__}: {exc}") from exc
    return energy, forces


#: largest force component a label may hold (eV/A) before the trainer refuses to learn it
DEFAULT_MAX_LABEL_FORCE = 25.0


def label_problem(energy: float, forces, n_atoms: int, max_force: float | None) -> str | None:
    """Why a reference label must not be learned, in one sentence, or None when it may be.

    A reference answers for whatever geometry it is given. When a biased walker has blown up
    (bench_onthefly's thirty-fourth run: an upper wall on a stiff sigma_E), xTB still labels
    the wreck (48 eV above every other label, forces up to 46 eV/A), and one such label made
    the refined model worse everywhere. Molecular dynamics at a few hundred K stays far below
    ``DEFAULT_MAX_LABEL_FORCE`` (alanine dipeptide at 300-500 K: at most 3.6 eV/A in xTB;
    1 Ha/Bohr is 51 eV/A). ``max_force`` None or 0: no force limit.
    """
    f = np.asarray(forces, dtype=float)
    if f.shape != (n_atoms, 3):
        return f"the reference returned forces of shape {f.shape} for {n_atoms} atoms"
    if not np.isfinite(energy) or not np.all(np.isfinite(f)):
        return "the reference returned a non-finite energy or force"
    worst = float(np.abs(f).max()) if f.size else 0.0
    if max_force and worst > max_force:
        return (f"its largest force component is {worst:.1f} eV/A, above the limit of "
                f"{max_force:g} eV/A (a blown-up geometry?); raise [learning] max_label_force "
                f"(--max-label-force) if such forces are real in this system")
    return None


class PySCFCalculator:
    """A minimal ASE calculator for PySCF DFT (energy + analytic gradient), molecules only."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, xc="PBE", basis="6-31G*", charge=0, spin=0, **opts):
        from ase.calculators.calculator import Calculator

        self._base = Calculator
        self.xc, self.basis, self.charge, self.spin, self.opts = xc, basis, charge, spin, opts

    def get_potential_energy(self, atoms=None):
        return self._run(atoms)[0]

    def get_forces(self, atoms=None):
        return self._run(atoms)[1]

    def _run(self, atoms):
        from ase.units import Bohr, Hartree
        from pyscf import dft, gto

        key = (atoms.numbers.tobytes(), atoms.positions.tobytes())
        if getattr(self, "_key", None) == key:
            return self._res
        mol = gto.M(atom=[(int(z), p) for z, p in zip(atoms.numbers, atoms.positions)], unit="Angstrom",
                    basis=self.basis, charge=self.charge, spin=self.spin, verbose=0)
        mf = dft.RKS(mol) if self.spin == 0 else dft.UKS(mol)
        mf.xc = self.xc
        e = mf.kernel()
        g = mf.nuc_grad_method().kernel()
        self._key, self._res = key, (e * Hartree, -g * Hartree / Bohr)
        return self._res
