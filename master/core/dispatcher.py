"""The one dispatcher behind every master: a run's ``Feeder`` and the ``Executor`` are both one.

It owns a run's chunks from pending to final: pending and delayed retries, the jobs in flight
(chunk -> agent, attempt), agents that died or drain (hand-back), jobs that vanished from a
live agent's mailbox, the losses of chunks that kill their agents, the collection of results
and the placement of jobs in mailboxes. ``step()`` does one pass and reads time only from the
injected clock, so the step tests drive it with a fake one. What differs between a run and an
Executor is a small set of hooks a subclass overrides (rq's ``execute_job`` per worker class):

* ``_job(c)``: the descriptor of chunk ``c``'s next attempt;
* ``sendable(c)``: False for a chunk its owner no longer wants (a cancelled future);
* ``settle(c, rec)``: a chunk's final result was read (of a batch's ok chunk: its status only);
* ``started(c)``: an agent's heartbeat shows it running;
* ``why_not(view)``: why this run may not use that agent (placement; an agent too old for its jobs), or None;
* ``failed_attempt(c, out)``: an attempt failed (retried or final);
* ``unplaceable(live)``: agents are alive but the run may use none of them;
* ``on_event(kind, info)``: what the user is told.

Placement (issue 11: every GPU busy, few long chunks as well as many tiny ones):

* Breadth first: an agent with fewer of this run's jobs gets the next one before any agent
  gets more; among equals, an idle agent first.
* Depth: the jobs of this run kept at one agent (running + queued) are as many as hide the
  round trip (the result reaching the master: its result-to-seen latency, measured by the file
  server's clock, plus its poll when it cannot watch; the refill reaching the agent: the
  ``mailbox_lag_s`` agents report) at the mean chunk duration seen so far, refilled at half,
  so about 2 for hour-long chunks and tens for tiny chunks across a slow shared filesystem;
  never more than the agent's fair share of what is left (chunks not done / eligible agents)
  and never more than ``max_depth``.
* Tidying: agents leave finished jobs in their mailboxes; a refill prunes this run's, and near
  and at the run's end the master removes them from agents with nothing of the run left.
* Stealing (Dask's work stealing, simplified: a thief is an idle agent, a victim holds jobs
  that have not started): when nothing is pending and an eligible agent is idle, half of the
  not-started jobs of the agent holding most of them move, under the victim's mailbox lock:
  those that would wait there longer than the move costs (the round trip, at least
  ``MOVE_MIN_S``), judged from the mean chunk duration and how long the job ahead has run.
  The first of the victim's jobs (it may be running, or in its worker's pipe) and the jobs its
  heartbeat names as ``current`` or ``ahead`` never move. A moved job is queued with its next
  attempt number (free): if the victim read its mailbox a moment before and runs it anyway,
  both attempts may run, and still exactly one result is committed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import heapq
import math
import os
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from gpupool.jobs.logsetup import logger

from gpupool.jobs import batches
from gpupool.jobs.atomic import read_bounded, server_now
from gpupool.jobs.descriptor import MUST_UNDERSTAND, Job, JobState
from gpupool.jobs.errors import BadFile, NoAgents
from gpupool.jobs.fsinfo import is_network_fs
from gpupool.jobs.heartbeat import AgentState, Heartbeat
from gpupool.jobs.losses import charge_loss, death_suspects, died_under, record_loss
from gpupool.jobs.mailbox import HOLD_LIMIT, Mailbox, drop_run, without_run
from gpupool.jobs.outcomes import Failure, FailureKind, failure_of
from gpupool.jobs.paths import BATCH_RE, HISTORY_RE, RESULT_RE, Spool
from gpupool.jobs.results import StaleResult, commit, has_outcome, read_result, record, supersede
from gpupool.jobs.words import plural
from gpupool.jobs.watching import OVERFLOW, watch_names
from gpupool.master.core.batching import MAX_BATCH_BYTES, batch_size
from gpupool.master.core.liveness import AgentView, Liveness
from gpupool.master.core.states import in_hand

Event = Callable[[str, dict[str, Any]], None]
BATCH_SCHEMA = MUST_UNDERSTAND["batch"]  # the job schema an agent reads batches from
SLOW_RTT_S = 0.5  # a round trip this long (agents report their mailbox lag) makes the first queue deep
MOVE_MIN_S = 0.1  # a queued job is moved to an idle agent only if it would otherwise wait longer than this
NO_AGENTS_SAY_S = 60.0  # while no agent is alive, a waiting master says so this often
LOCK_WAIT_S = 0.2  # the longest a pass waits for one mailbox's lock (then: that mailbox waits, not the pass)
LOCK_RETRY_S = 1.0  # a mailbox whose lock was held is tried again (without waiting) this much later


@dataclass
class FeedConfig:
    depth: int = 4  # jobs per agent before any chunk duration is known (then: see ``Dispatcher.depth``)
    max_depth: int = 64  # the most jobs of one run queued at one agent
    queue_s: float = 0.5  # tiny chunks: keep this much work queued (fewer mailbox rewrites)
    dead_after: float = 20.0  # heartbeat unchanged this long (master clock) = dead agent
    poll: float = 0.2  # longest wait between passes
    retry_delay: float = 1.0  # first retry back-off; doubles per attempt
    retry_cap: float = 60.0
    free_losses: int = 1  # times a chunk's agent may die under it at no cost; each further death costs an attempt
    steal: bool = True  # move jobs that have not started from busy agents to idle ones
    max_failures: int = 3  # a run stops once this many failed attempts in a row failed alike, none ok (0: never)
    wait_agents: float | None = None  # seconds to wait for a live agent before giving up (NoAgents); None: for ever


def backoff(attempt: int, cfg: FeedConfig, before: int = 0) -> float:
    """Seconds before retrying a chunk whose ``attempt`` failed: doubling, capped (the one rule).
    ``before``: the chunk's attempts made before this master started; each master starts again
    from ``retry_delay`` (as OctoRun does), however many attempts a chunk had in earlier runs."""
    return min(cfg.retry_cap, cfg.retry_delay * 2 ** max(0, attempt - before - 1))


@dataclass
class AttemptSummary:
    """What the dispatcher keeps of an attempt's result record (``summarize``)."""

    status: str
    attempt: int
    agent: str | None
    failure: Failure | None = None  # why it failed (None: it did not, or its record says nothing readable)
    duration_s: float | None = None

    @property
    def error(self) -> str | None:
        """The failure's first line, ``Type: message`` (``Failure.line``), or None."""
        return None if self.failure is None else self.failure.line


def summarize(rec: dict[str, Any]) -> AttemptSummary:
    duration, agent = rec.get("duration_s"), rec.get("agent")
    return AttemptSummary(rec["status"], rec["attempt"], agent if isinstance(agent, str) else None, failure_of(rec),
                          float(duration) if isinstance(duration, (int, float)) and not isinstance(duration, bool)
                          else None)


class Dispatcher:
    """One run's chunks on the pool's agents; subclasses say where chunks come from (see module)."""

    def __init__(self, spool: Spool, run: str, cfg: FeedConfig | None = None, on_event: Event | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.spool, self.run_name, self.cfg, self.clock = spool, run, cfg or FeedConfig(), clock
        self.epoch: str | None = None  # the run's epoch: results of another are stale (jobs.results.StaleResult)
        self.on_event = on_event or (lambda kind, info: None)
        self.liveness = Liveness(spool, self.cfg.dead_after, clock)
        self.attempt: dict[int, int] = {}  # last attempt number handed out per chunk
        self.max_attempts: dict[int, int] = {}
        self.pending: deque[int] = deque()
        self.delayed: list[tuple[float, int]] = []  # (not before, chunk) heap of retries
        self.inflight: dict[int, tuple[str, int]] = {}  # chunk -> (agent, attempt)
        self.by_agent: dict[str, set[int]] = {}
        self.losses: Counter[int] = Counter()  # chunk -> agents that died while perhaps running it
        self.isolated: set[int] = set()  # chunks with a loss: queued with ``alone`` from then on
        self.final: dict[int, AttemptSummary] = {}
        self.failed_on: dict[int, set[str]] = {}  # chunk -> agents an attempt of it failed on (retries go elsewhere)
        self.mailboxes: dict[str, Mailbox] = {}
        self.cancelled = False
        self.names: Any = None  # chunk ids inotify reported (an object with drain()); None: no inotify
        self._missing: dict[int, float] = {}  # chunk -> when it was first seen gone from its mailbox
        self._seen_running: dict[int, float] = {}  # chunk -> when a heartbeat first showed it running
        self._tidy: set[str] = set()  # agents whose mailbox holds none of this run's jobs (see tidy)
        self._next_liveness = 0.0
        self._next_sample = 0.0
        self._alone: tuple[float, float] | None = None  # no live agent: (since, last said) by this clock
        self._mean_s: float | None = None  # moving mean of chunk durations
        self._latency: float | None = None  # moving mean of result-to-seen seconds (file server's clock)
        self._lag: float | None = None  # the longest refill-to-agent lag live agents report (heartbeats)
        self._held: dict[str, tuple[float, float]] = {}  # agent -> (its lock first found held, next try)
        self._fill_error: dict[str, str] = {}  # agent -> why its last refill failed (said once)
        self.job_schema = 1  # the descriptor schema this run's jobs need, learnt as they are made (_fill)
        self._before: dict[int, int] = {}  # chunk -> attempts it had before its first failure seen here (backoff)
        # Batches (jobs.batches): a job in flight is named by its first chunk; ``span`` holds the chunk
        # count of those that are batches. Every other map here is by chunk (a batch's chunks get their
        # attempt numbers once the batch is over).
        self.span: dict[int, int] = {}
        self._unit = 1  # chunks per job planned in this pass (master.core.batching)

    # hooks -------------------------------------------------------------------------------------
    def _job(self, c: int) -> Job:
        """The descriptor of chunk ``c``'s next attempt (``attempt[c] + 1``)."""
        raise NotImplementedError

    def sendable(self, c: int) -> bool:
        return True

    def batchable(self, c: int) -> bool:
        """Chunk ``c`` may go in a batch (``jobs.batches``): a chunk at its first attempt whose job
        a batch can carry. None may by default (the Executor's calls: ``Executor.map`` groups its own)."""
        return False

    def batch_given(self) -> int | None:
        """Chunks per batch the user fixed (``--batch``), or None: by their duration."""
        return None

    def settle(self, c: int, rec: dict[str, Any]) -> None:
        """Chunk ``c``'s final result ``rec`` was read (``final[c]`` holds its summary)."""

    def started(self, c: int) -> None:
        """An agent's heartbeat shows chunk ``c`` running (or handed to its worker)."""

    def why_not(self, view: AgentView) -> str | None:
        """None if this run may use that agent, else why not (placement; an agent too old for its jobs)."""
        if view.job_schema < self.job_schema:
            return (f"reads job descriptors up to schema {view.job_schema}, this run's need {self.job_schema}: "
                    "restart it on this version (./start_agents.sh stop, then start)")
        return None

    def eligible(self, view: AgentView) -> bool:
        return self.why_not(view) is None

    def failed_attempt(self, c: int, out: AttemptSummary) -> None:
        """An attempt of chunk ``c`` failed (``out``), whether it is retried or final."""

    def unplaceable(self, live: list[AgentView]) -> None:
        """Agents are alive, but this run may use none of them (placement)."""
        self.on_event("unplaceable", {"agents": [v.id for v in live]})

    # bookkeeping -------------------------------------------------------------------------------
    def add(self, c: int, max_attempts: int, attempt: int = 0) -> None:
        """A chunk to run; ``attempt``: attempts already made (a resumed run)."""
        self.attempt[c], self.max_attempts[c] = attempt, max_attempts
        self.pending.append(c)

    def _mailbox(self, ident: str) -> Mailbox:
        if ident not in self.mailboxes:
            self.mailboxes[ident] = Mailbox(self.spool, ident)
        return self.mailboxes[ident]

    def _track(self, c: int, agent: str, attempt: int) -> None:
        self.inflight[c] = (agent, attempt)
        self.by_agent.setdefault(agent, set()).add(c)

    def _untrack(self, c: int) -> None:
        if c in self.inflight:
            agent, _ = self.inflight.pop(c)
            self.by_agent[agent].discard(c)
        self._missing.pop(c, None)
        self._seen_running.pop(c, None)

    def _requeue(self, c: int, delay: float = 0.0, free: bool = False) -> None:
        """Back to pending for the next attempt; ``free`` = a lost attempt that costs no retry.
        A batch is fenced instead and its chunks go on one by one (``_split``).
        A free one taken back while its descriptor says it is the last attempt is put on record
        as superseded (``jobs.results.supersede``): should it still run somewhere (a frozen agent
        thawed, a moved job already read), its failure then never commits over the next one."""
        if c in self.span:
            self._split(c, "taken back from its agent")
            return
        if free and c in self.inflight and self.inflight[c][1] >= self.max_attempts[c]:
            agent, attempt = self.inflight[c]
            try:
                supersede(self.spool, dataclasses.replace(self._job(c), attempt=attempt,
                                                          max_attempts=self.max_attempts[c] + 1),
                          f"taken back from {agent}; attempt {attempt + 1} runs instead")
            except OSError as e:
                logger.warning("could not record chunk {} attempt {} as superseded: {}", c, attempt, e)
        self._untrack(c)
        if free:
            self.max_attempts[c] += 1
        if delay > 0:
            heapq.heappush(self.delayed, (self.clock() + delay, c))
        else:
            self.pending.appendleft(c)  # before fresh chunks: keeps the run's tail short

    def _has_outcome(self, c: int, attempt: int) -> bool:
        if c in self.span:
            return self._slot(c).exists()
        return has_outcome(self.spool, (self.run_name, c, attempt), self.max_attempts[c])

    # batches -----------------------------------------------------------------------------------
    def _slot(self, u: int) -> Path:
        return self.spool.batch_json(self.run_name, u, self.span[u])

    def _split(self, u: int, why: str) -> None:
        """The batch in flight named by ``u`` goes back (its agent died, froze, drains or is
        replaced; it vanished or is moved): fenced (``jobs.batches.fence``), its chunks go on one
        by one at no cost, the next attempt of each after this one; where the batch committed
        first, its outcomes count (the next pass takes them in). A fence that cannot be written
        leaves it in flight: tried again on the next pass that takes it back."""
        try:
            fenced = batches.fence(self.spool, self.run_name, u, self.span[u], self.inflight[u][1], why)
        except (OSError, BadFile) as e:
            logger.warning("could not take back the batch of chunks {}..{}: {}", u, u + self.span[u] - 1, e)
            return
        if fenced:
            self._unbatch(u, free=True)

    def _unbatch(self, u: int, free: bool, codes: str | None = None) -> None:
        """The batch named by ``u`` is over without outcomes for the chunks ``codes`` says ``b``
        of (all: None): they go back to pending one by one, after its attempt, at no cost."""
        _, attempt = self.inflight[u]
        limit = self.max_attempts[u] + (1 if free else 0)
        n = self.span.pop(u)
        self._untrack(u)
        back = [u + i for i in range(n) if codes is None or codes[i] == batches.BACK]
        for c in back:
            self.attempt[c], self.max_attempts[c] = attempt, limit
        self.pending.extendleft(reversed(back))  # before fresh chunks: keeps the run's tail short

    def _take_batch(self, u: int, path: Path) -> bool:
        """Take in the batch named by ``u`` from its slot at ``path``; False while it has none."""
        agent, attempt = self.inflight[u]
        try:
            slot = batches.read_slot(path, self.epoch)
        except FileNotFoundError:
            return False
        except (BadFile, OSError) as e:  # torn, stale (--fresh) or no file: moved aside, its chunks run again
            self._refuse(path, e, "its chunks will run again")
            self._split(u, f"its results were refused: {e}")
            return True
        if slot.fenced is not None:
            self._unbatch(u, free=True)
            return True
        codes, limit = slot.codes, self.max_attempts[u]
        self._unbatch(u, free=True, codes=codes)
        rec = slot.rec or {}
        took = [d for d in rec.get("durations") or () if isinstance(d, (int, float)) and not isinstance(d, bool)]
        agent_ = rec.get("agent") if isinstance(rec.get("agent"), str) else agent
        ok = AttemptSummary(JobState.OK, attempt, agent_, None, sum(took) / len(took) if took else None)
        self._observe(ok)  # once: the batch's mean chunk duration
        attempts, limits, status = self.attempt, self.max_attempts, JobState.OK.value
        for i, code in enumerate(codes):
            c = u + i
            if code == batches.BACK:
                continue
            attempts[c], limits[c] = attempt, limit
            if code == batches.OK:  # the common case, kept cheap: no record made, one summary shared
                self._conclude(c, {"status": status, "chunk_id": c, "attempt": attempt,
                                   "batch": [u, slot.count]}, ok)
                continue
            one = slot.record(c)
            if code == batches.HISTORY:
                out = summarize(one)
                self._observe(out)
                self._retry(c, attempt, out, agent)
            else:
                self._conclude(c, one)
        return True

    @property
    def rtt(self) -> float:
        """Seconds from an agent finishing a job to its refill reaching it: the result's way to
        the master (measured here as the result-to-seen latency), plus the master's poll when it
        cannot watch the results folder, plus the mailbox's way back (the lag the agents report
        in their heartbeats; where none has, the result-to-seen latency again)."""
        latency = self._latency or 0.0
        back = self._lag if self._lag is not None else latency
        return latency + back + (self.cfg.poll if self.names is None else 0.0)

    @property
    def depth(self) -> int:
        """This run's jobs to keep at one busy agent, before the fair-share cap (see the module)."""
        if self._mean_s is None:  # no chunk finished yet: a guess, unless refills are known to be slow
            slow = self.rtt >= SLOW_RTT_S  # (a shared filesystem's cache delay): queue a fair share at once;
            return max(1, self.cfg.max_depth if slow else self.cfg.depth)  # stealing evens out long chunks
        mean = max(self._mean_s * self._unit, 1e-4)  # a job's: a batch lasts its chunks' time
        cover = 1 + math.ceil(2 * self.rtt / mean)  # refilled at half: the half left still covers it
        amortise = int(self.cfg.queue_s / mean) + 1
        return max(1, min(self.cfg.max_depth, max(2, cover, amortise)))

    def _observe(self, out: AttemptSummary) -> None:
        """Chunk durations set the depth: ok ones only (a failure is often quick, an import error
        in a millisecond, and would make the queue deep just when it should stay short)."""
        if out.duration_s is not None and out.status == JobState.OK:
            d = max(0.0, out.duration_s)
            self._mean_s = d if self._mean_s is None else 0.9 * self._mean_s + 0.1 * d

    # one pass ----------------------------------------------------------------------------------
    def step(self) -> None:
        now = self.clock()
        full = self.names is None or now >= self._next_liveness or self.names.overflowed()
        if now >= self._next_liveness:
            if self.spool.cancel_flag(self.run_name).exists():
                self._cancel()
                return
            self.liveness.refresh()
            self._note_heartbeats()
            self._restarted()
            self._hand_back()
            self._find_lost()
            self._withdraw_unwanted()
            self._next_liveness = now + min(1.0, self.cfg.dead_after / 4)
        self._take_in(full)
        while self.delayed and self.delayed[0][0] <= now:
            self.pending.appendleft(heapq.heappop(self.delayed)[1])
        self._dispatch()

    def _cancel(self) -> None:
        """The run was cancelled (``python -m master cancel``): take its queued jobs back, stop."""
        drop_run(self.spool, self.run_name)
        self.cancelled = True
        self.on_event("cancelled", {"pending": len(self.pending) + len(self.inflight) + len(self.delayed)})

    def _note_heartbeats(self) -> None:
        """What the heartbeats just read say: which of this run's chunks run (or wait in a worker's
        pipe), since when as seen here, and the longest mailbox lag the live agents report."""
        now, lags = self.clock(), []
        for view in self.liveness.views.values():
            for u in view.status.uncommitted or ():
                c = u["chunk_id"]
                if u["run"] == self.run_name and self.inflight.get(c) == (view.id, u["attempt"]) \
                        and u.get("epoch") == self.epoch:  # not a job of an earlier start of the run
                    self._uncommitted(c, view.id, u["attempt"], u["error"])
            cur = view.status.current
            for c in busy_chunks(view, self.run_name) & self.inflight.keys():
                if cur is not None and (cur.run, cur.chunk_id) == (self.run_name, c):
                    self._seen_running.setdefault(c, now)
                self.started(c)
            lag = view.status.mailbox_lag_s
            if view.alive and isinstance(lag, (int, float)) and not isinstance(lag, bool):
                lags.append(min(30.0, max(0.0, lag)))
        self._lag = max(lags) if lags else None

    def _uncommitted(self, c: int, agent: str, attempt: int, error: dict[str, Any]) -> None:
        """``agent`` ran attempt ``attempt`` of chunk ``c`` but cannot write its outcome (permission
        denied, a read-only filesystem: ``agent.diskpause.DiskPause._uncommittable``). Its failure is recorded here,
        as the loss of an agent is (history, or the final result of a last attempt), and taken in
        as any failure: retried, elsewhere where it can be, up to --retries, then final. Where this
        master cannot write it either, the chunk is settled here without a file. A batch goes back
        whole, its chunks one by one (``_split``)."""
        if c in self.span:
            self._requeue(c, free=True)
            return
        job = dataclasses.replace(self._job(c), attempt=attempt, max_attempts=self.max_attempts[c])
        failure = Failure.from_dict(error)
        rec = record(job, JobState.FAILED, agent=agent, error=failure, finished_at=time.time())
        logger.error("{} chunk {} attempt {}: {}", self.run_name, c, attempt, failure.message)
        try:
            commit(self.spool, job, rec)
            return  # the next pass takes it in
        except OSError as e:
            rec["error"] = failure.replace(message=f"{failure.message}; nor can this master ({e})").to_dict()
        if attempt >= self.max_attempts[c]:
            self._conclude(c, rec)
        else:
            self._retry(c, attempt, summarize(rec), agent)

    # results -----------------------------------------------------------------------------------
    def _take_in(self, full: bool = True) -> None:
        """Take in the outcomes of jobs in flight: of every one (a stat or two each) on a full
        pass, else only of the chunks whose result files inotify reported since the last pass."""
        named = self.names.drain() if self.names is not None else []
        chunks = list(self.inflight) if full else {c for c in named if c in self.inflight}
        seen: list[Path] = []  # the results found now, for the latency sample
        for c in chunks:
            if c not in self.inflight:  # a batch taken in before it in this pass
                continue
            if c in self.span:
                path = self._slot(c)
                if self._take_batch(c, path):
                    seen.append(path)
                continue
            agent, attempt = self.inflight[c]
            final = self.spool.result_json(self.run_name, c)
            try:  # no symlink followed: a link where the result belongs (dangling, or out of BASE) is refused
                rec = read_result(final, self.epoch)
            except FileNotFoundError:
                self._collect_history(c, agent, attempt)
                continue
            except BadFile as e:
                self._refuse(final, e)
                self._requeue(c, free=isinstance(e, StaleResult))  # a stale one was no attempt of this run
                continue
            except OSError as e:  # a folder (or an unreadable file) where the result belongs: no agent can
                # ever commit this chunk, so it fails now, naming the path, instead of the run never ending
                rec = {"status": JobState.FAILED, "attempt": attempt, "agent": agent, "chunk_id": c,
                       "error": Failure(FailureKind.BAD_RESULT_PATH, f"{final} is not a readable result file "
                                        f"({e.strerror}); remove it, then resume the run").to_dict()}
            seen.append(final)
            self._conclude(c, rec)
        self._sample_latency(seen)

    def _refuse(self, path: Path, why: object, then: str = "the chunk will run again") -> None:
        """A result file (a chunk's, or a batch's slot) that cannot count (torn by an OS crash, of
        an earlier start of the run, not what its name says): kept in ``rejected/`` with why, and
        removed, so that its chunks run again."""
        logger.warning("{}: {}; {}", path, why, then)
        self.spool.reject(read_or_empty(path), path, str(why))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def _conclude(self, c: int, rec: dict[str, Any], shared: AttemptSummary | None = None) -> None:
        """Chunk ``c`` has its final result ``rec``. ``shared``: the summary the ok chunks of a
        batch share (a million chunks' would otherwise be a million objects), observed once for
        them all; ``rec`` is then only its status, chunk, attempt and batch (``chunk_result``
        reads the whole record)."""
        self._untrack(c)
        self.failed_on.pop(c, None)
        self.final[c] = out = shared or summarize(rec)
        if shared is None:
            self._observe(out)
        self.settle(c, rec)
        self.on_event("failed" if out.status != JobState.OK else "ok", {"chunk": c, "outcome": out})
        if out.status != JobState.OK:
            self.failed_attempt(c, out)

    def _collect_history(self, c: int, agent: str, attempt: int) -> None:
        hist = self.spool.history_json(self.run_name, c, attempt)
        if attempt >= self.max_attempts[c] or not hist.exists():  # a last attempt ends with its final
            return
        try:
            rec = read_result(hist, self.epoch)
        except StaleResult:  # an earlier start's: this attempt's own, when it fails, is written over it
            return
        except (BadFile, OSError):
            rec = {"status": JobState.FAILED, "attempt": attempt, "agent": agent, "error": None}
        out = summarize(rec)
        self._observe(out)
        self._retry(c, attempt, out, agent)

    def _retry(self, c: int, attempt: int, out: AttemptSummary, agent: str) -> None:
        """Attempt ``attempt`` of chunk ``c`` failed (``out``) with attempts left: the next one is
        queued after a back-off, on another agent than ``agent`` where one has room."""
        self.failed_on.setdefault(c, set()).add(out.agent or agent)
        delay = backoff(attempt, self.cfg, self._before.setdefault(c, attempt - 1))
        self.on_event("retry", {"chunk": c, "outcome": out, "delay": delay})
        self._requeue(c, delay)
        self.failed_attempt(c, out)

    def _sample_latency(self, found: list[Path]) -> None:
        """At most once a second: how long results took to be seen here, by the file server's clock
        (their mtimes, read then: not a stat per result)."""
        now = self.clock()
        if not found or now < self._next_sample:
            return
        mtimes = []
        for path in found:
            with contextlib.suppress(OSError):
                mtimes.append(os.lstat(path).st_mtime)
        if not mtimes:
            return
        self._next_sample = now + 1.0
        stamp = server_now(self.spool.result_dir(self.run_name))
        if stamp is None:
            return
        sample = min(30.0, max(0.0, stamp - max(mtimes)))
        self._latency = sample if self._latency is None else 0.7 * self._latency + 0.3 * sample

    # agents that die, drain or lose jobs ---------------------------------------------------------
    def _take_back(self, ident: str, choose: Callable[[list[Job]], set[int]], force: bool) -> list[Job] | None:
        """Under ``ident``'s mailbox lock, remove the jobs of this run that ``choose`` picks from
        the ones in flight there (given in mailbox order); returns them in that order, or None
        if the mailbox could not be changed (its lock held by a frozen process, a disk error)."""
        taken: list[Job] = []

        def drop(jobs: list[Job]) -> list[Job] | None:
            ours = [j for j in jobs if j.run == self.run_name and self.inflight.get(j.chunk_id, ("", 0))[0] == ident]
            picked = choose(ours)
            taken.extend(j for j in ours if j.chunk_id in picked)
            gone = {id(j) for j in taken}
            return [j for j in jobs if id(j) not in gone] if taken else None

        try:
            self._update(ident, drop, force=force)
        except TimeoutError:
            return None  # tried again on a later pass
        except OSError as e:
            logger.warning("could not take jobs back from {}: {}", ident, e)
            return None
        return taken

    def _update(self, ident: str, change: Callable[[list[Job]], list[Job] | None], force: bool = False) -> None:
        """``Mailbox.update`` without stalling the pass on one mailbox: its lock is waited for
        ``LOCK_WAIT_S`` at most; a lock found held is tried again, without waiting, every
        ``LOCK_RETRY_S`` (TimeoutError meanwhile), and after ``HOLD_LIMIT`` a ``force`` change is
        made without it (its holder is taken for frozen: see ``Mailbox.update``). A process frozen
        holding one agent's lock, or a slow client, then costs that agent its refills, not the
        pass and the other agents theirs."""
        now = self.clock()
        held = self._held.get(ident)
        if held is not None and now < held[1]:
            raise TimeoutError(f"{self._mailbox(ident).lock.path} is held by another process")
        frozen = held is not None and now - held[0] >= HOLD_LIMIT
        try:
            self._mailbox(ident).update(change, wait=0.0 if held else LOCK_WAIT_S, force=force and frozen)
        except TimeoutError:
            if held is None:
                logger.warning("the mailbox lock of {} is held by another process; tried again every {:g} s, "
                               "other agents meanwhile", ident, LOCK_RETRY_S)
            self._held[ident] = (held[0] if held else now, now + LOCK_RETRY_S)
            raise
        self._held.pop(ident, None)

    def _hand_back(self) -> None:
        """Take back this run's jobs from dead agents, and the queued (not running) ones from
        draining agents."""
        for ident, view in self.liveness.views.items():
            draining = view.alive and view.state == AgentState.DRAINING
            if (view.alive and not draining) or not self.by_agent.get(ident):
                continue
            # a draining agent still runs its current job and the one already in its worker's pipe
            running = busy_chunks(view, self.run_name) if draining else set()
            ours = {c for c in self.by_agent[ident] if c not in running}
            if not ours:
                continue
            taken = self._take_back(ident, lambda jobs: ours, force=not draining)
            if taken is None:
                continue
            back = [c for c in ours if not self._has_outcome(c, self.inflight[c][1])]
            why = "draining" if draining else "stopped" if view.state == AgentState.STOPPED else f"no heartbeat for {view.age:.0f} s"
            died = not draining and view.state != AgentState.STOPPED
            suspects = death_suspects([j for j in taken if j.chunk_id in back and
                                       j.attempt == self.inflight[j.chunk_id][1]]) if died else []
            for c in back:
                if c not in {j.chunk_id for j in suspects}:
                    self._requeue(c, free=True)
            for job in suspects:
                self._lost(job, ident, why, sure=len(suspects) == 1)
            logger.warning("agent {}: {}; handed back {}", ident, why, plural(len(back), "chunk"))
            self.on_event("handback", {"agent": ident, "chunks": sorted(back), "why": why})

    def _restarted(self) -> None:
        """Agents whose process was replaced under the same id (see ``master.core.liveness``): the one
        that is gone died, unless it stopped, so what it was running is a loss as for a dead agent.
        The new process names the open jobs its predecessor may have died under (``died_under``)
        and leaves them alone for a while (see ``agent.Agent``); this run's leave its mailbox here
        and go to the loss rules, so a crash loop ends within ``free_losses`` + attempts restarts,
        however fast a supervisor brings the agent back. From an agent that names nothing (an
        older version), the suspects are a dead agent's: the first open jobs of its mailbox."""
        for ident, view in self.liveness.views.items():
            prev, view.previous = view.previous, None
            if prev is None or not self.by_agent.get(ident):
                continue
            named = died_under(view.status)
            if named is None and prev.state in (AgentState.STOPPING, AgentState.STOPPED):
                continue
            ours = {c for r, c, a in named or () if r == self.run_name and self.inflight.get(c) == (ident, a)}
            if named is not None and not ours:
                continue

            def pick(jobs: list[Job]) -> set[int]:
                return ours or {j.chunk_id for j in death_suspects(
                    [j for j in jobs if not self._has_outcome(j.chunk_id, j.attempt)])}

            suspects = [j for j in self._take_back(ident, pick, force=False) or ()
                        if j.attempt == self.inflight[j.chunk_id][1] and not self._has_outcome(j.chunk_id, j.attempt)]
            why = f"its process {prev.pid} was replaced by {view.status.pid}"
            sure = len(named) == 1 if named is not None else len(suspects) == 1
            for job in suspects:
                self._lost(job, ident, why, sure=sure)
            if suspects:
                logger.warning("agent {} restarted ({}); chunks {} it may have died under are queued again",
                               ident, why, sorted(j.chunk_id for j in suspects))
                self.on_event("handback", {"agent": ident, "chunks": sorted(j.chunk_id for j in suspects),
                                           "why": f"restarted: {why}"})

    def _lost(self, job: Job, agent: str, why: str, sure: bool) -> None:
        """``agent`` died while running ``job`` (``sure``) or perhaps the job beside it. The first
        ``free_losses`` times a chunk goes back at no cost (nodes fail on their own); after that
        each sure loss is a failed attempt, so a chunk that kills its agent (or its node) cannot
        take down the whole pool one by one. A suspect runs ``alone`` from then on, so its next
        loss is sure: the innocent neighbour of a poisonous chunk pays nothing."""
        if job.chunk_id in self.span:  # which chunk of a batch it was, its chunks one by one will tell
            self._requeue(job.chunk_id, free=True)
            return
        if sure:
            self.failed_on.setdefault(job.chunk_id, set()).add(agent)
        if not charge_loss(self.losses, self.isolated, job.chunk_id, self.cfg.free_losses, sure) or not record_loss(
                self.spool, job, agent, why, self.losses[job.chunk_id]):
            self._requeue(job.chunk_id, free=True)

    def _find_lost(self) -> None:
        """Jobs that left a live agent's mailbox without any result (mailbox replaced, ...).

        On a shared filesystem this master may see the agent's pruned mailbox before the result
        that was written first (each name is cached on its own), so a job must stay gone, with
        no outcome, for ``dead_after`` before it is queued again: the same wait as a dead agent's."""
        now = self.clock()
        for ident, chunks in self.by_agent.items():
            view = self.liveness.views.get(ident)
            if not chunks or view is None or not view.alive:
                continue
            try:
                keys = {j.key for j in self._mailbox(ident).read().jobs}  # read before results: see agent
            except (OSError, BadFile):
                continue
            for c in list(chunks):
                attempt = self.inflight[c][1]
                if (self.run_name, c, attempt) in keys or self._has_outcome(c, attempt):
                    self._missing.pop(c, None)
                elif now - self._missing.setdefault(c, now) >= self.cfg.dead_after:
                    logger.warning("chunk {} attempt {} vanished from {}'s mailbox; queued again", c, attempt, ident)
                    self._requeue(c, free=True)

    def _withdraw_unwanted(self) -> None:
        """Jobs in flight whose chunk its owner no longer wants (a cancelled future) leave the
        mailboxes they wait in; one already running finishes and its result is ignored."""
        for ident, chunks in self.by_agent.items():
            unwanted = {c for c in chunks if not self.sendable(c)}
            view = self.liveness.views.get(ident)
            if view is not None:
                unwanted -= busy_chunks(view, self.run_name)
            if unwanted and self._take_back(ident, lambda jobs: unwanted, force=False) is not None:
                for c in unwanted:
                    self._untrack(c)

    # placement ---------------------------------------------------------------------------------
    def _no_agents(self) -> None:
        """Work waits and no agent is alive: said at once and every ``NO_AGENTS_SAY_S`` after;
        past ``cfg.wait_agents`` seconds, NoAgents (a master on a mistyped or abandoned BASE ends)."""
        now = self.clock()
        since, said = self._alone or (now, -math.inf)
        if now - said >= NO_AGENTS_SAY_S:
            self.on_event("no_agents", {"waited_s": now - since})
            said = now
        self._alone = (since, said)
        if self.cfg.wait_agents is not None and now - since >= self.cfg.wait_agents:
            raise NoAgents(f"no live agent came in {self.cfg.wait_agents:g} s (--wait-agents); "
                           f"{plural(len(self.pending) + len(self.delayed), 'chunk')} not run. Start agents "
                           f"(./start_agents.sh N {self.spool.base}), then run the same command again", self.spool.base)

    def _candidates(self) -> list[AgentView]:
        return [v for v in self.liveness.views.values() if v.accepting and self.eligible(v)]

    def _dispatch(self) -> None:
        live = self._candidates()
        if self.pending and not live and (accepting := [v for v in self.liveness.views.values() if v.accepting]):
            self.unplaceable(accepting)
            return
        if self.pending and not live:
            self._no_agents()
            return
        self._alone = None
        if not self.pending and self.cfg.steal:
            self._steal(live)
        if not self.pending and not self.delayed:
            self.tidy(done_only=True)
        if not self.pending or not live:
            return
        self._unit = batch_size(self._mean_s, self.rtt, self.run_size(), len(self.pending), len(live),
                                self.batch_given())
        left = math.ceil(len(self.pending) / self._unit) + len(self.inflight)
        depth = self.depth
        cap = max(1, min(depth, math.ceil(left / len(live))))  # never more than a fair share of what is left
        now = self.clock()  # not at agents whose mailbox lock was just found held (see _update)
        plan = self._plan([v for v in live if v.id not in self._held or now >= self._held[v.id][1]], cap,
                          low=depth // 2)
        for ident, chunks in plan.items():
            self._fill(self.liveness.views[ident], chunks)

    def _plan(self, live: list[AgentView], cap: int, low: int) -> dict[str, list[int]]:
        """Breadth first: pending chunks one at a time, in order, to the agent holding fewest of
        this run's (idle ones first), to agents down to ``low`` (half the depth that hides the
        round trip: the fair-share cap near a run's end must not delay refills), each up to
        ``cap``. A chunk that failed on an agent goes to another agent with room in this plan where
        there is one (a later chunk takes its place there, looking a few ahead only), else where
        it failed: no agent waits for a busy one to retry what may have failed by chance. The
        chunks planned leave ``pending``."""
        heap = [(len(self.by_agent.get(v.id, ())), v.state != AgentState.IDLE, v.id) for v in live]
        heap = [h for h in heap if h[0] <= low]
        heapq.heapify(heap)
        room = {ident for n, _, ident in heap if n < cap}
        plan: dict[str, list[int]] = {}
        while self.pending and heap:
            n, busy, ident = heapq.heappop(heap)
            if n >= cap:
                break
            i = self._next_for(ident, room)
            if i is None:
                continue  # everything in reach failed here and may go elsewhere: this agent is done
            c = self.pending[i]
            del self.pending[i]
            if self.sendable(c):
                if i == 0 and self._unit > 1 and self.batchable(c) and \
                        self.liveness.views[ident].job_schema >= BATCH_SCHEMA:  # an older agent: one at a time
                    self._gather(c)
                plan.setdefault(ident, []).append(c)
                n += 1
            heapq.heappush(heap, (n, busy, ident))
        return plan

    def _gather(self, c: int) -> None:
        """Chunk ``c`` (just taken from the head of ``pending``) becomes a batch with the chunks
        that follow it there in order, up to ``_unit`` chunks, all of them batchable."""
        n, pending, size = 1, self.pending, self.chunk_bytes(c)
        while n < self._unit and pending and pending[0] == c + n and self.batchable(c + n):
            size += self.chunk_bytes(c + n)
            if size > MAX_BATCH_BYTES:
                break
            pending.popleft()
            n += 1
        if n > 1:
            self.span[c] = n

    def _ungather(self, units: list[int]) -> None:
        """Planned jobs that were not queued go back to the head of ``pending``, chunk by chunk."""
        chunks: list[int] = []
        for u in units:
            n = self.span.pop(u, 1)
            chunks.extend(range(u, u + n))
        self.pending.extendleft(reversed(chunks))

    def chunk_bytes(self, c: int) -> int:
        """What chunk ``c`` adds to a batch's descriptor (a sweep's parameters), in bytes."""
        return 0

    def run_size(self) -> int:
        """The run's chunk count, where it has a fixed one (the batch rule's file target)."""
        return 0

    def _next_for(self, ident: str, room: set[str], reach: int = 8) -> int | None:
        """The index in ``pending`` of the first of its first ``reach`` chunks that should go to
        ``ident``: one that has not failed there, or has failed on every agent of ``room``."""
        for i in range(min(reach, len(self.pending))):
            failed = self.failed_on.get(self.pending[i])
            if not failed or ident not in failed or room <= failed:
                return i
        return None

    def _fill(self, view: AgentView, chunks: list[int]) -> None:
        taken: list[Job] = []
        unreadable: list[Job] = []  # jobs of a newer descriptor schema than the agent reads

        def add(jobs: list[Job]) -> list[Job] | None:
            # Drop this run's jobs that are no longer in flight (their outcome is on disk):
            # agents leave finished jobs for us to prune, saving a mailbox rewrite per job.
            keep = [j for j in jobs if j.run != self.run_name or self.inflight.get(j.chunk_id) == (view.id, j.attempt)]
            made = [self._job(c) for c in chunks]
            taken[:] = [j for j in made if j.needs_schema <= view.job_schema]
            unreadable[:] = [j for j in made if j.needs_schema > view.job_schema]
            return keep + taken

        try:
            self._update(view.id, add)
        except OSError as e:
            if not isinstance(e, TimeoutError) and self._fill_error.get(view.id) != str(e):
                self._fill_error[view.id] = str(e)  # said once, not on every pass while it lasts
                logger.warning("could not queue jobs for {}: {}", view.id, e)
            self._ungather(chunks)
            return
        self._fill_error.pop(view.id, None)
        self._tidy.discard(view.id)
        if unreadable:  # from now on such agents are passed over (why_not)
            self.job_schema = max([self.job_schema] + [j.needs_schema for j in unreadable])
            self._ungather([j.chunk_id for j in unreadable])
        for job in taken:
            self.attempt[job.chunk_id] = job.attempt
            self._track(job.chunk_id, view.id, job.attempt)

    def _steal(self, live: list[AgentView]) -> None:
        """Idle agents take half of the not-started jobs of the agent that holds most of them."""
        thieves = [v for v in live if not self.by_agent.get(v.id) and v.state == AgentState.IDLE]
        if not thieves:
            return
        limit = max(self.rtt, MOVE_MIN_S)  # a move costs the round trip: worth it for a longer wait only

        def promising(chunks: set[int]) -> bool:  # without reading its mailbox: may any job there wait that long?
            return self._mean_s is None or (len(chunks) - 1) * self._mean_s > limit or \
                any(self._left(c) > limit for c in chunks)

        victims = {i: len(cs) for i, cs in self.by_agent.items() if len(cs) >= 2 and self._alive(i) and promising(cs)}
        for thief in thieves:
            if not victims:
                return
            ident = max(victims, key=lambda i: (victims[i], i))
            keep = busy_chunks(self.liveness.views[ident], self.run_name)
            want = victims.pop(ident) // 2  # the first job stays: it may be running

            def tail(jobs: list[Job]) -> set[int]:
                # the agent may have finished jobs not yet collected: count only those still open
                jobs = [j for j in jobs if not self._has_outcome(j.chunk_id, j.attempt)]
                movable, wait = [], self._left(jobs[0].chunk_id) if jobs else 0.0
                for j in jobs[1:]:
                    if j.chunk_id not in keep and wait > limit:
                        movable.append(j.chunk_id)
                    wait += self._mean_s if self._mean_s is not None else math.inf
                return set(movable[len(movable) - min(want, len(movable)):])

            taken = self._take_back(ident, tail, force=False) or []
            for job in reversed(taken):
                if not self._has_outcome(job.chunk_id, job.attempt):
                    self._requeue(job.chunk_id, free=True)
            if taken:
                logger.debug("moved {} job(s) of {} from {} to idle {}", len(taken), self.run_name, ident, thief.id)
                self.on_event("moved", {"from": ident, "to": thief.id, "chunks": sorted(j.chunk_id for j in taken)})

    # the loop -------------------------------------------------------------------------------------
    def loop(self, finished: Callable[[], bool], wake: threading.Event) -> None:
        """Pass after pass until ``finished()``; between passes wait for ``wake``, a result file
        (inotify, where the results folder is local) or ``poll`` seconds."""
        rdir = self.spool.result_dir(self.run_name)
        self.spool.mkdir(rdir)
        watch = None
        if not is_network_fs(rdir):
            names = ResultNames()

            def seen(new: list[str]) -> None:
                if names.add_all(new):
                    wake.set()

            watch = watch_names(rdir, seen, f"the master of {self.run_name}")
            self.names = names if watch is not None else None
        try:
            while not finished():
                self.step()
                if finished():
                    break
                wake.wait(self.cfg.poll)
                wake.clear()
        finally:
            if watch is not None:
                watch.stop()
            self.names = None

    def _left(self, c: int) -> float:
        """Seconds chunk ``c`` (the first open job at its agent) will still take, as far as can be
        told: the mean chunk duration for one that has barely begun, and as long again as it has
        run for one that has run longer than half that (a chunk past the mean is a long one).
        Infinite while no chunk has finished: the chunks are long, or it is early on."""
        if self._mean_s is None:
            return math.inf
        elapsed = self.clock() - self._seen_running.get(c, self.clock())
        return max(self._mean_s - elapsed, elapsed)

    def tidy(self, done_only: bool = False) -> None:
        """Remove this run's jobs from the mailboxes it used (agents leave finished jobs for a lazy
        prune, and an agent prunes only a mailbox that has been quiet a while): at the end of the
        run, and near it (``done_only``: from agents with nothing of the run left to run, while
        the others still work, so that the end itself has little left to do)."""
        for ident, box in self.mailboxes.items():
            if ident in self._tidy or (done_only and self.by_agent.get(ident)):
                continue
            self._tidy.add(ident)
            try:
                self._update(ident, without_run(self.run_name))
            except OSError as e:  # a frozen holder, a disk error: the agent's own prune tidies it later
                logger.debug("could not tidy {}: {}", ident, e)

    def _alive(self, ident: str) -> bool:
        view = self.liveness.views.get(ident)
        return view is not None and view.alive


def busy_chunks(view: AgentView | Heartbeat, run: str) -> set[int]:
    """This run's chunks the agent's heartbeat (a view's, or a heartbeat's own content) shows
    running or handed to its worker."""
    return in_hand(view.status if isinstance(view, AgentView) else view, run)  # master.core.states: the heartbeat alone


def read_or_empty(path: Path) -> bytes:
    try:
        return read_bounded(path)
    except (OSError, BadFile):
        return b""


class ResultNames:
    """Chunk ids of result files (final or history) that appeared, handed from the watch's thread
    (``jobs.watching.watch_names``) to the dispatcher's loop, a read of events at a time; and
    whether events were lost (the kernel's queue overflowed: the next pass looks at every chunk
    in flight)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chunks: list[int] = []
        self._overflow = False

    def add(self, name: str) -> None:
        self.add_all([name])

    def add_all(self, names: list[str]) -> bool:
        """Takes in the names of one read; True if any was a result's (or events were lost)."""
        chunks, lost = [], False
        for name in names:
            m = RESULT_RE.match(name) or HISTORY_RE.match(name) or BATCH_RE.match(name)
            if m:
                chunks.append(int(m.group(1)))
            lost = lost or name == OVERFLOW
        if chunks or lost:
            with self._lock:
                self._chunks += chunks
                self._overflow = self._overflow or lost
        return bool(chunks) or lost

    def drain(self) -> list[int]:
        with self._lock:
            out, self._chunks = self._chunks, []
        return out

    def overflowed(self) -> bool:
        """Events were lost since the last call (then: False again)."""
        with self._lock:
            lost, self._overflow = self._overflow, False
        return lost
