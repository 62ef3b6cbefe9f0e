"""Posteriors over MACE weights, behind one interface.

``load_posterior(path)`` reads a rarefly model file (``.rfly``) and returns a
:class:`~rarefly.posterior.base.Posterior` (a :class:`rarefly.prediction.Predictor`);
``create_posterior(foundation, kind)`` starts one from a MACE checkpoint. The posterior
kinds are registered once, in :data:`KINDS`.
"""

from __future__ import annotations

import torch

from rarefly.posterior.base import LabelledFrame, Posterior, PosteriorSettings
from rarefly.posterior.lastlayer import LastLayerPosterior
from rarefly.posterior.sghmc import SGHMCConfig, SGHMCPosterior

#: the one registry of posterior kinds
KINDS = {"lastlayer": LastLayerPosterior, "sghmc": SGHMCPosterior}

__all__ = ["KINDS", "LabelledFrame", "Posterior", "PosteriorSettings", "build_posterior",
           "create_posterior", "load_posterior"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def create_posterior(foundation: str, kind: str = "lastlayer", settings: PosteriorSettings | None = None,
                     dtype: str = "float64", device: str = "cpu", **kind_options) -> Posterior:
    """A posterior at its prior, centred on the foundation checkpoint ``foundation``."""
    from rarefly.foundation import architecture_of, load_foundation
    from rarefly.posterior.backbone import Backbone

    if kind not in KINDS:
        raise ValueError(f"unknown posterior kind {kind!r}; choose one of {', '.join(KINDS)}")
    model = load_foundation(foundation, device=device).to(_DTYPES[dtype])
    arch = architecture_of(model)
    settings = settings or PosteriorSettings()
    prov = {"foundation": str(foundation)}
    bb = Backbone(model)
    if kind == "lastlayer":
        return LastLayerPosterior.from_foundation(bb, settings, architecture=arch, provenance=prov,
                                                  **kind_options)
    return SGHMCPosterior(bb, settings, SGHMCConfig(**kind_options), architecture=arch,
                          provenance=prov)


def load_posterior(path, device: str = "cpu", epsilon: float | None = None,
                   dtype: str | None = None) -> Posterior:
    """Load a rarefly model file. ``epsilon`` (eV) overrides the stored threshold."""
    import rarefly  # noqa: F401  (e3nn fix)
    from rarefly.foundation import build_model
    from rarefly.model_file import load_model_file
    from rarefly.posterior.backbone import Backbone
    from rarefly.calibration import Calibration

    payload = load_model_file(path)
    kind = payload["kind"]
    if kind not in KINDS:
        raise ValueError(f"{path}: unknown posterior kind {kind!r}")
    weights = payload["weights"]
    tdtype = _DTYPES[dtype] if dtype else next(v.dtype for v in weights.values() if v.is_floating_point())
    model = build_model(payload["architecture"], weights, dtype=tdtype, device=device)
    settings = PosteriorSettings.from_dict(payload["settings"])
    if epsilon is not None:
        settings.epsilon = float(epsilon)
    kw = dict(calibration=Calibration.from_dict(payload["calibration"]),
              energy_offset=payload.get("energy_offset"), model_version=payload["model_version"],
              provenance=payload.get("provenance"), architecture=payload["architecture"])
    return KINDS[kind].from_payload(Backbone(model), settings, payload["posterior"], **kw)


def build_posterior(foundation: str, kind: str, frames, calibration_frames=None,
                    settings: PosteriorSettings | None = None, dtype: str = "float64",
                    progress: bool = False, align_energies: bool = False, finetune_steps: int = 0,
                    finetune_lr: float = 1e-3, misfit_variance: bool = False,
                    **kind_options) -> Posterior:
    """Create, fit and calibrate a posterior: what ``rarefly fit`` does.

    finetune_steps (lastlayer): fit the readout posterior, fine-tune *all* MACE weights on
    ``frames`` for this many Adam steps (anchored to the foundation weights, see
    :meth:`LastLayerPosterior.refine_backbone`), then fit the readout posterior again on the
    fine-tuned features: a fine-tuned model with a last-layer posterior.

    misfit_variance (lastlayer): the density of the fitted atoms' readout features is kept in
    the model, and the energy variance holds the fit's misfit, growing where the features
    leave the fitted ones (:mod:`rarefly.posterior.feature_density`).

    calibration_frames: held-out frames whose residuals set the Student-t calibration; when
    None, the last fifth of ``frames`` is held out for it (and not fitted). An uncalibrated
    posterior would report raw uncertainties, which are far too small for a model whose
    misfit is larger than its epistemic spread.
    """
    from rarefly.posterior.base import update_calibration

    if (finetune_steps or misfit_variance) and kind != "lastlayer":
        if misfit_variance:
            raise ValueError("the misfit variance is for lastlayer posteriors; sghmc's variance "
                             "across samples already covers all weights")
        raise ValueError("fine-tuning before the fit is for lastlayer posteriors; sghmc "
                         "samples all weights itself")
    frames = list(frames)
    if calibration_frames is None and len(frames) >= 5:
        k = max(1, len(frames) // 5)
        frames, calibration_frames = frames[:-k], frames[-k:]
    post = create_posterior(foundation, kind, settings, dtype=dtype, **kind_options)
    if align_energies:
        post.fit_energy_offset(frames)
    stats = post.fit(frames, progress=progress)
    if finetune_steps:
        ft = post.refine_backbone(frames, finetune_steps, lr=finetune_lr, progress=progress)
        stats = {**post.fit(frames, progress=progress), "finetune_steps": finetune_steps,
                 "finetune_loss_per_frame": ft["backbone_loss_per_frame"]}
    if misfit_variance:
        post.fit_density(frames)
    if calibration_frames:
        update_calibration(post, list(calibration_frames))
    post.model_version = 1
    post.provenance.update({"n_frames": len(frames), "n_calibration": len(calibration_frames or []),
                            "fit_stats": stats})
    return post
