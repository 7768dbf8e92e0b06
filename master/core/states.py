"""What state a chunk is in, and what state a run is in: the one answer, read from the spool.

A chunk's state (``jobs.descriptor.JobState``) is never stored apart from the spool; ``chunk_state``
says it from what the spool holds, in this order:

1. its committed result (``results/<run>/<chunk>.json``, or its batch's slot: ``jobs.results``):
   ``ok`` or ``failed``;
2. a live agent's heartbeat naming it as the job it runs, its outcome not on disk yet: ``running``
   (``running_job``: a heartbeat older than the end of its job names the job sent ahead instead);
3. an agent's mailbox holding it, its outcome not on disk yet: ``queued``;
4. its run's cancel flag: ``cancelled``; else ``pending``.

A batch (``jobs.batches``: one job for several short chunks) is running or queued as one: each of
its chunks is while its job is (``Job.chunks``), until its slot exists (``jobs.results.job_outcome``).

What agents hold is read once for every run of the spool (``holdings``: every mailbox and the
job each live agent runs), so ``status``, ``status --run``, ``runs`` and the run page agree.

A run's state (``RunState``) comes from its chunks' states and its marks (``runs/<run>/cancel``,
``runs/<run>/sealed`` with the reason a master stopped it early, ``jobs.results.read_seal``) and,
only while chunks are left, whether a master holds its lock (``master_feeds``). Only a run a
master feeds has an ETA. A run with ``--after`` whose chunks have not started waits (``after``)
while a run it names is not over (``not_over``; ``master.core.after``), fed or not.
"""
from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Collection, Mapping

from gpupool.jobs.descriptor import Job, JobState
from gpupool.jobs.errors import BadFile, SpoolError
from gpupool.jobs.heartbeat import Heartbeat, JobRef
from gpupool.jobs.locks import FileLock
from gpupool.jobs.mailbox import Mailbox
from gpupool.jobs.paths import Spool
from gpupool.jobs.results import Seal, final_status, job_outcome, read_seal, scan_run
from gpupool.master.core.liveness import AgentView

__all__ = ["JobState", "RunState", "chunk_state", "count_states", "final_states", "run_state", "Marks", "read_marks",
           "master_feeds", "not_over", "in_hand", "running_job", "Holding", "holdings", "AtAgents", "state_of_run",
           "batch_in_flight"]


class RunState(str, Enum):
    """Where a run is (``run_state``); the value is what ``status --json``, ``runs`` and the
    dashboard say."""

    FEEDING = "feeding"  # running: a master feeds it and agents hold some of its jobs (running or queued)
    WAITING = "waiting"  # a master feeds it and no agent holds any of its jobs: it waits for agents
    DONE = "done"  # every chunk ok
    FAILED = "failed"  # every chunk has its final result, some failed
    STOPPED_EARLY = "stopped_early"  # its master stopped it: its chunks would all fail alike (--max-failures)
    AFTER = "after"  # --after: a run it waits for is not over yet, and none of its chunks is at an agent
    INTERRUPTED = "interrupted"  # chunks left and no master feeds it (Ctrl-C, a killed master): run it again
    CANCELLED = "cancelled"  # ``python -m master cancel``

    @property
    def fed(self) -> bool:
        """A master feeds the run: only then can it finish by itself, so only then it has an ETA."""
        return self in (RunState.FEEDING, RunState.WAITING)

    def __str__(self) -> str:
        return self.value

    @property
    def label(self) -> str:
        """As the text table and the dashboard show it."""
        return self.value.replace("_", " ")


def chunk_state(result: str | None, running: bool, queued: bool, cancelled: bool = False) -> JobState:
    """The state of one chunk (see the module docstring): ``result`` is its committed result's
    status (None: none readable), ``running``/``queued``: a live agent runs it / a mailbox holds
    it with no outcome on disk, ``cancelled``: its run's cancel flag."""
    if result is not None:
        return JobState.OK if result == JobState.OK else JobState.FAILED
    if running:
        return JobState.RUNNING
    if queued:
        return JobState.QUEUED
    return JobState.CANCELLED if cancelled else JobState.PENDING


def count_states(chunks: int, results: Mapping[int, str], running: Collection[int], queued: Collection[int],
                 cancelled: bool = False) -> Counter:
    """How many of ``chunks`` chunks are in each state: ``chunk_state`` of every chunk, counted
    from the sets alone (a run of a million chunks is not walked chunk by chunk)."""
    done = {c: chunk_state(s, False, False) for c, s in results.items() if 0 <= c < chunks}
    busy = {c for c in running if 0 <= c < chunks and c not in done}
    waiting = {c for c in queued if 0 <= c < chunks and c not in done and c not in busy}
    counts = Counter(done.values())
    counts[JobState.RUNNING], counts[JobState.QUEUED] = len(busy), len(waiting)
    counts[JobState.CANCELLED if cancelled else JobState.PENDING] = chunks - len(done) - len(busy) - len(waiting)
    return counts


def final_states(spool: Spool, run: str, chunks: int) -> dict[int, JobState]:
    """chunk -> OK or FAILED for the run's chunks (of ``chunks``) with a readable committed result,
    from one listing of its results folder (``jobs.results.final_status``: a file is read only for
    a chunk that ever failed)."""
    scan = scan_run(spool, run)
    out = {c: final_status(spool, run, c, scan) for c in sorted(scan.finals) if c < chunks}
    return {c: chunk_state(status, False, False) for c, status in out.items() if status is not None}


@dataclass(frozen=True)
class Marks:
    """The marks a run's folder holds: its cancel flag and its seal (``jobs.results.read_seal``)."""

    cancelled: bool = False
    seal: Seal | None = None
    after: tuple[str, ...] = ()  # the runs it waits for (--after, --after-any: ``after``) that are not over


def read_marks(spool: Spool, run: str, after: Collection[str] = ()) -> Marks:
    """``after``: the runs it waits for (``RunSpec.waits_for``)."""
    return Marks(spool.cancel_flag(run).exists(), read_seal(spool, run), not_over(spool, after))


def not_over(spool: Spool, runs: Collection[str]) -> tuple[str, ...]:
    """Those of ``runs`` neither sealed nor cancelled (nor removed): what a run with --after waits for."""
    return tuple(r for r in runs if os.path.lexists(spool.run_spec(r)) and not os.path.lexists(spool.sealed_flag(r))
                 and not os.path.lexists(spool.cancel_flag(r)))


def master_feeds(spool: Spool, run: str) -> bool:
    """A master holds the run's lock (``runs/<run>/master.lock``): the run is being fed. A run
    without the file has never had a master: it is not made here (a new file in the run's folder
    would read as activity, ``master.report.status``)."""
    if not os.path.lexists(spool.master_lock(run)):
        return False
    lock = FileLock(spool.master_lock(run))
    try:
        return not lock.acquire(blocking=False)
    except OSError:
        return False
    finally:
        lock.close()


def run_state(chunks: int, counts: Mapping[JobState, int], marks: Marks, fed: Callable[[], bool]) -> RunState:
    """The state of a run of ``chunks`` chunks whose chunks are in ``counts`` (``count_states``),
    with ``marks``; ``fed()`` (``master_feeds``) is asked only for a run with chunks left and no
    mark that ends it (taking a lock to look costs a file open)."""
    ok, failed = counts.get(JobState.OK, 0), counts.get(JobState.FAILED, 0)
    if marks.cancelled:
        return RunState.CANCELLED
    if marks.seal is not None and marks.seal.halted is not None:
        return RunState.STOPPED_EARLY
    if ok >= chunks:
        return RunState.DONE
    if ok + failed >= chunks:
        return RunState.FAILED
    held = counts.get(JobState.RUNNING, 0) + counts.get(JobState.QUEUED, 0)
    if marks.after and not held:
        return RunState.AFTER
    if not fed():
        return RunState.INTERRUPTED
    return RunState.FEEDING if held else RunState.WAITING


# what agents hold ------------------------------------------------------------------------------
def in_hand(status: Heartbeat, run: str) -> set[int]:
    """This run's chunks a heartbeat names as running or handed to its worker (the job sent ahead),
    read from the heartbeat alone: what a master must not take back from the agent."""
    return {b.chunk_id for b in (status.current, status.ahead) if b is not None and b.run == run}


def ended_at(spool: Spool, ref: JobRef, batch: int | None = None) -> float | None:
    """When the job ``ref`` names ended, if its outcome is on disk (the mtime of its final result
    or of its attempt's history; of a batch of ``batch`` chunks, its slot's), else None."""
    run, chunk, attempt = ref.key
    if attempt is None:
        return None
    try:
        paths = (spool.result_json(run, chunk), spool.history_json(run, chunk, attempt)) if batch is None else \
            (spool.batch_json(run, chunk, batch),)
    except SpoolError:  # a name no run can have: judged as the heartbeat says
        return None
    for path in paths:
        try:
            return os.stat(path).st_mtime
        except OSError:
            continue
    return None


def running_job(spool: Spool, view: AgentView, batches: Mapping[tuple, int] | None = None
                ) -> tuple[JobRef | None, float | None]:
    """(the job a live agent runs now, when the job its heartbeat still names ended): a heartbeat
    older than the end of its job names one that is over; the job sent ahead (if any, and not over
    itself) has run since then, and its ``since`` is that end. ``batches``: job key -> its batch's
    size, for the batches of the agent's mailbox (a heartbeat names a batch by its first chunk)."""
    cur = view.status.current if view.alive else None
    if cur is None:
        return None, None
    batches = batches or {}
    ended = ended_at(spool, cur, batches.get(cur.key))
    if ended is None:
        return cur, None
    ahead = view.status.ahead
    if ahead is not None and ended_at(spool, ahead, batches.get(ahead.key)) is None:
        return dataclasses.replace(ahead, since=ended), ended
    return None, ended


@dataclass
class Holding:
    """What one agent holds, read once: its mailbox's jobs with no outcome yet and the job it runs."""

    view: AgentView
    jobs: list[Job]
    running: JobRef | None
    ended: float | None = None  # when the job its heartbeat names ended (``running``: the one sent ahead)
    running_chunks: range | None = None  # the chunks of the job it runs: ``running``'s, or all of its batch's

    @property
    def running_batch(self) -> bool:
        return self.running_chunks is not None and len(self.running_chunks) > 1

    def running_for(self, hb_now: float | None, now: float) -> float | None:
        """How long ``running`` has run: as its agent measured it (``AgentView.running_for``), or,
        for the job sent ahead, since the end of the one before (both by the file server's clock)."""
        if self.running is None:
            return None
        if self.ended is not None:
            return round(max(0.0, now - self.ended), 1)
        return self.view.running_for(hb_now)


def holdings(spool: Spool, views: Mapping[str, AgentView]) -> dict[str, Holding]:
    """Every agent's holding (sorted by id): each mailbox read once, each heartbeat judged once."""
    out = {}
    for ident, v in sorted(views.items()):
        try:
            every = Mailbox(spool, ident).read().jobs
        except (OSError, BadFile):
            every = []
        jobs = [j for j in every if not job_outcome(spool, j)]
        sizes = {j.key: j.batch for j in every if j.batch is not None}  # over too: its heartbeat may still name it
        ref, ended = running_job(spool, v, sizes)
        chunks = None if ref is None else range(ref.chunk_id, ref.chunk_id + sizes.get(ref.key, 1))
        out[ident] = Holding(v, jobs, ref, ended, chunks)
    return out


def batch_in_flight(spool: Spool, run: str, chunk: int) -> tuple[str, Job] | None:
    """(agent, job) of the batch (``jobs.batches``) an agent's mailbox holds with ``chunk`` in it
    and no outcome yet (queued or running), or None."""
    for ident in spool.agent_ids():
        try:
            jobs = Mailbox(spool, ident).read().jobs
        except (OSError, BadFile):
            continue
        for j in jobs:
            if j.batch is not None and j.run == run and chunk in j.chunks and not job_outcome(spool, j):
                return ident, j
    return None


@dataclass
class AtAgents:
    """Per run, the chunks agents hold: running (chunk -> its agent's id) and queued (chunk ->
    (agent id, attempt)), from ``holdings``."""

    running: dict[str, dict[int, str]]
    queued: dict[str, dict[int, tuple[str, int]]]

    @classmethod
    def of(cls, held: Mapping[str, Holding]) -> "AtAgents":
        running: dict[str, dict[int, str]] = {}
        queued: dict[str, dict[int, tuple[str, int]]] = {}
        for ident, h in held.items():
            if h.running is not None:
                running.setdefault(h.running.run, {}).update(dict.fromkeys(h.running_chunks or (), ident))
            for j in h.jobs:
                at = queued.setdefault(j.run, {})
                if j.batch is None:
                    at[j.chunk_id] = (ident, j.attempt)
                else:  # a batch: each of its chunks is queued while it is
                    at.update(dict.fromkeys(j.chunks, (ident, j.attempt)))
        return cls(running, queued)

    def counts(self, run: str, chunks: int, results: Mapping[int, str], cancelled: bool) -> Counter:
        return count_states(chunks, results, self.running.get(run, {}), self.queued.get(run, {}), cancelled)


def state_of_run(spool: Spool, run: str, chunks: int, counts: Mapping[JobState, int],
                 after: Collection[str] = ()) -> RunState:
    """``run_state`` with the run's marks read now and its lock looked at if needed; ``after``: the
    runs it waits for (``RunSpec.waits_for``)."""
    return run_state(chunks, counts, read_marks(spool, run, after), lambda: master_feeds(spool, run))
