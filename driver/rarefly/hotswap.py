"""Pick up new model versions between two force calls.

:class:`ModelWatcher` is a ``predictor_provider`` for :func:`rarefly.client.serve`: each call
costs one ``os.stat``; when the model file changed (the trainer publishes by atomic rename),
it loads the new file right there, between two force calls, and returns the new posterior.
The file at the path is always complete (atomic rename), so no step runs on a half-written
model; a file that fails to load is logged and the current model is kept.

The load is synchronous (about a second for a small model): building a MACE model runs
e3nn's code generation, which crashed the process when it ran in a thread beside a forward
pass of the serving model.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

log = logging.getLogger("rarefly.hotswap")


class ModelWatcher:
    def __init__(self, path: str, current, loader: Callable[[str], object],
                 on_swap: Callable[[object], object] | None = None):
        self.path = path
        self.current = current
        self.loader = loader
        self.on_swap = on_swap
        self._stamp = self._stat()
        self.swaps = 0

    def _stat(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def __call__(self):
        stamp = self._stat()
        if stamp is None or stamp == self._stamp:
            return self.current
        self._stamp = stamp
        try:
            new = self.loader(self.path)
        except Exception as exc:  # noqa: BLE001 - keep serving the current model
            log.warning("%s changed but could not be loaded (%s); keeping model version %s",
                        self.path, exc, getattr(self.current, "model_version", "?"))
            return self.current
        old_v = getattr(self.current, "model_version", None)
        self.current = self.on_swap(new) if self.on_swap else new
        self.swaps += 1
        log.info("model %s: version %s -> %s", self.path, old_v, getattr(new, "model_version", "?"))
        return self.current
