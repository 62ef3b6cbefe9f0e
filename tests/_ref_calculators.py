"""Reference calculators for the trainer tests, used by import path
(``--reference _ref_calculators:LoggedXTB``; the tests put ``tests/`` on PYTHONPATH).

:class:`LoggedXTB` is a real ASE calculator: GFN2-xTB through tblite, which then sleeps
``sleep`` seconds (so a test can kill the trainer while labels are in flight) and appends
one JSON line per finished calculation to ``log``: ``{"key", "pid", "energy", "t"}``, where
``key`` is :func:`structure_key` of the positions it computed. Options come from keyword
arguments (``--reference-option sleep=1``) or, for ``rarefly driver --reference`` which
takes no options, from the environment (``RAREFLY_TEST_REF_SLEEP``, ``RAREFLY_TEST_REF_LOG``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
from ase.calculators.calculator import Calculator, all_changes


def structure_key(numbers, positions) -> str:
    """Identity of a configuration: exact float64 positions (what the messages carry)."""
    h = hashlib.sha1(np.ascontiguousarray(numbers, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(positions, dtype="<f8").tobytes())
    return h.hexdigest()[:16]


def read_log(path) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.endswith("\n")]


class LoggedXTB(Calculator):
    implemented_properties = ["energy", "forces"]

    def __init__(self, sleep: float | None = None, log: str | None = None,
                 method: str = "GFN2-xTB", **kwargs):
        super().__init__(**kwargs)
        self.sleep = float(sleep if sleep is not None else os.environ.get("RAREFLY_TEST_REF_SLEEP", 0))
        self.log = log or os.environ.get("RAREFLY_TEST_REF_LOG")
        self.method = method

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        from tblite.ase import TBLite

        super().calculate(atoms, properties, system_changes)
        a = self.atoms.copy()
        a.calc = TBLite(method=self.method, verbosity=0)
        energy = float(a.get_potential_energy())
        forces = np.array(a.get_forces())
        if self.sleep > 0:
            time.sleep(self.sleep)
        if self.log:
            line = json.dumps({"key": structure_key(a.numbers, a.positions), "pid": os.getpid(),
                               "energy": energy, "t": time.time()}) + "\n"
            fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())       # one short write: lines never interleave
            finally:
                os.close(fd)
        self.results = {"energy": energy, "forces": forces}
