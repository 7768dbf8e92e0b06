"""How many threads a worker's math libraries may use: its share of the host's usable cores.

OpenMP, MKL, OpenBLAS and torch start one thread per core by default, each reading its variable
once, at import or first use, so the variables are set in the worker's environment when it
starts, before it imports anything (issue 22: two CPU agents on two cores took 18.4 s for 64
small torch chunks against 9.4 s with OMP_NUM_THREADS=1; on an 8-GPU, 64-core node the default
is 8 workers each spinning 64 threads). torchrun sets OMP_NUM_THREADS=1 for each process; Ray
sets it to a task's num_cpus. Here each worker gets the usable cores (``os.sched_getaffinity``:
a Slurm or container cpuset counts, not the whole machine) divided by the number of agents of
its host, at least 1. A variable the user set (in the agents' environment, or ``--env`` for a
run) is left as it is.
"""
from __future__ import annotations

import os
import socket

from gpupool.agent.worker_control import pid_alive
from gpupool.jobs.errors import BadFile
from gpupool.jobs.heartbeat import AgentState, read_status
from gpupool.jobs.paths import Spool

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS")  # torch reads the first two


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def share(agents: int) -> int:
    """Threads for each of ``agents`` agents of this host."""
    return max(1, usable_cores() // max(1, agents))


def thread_env(environ: dict[str, str], threads: int) -> dict[str, str]:
    """The variables to add to ``environ`` (those it does not set already)."""
    return {name: str(threads) for name in THREAD_VARS if name not in environ}


def host_agents(spool: Spool, me: str) -> int:
    """How many agents of this spool run on this host now (this one included): those whose
    heartbeat names this machine and a live process of it."""
    here, count = socket.gethostname(), 1
    try:
        names = [n for n in os.listdir(spool.agents_dir) if n.endswith(".json")]
    except OSError:
        return count
    for name in names:
        if name == f"{me}.json":
            continue
        try:
            hb = read_status(spool.agents_dir / name)
        except (OSError, BadFile):
            continue
        if hb.hostname == here and isinstance(hb.pid, int) and pid_alive(hb.pid) \
                and hb.state not in (AgentState.STOPPING, AgentState.STOPPED):
            count += 1
    return count
