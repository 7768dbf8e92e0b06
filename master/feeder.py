"""The master's loop: queue chunks into live agents' mailboxes, collect results, retry, hand back.

All state is rebuilt from the spool by ``recover()``: results and history files say
what is done and how many attempts each chunk had, mailboxes say what is in flight.
``step()`` does one pass; ``run()`` owns the loop and the waiting.
"""
from __future__ import annotations

import heapq
import os
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from loguru import logger
from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from jobs.atomic import read_bounded
from jobs.descriptor import Job, JobState
from jobs.errors import BadFile
from jobs.fsinfo import is_network_fs
from jobs.heartbeat import AgentState
from jobs.mailbox import HOLD_LIMIT, Mailbox, drop_run
from jobs.paths import HISTORY_RE, RESULT_RE, Spool
from jobs.results import (commit, has_outcome, read_epoch, read_result, record, reopen_failed, seal, sealed,
                          unseal)
from agent.watcher import EVENT_FILTER
from master.liveness import AgentView, Liveness
from master.runspec import RunSpec

Event = Callable[[str, dict[str, Any]], None]


@dataclass
class FeedConfig:
    depth: int = 4  # jobs kept queued per agent (at least), so it never waits for the master
    max_depth: int = 64  # short chunks: the queue grows to cover ``queue_s`` of work, up to this
    queue_s: float = 0.5
    dead_after: float = 20.0  # heartbeat unchanged this long (master clock) = dead agent
    poll: float = 0.2  # longest wait between passes
    retry_delay: float = 1.0  # first retry back-off; doubles per attempt
    retry_cap: float = 60.0
    free_losses: int = 1  # times a chunk's agent may die under it at no cost; each further death costs an attempt


@dataclass
class Outcome:
    status: str
    attempt: int
    agent: str | None
    error: str | None = None
    duration_s: float | None = None


@dataclass
class Summary:
    run: str
    chunks: int
    outcomes: dict[int, Outcome]
    wall_s: float
    results_dir: Path
    cancelled: bool = False
    done_this_session: int = 0

    @property
    def ok(self) -> int:
        return sum(o.status == JobState.OK.value for o in self.outcomes.values())

    @property
    def failed(self) -> list[int]:
        return sorted(c for c, o in self.outcomes.items() if o.status != JobState.OK.value)

    @property
    def all_ok(self) -> bool:
        """Every chunk has an ok result (what main.py's exit code 0 means)."""
        return self.ok == self.chunks

    @property
    def per_agent(self) -> Counter:
        return Counter(o.agent for o in self.outcomes.values() if o.agent)


def _summary(rec: dict[str, Any]) -> Outcome:
    err = rec.get("error") or None
    line = f"{err.get('type')}: {err.get('message')}".splitlines()[0][:300] if isinstance(err, dict) else None
    return Outcome(rec["status"], rec["attempt"], rec.get("agent"), line, rec.get("duration_s"))


class Feeder:
    def __init__(self, spool: Spool, spec: RunSpec, cfg: FeedConfig | None = None,
                 on_event: Event | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.spool, self.spec, self.cfg = spool, spec, cfg or FeedConfig()
        self.clock = clock
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
        self._missing: dict[int, float] = {}  # chunk -> when it was first seen gone from its mailbox
        self.final: dict[int, Outcome] = {}
        self.mailboxes: dict[str, Mailbox] = {}
        self._next_liveness = 0.0
        self._warned_no_agents = False
        self._names: _Names | None = None  # result names inotify reported (None: no inotify)
        self.cancelled = False
        self._mean_s: float | None = None  # moving mean of chunk durations
        self.recovered_done = 0  # chunks already done when this master started
        self.epoch = read_epoch(spool, spec.name)  # carried by every job (see jobs.descriptor)

    # recovery ------------------------------------------------------------------------------
    def recover(self) -> None:
        """Rebuild everything from the spool (first start, resume, or after a master crash)."""
        spec, rdir = self.spec, self.spool.result_dir(self.spec.name)
        rdir.mkdir(parents=True, exist_ok=True)
        finals, hist = set(), {}
        for name in os.listdir(rdir):
            if m := RESULT_RE.match(name):
                finals.add(int(m.group(1)))
            elif m := HISTORY_RE.match(name):
                c, a = int(m.group(1)), int(m.group(2))
                hist[c] = max(hist.get(c, 0), a)
        trusted = sealed(self.spool, spec.name)  # flushed when it finished: names alone are exact
        for c in sorted(finals):
            if c >= spec.chunks:
                continue
            if trusted and c not in hist:  # no failed attempt ever: an ok result (jobs.results)
                self.final[c] = Outcome(JobState.OK.value, 0, None)
            else:
                self._recover_final(c, hist)
        self._recover_mailboxes()
        self.recovered_done = len(self.final)
        if not self.done:
            unseal(self.spool, spec.name)
        for c in range(spec.chunks):
            if c in self.final or c in self.inflight or c in self.attempt:
                continue
            last = hist.get(c, 0)
            self.attempt[c] = last
            if last:
                rec = self._history(c, last)
                self.max_attempts[c] = max(_int(rec.get("max_attempts"), 1), last + 1)
                if (rec.get("error") or {}).get("type") == "AgentLost":
                    self._suspect(c)
            else:
                self.max_attempts[c] = 1 + spec.retries
            self.pending.append(c)

    def _recover_final(self, c: int, hist: dict[int, int]) -> None:
        path = self.spool.result_json(self.spec.name, c)
        try:
            rec = read_result(path)
        except BadFile as e:
            logger.warning("{}: {}; the chunk will run again", path, e)
            self.spool.reject(_read_or_empty(path), path, str(e))
            os.unlink(path)
            return
        if rec["status"] == JobState.OK.value:
            if self._arrays_torn(c, rec):
                return
            self.final[c] = _summary(rec)
        elif reopen_failed(self.spool, self.spec.name, c):  # a re-run tries failed chunks again
            last = max(rec["attempt"], hist.get(c, 0))
            self.attempt[c], self.max_attempts[c] = last, last + 1 + self.spec.retries
            self.pending.append(c)

    def _arrays_torn(self, c: int, rec: dict[str, Any]) -> bool:
        """An ok result whose arrays are missing or not the size it recorded (an OS crash before
        the run was sealed): rejected, so that the chunk runs again."""
        want = rec.get("arrays_bytes")
        if not rec.get("arrays") or not isinstance(want, int):
            return False
        path, npz = self.spool.result_json(self.spec.name, c), self.spool.arrays_of(self.spec.name, rec)
        try:
            if os.stat(npz).st_size == want:
                return False
        except FileNotFoundError:
            pass
        logger.warning("{}: its arrays {} are missing or torn; the chunk will run again", path, npz.name)
        self.spool.reject(_read_or_empty(path), path, f"arrays {npz.name} missing or not {want} bytes")
        os.unlink(path)
        return True

    def _history(self, c: int, attempt: int) -> dict[str, Any]:
        try:
            return read_result(self.spool.history_json(self.spec.name, c, attempt))
        except (OSError, BadFile):
            return {}

    def _suspect(self, c: int) -> None:
        """After a restart: ``c`` was already suspected of killing an agent (its job is marked
        ``alone``, or its last attempt ended with ``AgentLost``): it runs alone and has had its
        free losses."""
        self.isolated.add(c)
        self.losses[c] = max(self.losses[c], self.cfg.free_losses)

    def _recover_mailboxes(self) -> None:
        for ident in self.spool.agent_ids():
            try:
                jobs = self._mailbox(ident).read().jobs
            except (OSError, BadFile):
                continue
            for job in jobs:
                if job.run != self.spec.name or job.chunk_id in self.final or job.chunk_id >= self.spec.chunks:
                    continue
                if job.attempt > self.attempt.get(job.chunk_id, 0):
                    self._untrack(job.chunk_id)
                    self.attempt[job.chunk_id] = job.attempt
                    self.max_attempts[job.chunk_id] = job.max_attempts
                    self._track(job.chunk_id, ident, job.attempt)
                    if job.alone:
                        self._suspect(job.chunk_id)

    # bookkeeping -----------------------------------------------------------------------------
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

    def _requeue(self, c: int, delay: float = 0.0, free: bool = False) -> None:
        """Back to pending for the next attempt; ``free`` = a lost attempt that costs no retry."""
        self._untrack(c)
        if free:
            self.max_attempts[c] += 1
        if delay > 0:
            heapq.heappush(self.delayed, (self.clock() + delay, c))
        else:
            self.pending.appendleft(c)  # before fresh chunks: keeps the run's tail short

    @property
    def depth(self) -> int:
        """Jobs to keep queued per agent: enough to cover ``queue_s`` of work at the mean chunk
        duration seen so far (fewer mailbox rewrites for tiny chunks), within [depth, max_depth]."""
        if self._mean_s is None:
            return self.cfg.depth
        want = int(self.cfg.queue_s / max(self._mean_s, 1e-4)) + 1
        return max(self.cfg.depth, min(self.cfg.max_depth, want))

    def _observe(self, out: Outcome) -> None:
        if out.duration_s is not None:
            d = float(out.duration_s)
            self._mean_s = d if self._mean_s is None else 0.9 * self._mean_s + 0.1 * d

    @property
    def done(self) -> bool:
        return self.cancelled or len(self.final) >= self.spec.chunks

    # one pass ----------------------------------------------------------------------------------
    def step(self) -> None:
        now = self.clock()
        full = self._names is None or now >= self._next_liveness
        if now >= self._next_liveness:
            if self.spool.cancel_flag(self.spec.name).exists():
                self._cancel()
                return
            self.liveness.refresh()
            self._hand_back_dead()
            self._find_lost()
            self._next_liveness = now + min(1.0, self.cfg.dead_after / 4)
        self._collect(full)
        while self.delayed and self.delayed[0][0] <= now:
            self.pending.appendleft(heapq.heappop(self.delayed)[1])
        self._dispatch()

    def _cancel(self) -> None:
        """The run was cancelled (``python -m master cancel``): take its queued jobs back, stop."""
        drop_run(self.spool, self.spec.name)
        self.cancelled = True
        self.on_event("cancelled", {"pending": len(self.pending) + len(self.inflight) + len(self.delayed)})

    def _collect(self, full: bool = True) -> None:
        """Take in the outcomes of jobs in flight: of every one (two stats each) on a full pass,
        else only of the chunks whose result files inotify reported since the last pass."""
        run = self.spec.name
        named = self._names.drain() if self._names is not None else []
        chunks = list(self.inflight) if full else {c for c in named if c in self.inflight}
        for c in chunks:
            agent, attempt = self.inflight[c]
            final = self.spool.result_json(run, c)
            if final.exists():
                try:
                    rec = read_result(final)
                except BadFile as e:
                    logger.warning("{}: {}; the chunk will run again", final, e)
                    self.spool.reject(_read_or_empty(final), final, str(e))
                    reopen_failed(self.spool, run, c)
                    self._requeue(c)
                    continue
                except FileNotFoundError:
                    continue
                self._untrack(c)
                self.final[c] = out = _summary(rec)
                self._observe(out)
                self.on_event("failed" if out.status != JobState.OK.value else "ok", {"chunk": c, "outcome": out})
                continue
            hist = self.spool.history_json(run, c, attempt)
            if attempt < self.max_attempts[c] and hist.exists():  # a last attempt ends with its final
                try:
                    rec = read_result(hist)
                except (BadFile, FileNotFoundError):
                    rec = {"status": "failed", "attempt": attempt, "agent": agent, "error": None}
                out = _summary(rec)
                delay = min(self.cfg.retry_cap, self.cfg.retry_delay * 2 ** (attempt - 1))
                self.on_event("retry", {"chunk": c, "outcome": out, "delay": delay})
                self._requeue(c, delay)

    def _has_outcome(self, c: int, attempt: int) -> bool:
        return has_outcome(self.spool, (self.spec.name, c, attempt), self.max_attempts[c])

    def _hand_back_dead(self) -> None:
        """Take back this run's jobs from dead agents, and the queued (not running) ones from
        draining agents."""
        for ident, view in self.liveness.views.items():
            draining = view.alive and view.state == AgentState.DRAINING.value
            if (view.alive and not draining) or not self.by_agent.get(ident):
                continue
            # a draining agent still runs its current job and the one already in its worker's pipe
            busy = [view.status.get(k) or {} for k in ("current", "ahead")] if draining else []
            running = {(b.get("run"), b.get("chunk_id")) for b in busy}
            ours = {c for c in self.by_agent[ident] if (self.spec.name, c) not in running}
            if not ours:
                continue
            taken: list[Job] = []  # in mailbox order: the agent runs them in this order

            def drop(jobs: list[Job]) -> list[Job] | None:
                keep = [j for j in jobs if not (j.run == self.spec.name and j.chunk_id in ours)]
                taken.extend(j for j in jobs if j.run == self.spec.name and j.chunk_id in ours)
                return keep if len(keep) != len(jobs) else None

            try:
                self._mailbox(ident).update(drop, wait=HOLD_LIMIT, force=not draining)
            except OSError as e:  # the lock of a draining agent: held by a frozen process, or a disk error
                logger.warning("could not take back the jobs of {}: {}", ident, e)
                continue
            back = [c for c in ours if not self._has_outcome(c, self.inflight[c][1])]
            why = "draining" if draining else "stopped" if view.state == "stopped" else f"no heartbeat for {view.age:.0f} s"
            died = not draining and view.state != "stopped"
            suspects = death_suspects([j for j in taken if j.chunk_id in back and
                                       j.attempt == self.inflight[j.chunk_id][1]]) if died else []
            for c in back:
                if c not in {j.chunk_id for j in suspects}:
                    self._requeue(c, free=True)
            for job in suspects:
                self._lost(job, ident, why, sure=len(suspects) == 1)
            logger.warning("agent {} is {}; handed back {} chunk(s)", ident, why, len(back))
            self.on_event("handback", {"agent": ident, "chunks": sorted(back), "why": why})

    def _lost(self, job: Job, agent: str, why: str, sure: bool) -> None:
        """``agent`` died while running ``job`` (``sure``) or perhaps the job beside it. The first
        ``free_losses`` times a chunk goes back at no cost (nodes fail on their own); after that
        each sure loss is a failed attempt, so a chunk that kills its agent (or its node) cannot
        take down the whole pool one by one. A suspect runs ``alone`` from then on, so its next
        loss is sure: the innocent neighbour of a poisonous chunk pays nothing."""
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
                if (self.spec.name, c, attempt) in keys or self._has_outcome(c, attempt):
                    self._missing.pop(c, None)
                elif now - self._missing.setdefault(c, now) >= self.cfg.dead_after:
                    logger.warning("chunk {} attempt {} vanished from {}'s mailbox; queued again", c, attempt, ident)
                    self._requeue(c, free=True)

    def _dispatch(self) -> None:
        if not self.pending:
            return
        live = [v for v in self.liveness.views.values() if v.accepting]
        if not live:
            if not self._warned_no_agents:
                self._warned_no_agents = True
                self.on_event("no_agents", {})
            return
        self._warned_no_agents = False
        low = self.depth // 2
        for view in sorted(live, key=lambda v: len(self.by_agent.get(v.id, ()))):
            if not self.pending:
                break
            if len(self.by_agent.get(view.id, ())) <= low:
                self._fill(view)

    def _fill(self, view: AgentView) -> None:
        taken: list[Job] = []

        def add(jobs: list[Job]) -> list[Job] | None:
            # Drop this run's jobs that are no longer in flight (their outcome is on disk):
            # agents leave finished jobs for us to prune, saving a mailbox rewrite per job.
            keep = [j for j in jobs if j.run != self.spec.name or self.inflight.get(j.chunk_id) == (view.id, j.attempt)]
            room = self.depth - len(keep)
            while room > 0 and self.pending:
                taken.append(self._job(self.pending.popleft()))
                room -= 1
            return keep + taken if taken or len(keep) != len(jobs) else None

        try:
            self._mailbox(view.id).update(add, wait=HOLD_LIMIT)
        except OSError as e:
            logger.warning("could not queue jobs for {}: {}", view.id, e)
            self.pending.extendleft(reversed([j.chunk_id for j in taken]))
            return
        for job in taken:
            self.attempt[job.chunk_id] = job.attempt
            self._track(job.chunk_id, view.id, job.attempt)

    def _job(self, c: int) -> Job:
        s = self.spec
        return Job(run=s.name, chunk_id=c, total_chunks=s.chunks, kind=s.kind, target=s.target,
                   attempt=self.attempt.get(c, 0) + 1, max_attempts=self.max_attempts[c], kwargs=s.kwargs,
                   shared=s.shared, data=s.data_file(c), timeout=s.timeout, workdir=s.workdir,
                   submitted_at=time.time(), alone=c in self.isolated, epoch=self.epoch)

    # the loop ----------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> Summary:
        """Feed until every chunk has a final result (or ``stop`` is set)."""
        started = time.monotonic()
        rdir = self.spool.result_dir(self.spec.name)
        wake = threading.Event()
        observer = None
        if not is_network_fs(rdir):
            observer = Observer()
            self._names = _Names()
            observer.schedule(_Wake(wake, self._names), str(rdir), recursive=False, event_filter=EVENT_FILTER)
            observer.daemon = True
            observer.start()
        try:
            while not self.done and not (stop and stop.is_set()):
                self.step()
                if self.done:
                    break
                wake.wait(self.cfg.poll)
                wake.clear()
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)
        if self.done and not self.cancelled:
            seal(self.spool, self.spec.name)  # a run reported done is on disk
        return Summary(self.spec.name, self.spec.chunks, dict(self.final), time.monotonic() - started, rdir,
                       self.cancelled, len(self.final) - self.recovered_done)


def _int(v: Any, default: int) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else default


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
    error = {"type": "AgentLost", "traceback": "",
             "message": f"agent {agent} died ({why}) while running it; {losses} agents so far"}
    logger.warning("{} chunk {} attempt {}: {}", job.run, job.chunk_id, job.attempt, error["message"])
    try:
        commit(spool, job, record(job, JobState.FAILED, agent=agent, error=error, finished_at=time.time()))
        return True
    except OSError as e:
        logger.warning("could not record the loss of {} chunk {}: {}; queued again", job.run, job.chunk_id, e)
        return False


class _Names:
    """Chunk ids of result files (final or history) that appeared, handed from the watchdog
    thread to the feeder's loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chunks: list[int] = []

    def add(self, name: str) -> None:
        m = RESULT_RE.match(name) or HISTORY_RE.match(name)
        if m:
            with self._lock:
                self._chunks.append(int(m.group(1)))

    def drain(self) -> list[int]:
        with self._lock:
            out, self._chunks = self._chunks, []
        return out


class _Wake(FileSystemEventHandler):
    def __init__(self, wake: threading.Event, names: _Names) -> None:
        self.wake, self.names = wake, names

    def on_any_event(self, event: Any) -> None:
        path = event.dest_path if event.event_type == "moved" else event.src_path
        name = os.path.basename(os.fsdecode(path))
        if not name.startswith("."):  # temp files: not yet
            self.names.add(name)
            self.wake.set()


def _read_or_empty(path: Path) -> bytes:
    try:
        return read_bounded(path)
    except (OSError, BadFile):
        return b""
