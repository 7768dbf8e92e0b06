"""Where a run's chunks may run: ``--target HOST::GPU[,GPU]`` (KohakuRiver's syntax, repeatable),
``--hosts``, ``--exclude-hosts`` and ``--min-free-gb``, judged against each agent's heartbeat.

A host matches an agent's ``host`` (its host id, ``$GPUPOOL_HOST_ID`` or the short hostname)
or its ``hostname``; a GPU number matches the agent's ``gpu_id`` (its ``--gpu N``: an index
into the GPUs the host lets it see; a CPU agent's rank). ``HOST::`` or ``HOST`` alone means
any agent of that host. ``--min-free-gb``: the agent's GPU reports at least that much free
memory (a CPU agent has none). A run that no live agent may take fails at once, naming the
constraint (``Unplaceable``), instead of waiting for agents that will never match.

GPUs per job (docs/multigpu.md): ``--gpus-per-job K`` goes only to agents holding exactly K GPUs
(``--gpus-per-agent K``); a run without it only to agents holding at most one (CPU agents, one-GPU
agents and slots), so that no job meets GPUs it does not expect. ``--gpu-mem GB`` (what one job
needs; the agent starts it only while that much is free) passes over agents whose GPUs have less
than that in all, and CPU agents.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpupool.jobs.heartbeat import Heartbeat
from gpupool.jobs.jsonio import is_num
from gpupool.master.errors import UsageError
from gpupool.master.spec.options import first_problem


class Unplaceable(UsageError):
    """No live agent of the pool may take the run's jobs."""


@dataclass(frozen=True)
class Placement:
    targets: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (host, GPU numbers; () = any of the host)
    hosts: tuple[str, ...] = ()
    exclude_hosts: tuple[str, ...] = ()
    min_free_gb: float | None = None
    gpus_per_job: int | None = None  # None: agents with at most one GPU
    gpu_mem: float | None = None  # GiB one job needs (the agent waits until it is free)

    @classmethod
    def parse(cls, targets: list[str] | None = None, hosts: str | None = None, exclude_hosts: str | None = None,
              min_free_gb: float | None = None, gpus_per_job: int | None = None,
              gpu_mem: float | None = None) -> "Placement":
        """From the command line (or a run's saved spec: ``RunSpec.placement``); UsageError naming the bad argument."""
        parsed = tuple(_target(t) for t in targets or ())
        if why := first_problem(dict(min_free_gb=min_free_gb, gpus_per_job=gpus_per_job, gpu_mem=gpu_mem)):
            raise UsageError(why)
        return cls(parsed, _names(hosts, "--hosts"), _names(exclude_hosts, "--exclude-hosts"), min_free_gb,
                   gpus_per_job, gpu_mem)

    @property
    def any(self) -> bool:
        return bool(self.targets or self.hosts or self.exclude_hosts or self.min_free_gb or self.gpus_per_job
                    or self.gpu_mem)

    def why_not(self, status: Heartbeat) -> str | None:
        """None if the agent with this heartbeat may take the run's jobs, else the constraint it fails."""
        names = {str(status.host or ""), str(status.hostname or "")} - {""}
        if self.exclude_hosts and names & set(self.exclude_hosts):
            return f"--exclude-hosts {','.join(self.exclude_hosts)}"
        if self.hosts and not names & set(self.hosts):
            return f"--hosts {','.join(self.hosts)}"
        ids = gpu_ids(status)
        if self.targets and not any(h in names and (not g or set(ids) <= set(g)) for h, g in self.targets):
            return " ".join(f"--target {h}::{','.join(map(str, g))}" for h, g in self.targets)
        n = gpu_count(status)
        if self.gpus_per_job is None and n > 1:
            return f"holds {n} GPUs, and the run asks for one per job (give it --gpus-per-job {n})"
        if self.gpus_per_job is not None and n != self.gpus_per_job:
            return f"holds {n} GPU{'' if n == 1 else 's'}, not the {self.gpus_per_job} of --gpus-per-job"
        if self.gpu_mem:
            totals = [g.get("mem_total") for g in gpus_of(status)]
            if not totals:
                return f"has no GPU, and the run declares --gpu-mem {self.gpu_mem:g}"
            small = [t for t in totals if is_num(t) and t / 2**30 < self.gpu_mem]
            if small:
                return f"its GPU has {small[0] / 2**30:.1f} GB in all, under the run's --gpu-mem {self.gpu_mem:g}"
        if self.min_free_gb:
            free = free_gb(status)
            if free is None or free < self.min_free_gb:
                return f"--min-free-gb {self.min_free_gb:g}"
        return None

    def describe(self) -> str:
        parts = [f"--target {h}::{','.join(map(str, g))}" for h, g in self.targets]
        parts += [f"--hosts {','.join(self.hosts)}"] if self.hosts else []
        parts += [f"--exclude-hosts {','.join(self.exclude_hosts)}"] if self.exclude_hosts else []
        parts += [f"--min-free-gb {self.min_free_gb:g}"] if self.min_free_gb else []
        parts += [f"--gpus-per-job {self.gpus_per_job}"] if self.gpus_per_job else []
        parts += [f"--gpu-mem {self.gpu_mem:g}"] if self.gpu_mem else []
        return " ".join(parts) or "no placement flags (one GPU, or a CPU, per job)"


def gpus_of(status: Heartbeat) -> list[dict[str, Any]]:
    """The pynvml metrics of each GPU an agent's heartbeat lists (``gpus``; older agents: ``gpu``)."""
    gpus = status.gpus
    if isinstance(gpus, list) and gpus:
        return [g for g in gpus if isinstance(g, dict)]
    return [status.gpu] if isinstance(status.gpu, dict) else []


def combined(gpus: list[dict[str, Any]]) -> dict[str, Any]:
    """An agent's GPUs as one: its GPU's own figures, or for several the sums of their memory,
    the highest utilisation and temperature, and the name once (``2x NVIDIA H100``)."""
    if len(gpus) <= 1:
        return gpus[0] if gpus else {}

    def total(key: str) -> Any:
        vals = [g.get(key) for g in gpus]
        return None if any(not is_num(x) for x in vals) else sum(vals)

    def most(key: str) -> Any:
        vals = [g.get(key) for g in gpus if is_num(g.get(key))]
        return max(vals) if vals else None
    names = {g.get("name") for g in gpus}
    return {"name": f"{len(gpus)}x {names.pop()}" if len(names) == 1 and None not in names else f"{len(gpus)} GPUs",
            "util": most("util"), "temp": most("temp"), "mem_used": total("mem_used"), "mem_total": total("mem_total"),
            "worker_mem": total("worker_mem")}


def gpu_count(status: Heartbeat) -> int:
    """How many GPUs the agent holds (0: a CPU agent)."""
    for listed in (status.gpu_uuids, status.gpus):  # the UUIDs, else the metrics (a list dropped as malformed is None)
        if isinstance(listed, list):
            return len(listed)
    return 0 if status.device in (None, "cpu") else 1


def gpu_ids(status: Heartbeat) -> list[Any]:
    """The agent's GPU numbers (its --gpu N, or N,M), or its CPU rank."""
    ids = status.gpu_ids
    return ids if isinstance(ids, list) and ids else [status.gpu_id]


def free_gb(status: Heartbeat) -> float | None:
    """Free GPU memory in GiB from a heartbeat's pynvml metrics (the least of its GPUs'); None without a GPU."""
    free = []
    for gpu in gpus_of(status):
        used, total = gpu.get("mem_used"), gpu.get("mem_total")
        if not (is_num(used) and is_num(total)):
            return None
        free.append((total - used) / 2**30)
    return min(free) if free else None


def _target(text: str) -> tuple[str, tuple[int, ...]]:
    host, _, gpus = text.partition("::")
    if not host or any(c.isspace() for c in host) or ":" in host:
        raise UsageError(f"--target {text!r} must look like HOST::GPU[,GPU...] (e.g. node1::0,2) or HOST")
    try:
        numbers = tuple(int(g) for g in gpus.split(",") if g.strip() != "") if gpus else ()
    except ValueError:
        raise UsageError(f"--target {text!r}: GPU numbers must be whole numbers, like node1::0,2") from None
    if any(n < 0 for n in numbers):
        raise UsageError(f"--target {text!r}: GPU numbers start at 0")
    return host, numbers


def _names(text: str | None, flag: str) -> tuple[str, ...]:
    if not text:
        return ()
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise UsageError(f"{flag} {text!r}: give host names separated by commas")
    return names
