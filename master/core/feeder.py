"""A run's master: its chunks fed to the pool by the one dispatcher (``master.core.dispatcher``).

All state is rebuilt from the spool by ``recover()``: results and history files say
what is done and how many attempts each chunk had, mailboxes say what is in flight.
``step()`` does one pass; ``run()`` owns the loop and the waiting.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from gpupool.jobs.logsetup import logger

from gpupool.jobs.descriptor import Job, JobKind, JobState
from gpupool.jobs.errors import BadFile
from gpupool.jobs.paths import Spool
from gpupool.jobs.outcomes import FailureKind, failure_of
from gpupool.jobs.results import (RunScan, attempt_record, chunk_result, read_epoch, reopen_failed, result_or_none,
                                  scan_run, seal, sealed, unseal)
from gpupool.jobs.words import plural
from gpupool.master.core.dispatcher import AttemptSummary, Dispatcher, Event, FeedConfig, summarize
from gpupool.master.core.liveness import AgentView
from gpupool.master.spec.options import JOB_FIELDS
from gpupool.master.spec.placement import Placement, Unplaceable, gpu_count, gpu_ids
from gpupool.master.spec.runspec import RunSpec

__all__ = ["AttemptSummary", "Feeder", "FeedConfig", "Summary"]

# Errors that fail every chunk the same way when they come from the code, not the data: a missing
# module, a task or keyword that does not exist, a syntax error.
DETERMINISTIC = ("ImportError", "ModuleNotFoundError", "TaskError", "SyntaxError", "TypeError", "NameError",
                 "AttributeError")
# Failures of the pool (or of the machine), not of the code, never count towards failing fast
# (``FailureKind.of_the_pool``: an agent lost or frozen, a job past its timeout or its worker killed, a
# result that cannot be written, an attempt handed to another agent; a GPU fault that is not the job's
# own, which fails every chunk sent to that GPU alike and drains its agent instead: see
# agent.gpufaults.GpuFaults.after_job); nor do these task errors: memory that another job may hold.
MEMORY_ERRORS = frozenset({"MemoryError", "OutOfMemoryError"})
# Errors whose message is generic ("the script exited with code 1"): told apart by the last line of
# their output (the traceback a Python script printed), and never alike without one.
BY_OUTPUT = frozenset({FailureKind.SCRIPT_FAILED, FailureKind.COMMAND_FAILED})
_HEX = re.compile(r"0x[0-9a-fA-F]+|\b(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{8,}\b")
_NUMBER = re.compile(r"\d+")


def alike(line: str) -> str:
    """An error line with what differs from chunk to chunk made the same: hex addresses and long
    hex ids become ``<hex>`` (``<Model at 0x7f3a...>``, a hash), every run of digits ``#`` (chunk ids,
    sizes, ``/data/chunk_17.npy`` and ``/data/chunk_18.npy`` alike). Words are kept: a message that
    differs in its words is another error."""
    return _NUMBER.sub("#", _HEX.sub("<hex>", line))


@dataclass
class Summary:
    run: str
    chunks: int
    outcomes: dict[int, AttemptSummary]
    wall_s: float
    results_dir: Path
    cancelled: bool = False
    done_this_session: int = 0
    halted: str | None = None  # why the run stopped early (fail fast), if it did
    failed_attempts: int = 0  # attempts that failed in this session, final or retried
    retried_attempts: int = 0  # of them, those after which the chunk had attempts left

    @property
    def ok(self) -> int:
        return sum(o.status == JobState.OK for o in self.outcomes.values())

    @property
    def failed(self) -> list[int]:
        return sorted(c for c, o in self.outcomes.items() if o.status != JobState.OK)

    @property
    def all_ok(self) -> bool:
        """Every chunk has an ok result (what main.py's exit code 0 means)."""
        return self.ok == self.chunks

    @property
    def per_agent(self) -> Counter:
        return Counter(o.agent for o in self.outcomes.values() if o.agent)


class Feeder(Dispatcher):
    def __init__(self, spool: Spool, spec: RunSpec, cfg: FeedConfig | None = None,
                 on_event: Event | None = None, clock: Callable[[], float] = time.monotonic,
                 placement: Placement | None = None) -> None:
        super().__init__(spool, spec.name, cfg, on_event, clock)
        self.spec, self.placement = spec, placement or spec.placement
        self.recovered_done = 0  # chunks already done when this master started
        self.epoch = read_epoch(spool, spec.name)  # carried by every job (see jobs.descriptor)
        self.halted: str | None = None
        self._alike: dict[str, set[int]] = {}  # a deterministic error line -> the chunks it failed
        self._streak: list[tuple[str, int]] = []  # the latest failed attempts in a row with one error: (key, chunk)
        self.failed_attempts = 0  # attempts failed in this session (pool errors too), final or retried
        self.retried_attempts = 0  # of them, those with attempts left (a retry was queued)
        self._some_ok = False  # a chunk of the run is ok (kept as they come: not a look at every final per failure)
        # a batch carries callable chunks that differ only in their chunk id and sweep parameters
        self._batches = spec.kind is JobKind.CALLABLE and spec.data_dir is None and spec.batch != 1

    @property
    def done(self) -> bool:
        return self.cancelled or self.halted is not None or len(self.final) >= self.spec.chunks

    def _dispatch(self) -> None:
        if self.halted is None:  # halted in this pass: nothing more is queued
            super()._dispatch()

    def failed_attempt(self, c: int, out: AttemptSummary) -> None:
        """Fail fast: every chunk would fail the same way, so the run stops (what is queued leaves
        the mailboxes) instead of spending chunks x attempts of GPU time on it, when no chunk of the
        run is ok and either ``max_failures`` failed attempts in a row (of at least two chunks, pool
        errors aside) ended with the same error type and message (``alike``), or ``max_failures``
        chunks failed with the same error line of a type that comes from the code (``DETERMINISTIC``)."""
        self.failed_attempts += 1
        self.retried_attempts += c not in self.final
        limit, failure, line = self.cfg.max_failures, out.failure, out.error
        if limit <= 0 or failure is None or line is None or self.halted is not None or self._some_ok:
            return
        if failure.kind.of_the_pool or failure.type in MEMORY_ERRORS:  # the pool's or the GPU's, not the code's
            return
        if failure.type in DETERMINISTIC:
            chunks = self._alike.setdefault(line, set())
            chunks.add(c)
            if len(chunks) >= limit:
                self.halted = f"{len(chunks)} chunks failed with the same error and none is ok: {line}"
                self.on_event("halted", {"why": self.halted})
                return
        key = self._key(c, out)
        if key is None:
            self._streak = []
            return
        self._streak = [s for s in self._streak if s[0] == key][-(limit - 1):] + [(key, c)] if limit > 1 \
            else [(key, c)]
        chunks = sorted({s[1] for s in self._streak})
        if len(self._streak) >= limit and len(chunks) >= min(2, limit, self.spec.chunks):
            self.halted = (f"{plural(limit, 'failed attempt')} in a row (chunks {', '.join(map(str, chunks))}) ended "
                           f"with the same error and none is ok: {line}")
            self.on_event("halted", {"why": self.halted})

    def batchable(self, c: int) -> bool:
        return self._batches and not self.attempt.get(c) and c not in self.isolated and c not in self.failed_on

    def batch_given(self) -> int | None:
        return self.spec.batch

    def run_size(self) -> int:
        return self.spec.chunks

    def chunk_bytes(self, c: int) -> int:
        return 0 if self.spec.params is None else len(json.dumps(self.spec.params[c]))

    def settle(self, c: int, rec: dict[str, Any]) -> None:
        if rec["status"] == JobState.OK:
            self._some_ok = True

    def _key(self, c: int, out: AttemptSummary) -> str | None:
        """What makes two failed attempts alike (``alike`` of the error line; for a script or command,
        of the last line of its output as well), or None if it cannot tell."""
        line = alike(out.error or "")
        if out.failure is None or out.failure.kind not in BY_OUTPUT:
            return line
        rec = attempt_record(self.spool, self.spec.name, c, out.attempt) or \
            result_or_none(self.spool.result_json(self.spec.name, c)) or {}
        err = failure_of(rec) if rec.get("attempt") == out.attempt else None
        tb = err.traceback if err is not None else ""
        last = [t for t in tb.splitlines() if t.strip() and not t.startswith("# attempt ")][-1:]
        return f"{line} | {alike(last[0].strip())}" if last else None

    def why_not(self, view: AgentView) -> str | None:
        return super().why_not(view) or self.placement.why_not(view.status)

    def unplaceable(self, live: list[AgentView]) -> None:
        """Fail at once: waiting for agents that will never match helps nobody."""
        why = "; ".join(f"{v.id} (host {v.status.host}, gpu {','.join(map(str, gpu_ids(v.status)))}): "
                        f"{_phrase(self.why_not(v))}" for v in live[:8])
        held = Counter(gpu_count(v.status) for v in live)  # what exists, for --gpus-per-job
        pool = ", ".join(plural(n, "CPU agent") if not k else f"{plural(n, 'agent')} with {plural(k, 'GPU')}"
                         for k, n in sorted(held.items()))
        raise Unplaceable(f"run {self.spec.name}: none of the {plural(len(live), 'live agent')} may take its jobs under "
                          f"{self.placement.describe()} (the pool has {pool}): {why}{' ...' if len(live) > 8 else ''}")

    # recovery ------------------------------------------------------------------------------
    def recover(self) -> None:
        """Rebuild everything from the spool (first start, resume, or after a master crash)."""
        spec, rdir = self.spec, self.spool.result_dir(self.spec.name)
        self.spool.mkdir(rdir)
        scan = scan_run(self.spool, spec.name)
        trusted = sealed(self.spool, spec.name)
        for c in sorted(scan.finals.keys() | scan.odd):  # sealed: flushed when it finished, so names alone are
            if c >= spec.chunks:  # exact; a link, folder or FIFO where a result belongs is read (and refused)
                continue
            if trusted and scan.ok_by_name(c):
                self.final[c] = AttemptSummary(JobState.OK, 0, None)
            else:
                self._recover_final(c, scan)
        for slot in scan.stale.values():  # of an earlier start of the run (--fresh): moved aside, counts nothing
            self._refuse(self.spool.batch_json(spec.name, slot.first, slot.count),
                         "committed for an earlier start of the run (--fresh)", "its chunks will run again")
        handed: dict[int, int] = {}  # a batch's chunks handed back (b, or fenced): the batch's attempt
        for slot in (*scan.slots.values(), *scan.fenced.values()):
            for c in slot.chunks:
                if slot.code(c) == "b" and c not in self.final and c < spec.chunks:
                    handed[c] = max(handed.get(c, 0), slot.attempt)
        self._recover_mailboxes(handed)
        self.recovered_done = len(self.final)
        self._some_ok = any(o.status == JobState.OK for o in self.final.values())
        if not self.done:
            unseal(self.spool, spec.name)
        covered = {c for u, n in self.span.items() for c in range(u, u + n)}  # batches in flight
        for c in range(spec.chunks):
            if c in self.final or c in self.inflight or c in self.attempt or c in covered:
                continue
            last = scan.last_attempt(c)
            if handed.get(c, 0) > last:  # run again one by one (never in a batch of the same name), at no cost
                last = self.attempt[c] = handed[c]
                self.max_attempts[c] = last + 1 + spec.retries
            elif last:
                self.attempt[c] = last
                rec = self._history(c, last)
                self.max_attempts[c] = max(_int(rec.get("max_attempts"), 1), last + 1)
                if (failure := failure_of(rec)) is not None and failure.kind is FailureKind.AGENT_LOST:
                    self._suspect(c)
            else:
                self.attempt[c] = 0
                self.max_attempts[c] = 1 + spec.retries
            self.pending.append(c)

    def _recover_final(self, c: int, scan: RunScan) -> None:
        path = self.spool.result_json(self.spec.name, c)
        if (slot := scan.final_slot(c)) is not None:  # a batch's: its slot is read (and refused) whole
            path = self.spool.batch_json(self.spec.name, slot.first, slot.count)
        try:
            rec = chunk_result(self.spool, self.spec.name, c, scan, self.epoch)
        except FileNotFoundError:
            return
        except BadFile as e:
            self._refuse(path, e, "the chunk will run again" if slot is None else "its chunks will run again")
            return
        except OSError as e:  # a folder or FIFO where the result belongs: pending, and failed naming it
            logger.warning("{}: {}", path, e.strerror)  # (BadResultPath) when dispatched, as in a live run
            return
        if rec["status"] == JobState.OK:
            if self._arrays_torn(c, rec):
                return
            self.final[c] = summarize(rec)
        elif reopen_failed(self.spool, self.spec.name, c, scan):  # a re-run tries failed chunks again
            last = max(rec["attempt"], scan.last_attempt(c))
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
        if "batch" in rec:  # its batch's slot holds the other chunks' results: kept; this chunk's own, once it
            logger.warning("chunk {}: its arrays {} are missing or torn; it will run again", c, npz.name)
            return True  # has one, is read before it (jobs.results.chunk_result)
        self._refuse(path, f"its arrays {npz.name} are missing or not {want} bytes")
        return True

    def _history(self, c: int, attempt: int) -> dict[str, Any]:
        return attempt_record(self.spool, self.spec.name, c, attempt) or {}

    def _suspect(self, c: int) -> None:
        """After a restart: ``c`` was already suspected of killing an agent (its job is marked
        ``alone``, or its last attempt ended with ``AgentLost``): it runs alone and has had its
        free losses."""
        self.isolated.add(c)
        self.losses[c] = max(self.losses[c], self.cfg.free_losses)

    def _recover_mailboxes(self, handed: dict[int, int]) -> None:
        for ident in self.spool.agent_ids():
            try:
                jobs = self._mailbox(ident).read().jobs
            except (OSError, BadFile):
                continue
            for job in jobs:
                if job.run != self.spec.name or job.chunk_id in self.final or job.chunk_id >= self.spec.chunks:
                    continue
                if job.batch is not None:
                    if not any(c in handed for c in job.chunks):
                        self._recover_batch(ident, job)
                    continue
                if job.attempt > self.attempt.get(job.chunk_id, 0):
                    self._untrack(job.chunk_id)
                    self.attempt[job.chunk_id] = job.attempt
                    self.max_attempts[job.chunk_id] = job.max_attempts
                    self._track(job.chunk_id, ident, job.attempt)
                    if job.alone:
                        self._suspect(job.chunk_id)

    def _recover_batch(self, ident: str, job: Job) -> None:
        """A batch queued by an earlier master: in flight again, unless it has a slot (it is over,
        or was fenced) or any of its chunks is known otherwise."""
        chunks = [c for c in job.chunks if c < self.spec.chunks]
        if self.spool.batch_json(self.spec.name, job.chunk_id, job.batch or 1).exists():
            return  # over: its slot was read with the results
        if len(chunks) != job.batch or any(c in self.final or c in self.inflight or self.attempt.get(c)
                                           for c in chunks):
            return
        self.span[job.chunk_id] = job.batch
        self.max_attempts[job.chunk_id] = job.max_attempts
        self.attempt[job.chunk_id] = job.attempt
        self._track(job.chunk_id, ident, job.attempt)

    def _job(self, c: int) -> Job:
        """The next attempt of chunk ``c``, or of the batch it begins (``span``: at their first attempt)."""
        s, n = self.spec, self.span.get(c)
        each = dict(run=s.name, total_chunks=s.chunks, kind=s.kind, attempt=self.attempt.get(c, 0) + 1,
                    max_attempts=self.max_attempts[c], submitted_at=time.time(), epoch=self.epoch, options=s.options,
                    gpus=self.placement.gpus_per_job, gpu_mem=self.placement.gpu_mem,
                    **{job: getattr(s, field) for field, job in JOB_FIELDS.items()})  # as saved: master.spec.options
        if n is not None:
            return Job(chunk_id=c, target=s.target, kwargs=s.kwargs, batch=n,
                       batch_params=None if s.params is None else s.params[c:c + n], **each)
        return Job(chunk_id=c, target=s.chunk_target(c), kwargs=s.chunk_kwargs(c), data=s.data_file(c),
                   alone=c in self.isolated, params=s.chunk_params(c), **each)

    # the loop ----------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> Summary:
        """Feed until every chunk has a final result (or ``stop`` is set)."""
        started = time.monotonic()
        self.loop(lambda: self.done or bool(stop and stop.is_set()), threading.Event())
        if self.done and not self.cancelled:
            self.tidy()  # a halted run's queued jobs leave the mailboxes too (running ones finish)
            seal(self.spool, self.spec.name, self.halted)  # a run reported done is on disk; a halted one says so
        return Summary(self.spec.name, self.spec.chunks, dict(self.final), time.monotonic() - started,
                       self.spool.result_dir(self.spec.name), self.cancelled, len(self.final) - self.recovered_done,
                       self.halted, self.failed_attempts, self.retried_attempts)


def _phrase(why: str | None) -> str:
    """A placement flag reads "fails --hosts a"; an agent's own reason reads as it is."""
    return f"fails {why}" if why and why.startswith("--") else str(why)


def _int(v: Any, default: int) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else default


