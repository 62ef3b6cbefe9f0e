"""Loading MACE foundation checkpoints, and turning a MACE model into plain, safely
loadable data (and back).

A checkpoint is either a local MACE ``.model`` file (a pickled ``torch.nn.Module``, the
format mace itself writes: only load files you trust) or a name that mace's own loaders
know (``mace-mp-0:small``, ``mace-mp-0:medium``, ``mace-off:small`` ...), which mace
downloads on first use and therefore needs the internet; or ``small``: the project's
embedded model (``rarefly/data/foundation-small.model``, see ``scripts/make_foundation.py``).

Inside a rarefly model file the architecture is stored as a JSON-able dict
(:func:`architecture_of`) and the weights as a state dict, so model files load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

DATA_DIR = Path(__file__).parent / "data"
EMBEDDED = {"small": DATA_DIR / "foundation-small.model"}

#: classes/functions a stored architecture may name (module prefixes)
_ALLOWED_PREFIXES = ("mace.", "torch.nn.functional", "torch.")


class FoundationError(RuntimeError):
    """A checkpoint that cannot be loaded; the message says what to do."""


def load_foundation(name_or_path: str, device: str = "cpu") -> torch.nn.Module:
    """Return a ScaleShiftMACE from a local file, an embedded name or a mace model name."""
    from rarefly._compat import import_mace

    import_mace("mace.modules")
    if name_or_path in EMBEDDED:
        path = EMBEDDED[name_or_path]
        if not path.exists():
            raise FoundationError(f"the embedded model {path} is missing; regenerate it with "
                                  "`python scripts/make_foundation.py`")
        return _load_file(path, device)
    path = Path(name_or_path)
    if path.exists():
        return _load_file(path, device)
    if ":" in name_or_path or name_or_path.startswith(("mace-", "mace_", "small", "medium", "large")):
        return _load_named(name_or_path, device)
    raise FoundationError(f"no MACE checkpoint at {name_or_path!r}: give a .model file, `small` "
                          "(the embedded model) or a name such as mace-mp-0:small")


def _load_file(path: Path, device: str) -> torch.nn.Module:
    try:
        model = torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - turned into one sentence
        raise FoundationError(f"cannot read the MACE checkpoint {path}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise FoundationError(f"{path} does not hold a MACE model (found {type(model).__name__})")
    return model.to(device)


def _load_named(name: str, device: str) -> torch.nn.Module:
    family, _, size = name.partition(":")
    size = size or "small"
    from rarefly._compat import import_mace

    try:
        import_mace("mace.calculators")
        if family in ("mace-mp-0", "mace-mp", "mace_mp"):
            from mace.calculators import mace_mp

            calc = mace_mp(model=size, device=device, default_dtype="float64")
        elif family in ("mace-off", "mace_off", "mace-off23"):
            from mace.calculators import mace_off

            calc = mace_off(model=size, device=device, default_dtype="float64")
        else:
            raise FoundationError(f"unknown foundation model family {family!r}; use mace-mp-0:SIZE, "
                                  "mace-off:SIZE, `small` or a path to a .model file")
    except FoundationError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise FoundationError(
            f"could not fetch the foundation model {name!r} ({type(exc).__name__}: {exc}); this "
            "needs the internet on first use: download the .model file elsewhere and pass its path"
        ) from exc
    return calc.models[0]


# ---------------------------------------------------------------------------- architecture
def _encode(v: Any) -> Any:
    from e3nn import o3

    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, o3.Irreps):
        return {"__irreps__": str(v)}
    if isinstance(v, (np.ndarray, np.generic)):
        return {"__array__": np.asarray(v).tolist()}
    if isinstance(v, torch.Tensor):
        return {"__array__": v.detach().cpu().numpy().tolist()}
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    if isinstance(v, dict):
        return {k: _encode(x) for k, x in v.items()}
    if isinstance(v, type) or callable(v):
        return {"__callable__": f"{v.__module__}:{v.__qualname__}"}
    raise TypeError(f"cannot store architecture value {v!r}")


def _decode(v: Any) -> Any:
    from e3nn import o3

    if isinstance(v, list):
        return [_decode(x) for x in v]
    if isinstance(v, dict):
        if "__irreps__" in v:
            return o3.Irreps(v["__irreps__"])
        if "__array__" in v:
            return np.array(v["__array__"])
        if "__callable__" in v:
            module, _, qual = v["__callable__"].partition(":")
            if not module.startswith(_ALLOWED_PREFIXES):
                raise FoundationError(f"model file names {module}:{qual}, which rarefly does not load")
            obj = importlib.import_module(module)
            for part in qual.split("."):
                obj = getattr(obj, part)
            return obj
        return {k: _decode(x) for k, x in v.items()}
    return v


def architecture_of(model: torch.nn.Module) -> dict:
    """A JSON-able description from which :func:`build_model` rebuilds ``model``."""
    from mace.tools.scripts_utils import extract_config_mace_model

    config = extract_config_mace_model(model)
    if "error" in config:
        raise FoundationError(config["error"])
    config.pop("cueq_config", None)
    config["atomic_numbers"] = [int(z) for z in model.atomic_numbers]
    return {"class": type(model).__name__, "config": _encode(config)}


def build_model(architecture: dict, state_dict: dict, dtype: torch.dtype = torch.float64,
                device: str = "cpu") -> torch.nn.Module:
    from rarefly._compat import import_mace

    import_mace("mace.modules")
    from mace import modules

    config = _decode(architecture["config"])
    config["atomic_numbers"] = list(config["atomic_numbers"])
    config.pop("heads", None) if len(config.get("heads", [])) <= 1 else None
    cls = getattr(modules, architecture["class"])
    with _default_dtype(dtype):
        model = cls(**config)
    model.load_state_dict(state_dict)
    return model.to(device=device, dtype=dtype)


class _default_dtype:  # noqa: N801
    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.old)
