"""An ASE calculator over a rarefly posterior.

``results`` holds ``energy`` (eV), ``forces`` (eV/A), ``stress`` (eV/A^3, Voigt, periodic
only), ``energy_sigma`` (eV), ``forces_sigma`` (per atom, eV/A), ``energy_sigma_gradient``
(eV/A), ``confidence`` (P(|E error| < epsilon)) and ``model_version``.
"""

from __future__ import annotations

from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from rarefly.prediction import Structure


class RareflyCalculator(Calculator):
    implemented_properties = ["energy", "free_energy", "forces", "stress", "energy_sigma",
                              "forces_sigma", "energy_sigma_gradient", "confidence"]

    def __init__(self, model=None, posterior=None, device: str = "cpu", epsilon: float | None = None,
                 **kwargs):
        """``model``: path of a rarefly model file; or pass a loaded ``posterior``."""
        super().__init__(**kwargs)
        if posterior is None:
            if model is None:
                raise ValueError("RareflyCalculator needs model=PATH or posterior=...")
            from rarefly.posterior import load_posterior

            posterior = load_posterior(model, device=device, epsilon=epsilon)
        self.posterior = posterior

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        p = self.posterior.predict([Structure.from_atoms(self.atoms)])[0]
        self.results = {
            "energy": p.energy,
            "free_energy": p.energy,
            "forces": p.forces,
            "energy_sigma": p.energy_sigma,
            "forces_sigma": p.forces_sigma,
            "energy_sigma_gradient": p.energy_sigma_gradient,
            "confidence": p.confidence,
            "model_version": p.model_version,
        }
        if p.stress is not None:
            self.results["stress"] = full_3x3_to_voigt_6_stress(p.stress)
