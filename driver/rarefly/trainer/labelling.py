"""Running reference calculations: Parsl executors (local processes, threads, or a cluster).

The work is the pure function :func:`rarefly.trainer.reference.label` (arrays in, arrays out),
wrapped as a Parsl ``python_app``, the way psiflow and aims-PAX run theirs. Executors:

- ``local`` (default): Parsl's HighThroughputExecutor with a LocalProvider: worker processes
  on this machine; every socket it opens is bound to 127.0.0.1.
- ``threads``: Parsl's ThreadPoolExecutor (light references such as EMT or xTB).
- ``slurm``: HighThroughputExecutor with a SlurmProvider; options go to the provider
  (``partition``, ``account``, ``walltime``, ``nodes_per_block``, ``worker_init`` ...) and
  ``address`` must name the login node's address the workers can reach (asked explicitly:
  nothing listens beyond localhost unless configured).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from rarefly.trainer.reference import ReferenceSpec, label

log = logging.getLogger("rarefly.labelling")


class LabellingError(RuntimeError):
    pass


@dataclass
class ExecutorSpec:
    kind: str = "local"          # local | threads | slurm
    workers: int = 1
    options: dict[str, Any] = field(default_factory=dict)


def _label_task(spec_dict, numbers, positions, cell, pbc):
    # module-level so that Parsl ships it by reference; imports happen in the worker
    from rarefly.trainer.reference import ReferenceSpec, label

    return label(ReferenceSpec(**spec_dict), numbers, positions, cell, pbc)


_PDEATHSIG = """\
import ctypes, os, signal, sys
parent = int(sys.argv[1])
if ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL)) != 0:  # PR_SET_PDEATHSIG
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
if os.getppid() != parent:  # the parent died before prctl: nobody would signal us
    sys.exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def _die_with_parent(cmd: list[str]) -> list[str]:
    """``cmd`` run so that it is killed when this process dies (Linux; elsewhere unchanged)."""
    import os
    import sys

    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-c", _PDEATHSIG, str(os.getpid()), *cmd]


# Runs the worker pool and, once a second, checks that the trainer is alive; when it is gone,
# kills the pool's whole process group (the local provider gives each block one: the pool,
# its workers and this watchdog), also workers in the middle of a task. Text for bash and
# for Parsl's str.format: no braces, no single quotes, no dollar signs.
_WATCHDOG = """import os, signal, subprocess, sys, time
parent = int(sys.argv[1])
pool = subprocess.Popen(sys.argv[2:])
while pool.poll() is None:
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    time.sleep(1)
sys.exit(pool.returncode)
"""


def _pool_watched_by_this_process() -> str:
    """Parsl's launch command of a local worker pool, run under :data:`_WATCHDOG`."""
    import os
    import shlex
    import sys

    from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD

    prefix = f"{shlex.quote(sys.executable)} -c '{_WATCHDOG}' {os.getpid()} "
    return prefix.replace("{", "{{").replace("}", "}}") + DEFAULT_LAUNCH_CMD


class Labeller:
    """Submit labelling tasks; ``submit`` returns a future with ``(energy, forces)``."""

    def __init__(self, reference: ReferenceSpec, executor: ExecutorSpec, run_dir: str):
        import os
        import sys

        import parsl
        from parsl.config import Config

        # Parsl starts helper scripts (interchange.py, process_worker_pool.py) by name: make
        # the ones of this environment findable also when the venv is not activated.
        bindir = os.path.dirname(sys.executable)
        if bindir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        self.reference = reference
        self.spec = executor
        ex = self._executor(executor)
        self._dfk = parsl.load(Config(executors=[ex], run_dir=str(run_dir), strategy="none"
                                      if executor.kind != "slurm" else "simple",
                                      initialize_logging=False))
        self._app = parsl.python_app(executors=[ex.label])(_label_task)

    @staticmethod
    def _executor(spec: ExecutorSpec):
        from parsl.executors import HighThroughputExecutor, ThreadPoolExecutor

        if spec.kind == "threads":
            return ThreadPoolExecutor(label="rarefly_labels", max_threads=spec.workers)
        if spec.kind == "local":
            from parsl.providers import LocalProvider

            # A trainer killed with SIGKILL cannot shut Parsl down: its interchange and worker
            # pool would live on for ever (a pool that starts after its interchange died
            # blocks for ever on its first receive). Both are tied to this process instead.
            return HighThroughputExecutor(
                label="rarefly_labels", address="127.0.0.1", loopback_address="127.0.0.1",
                max_workers_per_node=spec.workers, cores_per_worker=1,
                interchange_launch_cmd=_die_with_parent(["interchange.py"]),
                launch_cmd=_pool_watched_by_this_process(),
                provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1,
                                       worker_init=spec.options.get("worker_init", "")))
        if spec.kind == "slurm":
            from parsl.providers import SlurmProvider

            opts = dict(spec.options)
            address = opts.pop("address", None)
            if not address:
                raise LabellingError("the slurm executor needs [labelling.options] address = the "
                                     "address of this machine that compute nodes can reach")
            return HighThroughputExecutor(label="rarefly_labels", address=address,
                                          max_workers_per_node=spec.workers,
                                          interchange_launch_cmd=_die_with_parent(["interchange.py"]),
                                          provider=SlurmProvider(**opts))
        raise LabellingError(f"unknown labelling executor {spec.kind!r}; use local, threads or slurm")

    def submit(self, structure):
        s = structure
        return self._app(self.reference.__dict__, s.numbers.tolist(), s.positions.tolist(),
                         None if s.cell is None else s.cell.tolist(), tuple(s.pbc))

    def close(self) -> None:
        import parsl

        try:
            self._dfk.cleanup()
        finally:
            parsl.clear()
