"""Restart deferral: a restarted agent leaves alone, for a while, the jobs its former process may
have died under, so that a job that kills its agent does not kill it again and again.

The agent asks ``RestartDeferral.judge_former`` once, at its start; its loop then leaves
``held()`` aside when it chooses a job, never pipelines nor runs unannounced a job it ``holds``,
and its heartbeat carries ``heartbeat_fields()`` (``died_under``, read by
``master.core.dispatcher.Dispatcher._restarted`` through ``jobs.losses.died_under``).
"""
from __future__ import annotations

import os
from typing import Any, Callable

from gpupool.jobs.logsetup import logger

from gpupool.jobs.descriptor import Job
from gpupool.jobs.errors import BadFile
from gpupool.jobs.heartbeat import AgentState, read_status
from gpupool.jobs.losses import death_suspects
from gpupool.jobs.mailbox import Mailbox
from gpupool.jobs.paths import Spool
from gpupool.jobs.results import job_outcome

RESTART_DEFER_S = 30.0  # a restarted agent leaves the jobs its former process died under this long


class RestartDeferral:
    def __init__(self, spool: Spool, agent_id: str, mailbox: Mailbox, clock: Callable[[], float]) -> None:
        self.spool, self.agent_id, self.mailbox, self.clock = spool, agent_id, mailbox, clock
        self.deferred: set[tuple] = set()  # Job.uid of the jobs a former process of this agent died under
        self.until = 0.0  # (clock) when they may run here again
        self.died_under: list[dict[str, Any]] = []  # what the former process may have died under (heartbeat)

    def judge_former(self) -> bool:
        """A supervisor restarts a dead agent within a second, and the job its former process was
        running may be what killed it. The suspects: the open jobs (no outcome yet) the former
        heartbeat names (running, or in the worker's pipe) or, where it names none (it died before
        a heartbeat showed its job), the first open jobs of the mailbox (``death_suspects``, a
        master's rule for a dead agent). They are left alone for ``RESTART_DEFER_S`` and the
        heartbeat names them (``died_under``): masters see the restart (``master.core.liveness``) and
        take them back under their loss rules, so a crash loop ends; if none does (no master is
        running), they run afterwards, alone. True if the former process died (did not stop)."""
        try:
            prev = read_status(self.spool.heartbeat(self.agent_id))
        except (OSError, BadFile):
            return False
        if prev.pid == os.getpid() or prev.state in (AgentState.STOPPING, AgentState.STOPPED):
            return False
        try:
            jobs = self.mailbox.read().jobs
        except (OSError, BadFile):
            return True
        named = {b.key for b in (prev.current, prev.ahead) if b is not None}
        open_jobs = [j for j in jobs if not job_outcome(self.spool, j)]
        suspects = [j for j in open_jobs if j.key in named] or death_suspects(open_jobs)
        if not suspects:
            return True
        self.deferred = {j.uid for j in suspects}
        self.until = self.clock() + RESTART_DEFER_S
        self.died_under = [{"run": j.run, "chunk_id": j.chunk_id, "attempt": j.attempt} for j in suspects]
        logger.warning("agent {}: its former process {} died while running {}{}; left alone for {:g} s for a master "
                       "to judge", self.agent_id, prev.pid, "" if len(suspects) == 1 else "one of ",
                       ", ".join(f"{j.run} chunk {j.chunk_id} attempt {j.attempt}" for j in suspects), RESTART_DEFER_S)
        return True

    def held(self) -> set[tuple]:
        """The jobs (``Job.uid``) not to be chosen now: the suspects, until their time is up."""
        return self.deferred if self.deferred and self.clock() < self.until else set()

    def holds(self, job: Job) -> bool:
        """``job`` is a suspect (whether or not its time is up): it runs alone, named at once."""
        return job.uid in self.deferred

    def heartbeat_fields(self) -> dict[str, Any]:
        return {"died_under": self.died_under}  # see master.core.dispatcher.Dispatcher._restarted
