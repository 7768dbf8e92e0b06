"""The loss rules: which jobs an agent that died may have been running, and what a loss costs.

Shared by masters (an agent whose heartbeat went stale, or whose process was replaced under the
same id) and agents (a restarted agent judging what its former process died under).
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Any

from gpupool.jobs.logsetup import logger

from gpupool.jobs.descriptor import Job, JobState
from gpupool.jobs.heartbeat import Heartbeat
from gpupool.jobs.outcomes import Failure, FailureKind
from gpupool.jobs.paths import Spool
from gpupool.jobs.results import commit, record
from gpupool.jobs.words import plural


def died_under(status: Heartbeat) -> set[tuple[Any, Any, Any]] | None:
    """The (run, chunk, attempt) of the open jobs a restarted agent says its former process may
    have died under (empty: none was open); None from an agent that does not say."""
    named = status.died_under
    if not isinstance(named, list):
        return None
    return {(b.get("run"), b.get("chunk_id"), b.get("attempt")) for b in named if isinstance(b, dict)}


def death_suspects(open_jobs: list[Job]) -> list[Job]:
    """Of the jobs with no outcome taken back from an agent that died, in its mailbox order
    (the order it runs them), those it may have been running: the first, or the second, as
    with pipelining the worker starts the next job while the agent commits one; never a job
    beside one marked ``alone``. One suspect is a sure one."""
    suspects = open_jobs[:2]
    return suspects[:1] if len(suspects) == 2 and (suspects[0].alone or suspects[1].alone) else suspects


def charge_loss(losses: Counter[int], isolated: set[int], chunk: int, free: int, sure: bool) -> bool:
    """Count a loss of ``chunk``'s agent and mark the chunk to run alone from now on; True if
    this loss costs it an attempt (a sure one, past its ``free`` losses)."""
    losses[chunk] += 1
    isolated.add(chunk)
    return sure and losses[chunk] > free


def record_loss(spool: Spool, job: Job, agent: str, why: str, losses: int) -> bool:
    """Record the death of ``agent`` under ``job`` as a failed attempt (``AgentLost``), like
    any failure: history, or the final result of a last attempt; the next pass over the jobs in
    flight takes it in and retries it with back-off. False if it could not be written."""
    error = Failure(FailureKind.AGENT_LOST,
                    f"agent {agent} died ({why}) while running it; {plural(losses, 'agent')} so far")
    logger.warning("{} chunk {} attempt {}: {}", job.run, job.chunk_id, job.attempt, error.message)
    try:
        commit(spool, job, record(job, JobState.FAILED, agent=agent, error=error, finished_at=time.time()))
        return True
    except OSError as e:
        logger.warning("could not record the loss of {} chunk {}: {}; queued again", job.run, job.chunk_id, e)
        return False
