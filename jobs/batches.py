"""Batches: several short chunks in one job, their results committed together in one file.

A master sends a run's short chunks (``master.core.batching``) as one job whose ``batch`` is
their count: chunks ``first`` .. ``first + count - 1``, all at their first attempt. Its worker
runs them in one request, and the agent commits their outcomes as one record, the batch's
*slot* ``results/<run>/<first>+<count>.json``, by the same ``link`` that commits a single
chunk's result: exactly one record takes the slot, whoever finishes first.

What a committed slot says of each of its chunks (``Slot.codes``, one letter a chunk):

* ``o``: ok, its final result; ``f``: failed at its last attempt, its final result;
* ``h``: failed with attempts left: history only (its next attempt runs as a single chunk);
* ``b``: handed back, not run or its value could not be kept in the batch (it runs again as a
  single chunk, at no cost).

A batch that goes back to a master (its agent died, froze or drains; it was moved to an idle
agent) is *fenced*: the master links a record of its own, ``{"fenced": why}``, at the slot. If
that link wins, the batch can never commit, and its chunks go on as single chunks (where one of
them kills agents, the loss rules find it); if it loses, the batch committed first and its
outcomes count. Either way each chunk has at most one final result: the slot's, or its own
``<chunk>.json`` after the slot was fenced or said ``h`` or ``b`` of it.

The record keeps what the chunks share once (run, attempt, agent, host, times) and each
chunk's value and duration in columns, so a million chunks' results take about the space of
their values. ``Slot.record(c)`` gives a chunk's record as ``jobs.results.read_result`` reads a
single one; every reader goes through ``jobs.results`` (``scan_run``, ``chunk_result``), which
reads slots as it reads single results.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from gpupool.jobs.atomic import move_in, read_bounded, write_exclusive
from gpupool.jobs.descriptor import Job, JobState
from gpupool.jobs.errors import BadFile
from gpupool.jobs.jsonio import is_int, is_num, load_json
from gpupool.jobs.names import brief
from gpupool.jobs.paths import ARRAYS_RE, BATCH_RE, Spool

BATCH_SCHEMA = 1
BATCH_LIMIT = 64 * 1024 * 1024  # readers refuse a larger slot; a batch's values beyond it are handed back
SHARED = ("agent", "host", "pid", "gpu_id", "device", "gpu_uuids")  # a batch's fields that are every chunk's
OK, FINAL_FAILED, HISTORY, BACK = "o", "f", "h", "b"
CLAIMED = (OK, FINAL_FAILED)  # a chunk's final result is in the slot


@dataclass(frozen=True)
class Slot:
    """A batch's slot as read back: its chunks' outcomes (``codes``) and, unless only the codes
    were kept (``scan``), the record they came from."""

    run: str
    first: int
    count: int
    attempt: int
    codes: str  # one letter a chunk (see the module); all "b" for a fenced slot
    fenced: str | None = None  # why a master fenced it (then no chunk of it has an outcome here)
    rec: dict[str, Any] | None = None

    @property
    def chunks(self) -> range:
        return range(self.first, self.first + self.count)

    def code(self, chunk: int) -> str:
        return self.codes[chunk - self.first]

    @functools.cached_property
    def _columns(self) -> "_Columns":
        return _Columns.of(self)

    def record(self, chunk: int) -> dict[str, Any]:
        """Chunk ``chunk``'s result record, as a single chunk's reads (``read_result``); ``batch``
        names the slot."""
        i = chunk - self.first
        assert self.rec is not None and 0 <= i < self.count
        code, cols = self.codes[i], self._columns
        out: dict[str, Any] = {**cols.common, "chunk_id": chunk,
                               "status": JobState.OK.value if code == OK else JobState.FAILED.value,
                               "batch": [self.first, self.count]}
        if cols.params is not None and i < len(cols.params):
            out["params"] = cols.params[i]
        duration = cols.durations[i]
        if cols.start is not None:  # each chunk started when the ones before it in the batch had run
            out["started_at"] = cols.start + cols.ran[i]
            if duration is not None:  # and finished when it had run: where the next one started
                out["finished_at"] = cols.start + cols.ran[i + 1]
        if duration is not None:
            out["duration_s"] = duration
        if code in (FINAL_FAILED, HISTORY):
            out["error"] = cols.errors.get(str(chunk)) or {"type": "Unknown", "message": "no error recorded"}
        else:
            out["value"] = cols.values[i]
        if cols.arrays and (arrays := cols.arrays.get(str(chunk))) is not None:
            out["arrays"] = arrays
            out["arrays_bytes"] = (self.rec.get("arrays_bytes") or {}).get(str(chunk))
            if form := (self.rec.get("arrays_form") or {}).get(str(chunk)):
                out["arrays_form"] = form
        return out


@dataclass(frozen=True)
class Block:
    """Consecutive chunks of one slot with the same outcome (``code``, ``o`` or ``f``), read as
    columns: for readers of a whole run (``collect``), which then make no record a chunk.
    ``records()`` gives them as ``Slot.record`` does, one by one."""

    slot: Slot
    chunks: range
    code: str

    @property
    def status(self) -> str:
        return JobState.OK.value if self.code == OK else JobState.FAILED.value

    @property
    def common(self) -> dict[str, Any]:
        """The fields every chunk's record shares (run, attempt, agent, host, device...)."""
        return self.slot._columns.common

    def records(self) -> Iterator[dict[str, Any]]:
        return map(self.slot.record, self.chunks)

    def _slice(self, column: list[Any]) -> list[Any]:
        lo = self.chunks.start - self.slot.first
        return column[lo:lo + len(self.chunks)]

    @property
    def durations(self) -> list[float | None]:
        return self._slice(self.slot._columns.durations)

    @property
    def values(self) -> list[Any]:
        return self._slice(self.slot._columns.values)

    @property
    def params(self) -> list[Any] | None:
        """Each chunk's sweep parameters (None where it has none), or None: no chunk has any."""
        params = self.slot._columns.params
        if params is None:
            return None
        got = self._slice(params)
        return got + [None] * (len(self.chunks) - len(got))

    def edges(self) -> list[float] | None:
        """When each chunk started, and when the last one finished (a chunk finished when the next
        one started), as ``Slot.record`` has them; None where the batch's start is not known."""
        cols = self.slot._columns
        if cols.start is None:
            return None
        lo = self.chunks.start - self.slot.first
        start = cols.start
        return [start + r for r in cols.ran[lo:lo + len(self.chunks) + 1]]

    @property
    def has_arrays(self) -> bool:
        arrays = self.slot._columns.arrays
        return bool(arrays) and any(str(c) in arrays for c in self.chunks)


@dataclass(frozen=True)
class _Columns:
    """What ``Slot.record`` needs of a slot's record, prepared once (a batch of many chunks is read
    whole, chunk by chunk)."""

    common: dict[str, Any]  # the fields every chunk's record shares
    durations: list[float | None]
    ran: list[float]  # for each chunk, how long the chunks before it in the batch ran; then all of them
    start: float | None
    values: list[Any]
    params: list[Any] | None
    errors: dict[str, Any]
    arrays: dict[str, Any]

    @classmethod
    def of(cls, slot: Slot) -> "_Columns":
        rec = slot.rec or {}
        common = {"schema": rec.get("schema", BATCH_SCHEMA), "run": slot.run, "total_chunks": rec.get("total_chunks"),
                  "attempt": slot.attempt, "max_attempts": rec.get("max_attempts"),
                  "submitted_at": rec.get("submitted_at")}
        common.update((name, rec[name]) for name in ("epoch", *SHARED) if name in rec)
        durations = [d if (type(d) is float and d - d == 0.0) or type(d) is int else None  # is_num, a million times
                     for d in rec.get("durations") or []]
        durations += [None] * (slot.count - len(durations))
        ran, total = [], 0.0
        for d in durations:
            ran.append(total)
            total += d or 0.0
        ran.append(total)
        values = list(rec.get("values") or [])
        params = rec.get("params")
        start = rec.get("started_at")
        return cls(common, durations, ran, start if is_num(start) else None,
                   values + [None] * (slot.count - len(values)), params if isinstance(params, list) else None,
                   rec.get("errors") or {}, rec.get("arrays") or {})


def outcome_code(job: Job, status: JobState) -> str:
    """The letter of a chunk of ``job`` that ended with ``status`` (ok or failed)."""
    if status is JobState.OK:
        return OK
    return FINAL_FAILED if job.attempt >= job.max_attempts else HISTORY


def batch_record(job: Job, codes: str, *, values: list[Any], durations: list[float | None],
                 errors: dict[int, dict[str, Any]], arrays: dict[int, tuple[str, int, str | None]] | None = None,
                 **fields: Any) -> dict[str, Any]:
    """The slot record of ``job`` (a batch): ``codes`` one letter a chunk, ``values`` and
    ``durations`` one entry a chunk (None where it has none), ``errors`` the failures by chunk,
    ``arrays`` by chunk (file name, bytes, form); ``fields``: the shared ones (agent, host,
    started_at, finished_at...)."""
    assert job.batch is not None and len(codes) == len(values) == len(durations) == job.batch
    rec = {"schema": BATCH_SCHEMA, "run": job.run, "first": job.chunk_id, "count": job.batch,
           "total_chunks": job.total_chunks, "attempt": job.attempt, "max_attempts": job.max_attempts,
           "submitted_at": job.submitted_at, "codes": codes, "values": values, "durations": durations,
           **({"epoch": job.epoch} if job.epoch is not None else {}),
           **({"params": job.batch_params} if job.batch_params is not None else {}),
           **({"errors": {str(c): e for c, e in errors.items()}} if errors else {}), **fields}
    if arrays:
        rec["arrays"] = {str(c): a[0] for c, a in arrays.items()}
        rec["arrays_bytes"] = {str(c): a[1] for c, a in arrays.items()}
        if forms := {str(c): a[2] for c, a in arrays.items() if a[2]}:
            rec["arrays_form"] = forms
    return rec


def commit_batch(spool: Spool, job: Job, rec: dict[str, Any], arrays_tmp: dict[int, Path] | None = None) -> bool:
    """Commit a batch's record at its slot; True if it took the slot. ``arrays_tmp``: chunk ->
    the temp file of its arrays, moved to ``<chunk>.a<attempt>.npz`` first (each attempt's own
    name) and removed again where the slot was taken already. Values that would make the record
    larger than ``BATCH_LIMIT`` are handed back (``b``) instead. An OSError (a full disk) leaves
    nothing behind but the temp files, and the commit can be tried again."""
    arrays_tmp = arrays_tmp or {}
    data = _encoded_within(rec)
    spool.real_dir(spool.result_dir(job.run), make=False)  # no link followed (see results.commit)
    slot = spool.batch_json(job.run, job.chunk_id, job.batch or 1)
    if slot.exists():
        _discard(*arrays_tmp.values())
        return False
    moved: dict[Path, Path] = {}
    named = rec.get("arrays") or {}
    try:
        for c, tmp in arrays_tmp.items():
            if str(c) in named:
                final = spool.result_npz(job.run, c, job.attempt)
                move_in(tmp, final)
                moved[final] = tmp
            else:
                _discard(tmp)
        if write_exclusive(slot, data, fsync=False):
            return True
    except BaseException:  # a full disk: no arrays without their commit, ours back for the next try
        for final, tmp in moved.items():
            try:
                os.replace(final, tmp)
            except OSError:
                _discard(final)
        raise
    _discard(*moved)
    return False


def _encoded_within(rec: dict[str, Any]) -> bytes:
    """``rec`` as JSON, its largest values handed back (``b``) until it fits ``BATCH_LIMIT``."""
    data = json.dumps(rec, default=str).encode()
    if len(data) <= BATCH_LIMIT:
        return data
    codes, values, first = list(rec["codes"]), rec["values"], rec["first"]
    sizes = sorted(((len(json.dumps(v, default=str)), i) for i, v in enumerate(values)), reverse=True)
    over = len(data) - BATCH_LIMIT
    for size, i in sizes:
        if over <= 0:
            break
        codes[i], values[i], over = BACK, None, over - size
        for name in ("arrays", "arrays_bytes", "arrays_form", "errors"):
            (rec.get(name) or {}).pop(str(first + i), None)
    rec["codes"] = "".join(codes)
    return json.dumps(rec, default=str).encode()


def fence(spool: Spool, run: str, first: int, count: int, attempt: int, why: str) -> bool:
    """A master takes back attempt ``attempt`` of the batch of chunks ``first`` .. ``first + count
    - 1``: True if the batch can no longer commit (this fence took its slot, or an earlier one
    did), False if the batch committed first (its outcomes count)."""
    spool.real_dir(spool.result_dir(run), make=False)
    slot = spool.batch_json(run, first, count)
    rec = {"schema": BATCH_SCHEMA, "run": run, "first": first, "count": count, "attempt": attempt, "fenced": why}
    if write_exclusive(slot, json.dumps(rec).encode(), fsync=False):
        return True
    return read_slot(slot).fenced is not None


def read_slot(path: Path, epoch: str | None = None, keep: bool = True) -> Slot:
    """Read and check a slot (``keep``: with its record, for ``Slot.record``). Raises BadFile if
    it is not a valid one (StaleBatch: of an earlier start of the run, ``--fresh``), OSError if it
    cannot be read."""
    from gpupool.jobs.results import StaleResult

    m = BATCH_RE.match(path.name)
    if m is None:
        raise BadFile("not a batch's results file (<first>+<count>.json)", path)
    first, count = int(m.group(1)), int(m.group(2))
    rec = load_json(read_bounded(path, BATCH_LIMIT), "batch results", path)
    if not isinstance(rec, dict) or rec.get("first") != first or rec.get("count") != count:
        raise BadFile(f"batch results do not say chunks {first} .. {first + count - 1} of their name", path)
    run, attempt = rec.get("run"), rec.get("attempt")
    if not isinstance(run, str) or not is_int(attempt):
        raise BadFile("batch results have no 'run' or integer 'attempt'", path)
    if (why := rec.get("fenced")) is not None:
        return Slot(run, first, count, attempt, BACK * count, str(why))
    codes = rec.get("codes")
    if not isinstance(codes, str) or len(codes) != count or set(codes) - {OK, FINAL_FAILED, HISTORY, BACK}:
        raise BadFile(f"batch results' 'codes' must be {count} letters of o, f, h, b", path)
    for name in ("values", "durations"):
        if not isinstance(rec.get(name), list) or len(rec[name]) != count:
            raise BadFile(f"batch results' {name!r} must be a list of {count}", path)
    for name in ("errors", "arrays", "arrays_bytes", "arrays_form"):
        if not isinstance(rec.get(name, {}), dict):
            raise BadFile(f"batch results' {name!r} must be an object", path)
    for c, name in (rec.get("arrays") or {}).items():
        a = ARRAYS_RE.match(name) if isinstance(name, str) else None
        if a is None or a.group(1).lstrip("0") != c.lstrip("0"):
            raise BadFile(f"batch results name arrays {brief(name)} for chunk {brief(c)}, not an .npz of it", path)
    if epoch is not None and rec.get("epoch", epoch) != epoch:
        raise StaleResult(f"batch results were committed for an earlier start of the run (epoch "
                          f"{brief(rec['epoch'])}, now {epoch}: --fresh)", path)
    return Slot(run, first, count, attempt, codes, None, rec if keep else None)


def _discard(*paths: Path) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
