"""The disk-full pause: an outcome the agent computed but cannot write.

On a full disk (or quota) the outcome is kept and only its write is tried again until space
returns (``DiskPause.commit``), and no job starts here meanwhile; where the worker could not save
a job's arrays, the job stays queued and no job starts here for a while (``pause_for_io``,
``paused``). An outcome no write can record (permission denied, a read-only filesystem) fails
its attempt, and the heartbeat names it (``heartbeat_fields``: ``uncommitted``) for the run's
master to record (``master.core.dispatcher.Dispatcher._uncommitted``). A batch's slot
(``jobs.batches.commit_batch``) takes the same way; where it cannot be written at all, the
heartbeat names the batch (by its first chunk, with ``batch``: its chunk count).
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Callable

from gpupool.jobs.logsetup import logger

from gpupool.agent.beat import Notes
from gpupool.agent.worker_process import chunk_words
from gpupool.jobs.batches import BACK, commit_batch
from gpupool.jobs.atomic import DISK_FULL
from gpupool.jobs.descriptor import Job, JobState
from gpupool.jobs.outcomes import Failure, FailureKind
from gpupool.jobs.paths import Spool
from gpupool.jobs.results import Uncommittable, commit, has_outcome

UNCOMMITTED_KEPT = 32  # attempts whose outcome could not be written, named in the heartbeat for masters


class DiskPause:
    def __init__(self, spool: Spool, agent_id: str, notes: Notes, *, clock: Callable[[], float],
                 stopping: Callable[[], bool], cancelled: Callable[[str], Any], stale: Callable[[Job], bool],
                 tell: Callable[[], None], now: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """``clock``: the job loop's (``pause_for_io``); ``stopping``: the agent stops; ``cancelled(run)``:
        the run's cancel note, or None; ``stale(job)``: the job's run was started afresh since;
        ``tell``: a heartbeat now; ``now`` and ``sleep``: the wait for space (``commit``)."""
        self.spool, self.agent_id, self.notes, self.clock = spool, agent_id, notes, clock
        self.stopping, self.cancelled, self.stale, self.tell = stopping, cancelled, stale, tell
        self.now, self.sleep = now, sleep
        self.pause_until = 0.0  # after an I/O error (disk full): no job before this (clock)
        self._backoff = 0.0
        # attempts whose outcome no write could record (a permanent error: EACCES, EROFS...), for the
        # masters to record as failed (master.core.dispatcher.Dispatcher._uncommitted): the heartbeat names them
        self.uncommitted: list[dict[str, Any]] = []

    def paused(self) -> bool:
        """No job starts now (``pause_for_io``)."""
        return self.clock() < self.pause_until

    def commit(self, job: Job, rec: dict[str, Any], arrays: Path | dict[int, Path] | None
               ) -> tuple[dict[str, Any], bool] | None:
        """``_write``, and the pause after a failed save of arrays (``pause_for_io``) starts short
        again once an outcome was written."""
        done = self._write(job, rec, arrays)
        if done is not None:
            self._backoff = 0.0
        return done

    def _write(self, job: Job, rec: dict[str, Any], arrays: Path | dict[int, Path] | None
               ) -> tuple[dict[str, Any], bool] | None:
        """Commit ``rec`` (``jobs.results.commit``; a batch's slot, ``jobs.batches.commit_batch``,
        ``arrays`` then by chunk); returns the record that was committed and whether it became the
        chunk's result (took the batch's slot). A record no reader would take (too large, too deep)
        fails the attempt instead. On a full disk (or quota) the outcome is kept and only its
        write is tried again, 0.5 s doubling up to 30 s, until space returns: no job starts here
        meanwhile (a job already in the worker's pipe computes, and its result waits behind this
        one). None (nothing kept, the job stays queued) if the agent stops, or the run is
        cancelled or started afresh, while it waits. Any other error (permission denied, a
        read-only filesystem, a folder gone) will not pass: the attempt fails (``_uncommittable``)."""
        pause = 0.0
        while True:
            try:
                try:
                    committed = commit(self.spool, job, rec, arrays) if job.batch is None else \
                        commit_batch(self.spool, job, rec, arrays)
                    self.notes.waiting = None
                    return rec, committed
                except Uncommittable as e:  # too large, too deep: no reader would take it; the attempt fails
                    discard(arrays)
                    arrays = None
                    rec = {**{k: v for k, v in rec.items() if k not in ("value", "error", "arrays_bytes")},
                           "status": JobState.FAILED, "arrays": None,
                           "error": Failure.of(e).to_dict()}
                    return rec, commit(self.spool, job, rec)
            except OSError as e:  # nothing partial is left (our arrays are kept, see results.commit)
                if e.errno not in DISK_FULL:
                    discard(arrays)
                    if self.stale(job):  # its run was started afresh meanwhile (its folder made anew)
                        return None
                    return self._uncommittable(job, rec, e), False
                pause = min(30.0, max(0.5, pause * 2))
                self.no_space(f"cannot write the result of {job.run} {chunk_words(job)}: {e}; its outcome is "
                              f"kept, written again in {pause:g} s")
            if not self._wait_for_space(job, pause):
                discard(arrays)
                return None

    def no_space(self, why: str) -> None:
        """A computed outcome waits for disk space (``commit``, or the worker's save of its
        arrays): said in the log and the heartbeat (``last_error``, ``waiting``)."""
        self.notes.waiting = self.notes.error(why)
        logger.error("agent {}: {}", self.agent_id, why)

    def _wait_for_space(self, job: Job, seconds: float) -> bool:
        """Wait ``seconds`` before writing ``job``'s outcome again; False if it is not to be
        written after all (the agent stops; the run was cancelled or started afresh)."""
        end = self.now() + seconds
        while self.now() < end:
            if self.stopping() or self.cancelled(job.run) is not None or self.stale(job):
                return False
            self.sleep(min(0.2, max(0.0, end - self.now())))
        return True

    def _uncommittable(self, job: Job, rec: dict[str, Any], e: OSError) -> dict[str, Any]:
        """An outcome no write can record (permission denied, a read-only filesystem, its folder
        gone): the attempt fails, naming the path and the error. Its record is not written (it
        cannot be), so the heartbeat names it (``uncommitted``) and the run's master records the
        failure itself (``master.core.dispatcher``): it counts against --retries and the run ends, never
        the same chunk run here again and again. Returns the failed record."""
        where = f" ({e.filename})" if e.filename else ""
        error = Failure(FailureKind.COMMIT_FAILED, f"agent {self.agent_id} cannot write the result{where}: "
                        f"{e.strerror or e}", errno=e.errno).to_dict()
        self.uncommitted = [u for u in self.uncommitted[-(UNCOMMITTED_KEPT - 1):] if not self._recorded(u)]
        self.uncommitted.append({"run": job.run, "chunk_id": job.chunk_id, "attempt": job.attempt,
                                 "max_attempts": job.max_attempts, "epoch": job.epoch, "error": error,
                                 **({"batch": job.batch} if job.batch is not None else {})})
        self.notes.error(f"{job.run} {chunk_words(job)}: {error['message']}")
        self.tell()  # masters learn it now
        if job.batch is not None:  # no chunk of it has an outcome
            return {**rec, "codes": BACK * job.batch, "error": error}
        return {**{k: v for k, v in rec.items() if k not in ("value", "arrays_bytes")},
                "status": JobState.FAILED, "arrays": None, "error": error}

    def _recorded(self, u: dict[str, Any]) -> bool:
        """An outcome ``uncommitted`` names is on record now (a master recorded it, or took the batch back)."""
        if u.get("batch"):
            return self.spool.batch_json(u["run"], u["chunk_id"], u["batch"]).exists()
        return has_outcome(self.spool, (u["run"], u["chunk_id"], u["attempt"]), u["max_attempts"])

    def pause_for_io(self, job: Job, error: str) -> bool:
        """A result could not be written (a full disk, most often): nothing of the attempt is
        kept and it costs no attempt; the job stays queued and no job starts here for a while
        (0.5 s, doubling up to 30 s while it goes on). False, as for an interrupted job."""
        self._backoff = min(30.0, max(0.5, self._backoff * 2))
        self.pause_until = self.clock() + self._backoff
        text = self.notes.error(f"cannot write the result of {job.run} {chunk_words(job)}: {error}")
        logger.error("{}; the job stays queued, next try in {:.1f} s", text, self._backoff)
        return False

    def heartbeat_fields(self) -> dict[str, Any]:
        return {"uncommitted": list(self.uncommitted) or None}


def discard(arrays: str | Path | dict[int, Any] | None) -> None:
    """Remove a job's arrays that will not be committed (a batch's: by chunk; a missing one is fine)."""
    for path in arrays.values() if isinstance(arrays, dict) else [arrays] if arrays else []:
        with contextlib.suppress(OSError):
            os.unlink(path)
