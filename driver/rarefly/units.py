"""The only place with unit conversions. Constants come from :mod:`ase.units`.

Inside rarefly: energies in eV, lengths in Angstrom, forces in eV/Angstrom, stress in
eV/Angstrom^3, time in fs. i-PI's wire uses Hartree atomic units (Bohr, Hartree).
"""

from ase import units as _u

BOHR_TO_ANGSTROM: float = _u.Bohr
ANGSTROM_TO_BOHR: float = 1.0 / _u.Bohr
HARTREE_TO_EV: float = _u.Hartree
EV_TO_HARTREE: float = 1.0 / _u.Hartree
#: eV/Angstrom -> Hartree/Bohr
FORCE_EV_A_TO_AU: float = _u.Bohr / _u.Hartree
#: kcal/mol -> eV
KCAL_MOL_TO_EV: float = _u.kcal / _u.mol
KJ_MOL_TO_EV: float = _u.kJ / _u.mol

ENERGY_UNITS = {"eV": 1.0, "meV": 1e-3, "kcal/mol": KCAL_MOL_TO_EV, "kJ/mol": KJ_MOL_TO_EV,
                "Ha": HARTREE_TO_EV, "hartree": HARTREE_TO_EV}


def energy_to_ev(value: float, unit: str) -> float:
    """Convert ``value`` in ``unit`` (one of :data:`ENERGY_UNITS`) to eV."""
    try:
        return float(value) * ENERGY_UNITS[unit]
    except KeyError:
        raise ValueError(
            f"unknown energy unit {unit!r}; use one of {', '.join(ENERGY_UNITS)}"
        ) from None
