"""Chunk results: ``results/<run>/<chunk:06d>.json`` (the commit) and ``<chunk>.a<attempt>.npz``
(the arrays of the attempt that returned some; the result names them in ``arrays``).

Committing takes no lock (a process frozen while holding one would stall every agent):
 1. if the final ``.json`` exists, another attempt won: drop ours;
 2. move our arrays (a temp file beside it) to this attempt's own ``.npz`` name, which no other
    process writes (a chunk's attempt is dispatched once);
 3. ``link`` our ``.json`` to the final name (fails if it exists: exactly one commit); if it
    fails, remove our ``.npz``.
Every failed attempt is also kept as history ``<chunk>.a<attempt>.json``, written before the
final result of a last attempt, so a final result without any history is an ok one.

Results are not fsynced one by one (that was the largest cost between two jobs): ``link()``
already makes a commit atomic and exactly-once for every reader. When a run is done the master
flushes its results with one syncfs and leaves ``runs/<run>/sealed``; a master resuming a run
that is not sealed (it may have lived through an OS crash) reads and checks every result, and a
result torn by the crash is rejected and its chunk runs again.
"""
from __future__ import annotations

import bisect
import contextlib
import errno
import json
import os
from dataclasses import replace as dataclasses_replace
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from gpupool.jobs import batches
from gpupool.jobs.atomic import move_in, read_bounded, write_exclusive, write_replace
from gpupool.jobs.descriptor import Job, JobState
from gpupool.jobs.errors import BadFile
from gpupool.jobs.jsonio import MAX_DEPTH, clean, is_int, is_num, is_str, is_time, load_json, read_json, too_deep
from gpupool.jobs.logsetup import logger
from gpupool.jobs.names import brief
from gpupool.jobs.outcomes import FIELDS as ERROR_FIELDS
from gpupool.jobs.outcomes import Failure, FailureKind, failure_of
from gpupool.jobs.paths import ARRAYS_RE, BATCH_RE, HISTORY_RE, RESULT_RE, Spool, warn_once

RESULT_LIMIT = 8 * 1024 * 1024  # readers refuse a larger record, so no larger one is ever written
RESULT_SCHEMA = 1


class StaleResult(BadFile):
    """A result committed by a job of an earlier start of its run (``--fresh``): it counts for nothing."""


class Uncommittable(ValueError):
    """A record no reader would accept (``read_result``): ``commit`` writes nothing."""


class ResultTooLarge(Uncommittable):
    """A record over ``RESULT_LIMIT``."""

    def __init__(self, size: int, what: str = "the result record") -> None:
        self.size = size
        super().__init__(
            f"{what} is {size / 2**20:.1f} MB as JSON, over the {RESULT_LIMIT // 2**20} MB limit of a "
            f"result; return a dict of numpy arrays instead (saved as the chunk's .npz, any size), or write a "
            f"file and return its path")


class ResultTooDeep(Uncommittable):
    """A record nested deeper than spool JSON may be (``jobs.jsonio.MAX_DEPTH``)."""

    def __init__(self) -> None:
        super().__init__(
            f"the value the task returned is nested more than {MAX_DEPTH - 1} levels deep, deeper than a result "
            f"may be; return it flatter, as a dict of numpy arrays (saved as the chunk's .npz), or write a file "
            f"and return its path")


def record(job: Job, status: JobState, error: Failure | Mapping[str, Any] | None = None,
           **fields: Any) -> dict[str, Any]:
    """A result record for ``job``; ``error``: why it failed (a mapping is written as it is: a record
    read back, or an odd one a test writes); ``fields`` adds agent, host, times, value..."""
    if error is not None:
        fields["error"] = error.to_dict() if isinstance(error, Failure) else dict(error)
    return {"schema": RESULT_SCHEMA, "run": job.run, "chunk_id": job.chunk_id,
            "total_chunks": job.total_chunks, "status": status.value, "attempt": job.attempt,
            "max_attempts": job.max_attempts, "submitted_at": job.submitted_at,
            **({"epoch": job.epoch} if job.epoch is not None else {}),  # fences --fresh (read_result)
            **({"params": job.params} if job.params is not None else {}), **fields}


def commit(spool: Spool, job: Job, rec: dict[str, Any], arrays_tmp: Path | None = None) -> bool:
    """Record an attempt's outcome. Returns True if it became the chunk's committed result.

    A failure with attempts left is only kept as history (the master retries it); an ok
    or a last failure is committed unless another attempt already committed. A record no
    reader would accept (over ``RESULT_LIMIT``, or nested too deep) raises Uncommittable before
    anything is written (``arrays_tmp`` is kept); so does an OSError (a full disk: nothing partial
    is left, ``arrays_tmp`` is where it was, and the commit can be tried again).
    """
    data = json.dumps(rec, default=str).encode()
    if len(data) > RESULT_LIMIT:
        raise ResultTooLarge(len(data))
    if too_deep(data):
        raise ResultTooDeep()
    # Nothing written through a link: one at results/ or results/<run> (planted after the run
    # started) is moved to rejected/, and an OSError naming it raised, as a full disk's would be.
    spool.real_dir(spool.result_dir(job.run), make=False)
    ok = rec["status"] == JobState.OK
    if not ok:  # history first: a final result with no history beside it is then always an ok one
        hist = spool.history_json(job.run, job.chunk_id, job.attempt)
        if not write_exclusive(hist, data, fsync=False):
            if _judged_by_a_master(hist):  # a newer attempt runs: this late failure must not be final
                _discard(arrays_tmp)
                return False
            write_replace(hist, data, fsync=False)  # our own, from a commit that failed half-way (disk full)
    committed = _commit_final(spool, job, data, arrays_tmp) if ok or job.attempt >= job.max_attempts else False
    if not committed:
        _discard(arrays_tmp)
    return committed


JUDGED = (FailureKind.SUPERSEDED, FailureKind.AGENT_LOST)  # history a master writes for an attempt it took back


def supersede(spool: Spool, job: Job, why: str) -> None:
    """A master took attempt ``job`` back (its agent died, froze or drains; it vanished; it was
    moved to an idle agent) and queues the next one: on record (``job.max_attempts`` the chunk's
    new limit), so that if the old attempt still runs somewhere and fails, that failure stays
    history and never commits over the newer attempt (see ``commit``)."""
    rec = record(job, JobState.FAILED, error=Failure(FailureKind.SUPERSEDED, why))
    spool.real_dir(spool.result_dir(job.run), make=False)  # no link followed (see commit)
    write_exclusive(spool.history_json(job.run, job.chunk_id, job.attempt), json.dumps(rec).encode(), fsync=False)


def _judged_by_a_master(hist: Path) -> bool:
    failure = failure_of(result_or_none(hist) or {})
    return failure is not None and failure.kind in JUDGED


def _commit_final(spool: Spool, job: Job, data: bytes, arrays_tmp: Path | None) -> bool:
    run, chunk = job.run, job.chunk_id
    if spool.result_json(run, chunk).exists():
        return False
    npz = None
    if arrays_tmp is not None:
        npz = spool.result_npz(run, chunk, job.attempt)
        move_in(arrays_tmp, npz)  # not a rename: that would hold up the master's watch (jobs.atomic.move_in)
    try:
        # No fsync here: see the module docstring (runs are sealed with one syncfs instead).
        if write_exclusive(spool.result_json(run, chunk), data, fsync=False):
            return True
    except BaseException:  # e.g. disk full: no arrays without their commit; ours back, for the next try
        if npz is not None and arrays_tmp is not None:
            try:
                os.replace(npz, arrays_tmp)
            except OSError:
                _discard(npz)
        raise
    _discard(npz)  # another attempt committed first
    return False


def sync_run(spool: Spool, run: str) -> None:
    """Make a finished run's results durable with one flush of their filesystem (syncfs),
    instead of an fsync per result on the agents' critical path."""
    fd = os.open(spool.result_dir(run), os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc_syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _libc_syncfs(fd: int) -> int:
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).syncfs(fd)
    except (OSError, AttributeError):
        return -1


def reopen_failed(spool: Spool, run: str, chunk: int, scan: RunScan | None = None) -> bool:
    """Move a committed *failed* result aside so the chunk can run again (a re-run).

    The failed record already exists as history, so it is simply removed; one in a batch's
    slot stays there, and the chunk's own result, once it has one, is read before it
    (``chunk_result``). Returns True if the chunk may now run again.
    """
    slot = scan.final_slot(chunk) if scan is not None else None
    if slot is not None:
        return slot.code(chunk) != batches.OK
    path = spool.result_json(run, chunk)
    try:
        rec = read_result(path)
    except FileNotFoundError:
        return True
    except BadFile:
        rec = None  # an unreadable result counts as not done
    if rec is not None and rec["status"] == JobState.OK:
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True


def has_outcome(spool: Spool, job_key: tuple[str, int, int], max_attempts: int) -> bool:
    """True once attempt ``job_key`` = (run, chunk, attempt) is over: the chunk has a committed
    result, or this attempt's failure is on record and another attempt may follow (the last
    attempt is over only with its final result). Agents leave finished jobs in their mailboxes
    until a lazy prune, so whoever counts queued work checks this."""
    run, chunk, attempt = job_key
    if spool.result_json(run, chunk).exists():
        return True
    return attempt < max_attempts and spool.history_json(run, chunk, attempt).exists()


def job_outcome(spool: Spool, job: Job) -> bool:
    """``has_outcome`` of any job: a batch (``jobs.batches``) is over once its slot exists,
    committed or fenced (its chunks' later attempts are single jobs of their own)."""
    if job.batch is not None:
        return os.path.lexists(spool.batch_json(job.run, job.chunk_id, job.batch))
    return has_outcome(spool, job.key, job.max_attempts)


def new_epoch(spool: Spool, run: str) -> str:
    """Start the run's next epoch (``--fresh``): results of jobs queued before are dropped."""
    token = secrets.token_hex(8)
    spool.mkdir(spool.run_dir(run))
    write_replace(spool.run_epoch(run), token.encode())
    return token


def read_epoch(spool: Spool, run: str) -> str | None:
    """The run's current epoch; None for a run that has none (made by an older version)."""
    try:
        token = read_bounded(spool.run_epoch(run), 128).decode(errors="replace").strip()
    except (OSError, BadFile):
        return None
    return token if token.isalnum() else None


@dataclass(frozen=True)
class Seal:
    """What ``runs/<run>/sealed`` says: the run is over, and how. An empty file (every release
    before the halted field) is a run that finished: every chunk has its final result."""

    halted: str | None = None  # why its master stopped it early (fail fast: --max-failures), if it did

    @property
    def finished(self) -> bool:
        """Every chunk has its final result and all of them were flushed when it was sealed."""
        return self.halted is None


def read_seal(spool: Spool, run: str) -> Seal | None:
    """The run's seal, None if it has none. Content that is not a JSON object naming ``halted`` as
    a string reads as a plain seal (the flag's presence is what older readers go by)."""
    try:
        data = read_bounded(spool.sealed_flag(run), 8192)
    except FileNotFoundError:
        return None
    except (OSError, BadFile):
        return Seal()
    try:
        note = load_json(data, "seal", spool.sealed_flag(run)) if data.strip() else {}
    except BadFile:
        note = {}
    why = note.get("halted") if isinstance(note, dict) else None
    return Seal(why if isinstance(why, str) else None)


def sealed(spool: Spool, run: str) -> bool:
    """The run finished and its results were flushed to disk (``seal``): the names of its
    result files can be trusted without reading them. A run stopped early is not (chunks still
    running when it stopped commit after its seal, not flushed by it)."""
    seal_ = read_seal(spool, run)
    return seal_ is not None and seal_.finished


def seal(spool: Spool, run: str, halted: str | None = None) -> None:
    """Flush a run's results to disk (one syncfs, see ``sync_run``) and say it is over: finished,
    or stopped early by its master (``halted``: why; ``--max-failures``), which the seal records
    for ``status`` and ``runs`` (``read_seal``). An empty file is a finished run, as before."""
    sync_run(spool, run)
    spool.mkdir(spool.run_dir(run))
    write_replace(spool.sealed_flag(run), b"" if halted is None else json.dumps({"halted": halted}).encode())


def read_hook(spool: Spool, run: str) -> dict[str, Any] | None:
    """The run's --on-done record (``master.hooks``: claimed, then its exit code once it ended), or
    None where it has none or it cannot be read (said in the log)."""
    try:
        rec = read_json(spool.on_done_record(run), "on-done record", 64 * 1024)
    except FileNotFoundError:
        return None
    except (OSError, BadFile) as e:
        logger.warning("run {}: {}", run, e)
        return None
    return rec if isinstance(rec, dict) else None


def unseal(spool: Spool, run: str) -> None:
    """The run has work again: until it is sealed anew, a resume reads every result, and its
    --on-done hook runs again when it is (``master.hooks``)."""
    for path in (spool.sealed_flag(run), spool.on_done_record(run)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# fields read for display and bookkeeping: a wrong type is dropped (None) with one warning
FIELDS: dict[str, Any] = {
    "run": is_str, "total_chunks": is_int, "max_attempts": is_int, "agent": is_str, "host": is_str,
    "device": is_str, "log": is_str, "submitted_at": is_num, "started_at": is_time, "finished_at": is_time,
    "duration_s": is_num, "arrays_bytes": is_int, "arrays_form": is_str, "error": ERROR_FIELDS, "exit_code": is_int,
    "result_file": is_str, "epoch": is_str,
    "params": lambda v: isinstance(v, dict),
}


@dataclass
class RunScan:
    """What one listing of ``results/<run>`` says: the one reading of a run's results folder
    (masters, status, retry, collect, logs all use it). Single results are known by their names
    alone; a batch's slot (``jobs.batches``) is read for what it says of each of its chunks
    (once per version of the file: ``_slot_codes``). A fenced slot and one of an earlier start of
    the run (``stale``) say nothing of their chunks; they are kept apart (``logs``, masters)."""

    finals: dict[int, float] = field(default_factory=dict)  # chunk -> mtime of its final result (a regular file)
    history: dict[int, list[int]] = field(default_factory=dict)  # chunk -> its failed attempts on record, sorted
    odd: set[int] = field(default_factory=set)  # chunks with a folder, FIFO or link where the final belongs
    slots: dict[int, batches.Slot] = field(default_factory=dict)  # first chunk -> its batch's slot (not fenced ones)
    fenced: dict[int, batches.Slot] = field(default_factory=dict)  # first chunk -> a fenced batch's slot
    singles: set[int] = field(default_factory=set)  # chunks whose final result is a file of their own
    fenced: dict[int, batches.Slot] = field(default_factory=dict)  # first chunk -> a fenced batch's slot (no outcome)
    stale: dict[int, batches.Slot] = field(default_factory=dict)  # first chunk -> a slot of an earlier epoch (--fresh)
    _firsts: list[int] | None = None

    def last_attempt(self, chunk: int) -> int:
        """The highest attempt with a failure on record (0: none)."""
        return self.history[chunk][-1] if chunk in self.history else 0

    def ok_by_name(self, chunk: int) -> bool:
        """A final result with no history beside it is an ok one: a failed attempt writes its
        history first (see ``commit``; a batch's slot says a failure as history too). Exact for a
        sealed run; before sealing, an OS crash may have torn the file, which its reader then finds."""
        return chunk in self.finals and chunk not in self.history

    def slot_of(self, chunk: int) -> batches.Slot | None:
        """The batch (not fenced) that ran ``chunk``, if one did."""
        if not self.slots:
            return None
        if self._firsts is None:
            self._firsts = sorted(self.slots)
        i = bisect.bisect_right(self._firsts, chunk) - 1
        slot = self.slots[self._firsts[i]] if i >= 0 else None
        return slot if slot is not None and chunk < slot.first + slot.count else None

    def final_slot(self, chunk: int) -> batches.Slot | None:
        """The batch slot holding ``chunk``'s final result, None where its own file does (or none)."""
        if chunk in self.singles or chunk not in self.finals:
            return None
        slot = self.slot_of(chunk)
        return slot if slot is not None and slot.code(chunk) in batches.CLAIMED else None

    def sent_in(self, chunk: int) -> batches.Slot | None:
        """The batch ``chunk`` was sent in, as its slot says, fenced or not (its log is that
        batch's: ``Spool.batch_log``); None where no slot of a batch covers it."""
        slot = self.slot_of(chunk)
        if slot is not None or not self.fenced:
            return slot
        return next((s for s in self.fenced.values() if chunk in s.chunks), None)


def scan_run(spool: Spool, run: str, records: bool = False) -> RunScan:
    """List ``results/<run>`` once (a missing or unreadable folder: nothing). A slot that cannot
    be read is named once in the log and its chunks count as not done; a fenced slot, or one of
    an earlier start of the run (``--fresh``: its epoch is not the run's), counts nothing.
    ``records``: keep each slot's record (``Slot.rec``), for a reader of the whole run that reads
    them all (``collect``), so that each slot is read once."""
    scan = RunScan()
    found: list[tuple[os.DirEntry, int, int]] = []
    singles: dict[int, float] = {}  # chunk -> the mtime of its own final result
    with contextlib.suppress(OSError):
        for e in os.scandir(spool.result_dir(run)):
            if m := RESULT_RE.match(e.name):
                c = int(m.group(1))
                try:
                    if e.is_file(follow_symlinks=False):
                        singles[c] = e.stat(follow_symlinks=False).st_mtime
                        scan.singles.add(c)
                    else:
                        scan.odd.add(c)
                except OSError:  # removed meanwhile
                    continue
            elif m := HISTORY_RE.match(e.name):
                scan.history.setdefault(int(m.group(1)), []).append(int(m.group(2)))
            elif m := BATCH_RE.match(e.name):
                found.append((e, int(m.group(1)), int(m.group(2))))
    epoch = read_epoch(spool, run) if found else None
    for e, first, count in found:
        slot, mtime, made_in = _slot_codes(e, records)
        if slot is None:
            continue
        if epoch is not None and made_in not in (None, epoch):
            scan.stale[first] = slot
            continue
        if slot.fenced is not None:
            scan.fenced[first] = slot
            continue
        scan.slots[first] = slot
        if slot.codes.count(batches.OK) == count:  # every chunk ok (the common case): at once
            scan.finals.update(dict.fromkeys(range(first, first + count), mtime))
            continue
        for i, code in enumerate(slot.codes):
            c = first + i
            if code in batches.CLAIMED:
                scan.finals[c] = mtime
            if code in (batches.HISTORY, batches.FINAL_FAILED):
                scan.history.setdefault(c, []).append(slot.attempt)
    scan.finals.update(singles)  # a chunk's own file is its final result, whatever a slot says
    for attempts in scan.history.values():
        attempts.sort()
    return scan


# slot path -> (its stat, what it says, the epoch it was committed in)
_CODES: dict[str, tuple[tuple[int, int, int], batches.Slot, str | None]] = {}
_RECORDS: dict[str, tuple[tuple[int, int, int], batches.Slot]] = {}  # the same with the record: the latest few


def _slot_codes(e: os.DirEntry, records: bool = False) -> tuple[batches.Slot | None, float, str | None]:
    """What a slot says of its chunks (read once per version of the file; ``records``: with its
    record), its mtime and the epoch it was committed in; None for one that cannot be read (said
    once, naming the file and its chunks)."""
    try:
        st = e.stat(follow_symlinks=False)
    except OSError:
        return None, 0.0, None
    key = (st.st_ino, st.st_mtime_ns, st.st_size)
    got = _CODES.get(e.path)
    if got is not None and got[0] == key and not records:
        return got[1], st.st_mtime, got[2]
    try:
        full = batches.read_slot(Path(e.path))
    except (OSError, BadFile) as err:
        m = BATCH_RE.match(e.name)
        chunks = f"chunks {int(m.group(1))} .. {int(m.group(1)) + int(m.group(2)) - 1}" if m else "its chunks"
        why = str(err) if isinstance(err, BadFile) else f"{e.path}: {err.strerror or err}"
        warn_once(f"{why}; {chunks} count as not done")
        return None, st.st_mtime, None
    made_in = full.rec.get("epoch") if full.rec is not None else None
    slot = dataclasses_replace(full, rec=None)
    if len(_CODES) >= 100_000:
        _CODES.clear()
    _CODES[e.path] = (key, slot, made_in if isinstance(made_in, str) else None)
    return _typed(full, Path(e.path)) if records else slot, st.st_mtime, _CODES[e.path][2]


def read_slot_record(spool: Spool, run: str, slot: batches.Slot, epoch: str | None = None) -> batches.Slot:
    """``slot`` read again whole (with its record, for ``Slot.record``; as it is where it has it:
    ``scan_run(records=True)``); the latest few are kept."""
    path = spool.batch_json(run, slot.first, slot.count)
    full = slot
    if slot.rec is None:
        st = os.lstat(path)
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        got = _RECORDS.get(str(path))
        if got is None or got[0] != key:
            if len(_RECORDS) >= 4:
                _RECORDS.pop(next(iter(_RECORDS)))
            got = _RECORDS[str(path)] = (key, _typed(batches.read_slot(path), path))
        full = got[1]
    if epoch is not None and full.rec is not None and full.rec.get("epoch", epoch) != epoch:
        batches.read_slot(path, epoch)  # raises StaleResult, naming the file
    return full


# a slot's own fields, shared by its chunks (their params, errors and arrays are per chunk)
_SLOT_FIELDS = {k: v for k, v in FIELDS.items() if k not in ("params", "error", "arrays_bytes", "arrays_form")}


def _typed(slot: batches.Slot, path: Path) -> batches.Slot:
    """``slot`` with its fields of the wrong type dropped, once for all its chunks' records, as
    ``read_result`` drops a single result's (one warning naming the file)."""
    rec = slot.rec or {}
    bad = clean(rec, _SLOT_FIELDS)
    params, errors = rec.get("params"), rec.get("errors") or {}
    if isinstance(params, list):
        for i, p in enumerate(params):
            if p is not None and not isinstance(p, dict):
                params[i] = None
                bad.append(f"params[{i}]")
    for c, err in errors.items():
        if not isinstance(err, dict):
            errors[c] = None
            bad.append(f"errors.{c}")
        else:
            bad += clean(err, ERROR_FIELDS, f"errors.{c}.")
    if bad:
        warn_once(f"{path}: batch result fields of the wrong type ignored: {', '.join(bad[:10])}"
                  f"{' ...' if len(bad) > 10 else ''}")
    return slot


def chunk_result(spool: Spool, run: str, chunk: int, scan: RunScan | None = None,
                 epoch: str | None = None) -> dict[str, Any]:
    """Chunk ``chunk``'s final result record, from its own file or from its batch's slot (the
    one reader of a chunk's result: every reader of results goes through it). Raises
    FileNotFoundError if it has none, BadFile (StaleResult) or OSError as ``read_result`` does.
    ``scan``: the run's listing, where the caller has one (else it is made when needed)."""
    path = spool.result_json(run, chunk)
    if scan is None or chunk in scan.singles or chunk in scan.odd:
        try:
            return read_result(path, epoch)
        except FileNotFoundError:
            if scan is not None:
                raise
        scan = scan_run(spool, run)
    slot = scan.final_slot(chunk)
    if slot is None:
        raise FileNotFoundError(errno.ENOENT, "no result", str(path))
    return read_slot_record(spool, run, slot, epoch).record(chunk)


def chunk_results(spool: Spool, run: str, chunks: Iterable[int], scan: RunScan,
                  epoch: str | None = None) -> Iterator[tuple[int, dict[str, Any] | BadFile | OSError]]:
    """``chunk_result`` of each of ``chunks`` (in the order given) that has a final result on
    ``scan``, or the BadFile (StaleResult) or OSError that refused it: for readers of a whole run
    (the API's ``results()``, status), each batch's slot read once and not looked at again."""
    for c, got in result_blocks(spool, run, chunks, scan, epoch):
        if type(got) is batches.Block:
            yield from zip(got.chunks, got.records())
        else:
            yield c, got


def result_blocks(spool: Spool, run: str, chunks: Iterable[int], scan: RunScan, epoch: str | None = None
                  ) -> Iterator[tuple[int, dict[str, Any] | BadFile | OSError | batches.Block]]:
    """``chunk_results``, where consecutive chunks of ``chunks`` whose final results are in the
    same batch's slot with the same outcome come as one ``batches.Block`` (at its first chunk),
    read as columns, not as a record each: for ``collect`` of a run of a million chunks."""
    lo = hi = 0  # the chunks of the batch of the chunk before: lo .. hi - 1, what its slot says, the slot read
    codes, got, slot = "", None, None
    first = nxt = -1  # the block being gathered: its first chunk and the next one (none: -1), their letter
    code = ""
    own = scan.singles | scan.odd  # chunks with a file of their own where their result belongs
    for c in chunks:
        if c == nxt and c < hi and codes[c - lo] == code and c not in own:  # the block goes on
            nxt += 1
            continue
        if nxt >= 0:
            yield first, batches.Block(slot, range(first, nxt), code)
            first = nxt = -1
        if c in own:
            try:
                yield c, read_result(spool.result_json(run, c), epoch)
            except (OSError, BadFile) as e:
                yield c, e
            continue
        if not lo <= c < hi:
            if (found := scan.slot_of(c)) is None:
                continue
            lo, hi, codes = found.first, found.first + found.count, found.codes
            try:
                got, slot = None, read_slot_record(spool, run, found, epoch)
            except (OSError, BadFile) as e:
                got, slot = e, None
        if codes[c - lo] not in batches.CLAIMED:  # what final_slot says, without looking it up again
            continue
        if slot is None:
            yield c, got
        else:
            first, nxt, code = c, c + 1, codes[c - lo]
    if nxt >= 0:
        yield first, batches.Block(slot, range(first, nxt), code)


def result_file(spool: Spool, run: str, chunk: int, scan: RunScan) -> Path:
    """The file that holds (or would hold) ``chunk``'s final result: its batch's slot where that
    has it, else its own ``<chunk>.json``."""
    slot = scan.final_slot(chunk)
    return spool.result_json(run, chunk) if slot is None else spool.batch_json(run, slot.first, slot.count)


def attempt_record(spool: Spool, run: str, chunk: int, attempt: int, scan: RunScan | None = None) -> dict[str, Any] | None:
    """The record of failed attempt ``attempt`` of ``chunk`` (its history file, or its batch's
    slot), None where none can be read."""
    rec = result_or_none(spool.history_json(run, chunk, attempt))
    if rec is not None:
        return rec
    slot = (scan or scan_run(spool, run)).slot_of(chunk)
    if slot is None or slot.attempt != attempt or slot.code(chunk) not in (batches.HISTORY, batches.FINAL_FAILED):
        return None
    try:
        return read_slot_record(spool, run, slot).record(chunk)
    except (OSError, BadFile):
        return None


def final_status(spool: Spool, run: str, chunk: int, scan: RunScan) -> str | None:
    """"ok" or "failed" for a chunk with a committed result, None without a readable one; the
    file is read only for a chunk that ever failed (``RunScan.ok_by_name``)."""
    if chunk not in scan.finals:
        return None
    if scan.ok_by_name(chunk):
        return JobState.OK
    slot = scan.final_slot(chunk)
    if slot is not None:
        return JobState.OK if slot.code(chunk) == batches.OK else JobState.FAILED
    try:
        return read_result(spool.result_json(run, chunk))["status"]
    except (OSError, BadFile):
        return None


def read_result(path: Path, epoch: str | None = None) -> dict[str, Any]:
    """Read and check a result record; raises BadFile if it is not a valid one, OSError if it
    cannot be read (NotAFile: a folder or FIFO where the result belongs). With ``epoch`` (the
    run's, ``read_epoch``), a record of another epoch raises StaleResult: a job queued before the
    run was started afresh committed it after the fresh start (records without one, made by
    older versions, pass).

    ``status``, ``chunk_id`` (that of the file name) and ``attempt`` must be right, and
    ``arrays`` must name an .npz of the chunk beside it, or the record is refused; other fields
    of the wrong type (``FIELDS``; the error's: ``jobs.outcomes.FIELDS``) are dropped with one
    warning naming the file. ``failure_of(rec)`` gives its error typed (``jobs.outcomes.Failure``)."""
    rec = read_json(path, "result", RESULT_LIMIT)
    if not isinstance(rec, dict) or rec.get("status") not in (JobState.OK, JobState.FAILED):
        raise BadFile("result has no valid 'status'", path)
    if not is_int(rec.get("chunk_id")) or not is_int(rec.get("attempt")):
        raise BadFile("result has no integer 'chunk_id'/'attempt'", path)
    named = RESULT_RE.match(path.name) or HISTORY_RE.match(path.name)
    if named is not None and int(named.group(1)) != rec["chunk_id"]:
        raise BadFile(f"result says chunk {rec['chunk_id']}, not the {int(named.group(1))} of its name", path)
    arrays = rec.get("arrays")
    if arrays is not None:  # a file name in the result's own folder, of its own chunk: nothing else
        m = ARRAYS_RE.match(arrays) if isinstance(arrays, str) else None
        if m is None or int(m.group(1)) != rec["chunk_id"]:
            raise BadFile(f"result names arrays {brief(arrays)}, not an .npz of its chunk", path)
    if epoch is not None and rec.get("epoch", epoch) != epoch:
        raise StaleResult(f"result was committed for an earlier start of the run (epoch {brief(rec['epoch'])}, "
                          f"now {epoch}: --fresh)", path)
    bad = clean(rec, FIELDS)
    if bad:
        warn_once(f"{path}: result fields of the wrong type ignored: {', '.join(bad)}")
    return rec


def result_or_none(path: Path, epoch: str | None = None) -> dict[str, Any] | None:
    """``read_result``, or None for a missing, unreadable or refused file (for display)."""
    try:
        return read_result(path, epoch)
    except (OSError, BadFile):
        return None


def chunk_records(spool: Spool, run: str, chunk: int, scan: RunScan | None = None
                  ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(the chunk's committed result or None, the records of its failed attempts, oldest first;
    an unreadable one as ``{"attempt": N, "status": "unreadable"}``), from its own files or its
    batch's slot. ``scan``: the run's listing, where the caller has one."""
    scan = scan or scan_run(spool, run)
    try:
        result: dict[str, Any] | None = chunk_result(spool, run, chunk, scan)
    except (OSError, BadFile):
        result = None
    history = [attempt_record(spool, run, chunk, a, scan) or {"attempt": a, "status": "unreadable"}
               for a in scan.history.get(chunk, [])]
    return result, history


def _discard(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
