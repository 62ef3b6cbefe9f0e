"""Compatibility fixes applied once, when :mod:`rarefly` is imported.

e3nn 0.4.4 (pinned by mace-torch 0.3.16) calls ``torch.load`` on a pickled constants file
at import time. With torch >= 2.6, ``weights_only=True`` is the default and that file holds
a ``slice`` object, so the import fails with "Weights only load failed ... slice". We
allow-list ``slice`` for safe loading instead of turning safe loading off.
"""


def fix_e3nn_safe_load() -> None:
    try:
        import torch.serialization
    except ImportError:  # torch absent: nothing to fix (pure-logic tools still import)
        return
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:
        add([slice])


_MACE_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def import_mace(*modules: str) -> None:
    """Import mace (and ``modules`` of it) without keeping its process-wide switch-off of
    safe loading: mace sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 at import time, which would make
    every later ``torch.load`` without an explicit ``weights_only`` unpickle. We restore the
    variable to what it was before (rarefly passes ``weights_only`` explicitly everywhere)."""
    import importlib
    import os

    had = os.environ.get(_MACE_ENV)
    try:
        # e3nn first: its constants then load with safe loading (``slice`` allow-listed above),
        # not inside mace's switch-off (which also made torch print a warning)
        fix_e3nn_safe_load()
        importlib.import_module("e3nn.o3")
        importlib.import_module("mace")
        for name in modules:
            importlib.import_module(name)
    finally:
        if had is None:
            os.environ.pop(_MACE_ENV, None)
        else:
            os.environ[_MACE_ENV] = had
