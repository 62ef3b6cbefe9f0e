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
