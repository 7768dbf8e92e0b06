"""Where a run's chunks may run: ``--target HOST::GPU[,GPU]`` (KohakuRiver's syntax, repeatable),
``--hosts``, ``--exclude-hosts`` and ``--min-free-gb``, judged against each agent's heartbeat.

A host matches an agent's ``host`` (its host id, ``$GPUPOOL_HOST_ID`` or the short hostname)
or its ``hostname``; a GPU number matches the agent's ``gpu_id`` (its ``--gpu N``: an index
into the GPUs the host lets it see; a CPU agent's rank). ``HOST::`` or ``HOST`` alone means
any agent of that host. ``--min-free-gb``: the agent's GPU reports at least that much free
memory (a CPU agent has none). A run that no live agent may take fails at once, naming the
constraint (``Unplaceable``), instead of waiting for agents that will never match.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from master.runspec import UsageError


class Unplaceable(UsageError):
    """No live agent of the pool may take the run's jobs."""


@dataclass(frozen=True)
class Placement:
    targets: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (host, GPU numbers; () = any of the host)
    hosts: tuple[str, ...] = ()
    exclude_hosts: tuple[str, ...] = ()
    min_free_gb: float | None = None

    @classmethod
    def parse(cls, targets: list[str] | None = None, hosts: str | None = None, exclude_hosts: str | None = None,
              min_free_gb: float | None = None) -> "Placement":
        """From the command line; UsageError naming the bad argument."""
        parsed = tuple(_target(t) for t in targets or ())
        if min_free_gb is not None and not 0 <= min_free_gb < math.inf:
            raise UsageError(f"--min-free-gb must be 0 or a positive number of GiB, not {min_free_gb}")
        return cls(parsed, _names(hosts, "--hosts"), _names(exclude_hosts, "--exclude-hosts"), min_free_gb)

    @property
    def any(self) -> bool:
        return bool(self.targets or self.hosts or self.exclude_hosts or self.min_free_gb)

    def why_not(self, status: dict[str, Any]) -> str | None:
        """None if the agent with this heartbeat may take the run's jobs, else the constraint it fails."""
        names = {str(status.get("host") or ""), str(status.get("hostname") or "")} - {""}
        if self.exclude_hosts and names & set(self.exclude_hosts):
            return f"--exclude-hosts {','.join(self.exclude_hosts)}"
        if self.hosts and not names & set(self.hosts):
            return f"--hosts {','.join(self.hosts)}"
        gpu = status.get("gpu_id")
        if self.targets and not any(h in names and (not g or gpu in g) for h, g in self.targets):
            return " ".join(f"--target {h}::{','.join(map(str, g))}" for h, g in self.targets)
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
        return " ".join(parts) or "(none)"


def free_gb(status: dict[str, Any]) -> float | None:
    """Free GPU memory in GiB from a heartbeat's pynvml metrics; None without a GPU."""
    gpu = status.get("gpu")
    if not isinstance(gpu, dict):
        return None
    used, total = gpu.get("mem_used"), gpu.get("mem_total")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (used, total)):
        return None
    return (total - used) / 2**30


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
