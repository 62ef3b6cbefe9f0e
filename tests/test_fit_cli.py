"""`rarefly fit` as a user runs it (a subprocess on the embedded model and its xTB data):
a plain last-layer fit, a fit on fine-tuned weights, and a refused combination."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from pathlib import Path

ALA2 = Path(__file__).parents[1] / "benchmarks" / "data" / "ala2_c7eq_xtb.xyz"


def _fit(tmp_path, child_env, *extra):
    from ase.io import read, write

    data = tmp_path / "train.xyz"
    if not data.exists():
        # 12 xTB frames of alanine dipeptide, a molecule larger than any the embedded model
        # was trained on (its forces there are off by ~0.25 eV/A); `rarefly fit` holds out 2
        write(data, read(ALA2, index="::3")[:12])
    out = tmp_path / f"model{len(list(tmp_path.glob('*.rfly')))}.rfly"
    proc = subprocess.run([sys.executable, "-m", "rarefly.cli", "fit", "--foundation", "small",
                           "--data", str(data), "-o", str(out), *extra],
                          capture_output=True, text=True, env=child_env, timeout=600)
    return proc, out, data


def _train_force_rmse(model, data):
    from rarefly.data_io import read_frames
    from rarefly.posterior import load_posterior

    post = load_posterior(model)
    frames = read_frames(data)[:10]                 # the fitted ones
    preds = post.predict([f.structure for f in frames])
    err = np.concatenate([(p.forces - f.forces).ravel() for p, f in zip(preds, frames)])
    return post, float(np.sqrt(np.mean(err ** 2)))


@pytest.mark.slow
def test_fit_with_finetuned_weights_fits_its_data_better(tmp_path, child_env):
    plain, m_plain, data = _fit(tmp_path, child_env)
    assert plain.returncode == 0, plain.stderr
    tuned, m_tuned, _ = _fit(tmp_path, child_env, "--finetune-steps", "100")
    assert tuned.returncode == 0, tuned.stderr
    assert "finetune_steps" in tuned.stdout
    p_plain, rmse_plain = _train_force_rmse(m_plain, data)
    p_tuned, rmse_tuned = _train_force_rmse(m_tuned, data)
    w0, w1 = p_plain.backbone.model.state_dict(), p_tuned.backbone.model.state_dict()
    assert not torch.equal(w0["interactions.0.linear_up.weight"], w1["interactions.0.linear_up.weight"])
    assert rmse_tuned < 0.92 * rmse_plain, (rmse_plain, rmse_tuned)


def test_finetune_steps_with_sghmc_or_negative_are_one_sentence(tmp_path, child_env):
    proc, _, _ = _fit(tmp_path, child_env, "--kind", "sghmc", "--finetune-steps", "5")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("rarefly fit: fine-tuning before the fit")
    proc, _, _ = _fit(tmp_path, child_env, "--finetune-steps", "-1")
    assert proc.returncode == 2 and "0 or more" in proc.stderr
