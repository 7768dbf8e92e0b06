"""Chunk results: ``results/<run>/<chunk:06d>.json`` (the commit) and ``.npz`` (arrays).

Committing, under ``results/<run>/commit.lock``:
 1. if the final ``.json`` exists, another attempt won: drop ours;
 2. move our arrays (a temp file beside it) to ``<chunk>.npz``, or remove a stale one;
 3. ``link`` our ``.json`` to the final name (fails if it exists: exactly one commit).
Every failed attempt is also kept as history ``<chunk>.a<attempt>.json``.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from jobs.atomic import read_bounded, write_exclusive, write_replace
from jobs.descriptor import Job, JobState
from jobs.errors import BadFile
from jobs.locks import FileLock
from jobs.paths import Spool

RESULT_LIMIT = 8 * 1024 * 1024
RESULT_SCHEMA = 1


def record(job: Job, status: JobState, **fields: Any) -> dict[str, Any]:
    """A result record for ``job``; ``fields`` adds agent, host, times, value, error..."""
    return {"schema": RESULT_SCHEMA, "run": job.run, "chunk_id": job.chunk_id,
            "total_chunks": job.total_chunks, "status": status.value, "attempt": job.attempt,
            "max_attempts": job.max_attempts, **fields}


def commit(spool: Spool, job: Job, rec: dict[str, Any], arrays_tmp: Path | None = None) -> bool:
    """Record an attempt's outcome. Returns True if it became the chunk's committed result.

    A failure with attempts left is only kept as history (the master retries it); an ok
    or a last failure is committed unless another attempt already committed.
    """
    data = json.dumps(rec, default=str).encode()
    ok = rec["status"] == JobState.OK.value
    committed = _commit_final(spool, job, data, arrays_tmp) if ok or job.attempt >= job.max_attempts else False
    if not committed:
        _discard(arrays_tmp)
    if not ok:  # after the final commit: a reader that sees the last history also sees the final
        write_replace(spool.history_json(job.run, job.chunk_id, job.attempt), data)
    return committed


_LOCKS: dict[Path, FileLock] = {}


def _commit_lock(spool: Spool, run: str) -> FileLock:
    """The run's commit lock, kept open across commits (an open and a close saved per job)."""
    path = spool.commit_lock(run)
    if path not in _LOCKS:
        if len(_LOCKS) >= 16:
            _LOCKS.pop(next(iter(_LOCKS))).close()
        _LOCKS[path] = FileLock(path)
    return _LOCKS[path]


def _commit_final(spool: Spool, job: Job, data: bytes, arrays_tmp: Path | None) -> bool:
    run, chunk = job.run, job.chunk_id
    with _commit_lock(spool, run):
        if spool.result_json(run, chunk).exists():
            return False
        npz = spool.result_npz(run, chunk)
        if arrays_tmp is not None:
            os.replace(arrays_tmp, npz)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(npz)
        try:
            return write_exclusive(spool.result_json(run, chunk), data)
        except BaseException:  # e.g. disk full: leave no arrays without their commit
            with contextlib.suppress(OSError):
                os.unlink(npz)
            raise


def reopen_failed(spool: Spool, run: str, chunk: int) -> bool:
    """Move a committed *failed* result aside so the chunk can run again (a re-run).

    The failed record already exists as history, so it is simply removed. Returns True if
    the chunk is now without a committed result.
    """
    with _commit_lock(spool, run):
        path = spool.result_json(run, chunk)
        try:
            rec = read_result(path)
        except FileNotFoundError:
            return True
        except BadFile:
            rec = None  # an unreadable result counts as not done
        if rec is not None and rec["status"] == JobState.OK.value:
            return False
        os.unlink(path)
        return True


def has_outcome(spool: Spool, job_key: tuple[str, int, int]) -> bool:
    """True once attempt ``job_key`` = (run, chunk, attempt) is over: the chunk has a committed
    result, or this attempt's failure is on record. Agents leave such jobs in their mailboxes
    until a lazy prune, so whoever counts queued work checks this."""
    run, chunk, attempt = job_key
    return spool.result_json(run, chunk).exists() or spool.history_json(run, chunk, attempt).exists()


def read_result(path: Path) -> dict[str, Any]:
    """Read and check a result record; raises BadFile if it is not a valid one."""
    data = read_bounded(path, RESULT_LIMIT)
    try:
        rec = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadFile(f"result is not valid JSON ({e})", path) from e
    if not isinstance(rec, dict) or rec.get("status") not in (JobState.OK.value, JobState.FAILED.value):
        raise BadFile("result has no valid 'status'", path)
    if not isinstance(rec.get("chunk_id"), int) or not isinstance(rec.get("attempt"), int):
        raise BadFile("result has no integer 'chunk_id'/'attempt'", path)
    return rec


def _discard(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
