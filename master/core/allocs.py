"""Allocations of agents (Slurm jobs the allocator submits, ``master.alloc``): their records and the
rule that says how many to submit.

A record, ``BASE/alloc/<jobid>.json``, is written by the allocator alone (it holds
``alloc/alloc.lock``) and read by ``status``: the job's Slurm state (``PENDING``, ``RUNNING``, ...,
``ENDED`` once Slurm no longer lists it), when it was submitted, started and ended, its nodes,
the agents seen from it (matched by host and start time: an agent on one of its nodes that
started after the job did), and ``cancelled`` when the allocator gave back a job that had not
started for lack of work.

The rule (``plan``), after HyperQueue's automatic allocation: a chunk *waits* when its run is fed
by a master (``RunState.fed``) and no agent holds it (``pending``), less, per run, the idle agents
that may take it (alive, nothing running or queued, no drain flag, its placement allows them):
those take it within a second. While chunks wait, the allocator keeps up to ``backlog``
allocations *starting* (pending in Slurm, or running with no agent seen yet), each counted as
taking at least one waiting chunk, and at most ``max_jobs`` allocations in all.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable

from gpupool.jobs.errors import BadFile
from gpupool.jobs.heartbeat import Heartbeat
from gpupool.jobs.jsonio import is_num, is_str, read_json
from gpupool.jobs.paths import Spool

# Slurm job states in which the job waits for or holds its nodes (squeue's %T); any other is an end
ACTIVE = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                    "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"})
ENDED = "ENDED"  # the state of a job Slurm no longer lists


@dataclass
class Allocation:
    """One Slurm job of agents, as its record says."""

    job: str
    state: str = "PENDING"
    submitted_at: float | None = None
    started_at: float | None = None  # when Slurm started it (its own clock)
    ended_at: float | None = None  # when the allocator saw it end
    nodes: list[str] = field(default_factory=list)
    agents: list[str] = field(default_factory=list)  # agent ids seen from it
    cancelled: bool = False  # given back before it started: no work was left for it
    error: str | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def starting(self) -> bool:
        """Submitted and not yet serving: pending in Slurm, or running with no agent seen yet."""
        return self.active and not self.agents

    @property
    def failed(self) -> bool:
        """It ended without any agent starting (and was not given back by the allocator)."""
        return not self.active and not self.agents and not self.cancelled

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Allocation":
        known = {f.name for f in fields(cls)}
        a = cls(**{k: v for k, v in d.items() if k in known})
        if not is_str(a.job) or not is_str(a.state):
            raise ValueError("an allocation record needs 'job' and 'state'")
        for name in ("submitted_at", "started_at", "ended_at"):
            if getattr(a, name) is not None and not is_num(getattr(a, name)):
                setattr(a, name, None)
        a.nodes = [n for n in a.nodes if is_str(n)] if isinstance(a.nodes, list) else []
        a.agents = [n for n in a.agents if is_str(n)] if isinstance(a.agents, list) else []
        a.cancelled = a.cancelled is True
        a.error = a.error if is_str(a.error) else None
        return a


def save(spool: Spool, a: Allocation) -> None:
    spool.mkdir(spool.alloc_dir)
    spool.write_over(spool.alloc_record(a.job), json.dumps(a.to_dict()).encode(), "allocation record")


def load_all(spool: Spool) -> list[Allocation]:
    """Every readable allocation record, oldest job first (an unreadable one is passed over)."""
    out = []
    for job in spool.alloc_jobs():
        try:
            out.append(Allocation.from_dict(read_json(spool.alloc_record(job), "allocation record")))
        except (OSError, BadFile, ValueError, TypeError):
            continue
    return sorted(out, key=lambda a: (a.submitted_at or 0.0, a.job))


def shown(allocs: Iterable[Allocation], now: float, recent_s: float = 24 * 3600.0) -> list[dict[str, Any]]:
    """What ``status`` shows: the allocations in flight and those that ended within ``recent_s``."""
    return [a.to_dict() for a in allocs if a.active or (a.ended_at or 0.0) >= now - recent_s]


# the rule --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunDemand:
    """One fed run's chunks at no agent (``pending``) and which agents it may run on (``fits``)."""

    run: str
    pending: int
    fits: Any = None  # a callable Heartbeat -> bool (None: any agent)


def waiting(runs: Iterable[RunDemand], idle: Iterable[Heartbeat]) -> int:
    """Chunks that no live agent will soon take: per run, its pending chunks less the idle agents
    that may take them (an idle agent is counted for every run it fits: it soon takes one of them)."""
    idle = list(idle)
    total = 0
    for r in runs:
        free = sum(1 for h in idle if r.fits is None or r.fits(h))
        total += max(0, r.pending - free)
    return total


def plan(waiting_chunks: int, starting: int, serving: int, max_jobs: int, backlog: int) -> int:
    """How many allocations to submit now: while chunks wait (``waiting_chunks``), keep up to
    ``backlog`` allocations ``starting`` (each counted as taking one waiting chunk), with at most
    ``max_jobs`` in flight (``starting`` + ``serving``, those whose agents have been seen)."""
    room = min(backlog - starting, max_jobs - starting - serving)
    return max(0, min(waiting_chunks - starting, room))
