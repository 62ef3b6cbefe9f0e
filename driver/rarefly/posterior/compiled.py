"""``torch.compile`` for the backbone of a ``lastlayer`` posterior (``rarefly driver --compile``).

Why: on a CPU, eager MACE spends much of a force call in small element-wise kernels
(``mul``, ``add``, ``fill_``, ``copy_``: see ``benchmarks/profile_driver.out``). Inductor
fuses them, for the forward pass and for both backward passes that a lastlayer call needs
(forces and d sigma_E/dR). ``benchmarks/bench_compile.py`` measures the effect against i-PI's
own MACE driver.

How: mace's recipe (``mace.tools.compile``): the MACE model is rebuilt from the model file's
architecture and weights with e3nn's TorchScript code generation off, the modules mace marks
are simplified by ``torch.fx``, and :meth:`Backbone.forward` is compiled with dynamic shapes
(the number of edges changes from step to step without a recompilation). The arithmetic is
the same; results agree with the eager model to rounding (``tests/test_compiled.py``).

Costs and limits:

- the first call compiles (about 30 s for the embedded model on 2 cores; a structure with a
  periodic cell after a molecule compiles once more); ``rarefly driver --compile`` makes that
  call on its template before it connects to i-PI, and again after each hot swap;
- ``lastlayer`` only: ``sghmc`` evaluates its samples through ``torch.func.vmap`` over
  functional parameters, which this path does not compile;
- the lastlayer call runs two backward passes over one forward graph (``retain_graph``),
  which compiled graphs allow only without donated buffers; AOTAutograd compiles the backward
  lazily, at the first backward call, so :func:`compile_posterior` sets
  ``torch._functorch.config.donated_buffer = False`` for the process (it concerns compiled
  graphs only; eager code is unaffected).
"""

from __future__ import annotations

import torch

from rarefly.posterior.backbone import Backbone


class CompileError(ValueError):
    """The posterior cannot be compiled (one sentence, for the CLI)."""


def compile_posterior(posterior):
    """Give ``posterior`` (a ``lastlayer`` posterior) a compiled backbone, in place; returns it."""
    if getattr(posterior, "kind", None) != "lastlayer":
        raise CompileError(f"--compile supports lastlayer models; this one is "
                           f"{getattr(posterior, 'kind', type(posterior).__name__)} "
                           "(run it without --compile)")
    from rarefly._compat import import_mace

    import_mace("mace.tools.compile")
    from mace.tools.compile import disable_e3nn_codegen, simplify

    from rarefly.foundation import architecture_of, build_model

    old = posterior.backbone
    arch = posterior.architecture or architecture_of(old.model)
    with disable_e3nn_codegen():
        model = build_model(arch, old.model.state_dict(), dtype=posterior.dtype,
                            device=str(posterior.device))
    model = simplify(model)
    for p in model.parameters():
        p.requires_grad_(False)
    backbone = Backbone(model, head=old.head)
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    backbone.forward = torch.compile(backbone.forward, dynamic=True)
    posterior.backbone = backbone
    posterior.compiled = True
    return posterior
