"""Host and agent identity: ids readable at a glance and unique across hosts sharing BASE."""
from __future__ import annotations

import os
import socket

from gpupool.jobs.names import check_name, slug


def host_id(override: str | None = None) -> str:
    """``--host-id``, else $GPUPOOL_HOST_ID, else this host's short name."""
    name = override or os.environ.get("GPUPOOL_HOST_ID") or socket.gethostname().split(".")[0]
    return check_name(slug(name, 60), "host id")


def agent_id(host: str, part: str) -> str:
    """``<host>-<part>``: ``<host>-gpu<N>`` (N = the GPU's minor number, the same in every Slurm job's
    cgroup, where NVML renumbers the job's GPUs from 0: ``agent.gpu.Gpu.label``), ``<host>-gpu<N>-mig<G>``
    (a MIG device), or ``<host>-cpu<N>`` (a local rank)."""
    return check_name(f"{host}-{part}", "agent id")
