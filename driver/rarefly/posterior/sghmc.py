"""``sghmc``: posterior samples of *all* MACE weights by cyclical preconditioned SGHMC
(the seed paper's method, METHOD.md §1).

Model: the foundation MACE plus an optional aleatoric head ``sigma_F,i = f0 exp(MLP(phi_i))``
on the invariant readout features (``f0`` = 0.1 kcal/mol/A, the seed paper's scale). Prior:
``N(theta_foundation, s_p^2 I)`` on every foundation weight, ``N(0, s_p^2 I)`` on the head.
Likelihood: Gaussian on total energies (noise ``settings.energy_noise``, 0.1 epsilon) and on
force components (noise from the head, or ``settings.force_noise`` without it).

Sampler, per chain and cycle: ``cycle_steps`` steps; cosine learning rate from ``lr`` to
``lr_min``; the first 20 % of steps noise-free, a temperature ramp 0 -> 1 over the next 5 %,
then T = 1 (the seed paper's 400/500/2000 split); friction 0.1; inverse mass
``1 / (sqrt(v) + 1e-4)`` with ``v`` the AMSGrad-style running maximum of the squared-gradient
average (beta 0.999), reset each cycle. The last weights of a cycle are one posterior sample.
Chains are warm-started from their previous sample. Mini-batches of ``batch_size`` frames;
the newest frames are over-sampled with importance weights that keep the gradient unbiased.
The seed paper runs 2000 steps per cycle; our default is ``cycle_steps = 200`` (one tenth),
see the README for the measured effect on calibration.

Prediction evaluates the S samples together on one shared graph (one neighbour list):
``torch.func.vmap`` over stacked parameters with ``grad`` for forces and stress, or, on a CPU
for graphs of ``loop_min_edges`` edges or more, one plain autograd pass per sample on that
graph (measured faster there). Either way d sigma_E/dR comes from the per-sample forces,
without another backward pass.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap
from tqdm import tqdm

from rarefly.graph import build_graph
from rarefly.posterior.backbone import Backbone, vmappable_mace
from rarefly.posterior.base import LabelledFrame, Moments, Posterior, PosteriorSettings
from rarefly.units import KCAL_MOL_TO_EV

FORCE_NOISE_SCALE = 0.1 * KCAL_MOL_TO_EV


@dataclass
class SGHMCConfig:
    num_samples: int = 8
    cycle_steps: int = 200
    lr: float = 1e-3
    lr_min: float = 1e-8
    friction: float = 0.1
    batch_size: int = 5
    noise_free_fraction: float = 0.2
    ramp_fraction: float = 0.05
    beta: float = 0.999
    force_noise_head: bool = True
    seed: int = 0
    #: on a CPU, graphs with at least this many edges evaluate the samples one after another
    #: (plain autograd) instead of vmapped: measured faster from ~350 edges (22-atom alanine
    #: dipeptide: equal; 64-atom box, ~2,900 edges: 1.7x faster)
    loop_min_edges: int = 350

    @classmethod
    def from_dict(cls, d: dict) -> "SGHMCConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class BayesianMACE(nn.Module):
    """Backbone + optional force-noise head; ``forward`` gives graph energies and sigma_F."""

    def __init__(self, backbone: Backbone, head: bool):
        super().__init__()
        self.backbone = backbone
        self.has_head = head
        if head:
            D = backbone.num_features
            dt = backbone._dtype()
            self.head = nn.Sequential(nn.Linear(D, 16, dtype=dt), nn.SiLU(), nn.Linear(16, 1, dtype=dt))
            nn.init.zeros_(self.head[2].weight)
            nn.init.zeros_(self.head[2].bias)

    def forward(self, data, positions, strain, num_graphs: int):
        out = self.backbone(data, positions, strain)
        e = torch.zeros(num_graphs, dtype=positions.dtype, device=positions.device)
        e = e.index_add(0, data["batch"], out["energy"])
        if self.has_head:
            sig_f = FORCE_NOISE_SCALE * torch.exp(self.head(out["phi"].detach()).squeeze(-1))
        else:
            sig_f = torch.zeros_like(out["energy"])
        return e, sig_f


class SGHMCPosterior(Posterior):
    kind = "sghmc"

    def __init__(self, backbone: Backbone, settings: PosteriorSettings, config: SGHMCConfig,
                 samples: dict[str, torch.Tensor] | None = None,
                 prior_center: dict[str, torch.Tensor] | None = None, **kw):
        super().__init__(backbone, settings, **kw)
        self.config = config
        self.net = BayesianMACE(backbone, config.force_noise_head)
        for p in self.net.parameters():
            p.requires_grad_(False)
        base = {k: v.detach().clone() for k, v in self.net.named_parameters()}
        self.prior_center = prior_center or {
            k: (v if k.startswith("backbone.") else torch.zeros_like(v)) for k, v in base.items()}
        if samples is None:  # all samples at the prior centre: zero epistemic variance
            samples = {k: v.unsqueeze(0).repeat(config.num_samples, *[1] * v.dim())
                       for k, v in base.items()}
        self.samples = {k: v.to(self.device, self.dtype) for k, v in samples.items()}
        self._buffers = {k: v for k, v in self.net.named_buffers()}

    @property
    def num_samples(self) -> int:
        return next(iter(self.samples.values())).shape[0]

    # ------------------------------------------------------------------ prediction
    def _moments(self, data, positions, strain) -> Moments:
        G = int(data["ptr"].numel() - 1)
        periodic = strain is not None
        pos0 = positions.detach()
        str0 = strain.detach() if periodic else torch.zeros(G, 3, 3, dtype=pos0.dtype, device=pos0.device)

        def energy(params, pos, st):
            e, sig_f = functional_call(self.net, (params, self._buffers),
                                       (data, pos, st if periodic else None, G))
            return e.sum(), (e, sig_f)

        if self._loop_over_samples(data):
            dpos, dstr, e_s, sigf_s = self._per_sample_loop(data, pos0, str0 if periodic else None, G)
        else:
            g = grad(energy, argnums=(1, 2), has_aux=True)
            with vmappable_mace():
                (dpos, dstr), (e_s, sigf_s) = vmap(g, in_dims=(0, None, None))(self.samples, pos0, str0)
        S = e_s.shape[0]
        f_s = -dpos                                           # (S, n, 3)
        e_mean, f_mean = e_s.mean(0), f_s.mean(0)
        de, df = e_s - e_mean, f_s - f_mean
        denom = max(S - 1, 1)
        var_e = (de ** 2).sum(0) / denom + self.settings.energy_noise ** 2
        # d var_E / dR = (2/(S-1)) sum_s dE_s (dE_s/dR - mean) = -(2/(S-1)) sum_s dE_s dF_s
        node_graph = data["batch"]
        grad_var = -(2.0 / denom) * (de[:, node_graph, None] * df).sum(0)
        if self.config.force_noise_head:
            alea = (sigf_s ** 2).mean(0)[:, None].expand(-1, 3)
        else:
            alea = torch.full_like(f_mean, self.settings.force_noise ** 2)
        var_f = (df ** 2).sum(0) / denom + alea
        dstr_mean = dstr.mean(0) if periodic else None
        sgrad = (2.0 / denom) * (de[:, :, None, None] * (dstr - dstr_mean)).sum(0) if periodic else None
        return Moments(energy=e_mean, forces=f_mean, dE_dstrain=dstr_mean, var_energy=var_e,
                       grad_var_energy=grad_var, strain_grad_var_energy=sgrad, var_forces=var_f)

    def _loop_over_samples(self, data) -> bool:
        """One plain forward/backward per sample on the shared graph instead of ``vmap``?
        On a CPU, vmap wins for small graphs (per-call overhead) and loses for large ones
        (``benchmarks/bench_driver.out``); on a GPU, vmap always."""
        if self.device.type != "cpu":
            return False
        return int(data["edge_index"].shape[1]) >= self.config.loop_min_edges

    def _per_sample_loop(self, data, pos0, str0, G: int):
        """Per-sample (dE/dR, dE/dstrain, E, sigma_F) stacked over samples, as ``vmap`` gives
        them: the graph (neighbour list, shifts) is built once and shared."""
        dpos, dstr, e_s, sigf_s = [], [], [], []
        for k in range(self.num_samples):
            params = {n: v[k] for n, v in self.samples.items()}
            pos = pos0.clone().requires_grad_(True)
            st = None if str0 is None else str0.clone().requires_grad_(True)
            e, sig_f = functional_call(self.net, (params, self._buffers), (data, pos, st, G))
            grads = torch.autograd.grad(e.sum(), [pos] + ([st] if st is not None else []))
            dpos.append(grads[0])
            if st is not None:
                dstr.append(grads[1])
            e_s.append(e.detach())
            sigf_s.append(sig_f.detach())
        return (torch.stack(dpos), torch.stack(dstr) if dstr else None,
                torch.stack(e_s), torch.stack(sigf_s))

    # ------------------------------------------------------------------ sampling
    def _nll(self, params_net: nn.Module, batch: Sequence[LabelledFrame]) -> torch.Tensor:
        """Negative log-likelihood summed over ``batch`` (per-frame vector)."""
        dt, dev = self.dtype, self.device
        data = build_graph([f.structure for f in batch], self.r_max, self.atomic_numbers, dt, dev)
        G = len(batch)
        pos = data["positions"].detach().clone().requires_grad_(True)
        e, sig_f = params_net(data, pos, None, G)
        (dE,) = torch.autograd.grad(e.sum(), pos, create_graph=True)
        ref_e = torch.tensor([self.offset_energy(f.structure.numbers, f.energy) for f in batch],
                             dtype=dt, device=dev)
        ref_f = torch.as_tensor(np.concatenate([f.forces for f in batch]), dtype=dt, device=dev)
        se = self.settings.energy_noise
        nll_e = 0.5 * ((e - ref_e) / se) ** 2
        if self.config.force_noise_head:
            sf = sig_f[:, None] + self.settings.force_noise * 0.0
        else:
            sf = torch.full_like(ref_f, self.settings.force_noise)
        per_comp = 0.5 * ((-dE - ref_f) / sf) ** 2 + torch.log(sf).expand_as(ref_f)
        nll_f = torch.zeros(G, dtype=dt, device=dev).index_add(0, data["batch"], per_comp.sum(-1))
        return nll_e + nll_f

    def sample(self, frames: Sequence[LabelledFrame], newest: int = 0, progress: bool = False,
               cycles: int = 1) -> dict:
        """Run ``cycles`` cycles of every chain, warm-started from the current samples.

        newest: the last ``newest`` frames are over-sampled (about one per batch) with
        importance weights that keep the mini-batch gradient unbiased.
        Returns statistics (gradient steps, final loss).
        """
        cfg, s = self.config, self.settings
        rng = np.random.default_rng(cfg.seed + self.model_version)
        N = len(frames)
        if N == 0:
            raise ValueError("no labelled frames to sample the posterior from")
        B = min(cfg.batch_size, N)
        # sampling probabilities: newest frames get ~1/B of the mass in total
        p = np.full(N, 1.0)
        if 0 < newest < N:
            p[-newest:] = (N - newest) / (B - 1 if B > 1 else 1) / newest
        p /= p.sum()
        work = BayesianMACE(self.backbone.__class__(self.backbone.model), cfg.force_noise_head)
        names = [k for k, _ in work.named_parameters()]
        steps_total = 0
        last_loss = float("nan")
        bar = tqdm(total=self.num_samples * cycles * cfg.cycle_steps, desc="SGHMC", unit="step",
                   disable=not progress)
        new_samples = {k: v.clone() for k, v in self.samples.items()}
        for chain in range(self.num_samples):
            with torch.no_grad():
                for k, prm in work.named_parameters():
                    prm.copy_(new_samples[k][chain])
            params = [prm for _, prm in work.named_parameters()]
            for prm in params:
                prm.requires_grad_(True)
            center = [self.prior_center[k] for k in names]
            for _cycle in range(cycles):
                mom = [torch.zeros_like(q) for q in params]
                v_avg = [torch.zeros_like(q) for q in params]
                v_max = [torch.zeros_like(q) for q in params]
                T_steps = cfg.cycle_steps
                for t in range(T_steps):
                    frac = t / T_steps
                    lr = cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * frac))
                    nf, rp = cfg.noise_free_fraction, cfg.ramp_fraction
                    temp = 0.0 if frac < nf else min(1.0, (frac - nf) / rp) if rp > 0 else 1.0
                    idx = rng.choice(N, size=B, replace=True, p=p)
                    w = torch.as_tensor(1.0 / (N * p[idx]), dtype=self.dtype)  # importance weights
                    nll = self._nll(work, [frames[i] for i in idx])
                    U = (N / B) * (w * nll).sum()
                    prior = sum(((q - c) ** 2).sum() for q, c in zip(params, center)) / (2 * s.prior_sigma ** 2)
                    gs = torch.autograd.grad(U + prior, params)
                    with torch.no_grad():
                        for q, g_, m_, va, vm in zip(params, gs, mom, v_avg, v_max):
                            va.mul_(cfg.beta).add_((1 - cfg.beta) * g_ * g_)
                            torch.maximum(vm, va / (1 - cfg.beta ** (t + 1)), out=vm)
                            minv = 1.0 / (vm.sqrt() + 1e-4)
                            m_.mul_(1 - cfg.friction).add_(-lr * minv * g_)
                            if temp > 0:
                                m_.add_(torch.randn_like(q) * torch.sqrt(2 * cfg.friction * lr * temp * minv))
                            q.add_(m_)
                    last_loss = float(U.detach()) / max(N, 1)
                    steps_total += 1
                    bar.update(1)
            with torch.no_grad():
                for k, prm in work.named_parameters():
                    new_samples[k][chain] = prm.detach()
        bar.close()
        self.samples = new_samples
        return {"gradient_steps": steps_total, "loss_per_frame": last_loss}

    def fit(self, frames: Sequence[LabelledFrame], progress: bool = False, newest: int = 0,
            cycles: int = 1) -> dict:
        return self.sample(frames, newest=newest, progress=progress, cycles=cycles)

    # ------------------------------------------------------------------ model file
    def payload(self) -> dict:
        return {"samples": {k: v.detach().cpu() for k, v in self.samples.items()},
                "prior_center": {k: v.detach().cpu() for k, v in self.prior_center.items()},
                "config": asdict(self.config)}

    @classmethod
    def from_payload(cls, backbone: Backbone, settings: PosteriorSettings, post: dict, **kw):
        return cls(backbone, settings, SGHMCConfig.from_dict(post["config"]),
                   samples=post["samples"], prior_center=post["prior_center"], **kw)
