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
import math
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import numpy as np

from gpupool.jobs import batches
from gpupool.jobs.atomic import write_replace
from gpupool.jobs.codec import plain
from gpupool.jobs.descriptor import JobState
from gpupool.jobs.errors import SpoolError
from gpupool.jobs.npzio import load_npz
from gpupool.jobs.paths import Spool
from gpupool.jobs.jsonio import is_time
from gpupool.jobs.results import read_epoch, result_blocks, scan_run
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


Piece = "dict[str, Any] | batches.Block"  # one chunk's record, or a batch's chunks read as columns


def committed(spool: Spool, spec: RunSpec, partial: bool) -> tuple[list[Piece], list[int]]:
    """The ok results in chunk order (records, and blocks of a batch's chunks: ``records``
    gives every one as a record), and the chunks left out (missing or failed)."""
    pieces: list[Piece] = []
    failed: list[int] = []
    read: set[int] = set()
    scan, epoch = scan_run(spool, spec.name, records=True), read_epoch(spool, spec.name)
    for c, got in result_blocks(spool, spec.name, range(spec.chunks), scan, epoch):  # own files, batches' slots
        if type(got) is batches.Block:
            read.update(got.chunks)
            if got.code == batches.OK:
                pieces.append(got)
            else:
                failed += got.chunks
        elif isinstance(got, Exception):  # broken, stale, or not a file (a folder where it belongs): missing
            continue
        else:
            read.add(c)
            if got["status"] == JobState.OK:
                pieces.append(got)
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
    if not pieces:
        raise CollectError(f"run {spec.name}: no chunk has an ok result yet; nothing to collect")
    return pieces, skipped


def records(pieces: list[Piece]) -> Iterator[dict[str, Any]]:
    """Every chunk's record, a batch's as ``Slot.record`` makes it."""
    for p in pieces:
        if type(p) is batches.Block:
            yield from p.records()
        else:
            yield p


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
    pieces, skipped = committed(spool, spec, partial)
    has_arrays = any(p.has_arrays if type(p) is batches.Block else p.get("arrays") for p in pieces)
    out = Path(out if out is not None else f"{spec.name}.{'npz' if has_arrays else 'csv'}")
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".npz":
        if not has_arrays:
            raise CollectError(f"run {run} returned JSON values, not arrays; use --out FILE.csv or FILE.jsonl")
        keys = _write_npz(spool, spec, list(records(pieces)), out, concat)
    else:
        if has_arrays:
            raise CollectError(f"run {run} returned arrays; use --out FILE.npz (add --concat to join them "
                               "along the first axis)")
        keys = _write_table(pieces, out)
    chunks = sum(len(p.chunks) if type(p) is batches.Block else 1 for p in pieces)
    return Collected(out, chunks, skipped, keys)


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


def rows(recs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
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


class Same(NamedTuple):
    """A column whose every row has this one cell."""

    cell: Any


class Texts(NamedTuple):
    """A column of numbers with each one's text, which JSON and CSV write alike (a finite float's repr)."""

    cells: list[Any]
    texts: list[str]


@dataclass
class Rows:
    """Rows that have the same columns in the same order, held as columns (each a list of cells,
    or ``Same``): a batch's chunks, as ``rows`` would make them one by one."""

    n: int
    columns: dict[str, list[Any] | Same | Texts]

    def column(self, name: str) -> Iterable[Any]:
        """The column's cells (None where these rows have no such column)."""
        col = self.columns.get(name, _NONE)
        return itertools.repeat(col.cell, self.n) if type(col) is Same else col.cells if type(col) is Texts else col


_NONE = Same(None)


def block_rows(block: batches.Block) -> Rows | list[dict[str, Any]]:
    """A batch's ok chunks' rows: as columns where every row has the same columns in the same
    order (the parameters' keys and the values' are the same for every chunk), else ``rows`` of
    their records."""
    common, chunks, durations, edges = block.common, block.chunks, block.durations, block.edges()
    begun: list[Any] | Same | Texts
    ended: list[Any] | Same | Texts
    if edges is None:
        begun = ended = texts_begun = texts_ended = _NONE
    else:  # each time's texts made once: a chunk finished when the next one started
        texts = iso_times(edges)
        begun, ended, texts_begun, texts_ended = edges[:-1], edges[1:], texts[:-1], texts[1:]
        if all(map(math.isfinite, edges)):
            reprs = list(map(float.__repr__, edges))
            begun, ended = Texts(edges[:-1], reprs[:-1]), Texts(edges[1:], reprs[1:])
        if None in durations:  # no finish where no duration
            ended = [None if d is None else e for d, e in zip(durations, edges[1:])]
            texts_ended = [None if d is None else e for d, e in zip(durations, texts_ended)]
    cols: dict[str, list[Any] | Same | Texts] = {
        "run": Same(common.get("run")), "chunk_id": list(chunks), "status": Same(block.status),
        "attempt": Same(common.get("attempt")), "agent": Same(common.get("agent")), "host": Same(common.get("host")),
        "device": Same(common.get("device")), "gpu_id": Same(common.get("gpu_id")),
        "started_at": texts_begun, "finished_at": texts_ended, "duration_s": durations,
        "started_at_epoch": begun, "finished_at_epoch": ended}
    params = block.params
    if params is not None and any(p is not None for p in params):
        names = _same_keys(params)
        if names is None:
            return rows(block.records())
        named = {(k if k not in cols else f"param.{k}"): k for k in names}  # as rows names them: the last wins
        cols.update((name, [p[k] for p in params]) for name, k in named.items())
    values = block.values
    if not _SCALARS.issuperset(map(type, values)):
        values = [plain(v) if isinstance(v, (list, dict)) else v for v in values]
    if _SCALARS.issuperset(map(type, values)) or not any(type(v) is dict and v for v in values):
        cols["value"] = _NONE if values.count(None) == len(values) else values  # a task that returns nothing
        return Rows(len(chunks), cols)
    keys = _same_keys(values)
    if keys is None or not keys:
        return rows(block.records())  # some values are no dict, or their keys differ
    named = {(f"value.{k}" if k in META else k): k for k in keys}
    if len(named) < len(keys) or any(name in cols for name in named):
        return rows(block.records())  # a key that is a parameter's or an epoch's: its name depends on its value
    cols.update((name, [v[k] for v in values]) for name, k in named.items())
    return Rows(len(chunks), cols)


def _same_keys(dicts: list[Any]) -> tuple[str, ...] | None:
    """The keys, in order, that every one of ``dicts`` has; None where one is no dict or their keys differ."""
    first = dicts[0]
    if type(first) is not dict:
        return None
    keys = tuple(first)
    for d in dicts:
        if type(d) is not dict or len(d) != len(keys) or tuple(d) != keys:
            return None
    return keys


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
    parts = _second(sec)
    return parts[0] + _MILLIS[us // 1000] + parts[1]


_MILLIS = [f".{i:03d}" for i in range(1000)]
_SECONDS: dict[int, tuple[str, str]] = {}


def iso_times(times: list[Any]) -> list[str | None]:
    """``iso_time`` of each of ``times`` (a batch's column): where all are times, with numpy's
    arithmetic (the same as ``iso_time``'s) and each second's text made once."""
    if not times or set(map(type, times)) != {float} or not 0.0 <= min(times) <= max(times) < 2.0**33:
        return [iso_time(t) for t in times]
    t = np.array(times, dtype=np.float64)
    sec = t.astype(np.int64)
    us = ((t - sec) * 1e6 + 0.5).astype(np.int64)
    over = us >= 1_000_000
    sec[over] += 1
    us[over] -= 1_000_000
    secs = sec.tolist()
    parts = {s: _second(s) for s in set(secs)}
    millis = _MILLIS
    return [parts[s][0] + millis[m] + parts[s][1] for s, m in zip(secs, (us // 1000).tolist())]


def _second(sec: int) -> tuple[str, str]:
    """The second's text (YYYY-MM-DDTHH:MM:SS) and its zone's offset, in this machine's time zone."""
    parts = _SECONDS.get(sec)
    if parts is None:
        text = datetime.fromtimestamp(sec, timezone.utc).astimezone().isoformat(timespec="seconds")
        if len(_SECONDS) >= 100_000:
            _SECONDS.clear()
        parts = _SECONDS[sec] = (text[:19], text[19:])
    return parts


Table = "list[dict[str, Any] | Rows]"  # the rows in chunk order: one a dict, or a batch's as columns


def table_of(pieces: list[Piece]) -> Table:
    table: Table = []
    for p in pieces:
        if type(p) is batches.Block:
            got = block_rows(p)
            if type(got) is Rows:
                table.append(got)
            else:
                table += got
        else:
            table += rows([p])
    return table


def columns_of(table: Table) -> list[str]:
    """The table's columns, in order of first appearance."""
    return list(dict.fromkeys(itertools.chain.from_iterable(p.columns if type(p) is Rows else p for p in table)))


def _write_table(pieces: list[Piece], out: Path) -> list[str]:
    table = table_of(pieces)
    columns = columns_of(table)
    suffix = out.suffix.lower()
    data = _parquet(table, columns) if suffix == ".parquet" else _jsonl(table) if suffix == ".jsonl" else \
        _csv(table, columns)
    write_replace(out.resolve(), data)  # a table of text is written as it is made
    return _value_columns(columns, pieces)


def _csv(table: Table, columns: list[str]) -> Iterator[bytes]:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for part in table:
        if type(part) is Rows:
            buf.write(_csv_rows(part, columns))
        else:
            cells = list(map(part.get, columns))
            w.writerow(cells if _SCALARS.issuperset(map(type, cells)) else list(map(_cell, cells)))  # None: empty
        if buf.tell() >= _PIECE:
            yield buf.getvalue().encode(errors="backslashreplace")  # a lone surrogate as \udc80
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue().encode(errors="backslashreplace")


_PIECE = 1 << 20  # text written a megabyte or so at a time


def _csv_rows(part: Rows, columns: list[str]) -> str:
    """A batch's lines, as the csv module writes them: each column's cells made once."""
    shape, cells = [], []
    for name in columns:
        col = part.columns.get(name, _NONE)
        if type(col) is Same:
            shape.append(_csv_text(col.cell).replace("%", "%%"))
        else:
            shape.append("%s")
            cells.append(_csv_texts(col))
    line = ",".join(shape) + "\n"
    return "".join(map(line.__mod__, zip(*cells))) if cells else (line % ()) * part.n


def _csv_texts(col: list[Any] | Texts) -> list[str]:
    if type(col) is Texts:
        return col.texts
    kinds = set(map(type, col))
    if kinds <= _NUMBERS:  # as csv writes them: str(), None as an empty cell
        return list(map(str, col)) if type(None) not in kinds else ["" if v is None else str(v) for v in col]
    if kinds == {str} and not any(c in "".join(col) for c in _QUOTED):
        return col
    return list(map(_csv_text, col))


_QUOTED = (",", '"', "\r", "\n")  # a cell with one of these is quoted


def _csv_text(cell: Any) -> str:
    """One cell as csv writes it in a row of several."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([_cell(cell) if type(cell) not in _SCALARS else cell, None])
    return buf.getvalue()[:-2]  # less the empty last cell's comma and the line's end


def _jsonl(table: Table) -> Iterator[bytes]:
    """The rows as JSON lines, each as ``json.dumps(row, default=str)`` writes it."""
    enc = _encoder()
    lines: list[str] = []
    for part in table:
        if type(part) is not Rows:
            lines.append(enc(part) + "\n")
            if len(lines) >= 1000:
                yield "".join(lines).encode()
                lines.clear()
            continue
        shape, cells = [], []  # a batch's lines: its columns' names and every row's cells made once
        for name, col in part.columns.items():
            key = enc(name).replace("%", "%%") + ": "
            if type(col) is Same:
                shape.append(key + enc(col.cell).replace("%", "%%"))
            else:
                shape.append(key + "%s")
                cells.append(_encoded(col, enc))
        line = "{" + ", ".join(shape) + "}\n"
        lines.append("".join(map(line.__mod__, zip(*cells))) if cells else (line % ()) * part.n)
        yield "".join(lines).encode()
        lines.clear()
    yield "".join(lines).encode()


_NUMBERS = frozenset((type(None), int, float, bool))  # JSON text without a ", " inside
_quoted = json.encoder.encode_basestring_ascii  # a str as JSON text, as the encoder writes it (ensure_ascii)


def _encoded(col: list[Any] | Texts, enc: Callable[[Any], str]) -> list[str]:
    """Each cell as JSON text: a column of numbers encoded in one call (as a list, then split)."""
    if type(col) is Texts:
        return col.texts
    kinds = set(map(type, col))
    if kinds <= _NUMBERS:
        return enc(col)[1:-1].split(", ")
    if kinds == {str}:
        return list(map(_quoted, col))
    return list(map(enc, col))


def _encoder() -> Callable[[Any], str]:
    """A value as JSON text, as ``json.dumps(value, default=str)`` writes it: through the C
    encoder made once (``json.dumps`` makes one a call, half the time of a million rows), where
    this Python has it."""
    from json import encoder

    if encoder.c_make_encoder is None:
        return lambda v: json.dumps(v, default=str)
    enc = encoder.c_make_encoder(None, str, encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True)
    return lambda v: "".join(enc(v, 0))  # one string in a tuple; a list of pieces before Python 3.11


def _value_columns(columns: list[str], pieces: list[Piece]) -> list[str]:
    """The columns that come from the values (not collect's own, not the sweep's parameters)."""
    params = {k for r in pieces for p in (r.params or () if type(r) is batches.Block else [r.get("params")])
              if isinstance(p, dict) for k in p}
    return [c for c in columns if c not in META and not c.endswith("_at_epoch") and c not in params
            and not (c.startswith("param.") and c[6:] in params)]


def _parquet(table: Table, columns: list[str]) -> bytes:
    """The table as Parquet bytes; a column of mixed or nested values is stored as JSON text."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise CollectError("--out FILE.parquet needs pyarrow (pip install pyarrow); or use .csv or .jsonl") from None
    buf = io.BytesIO()
    pq.write_table(pa.table(parquet_columns(table, columns)), buf)
    return buf.getvalue()


def parquet_columns(table: Table, columns: list[str]) -> dict[str, list[Any]]:
    """The table's columns for Parquet: a column of mixed or nested values as JSON text."""
    cols: dict[str, list[Any]] = {}
    for c in columns:
        cells = list(itertools.chain.from_iterable(p.column(c) if type(p) is Rows else [p.get(c)] for p in table))
        kinds = {type(v) for v in cells if v is not None}
        if not (kinds <= {int, float} or kinds == {str} or kinds == {bool}):
            cells = [None if v is None else json.dumps(v, default=str) for v in cells]
        cols[c] = cells
    return cols


_SCALARS = frozenset((type(None), str, int, float, bool))  # written as they are by csv (None as an empty cell)


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    return v if isinstance(v, (str, int, float)) else json.dumps(v)  # a bool is an int
