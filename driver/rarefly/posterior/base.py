"""What every posterior kind shares: settings, the model-file round trip, batching of
structures, calibration and the conversion of raw moments into :class:`Prediction`.

A kind implements ``_moments(data, positions, strain)`` returning, per batched graph, the raw
(uncalibrated) predictive moments (see :class:`Moments`), plus ``fit`` and ``payload``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from rarefly.calibration import Calibration, ScaleCalibration
from rarefly.graph import build_graph
from rarefly.posterior.backbone import Backbone
from rarefly.prediction import Prediction, Structure
from rarefly.units import KCAL_MOL_TO_EV


@dataclass
class PosteriorSettings:
    """Settings stored in the model file. Energies in eV, forces in eV/Angstrom."""

    #: the user's error threshold on the total energy (seed paper's ethanol: 0.5 kcal/mol)
    epsilon: float = 0.5 * KCAL_MOL_TO_EV
    #: Gaussian prior width around the foundation weights (seed paper: 0.5 for MACE-MP-0)
    prior_sigma: float = 0.5
    #: energy noise of the likelihood; the seed paper fixes it at 0.1 * epsilon
    energy_noise: float = 0.1 * 0.5 * KCAL_MOL_TO_EV
    #: force noise of the likelihood (lastlayer: learned from residuals; sghmc: floor of the head)
    force_noise: float = 0.1 * KCAL_MOL_TO_EV
    #: per-atom force threshold for flagging (eV/A); None: not used
    force_threshold: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PosteriorSettings":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


@dataclass
class Moments:
    """Raw predictive moments for a batch (n nodes, G graphs), torch tensors.

    energy (G,), forces (n,3), dE_dstrain (G,3,3) or None,
    var_energy (G,) raw epistemic+aleatoric variance,
    grad_var_energy (n,3) d var_energy / d positions (None when ``sigma_gradient`` is off),
    strain_grad_var_energy (G,3,3) or None,
    var_forces (n,3) raw per-component force variance.
    """

    energy: torch.Tensor
    forces: torch.Tensor
    dE_dstrain: torch.Tensor | None
    var_energy: torch.Tensor
    grad_var_energy: torch.Tensor | None
    strain_grad_var_energy: torch.Tensor | None
    var_forces: torch.Tensor


class Posterior:
    """Base class: a MACE backbone with a posterior over (some of) its weights."""

    kind = "base"
    #: compute d sigma_E / d positions (and strain)? Posteriors that pay for it with an extra
    #: backward pass (``lastlayer``) skip it when False; ``rarefly driver`` turns it off
    #: without ``--cv``, where nothing uses the gradient.
    sigma_gradient: bool = True

    def __init__(self, backbone: Backbone, settings: PosteriorSettings,
                 calibration: Calibration | None = None, energy_offset: dict | None = None,
                 model_version: int = 0, provenance: dict | None = None,
                 architecture: dict | None = None):
        self.backbone = backbone
        self.settings = settings
        self.calibration = calibration or Calibration.prior()
        self.energy_offset = {int(k): float(v) for k, v in (energy_offset or {}).items()}
        self.model_version = int(model_version)
        self.provenance = dict(provenance or {})
        self.architecture = architecture
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------ properties
    @property
    def atomic_numbers(self) -> list[int]:
        return self.backbone.atomic_numbers

    @property
    def r_max(self) -> float:
        return self.backbone.r_max

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone._dtype()

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    # ------------------------------------------------------------------ prediction
    def _moments(self, data, positions, strain) -> Moments:  # pragma: no cover - abstract
        raise NotImplementedError

    def raw_moments(self, structures: Sequence[Structure]):
        """Build the graph for ``structures`` and return (data, Moments)."""
        data = build_graph(structures, self.r_max, self.atomic_numbers, self.dtype, self.device)
        periodic = any(s.cell is not None and any(s.pbc) for s in structures)
        num_graphs = len(structures)
        positions = data["positions"].detach().clone().requires_grad_(True)
        strain = (torch.zeros(num_graphs, 3, 3, dtype=self.dtype, device=self.device,
                              requires_grad=True) if periodic else None)
        return data, self._moments(data, positions, strain)

    def predict(self, structures: Sequence[Structure]) -> list[Prediction]:
        """Posterior-predictive energy, forces, stress and calibrated uncertainties."""
        if len(structures) == 0:
            return []
        data, mo = self.raw_moments(structures)
        k_e = self.calibration.energy.variance_factor
        k_f = self.calibration.forces.variance_factor
        eps = self.settings.epsilon
        out = []
        ptr = data["ptr"].tolist()
        energy = mo.energy.detach().cpu().numpy()
        forces = mo.forces.detach().cpu().numpy()
        var_e = mo.var_energy.detach().cpu().numpy()
        gvar = None if mo.grad_var_energy is None else mo.grad_var_energy.detach().cpu().numpy()
        var_f = mo.var_forces.detach().cpu().numpy()
        dEde = None if mo.dE_dstrain is None else mo.dE_dstrain.detach().cpu().numpy()
        sgvar = None if mo.strain_grad_var_energy is None else mo.strain_grad_var_energy.detach().cpu().numpy()
        for g, s in enumerate(structures):
            sl = slice(ptr[g], ptr[g + 1])
            raw_sigma = float(np.sqrt(max(var_e[g], 1e-300)))
            sigma = raw_sigma * np.sqrt(k_e)
            # d sigma / dR = sqrt(k) * d var / (2 sqrt(var))
            gsig = None if gvar is None else np.sqrt(k_e) * gvar[sl] / (2.0 * raw_sigma)
            stress = cell_grad = None
            if s.cell is not None and any(s.pbc):
                vol = abs(float(np.linalg.det(s.cell)))
                stress = dEde[g] / vol
                if sgvar is not None:
                    cell_grad = np.sqrt(k_e) * sgvar[g] / (2.0 * raw_sigma)
            out.append(Prediction(
                energy=float(energy[g]) ,
                forces=forces[sl].astype(float),
                stress=stress,
                energy_sigma=float(sigma),
                forces_sigma=np.sqrt(k_f * var_f[sl].mean(axis=1)),
                energy_sigma_gradient=None if gsig is None else gsig.astype(float),
                confidence=float(self.calibration.energy.confidence(raw_sigma, eps)),
                model_version=self.model_version,
                energy_sigma_cell_gradient=cell_grad,
                extra={"energy_sigma_raw": raw_sigma},
            ))
        return out

    # ------------------------------------------------------------------ model file
    def payload(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_payload(self) -> dict:
        from rarefly.foundation import architecture_of

        return {
            "model_version": self.model_version,
            "kind": self.kind,
            "architecture": self.architecture or architecture_of(self.backbone.model),
            "weights": {k: v.detach().cpu() for k, v in self.backbone.model.state_dict().items()},
            "posterior": self.payload(),
            "calibration": self.calibration.to_dict(),
            "settings": self.settings.to_dict(),
            "energy_offset": dict(self.energy_offset),
            "provenance": self.provenance,
        }

    def save(self, path) -> None:
        from rarefly.model_file import save_model_file

        save_model_file(path, self.to_payload())

    # ------------------------------------------------------------------ reference data
    def offset_energy(self, numbers: np.ndarray, reference_energy: float) -> float:
        """A reference energy moved onto the foundation model's zero (METHOD.md §1)."""
        return float(reference_energy) + sum(self.energy_offset.get(int(z), 0.0) for z in numbers)

    def fit_energy_offset(self, frames) -> None:
        """Per-element offsets: least squares of E_pred - E_ref over compositions (min-norm)."""
        zs = self.atomic_numbers
        comp = np.array([[np.sum(f.structure.numbers == z) for z in zs] for f in frames], float)
        preds = [p.energy for p in predict_in_chunks(self, [f.structure for f in frames])]
        diff = np.array(preds) - np.array([f.energy for f in frames])
        delta, *_ = np.linalg.lstsq(comp, diff, rcond=None)
        self.energy_offset = {int(z): float(d) for z, d in zip(zs, delta)}


def predict_in_chunks(posterior: Posterior, structures: Sequence[Structure],
                      chunk: int = 16) -> list[Prediction]:
    out: list[Prediction] = []
    for i in range(0, len(structures), chunk):
        out.extend(posterior.predict(structures[i:i + chunk]))
    return out


@dataclass
class LabelledFrame:
    """A structure with reference energy (eV) and forces (eV/A); offset already applied or not."""

    structure: Structure
    energy: float
    forces: np.ndarray
    stress: np.ndarray | None = None
    info: dict = field(default_factory=dict)


def update_calibration(posterior: Posterior, frames: Sequence[LabelledFrame],
                       memory: int | None = None) -> None:
    """Student-t update with residuals of the current (pre-update) predictions; with
    ``memory`` (labels) the older evidence is discounted first (:meth:`Calibration.forget`)."""
    _, mo = None, None
    if frames:
        posterior.calibration.forget(len(frames), memory)
    cal_e: ScaleCalibration = posterior.calibration.energy
    cal_f: ScaleCalibration = posterior.calibration.forces
    for i in range(0, len(frames), 16):
        chunk = frames[i:i + 16]
        data, mo = posterior.raw_moments([f.structure for f in chunk])
        e = mo.energy.detach().cpu().numpy()
        ve = mo.var_energy.detach().cpu().numpy()
        fo = mo.forces.detach().cpu().numpy()
        vf = mo.var_forces.detach().cpu().numpy()
        ref_e = np.array([posterior.offset_energy(f.structure.numbers, f.energy) for f in chunk])
        ref_f = np.concatenate([f.forces for f in chunk])
        cal_e.update(ref_e - e, np.sqrt(ve))
        cal_f.update(ref_f - fo, np.sqrt(vf))
