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
  call on its template before it connects to i-PI;
- a hot swap does not compile again: :func:`adopt_compiled` copies the new version's MACE
  weights into the compiled model in place (same architecture, same parameter names and
  shapes; the compiled graphs take the weights as inputs, so new values need no new graph)
  and hands the new posterior that compiled backbone; only when the architecture differs is
  the new model compiled from scratch;
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


def adopt_compiled(new, old) -> bool:
    """Give the freshly loaded posterior ``new`` the compiled backbone of ``old`` (the version
    being served), with ``new``'s MACE weights copied into it in place: a hot swap without a
    re-compilation. Returns False, changing nothing, when that is not possible (``old`` is not
    compiled, the kinds, heads or architectures differ, or any weight's name, shape or dtype
    does not match); the caller then compiles ``new`` itself.

    ``old`` stops being valid: its backbone now carries ``new``'s weights. The hot swap calls
    this between two force calls, when ``old`` is being replaced."""
    if not getattr(old, "compiled", False) or getattr(new, "kind", None) != "lastlayer" \
            or getattr(old, "kind", None) != "lastlayer":
        return False
    if new.backbone.head != old.backbone.head or new.dtype != old.dtype or new.device != old.device:
        return False
    if new.architecture and old.architecture and new.architecture != old.architecture:
        return False
    src = new.backbone.model.state_dict()
    dst = old.backbone.model.state_dict()
    # every weight must match; ``torch.fx`` tracing drops a few constant buffers (the
    # ``*_zeroed`` masks of the symmetric contractions, fixed by the architecture), so the
    # compiled model may hold fewer buffers than the eager one, never other ones
    params_src = {k for k, _ in new.backbone.model.named_parameters()}
    params_dst = {k for k, _ in old.backbone.model.named_parameters()}
    if params_src != params_dst or not dst.keys() <= src.keys() \
            or any(src[k].shape != dst[k].shape or src[k].dtype != dst[k].dtype for k in dst):
        return False
    with torch.no_grad():  # all checks passed: the copy cannot fail half-way
        for k, v in dst.items():
            v.copy_(src[k])
    new.backbone = old.backbone
    new.compiled = True
    return True
