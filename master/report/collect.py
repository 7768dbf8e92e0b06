"""``python -m master collect``: a run's results gathered into one file.

* ``.npz``: each array key stacked over the chunks in chunk order (shape ``(chunks, ...)``), or
  concatenated along the first axis with ``concat``; plus ``chunk_id`` (the chunks included)
  and ``run_json`` (the run's metadata and each chunk's agent and times, as JSON text).
* ``.csv`` / ``.jsonl``: one row per chunk: run, chunk_id, status, attempt, agent, host (the
  machine that ran it), device (``cuda:0`` as the job saw it, or ``cpu``), gpu_id (the GPU that
  ran it, as its agent's ``--gpu`` numbers it: the index among that host's visible GPUs; the
  first of an agent of several; a ``--cpu`` agent's rank), started_at, finished_at (ISO 8601
  with the time zone; ``*_epoch``: the Unix time),
  duration_s, the chunk's sweep parameters (``master.spec.sweep``; a name that is also one of these
  columns becomes ``param.<name>``), and the value (a dict's keys become columns; other values a
  ``value`` column, JSON-encoded in CSV when not a plain scalar). A command job's ``--result-file``
  table (a list of row objects) gives one row per table row, each with its chunk's columns.
* ``.parquet`` (where pyarrow is installed): the same table, readable by ``pandas.read_parquet``.

With no ``--out``: ``RUN.npz`` (arrays) or ``RUN.csv`` (values) in the current folder.
The output is written to a temporary name beside it and renamed into place.
"""
from __future__ import annotations

import contextlib
import csv
import gc
import io
import itertools
import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from gpupool.jobs.atomic import write_replace
from gpupool.jobs.codec import plain
from gpupool.jobs.descriptor import JobState
from gpupool.jobs.errors import SpoolError
from gpupool.jobs.npzio import load_npz
from gpupool.jobs.paths import Spool
from gpupool.jobs.jsonio import is_time
from gpupool.jobs.results import chunk_results, read_epoch, scan_run
from gpupool.master.spec.runspec import RunSpec, load_run


def _meta(rec: dict[str, Any]) -> dict[str, Any]:
    """A record's metadata columns, in their order (spelled out: a million rows are made so)."""
    g = rec.get
    return {"run": g("run"), "chunk_id": g("chunk_id"), "status": g("status"), "attempt": g("attempt"),
            "agent": g("agent"), "host": g("host"), "device": g("device"), "gpu_id": g("gpu_id"),
            "started_at": g("started_at"), "finished_at": g("finished_at"), "duration_s": g("duration_s")}


META = tuple(_meta({}))
FORMATS = (".npz", ".csv", ".jsonl", ".parquet")


class CollectError(SpoolError):
    """The run's results cannot be gathered as asked; the message says what to do."""


@dataclass
class Collected:
    out: Path
    rows: int
    skipped: list[int]
    keys: list[str]


def committed(spool: Spool, spec: RunSpec, partial: bool) -> tuple[list[dict[str, Any]], list[int]]:
    """The ok result records in chunk order, and the chunks left out (missing or failed)."""
    recs, failed, read = [], [], set()
    scan, epoch = scan_run(spool, spec.name), read_epoch(spool, spec.name)
    for c, rec in chunk_results(spool, spec.name, range(spec.chunks), scan, epoch):  # its own file or its batch's
        if isinstance(rec, Exception):  # broken, stale, or not a file (a folder where it belongs): missing
            continue
        read.add(c)
        if rec["status"] == JobState.OK:
            recs.append(rec)
        else:
            failed.append(c)
    missing = [c for c in range(spec.chunks) if c not in read]
    skipped = sorted(missing + failed)
    if skipped and not partial:
        why = [f"{len(failed)} chunk(s) failed {_few(failed)}"] if failed else []
        why += [f"{len(missing)} chunk(s) have no result yet {_few(missing)}"] if missing else []
        raise CollectError(
            f"run {spec.name}: {' and '.join(why)}. Retry them (python -m master retry --base {spool.base} "
            f"--run {spec.name}), or pass --partial to collect the ok chunks only")
    if not recs:
        raise CollectError(f"run {spec.name}: no chunk has an ok result yet; nothing to collect")
    return recs, skipped


def _few(chunks: list[int]) -> str:
    return f"({', '.join(map(str, chunks[:10]))}{' ...' if len(chunks) > 10 else ''})"


def collect(spool: Spool, run: str, out: str | os.PathLike | None = None, concat: bool = False,
            partial: bool = False) -> Collected:
    """Gather ``run``'s results into ``out`` (format by extension; None: ``RUN.npz`` for a run that
    returned arrays, ``RUN.csv`` for one that returned values, in the current folder); see the
    module docstring."""
    if out is not None and Path(out).suffix.lower() not in FORMATS:
        raise CollectError(f"--out {out}: the name must end in .npz (arrays), .csv, .jsonl or .parquet (values)")
    spec = load_run(spool, run)
    with _no_gc():
        return _collect(spool, spec, out, concat, partial)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """The cycle collector paused: a run of a million chunks makes millions of records and rows,
    none of them in a cycle, and the collector would walk them over and over."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _collect(spool: Spool, spec: RunSpec, out: str | os.PathLike | None, concat: bool, partial: bool) -> Collected:
    run = spec.name
    recs, skipped = committed(spool, spec, partial)
    has_arrays = any(r.get("arrays") for r in recs)
    out = Path(out if out is not None else f"{spec.name}.{'npz' if has_arrays else 'csv'}")
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".npz":
        if not has_arrays:
            raise CollectError(f"run {run} returned JSON values, not arrays; use --out FILE.csv or FILE.jsonl")
        keys = _write_npz(spool, spec, recs, out, concat)
    else:
        if has_arrays:
            raise CollectError(f"run {run} returned arrays; use --out FILE.npz (add --concat to join them "
                               "along the first axis)")
        keys = _write_table(recs, out)
    return Collected(out, len(recs), skipped, keys)


def _write_npz(spool: Spool, spec: RunSpec, recs: list[dict[str, Any]], out: Path, concat: bool) -> list[str]:
    per_key: dict[str, list[np.ndarray]] = {}
    for rec in recs:
        npz = spool.arrays_of(spec.name, rec)
        arrays = load_npz(npz) if npz is not None else {}
        if per_key and set(arrays) != set(per_key):
            raise CollectError(f"chunk {rec['chunk_id']} returned arrays {sorted(arrays)} but earlier chunks "
                               f"returned {sorted(per_key)}; every chunk must return the same keys")
        for k, a in arrays.items():
            per_key.setdefault(k, []).append(np.asarray(a))
    joined = {k: _join(k, v, [r["chunk_id"] for r in recs], concat) for k, v in per_key.items()}
    for reserved in ("chunk_id", "run_json"):
        if reserved in joined:
            raise CollectError(f"the chunks return an array named {reserved!r}, which collect uses itself")
    meta = {"spec": {**asdict(spec), "kind": spec.kind.value},
            "chunks": [_meta(r) for r in recs]}
    joined["chunk_id"] = np.array([r["chunk_id"] for r in recs], dtype=np.int64)
    joined["run_json"] = np.array(json.dumps(meta, default=str))
    buf = io.BytesIO()
    np.savez(buf, **joined)
    write_replace(out.resolve(), buf.getvalue())
    return sorted(per_key)


def _join(key: str, arrays: list[np.ndarray], chunks: list[int], concat: bool) -> np.ndarray:
    if concat:
        tails = {a.shape[1:] for a in arrays}
        if any(a.ndim == 0 for a in arrays) or len(tails) > 1:
            raise CollectError(f"array {key!r}: cannot concatenate shapes {_shapes(arrays, chunks)} along the "
                               "first axis (all but the first dimension must match)")
        return np.concatenate(arrays, axis=0)
    if len({a.shape for a in arrays}) > 1:
        raise CollectError(f"array {key!r} has different shapes across chunks {_shapes(arrays, chunks)}; "
                           "pass --concat to join them along the first axis")
    return np.stack(arrays)


def _shapes(arrays: list[np.ndarray], chunks: list[int]) -> str:
    seen: dict[tuple, int] = {}
    for a, c in zip(arrays, chunks):
        seen.setdefault(a.shape, c)
    return ", ".join(f"{s} (chunk {c})" for s, c in list(seen.items())[:4])


def rows(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows: per chunk, the metadata columns, its parameters, then the value's."""
    out = []
    for rec in recs:
        row = _meta(rec)
        start, end = row["started_at"], row["finished_at"]  # ISO 8601 with the time zone; the epoch beside it
        row["started_at"], row["finished_at"] = iso_time(start), iso_time(end)
        row["started_at_epoch"], row["finished_at_epoch"] = start, end
        params = rec.get("params")
        if isinstance(params, dict):
            row.update({(k if k not in row else f"param.{k}"): v for k, v in params.items()})
        value = rec.get("value")
        if isinstance(value, (list, dict)):
            value = plain(value)  # a tuple as the list it always was in a table
        table = rec.get("result_file") and isinstance(value, list) and value and \
            all(isinstance(v, dict) for v in value)
        if table:
            out += [_with_value(dict(row), v) for v in value]
        elif isinstance(value, dict):
            out.append(_with_value(row, value))
        else:
            row["value"] = value
            out.append(row)
    return out


def _with_value(row: dict[str, Any], value: Any) -> dict[str, Any]:
    """``row`` with the value's columns (a key already there, with another value, becomes ``value.<key>``)."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            if k in META or (k in row and row[k] != v):
                row[f"value.{k}"] = v
            else:
                row[k] = v
    else:
        row["value"] = value
    return row


def iso_time(t: Any) -> str | None:
    """A Unix time as ISO 8601 in this machine's time zone (``2026-12-01T14:30:05.123+01:00``),
    as ``datetime.isoformat(timespec="milliseconds")`` writes it; each second's text is made once
    (a run of a million short chunks has two times a row)."""
    if type(t) is not float or not 0.0 <= t < 2.0**33:  # the common case first: is_time of a float
        if not is_time(t):
            return None
    sec = int(t)
    us = int((t - sec) * 1e6 + 0.5)  # as datetime.fromtimestamp rounds (half-even: the same milliseconds)
    if us >= 1_000_000:
        sec, us = sec + 1, us - 1_000_000
    parts = _SECONDS.get(sec)
    if parts is None:
        text = datetime.fromtimestamp(sec, timezone.utc).astimezone().isoformat(timespec="seconds")
        if len(_SECONDS) >= 100_000:
            _SECONDS.clear()
        parts = _SECONDS[sec] = (text[:19], text[19:])  # YYYY-MM-DDTHH:MM:SS, then the zone's offset
    return parts[0] + _MILLIS[us // 1000] + parts[1]


_MILLIS = [f".{i:03d}" for i in range(1000)]
_SECONDS: dict[int, tuple[str, str]] = {}


def _write_table(recs: list[dict[str, Any]], out: Path) -> list[str]:
    table = rows(recs)
    columns = list(dict.fromkeys(itertools.chain.from_iterable(table)))  # in order of first appearance
    if out.suffix.lower() == ".jsonl":
        line = _line_encoder()
        data = "".join([line(r) for r in table])
    elif out.suffix.lower() == ".parquet":
        write_replace(out.resolve(), _parquet(table, columns))
        return _value_columns(columns, recs)
    else:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        cells = (list(map(r.get, columns)) for r in table)
        w.writerows(c if _SCALARS.issuperset(map(type, c)) else list(map(_cell, c)) for c in cells)  # None: empty
        data = buf.getvalue()
    write_replace(out.resolve(), data.encode())
    return _value_columns(columns, recs)


def _line_encoder() -> Any:
    """A row as one line of JSON, as ``json.dumps(row, default=str)`` writes it: through the C
    encoder made once (``json.dumps`` makes one a row, half the time of a million rows), where
    this Python has it."""
    from json import encoder

    if encoder.c_make_encoder is None:
        return lambda r: json.dumps(r, default=str) + "\n"
    enc = encoder.c_make_encoder(None, str, encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True)
    return lambda r: enc(r, 0)[0] + "\n"


def _value_columns(columns: list[str], recs: list[dict[str, Any]]) -> list[str]:
    """The columns that come from the values (not collect's own, not the sweep's parameters)."""
    params = {k for r in recs if isinstance(r.get("params"), dict) for k in r["params"]}
    return [c for c in columns if c not in META and not c.endswith("_at_epoch") and c not in params
            and not (c.startswith("param.") and c[6:] in params)]


def _parquet(table: list[dict[str, Any]], columns: list[str]) -> bytes:
    """The table as Parquet bytes; a column of mixed or nested values is stored as JSON text."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise CollectError("--out FILE.parquet needs pyarrow (pip install pyarrow); or use .csv or .jsonl") from None
    cols: dict[str, list[Any]] = {}
    for c in columns:
        cells = [r.get(c) for r in table]
        kinds = {type(v) for v in cells if v is not None}
        if not (kinds <= {int, float} or kinds == {str} or kinds == {bool}):
            cells = [None if v is None else json.dumps(v, default=str) for v in cells]
        cols[c] = cells
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf)
    return buf.getvalue()


_SCALARS = frozenset((type(None), str, int, float, bool))  # written as they are by csv (None as an empty cell)


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    return v if isinstance(v, (str, int, float)) else json.dumps(v)  # a bool is an int
