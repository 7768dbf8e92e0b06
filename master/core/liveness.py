"""Which agents are alive, judged without comparing two machines' clocks.

An agent is alive while its heartbeat ``seq`` keeps changing: the master notes, by its
own monotonic clock, when it last saw a change. For an agent first seen now, the age of
its heartbeat file is measured against the mtime of a file the master has just written
in the same folder (both stamped by the same file server).

An agent restarted under the same id (by a supervisor: ``start_agents.sh``'s loop, systemd, a
Slurm step) comes back within a second, so its heartbeat never goes stale: its *incarnation*
(host name, pid, start time) changes instead, and ``AgentView.previous`` then holds the last
heartbeat of the process that is gone, for the dispatcher to judge what that one died under.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from gpupool.jobs.atomic import server_now as server_time
from gpupool.jobs.errors import BadFile
from gpupool.jobs.heartbeat import AgentState, Heartbeat, read_status
from gpupool.jobs.paths import Spool


DEAD = "dead"  # an agent whose heartbeat stopped changing, as masters and status call it
GONE = (AgentState.STOPPED.value, DEAD)  # states of an agent that takes nothing any more

@dataclass
class AgentView:
    id: str
    seq: int
    changed_at: float  # master clock when seq last changed
    status: Heartbeat  # its last heartbeat
    age: float = 0.0  # seconds since the heartbeat last changed (master clock)
    alive: bool = False  # heartbeat fresh and not stopped
    accepting: bool = False  # alive and taking new jobs
    previous: Heartbeat | None = None  # the last heartbeat of its former process, if it restarted
    mtime: float | None = None  # its heartbeat file's mtime: the file server's clock

    def running_for(self, server_now: float | None) -> float | None:
        """How long its current job has run, one clock per measurement: what the agent measured on
        its own monotonic clock when it wrote the heartbeat (``running_s``), plus the heartbeat's
        age by the file server's clock (``server_now``, from ``jobs.atomic.server_now``, against
        the file's mtime; left out where unknown). None where the heartbeat does not say (an older
        agent): no duration rather than a wrong one. Never this host's clock minus the agent's."""
        cur = self.status.current
        if cur is None or cur.running_s is None:
            return None
        age = server_now - self.mtime if server_now is not None and self.mtime is not None else 0.0
        return round(cur.running_s + max(0.0, age), 1)

    @property
    def state(self) -> str:
        return self.status.state

    @property
    def seen(self) -> str:
        """Its state as masters and ``status`` show it: its heartbeat's while it is alive,
        ``stopped`` once it stopped, else ``dead`` (``DEAD``: no agent writes it)."""
        if self.alive:
            return self.status.state
        return AgentState.STOPPED.value if self.status.state == AgentState.STOPPED else DEAD

    @property
    def job_schema(self) -> int:
        """The newest job descriptors the agent reads (older agents do not say: 1)."""
        return self.status.job_schema or 1


class Liveness:
    def __init__(self, spool: Spool, dead_after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.spool, self.dead_after, self.clock = spool, dead_after, clock
        self.views: dict[str, AgentView] = {}

    def refresh(self) -> dict[str, AgentView]:
        now = self.clock()
        server_now = None
        for ident in self.spool.agent_ids():
            try:
                path = self.spool.heartbeat(ident)
                st = read_status(path)
                mtime = os.stat(path).st_mtime
            except (OSError, BadFile, ValueError):
                continue  # vanished, being replaced, or not ours: judged on the next refresh
            view = self.views.get(ident)
            if view is None:
                if server_now is None:
                    server_now = server_time(self.spool.agents_dir)
                age = max(0.0, server_now - mtime) if server_now is not None else 0.0
                view = self.views[ident] = AgentView(ident, st.seq, now - age, st)
            elif incarnation(st) != incarnation(view.status):
                view.previous = view.status  # kept until the dispatcher has judged it (see module)
                view.seq, view.changed_at = st.seq, now
            elif st.seq != view.seq:
                view.seq, view.changed_at = st.seq, now
            view.status, view.mtime = st, mtime
            view.age = now - view.changed_at
            view.alive = view.age < self.dead_after and st.state != AgentState.STOPPED
            view.accepting = view.alive and st.state in (AgentState.IDLE, AgentState.BUSY)
        return self.views


def incarnation(status: Heartbeat) -> tuple[Any, Any, Any]:
    """What tells one process of an agent from the next under the same id."""
    return status.hostname, status.pid, status.started_at
