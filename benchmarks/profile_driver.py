#!/usr/bin/env python
"""Where the time of a posterior force call goes, and what-if prototypes.

Companion of ``bench_driver.py`` (same model, same systems, same timing discipline:
one torch thread, interleaved repetitions, medians of per-repetition ratios to i-PI's
MACE driver). It answers: which part of ``posterior.predict`` costs what, and how fast
would cheaper designs be? The prototypes live HERE, as subclasses, only to be measured;
they are not the product code in ``driver/rarefly/posterior``.

Rows (all relative to i-PI's ``MACE_driver(cell, pos)`` on the same structure):

lastlayer
  fwd                 backbone forward only (no gradient)
  fwd+1vjp            forward + 1 backward: plain forces
  fwd+2vjp batched    forward + 2 backwards through ``autograd.grad(is_grads_batched=True)``
  fwd+2vjp loop       forward + 2 ``autograd.grad(retain_graph=True)`` calls
  fwd+10vjp batched   what ``LastLayerPosterior._moments`` does today (2 + rank 8)
  fwd+10vjp loop      the same 10 vector-Jacobian products as a loop
  predict             ``LastLayerPosterior.predict`` today
  predict lean        prototype: forces and d var_E/dR by 2 looped backwards, sigma_F from
                      the per-atom readout-feature variance phi_i^T Sigma phi_i (no backward)
sghmc
  1 sample            ``torch.func.grad`` of one sample (functional_call)
  vmap S              today's evaluation: ``vmap(grad(...))`` over the S samples
  loop S              the same S samples one after the other
  predict             ``SGHMCPosterior.predict`` today

``--profile`` adds a torch.profiler table of the busiest operators of ``predict`` for
each kind.

Usage::

    .venv/bin/python benchmarks/profile_driver.py --system box --repeats 9
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_driver as B  # noqa: E402


def lastlayer_rows(post, s, data):
    import torch

    def fwd(grad=True):
        pos = data["positions"].detach().clone().requires_grad_(grad)
        out = post.backbone(data, pos, None)
        Phi = out["phi"].sum(0)
        q = [out["fixed"].sum() + Phi @ post.mean, 2.0 * (Phi * (Phi @ post.cov).detach()).sum()]
        q += [Phi @ r for r in post._lowrank]
        return torch.stack(q), pos

    def batched(R):
        Q, pos = fwd()
        Q = Q[:R]
        return torch.autograd.grad(Q, pos, grad_outputs=torch.eye(R, dtype=Q.dtype),
                                   is_grads_batched=True)

    def loop(R):
        Q, pos = fwd()
        return [torch.autograd.grad(Q[r], pos, retain_graph=r < R - 1) for r in range(R)]

    def fwd_only():
        with torch.no_grad():
            post.backbone(data, data["positions"], None)

    lean = lean_lastlayer(post)
    return {
        "ll fwd": fwd_only,
        "ll fwd+1vjp": lambda: loop(1),
        "ll fwd+2vjp batched": lambda: batched(2),
        "ll fwd+2vjp loop": lambda: loop(2),
        f"ll fwd+{2 + len(post._lowrank)}vjp batched": lambda: batched(2 + len(post._lowrank)),
        f"ll fwd+{2 + len(post._lowrank)}vjp loop": lambda: loop(2 + len(post._lowrank)),
        "ll predict": lambda: post.predict([s]),
        "ll predict lean": lambda: lean.predict([s]),
    }


def lean_lastlayer(post):
    """Prototype (measurement only): the same posterior state, with ``_moments`` doing 2
    looped backward passes and a backward-free per-atom force-uncertainty proxy."""
    import torch

    from rarefly.posterior.base import Moments
    from rarefly.posterior.lastlayer import LastLayerPosterior, _graph_sum

    class LeanLastLayer(LastLayerPosterior):
        def _moments(self, data, positions, strain):
            st = self.settings
            G = int(data["ptr"].numel() - 1)
            out = self.backbone(data, positions, strain)
            Phi = _graph_sum(out["phi"], data["batch"], G)
            energy = _graph_sum(out["fixed"], data["batch"], G) + Phi @ self.mean
            c = (Phi @ self.cov).detach()
            inputs = [positions] + ([strain] if strain is not None else [])
            gE = torch.autograd.grad(energy.sum(), inputs, retain_graph=True)
            gV = torch.autograd.grad(2.0 * (Phi * c).sum(), inputs)
            phi = out["phi"].detach()
            local = ((phi @ self.cov) * phi).sum(-1)  # per-atom readout variance, eV^2
            return Moments(energy=energy.detach(), forces=-gE[0],
                           dE_dstrain=gE[1] if strain is not None else None,
                           var_energy=(Phi.detach() * c).sum(-1) + st.energy_noise ** 2,
                           grad_var_energy=gV[0],
                           strain_grad_var_energy=gV[1] if strain is not None else None,
                           var_forces=local[:, None].expand(-1, 3) + st.force_noise ** 2)

    lean = LeanLastLayer.__new__(LeanLastLayer)
    lean.__dict__.update(post.__dict__)
    return lean


def sghmc_rows(post, s, data, samples: int):
    from torch.func import functional_call, grad, vmap

    from rarefly.posterior.backbone import vmappable_mace

    pos0 = data["positions"].detach().clone()

    def energy(params, pos):
        e, sig = functional_call(post.net, (params, post._buffers), (data, pos, None, 1))
        return e.sum(), (e, sig)

    g = grad(energy, argnums=1, has_aux=True)

    def vm():
        with vmappable_mace():
            return vmap(g, in_dims=(0, None))(post.samples, pos0)

    def loop(n):
        return [g({k: v[i] for k, v in post.samples.items()}, pos0) for i in range(n)]

    return {"sg 1 sample": lambda: loop(1), f"sg vmap {samples}": vm,
            f"sg loop {samples}": lambda: loop(samples), "sg predict": lambda: post.predict([s])}


def rusage_per_call(fn, calls: int = 2):
    """(sys ms, minor page faults) per call: the kernel's share of a call, mostly the
    zero-filling of freshly mapped memory for large tensors."""
    import resource

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(calls):
        fn()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return (1e3 * (r1.ru_stime - r0.ru_stime) / calls, (r1.ru_minflt - r0.ru_minflt) / calls)


def bead_rows(ll, lean, sg, base, atoms, nbeads, repeats, kinds):
    bead_atoms = B.beads(atoms, nbeads)
    structs = [B.structure(b) for b in bead_atoms]
    cells, poss = zip(*[B.ipi_args(b) for b in bead_atoms])
    preds = {"ipi mace": None}
    if "lastlayer" in kinds:
        preds.update({"ll predict": ll, "ll predict lean": lean})
    if "sghmc" in kinds:
        preds["sg predict"] = sg
    fns = {}
    for name, p in preds.items():
        if p is None:
            fns[name + " batch"] = lambda: base([c.copy() for c in cells], [x.copy() for x in poss])
            fns[name + " single"] = lambda: [base(c.copy(), x.copy()) for c, x in zip(cells, poss)]
        else:
            fns[name + " batch"] = lambda p=p: p.predict(structs)
            fns[name + " single"] = lambda p=p: [p.predict([x]) for x in structs]
    t = B.interleaved(fns, max(3, repeats // 2), warmup=1, cpu=True)
    print(f"\n{nbeads}-bead batch / {nbeads} single calls (CPU ms)")
    for name in preds:
        b, s1 = t[name + " batch"], t[name + " single"]
        print(f"{name:16}  batch {B.med(b) * 1e3:8.1f}  singles {B.med(s1) * 1e3:8.1f}  "
              f"ratio {B.paired_ratio(b, s1):5.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Cost breakdown of rarefly's posterior force call "
                                             "and what-if prototypes, relative to i-PI's MACE "
                                             "driver (see the module docstring).")
    ap.add_argument("--system", choices=["ethanol", "box"], default="box",
                    help="ethanol (9 atoms) or the periodic 64-atom box of bench_driver.py")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--model", type=Path, default=None, help="as in bench_driver.py")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--kinds", default="lastlayer,sghmc")
    ap.add_argument("--beads", type=int, default=0,
                    help="also time an N-bead batch against N single calls (0: no)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler operator tables")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch = B._torch_one_thread()
    from rarefly.graph import build_graph

    with tempfile.TemporaryDirectory(prefix="rarefly-prof-") as tmp:
        work = Path(tmp)
        model = args.model or B.EMBEDDED_MODEL
        if args.model is None and not B.EMBEDDED_MODEL.exists():
            model = work / "stand-in.model"
            B.stand_in_model(model)
        posts = B.make_posteriors(model, work, args.samples)
        atoms = B.ethanol() if args.system == "ethanol" else B.molecular_box()
        s = B.structure(atoms)
        base = B.make_baseline(model, atoms, work)
        cell, pos = B.ipi_args(atoms)
        kinds = args.kinds.split(",")
        fns = {"ipi mace": lambda: base(cell.copy(), pos.copy())}
        ll, sg = posts["lastlayer"][0], posts["sghmc"][0]
        data = build_graph([s], ll.r_max, ll.atomic_numbers, ll.dtype)
        if "lastlayer" in kinds:
            fns.update(lastlayer_rows(ll, s, data))
        if "sghmc" in kinds:
            fns.update(sghmc_rows(sg, s, data, args.samples))
        print(f"profile_driver.py {' '.join(sys.argv[1:])}")
        for line in B.machine_header(model, "stand-in" if model != B.EMBEDDED_MODEL and
                                     args.model is None else "", posts):
            print(line)
        print(f"{args.system}: {len(atoms)} atoms, {data['edge_index'].shape[1]} edges; "
              f"{args.repeats} interleaved repetitions; load average {os.getloadavg()[0]:.1f}")
        t = B.interleaved(fns, args.repeats, warmup=1, cpu=True)
        mem = {name: rusage_per_call(f) for name, f in fns.items()}
        width = max(map(len, fns))
        print("CPU time of the process per call (median), ratio = median of per-repetition "
              "ratios; sys time and minor page faults per call from getrusage (2 calls)")
        print(f"{'':{width}}  {'CPU ms':>8}  {'/ i-PI':>6}  {'sys ms':>7}  {'page faults':>11}")
        for name, v in t.items():
            print(f"{name:{width}}  {B.med(v) * 1e3:8.1f}  {B.paired_ratio(v, t['ipi mace']):6.2f}"
                  f"  {mem[name][0]:7.1f}  {mem[name][1]:11.0f}")
        if args.beads:
            bead_rows(ll, lean_lastlayer(ll), sg, base, atoms, args.beads, args.repeats, kinds)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            for kind in kinds:
                post = posts[kind][0]
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(2):
                        post.predict([s])
                print(f"\n{kind}.predict, 2 calls: busiest operators")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return 0


if __name__ == "__main__":
    sys.exit(main())
