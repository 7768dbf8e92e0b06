"""``collect`` reads a batch's chunks as columns (issue 27: a million chunks' rows in under 10 s):
``master.report.collect.block_rows`` makes a batch's rows as columns where they all have the same
columns, and the writers make each column's text once. What it writes must be what the rows of
the same chunks' records, one by one (``rows``), make: the same CSV, JSON lines and Parquet
columns, byte for byte. Slots committed by ``jobs.batches.commit_batch`` into a real spool, read
back through ``jobs.results``; hypothesis draws their values, parameters, times and outcomes,
among them the cases that send a batch back to rows one by one (keys that differ, keys that are
collect's own columns, a parameter and a value of the same name).
"""
from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpupool.jobs import batches
from gpupool.jobs.codec import encode
from gpupool.jobs.descriptor import Job, JobKind, JobState
from gpupool.jobs.paths import Spool
from gpupool.jobs.results import commit, new_epoch, record
from gpupool.master.report import collect as C
from gpupool.master.spec.runspec import RunSpec, load_run, save_or_check

RUN, TASK = "cols", "examples.noop:square"
KEYS = ["x", "y", "chunk_id", "status", "value", "started_at_epoch", "value.status", "param.status", "a,b", '%s "q"']
TEXT = st.text(st.characters(), max_size=6) | st.sampled_from(["", "a,b", 'say "hi"', "two\nlines", "cr\r", "100%",
                                                                "%s", " pad ", "é", "\ud800"])
SCALAR = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | TEXT
VALUE = SCALAR | st.lists(SCALAR, max_size=3) | st.dictionaries(st.sampled_from(KEYS), SCALAR, max_size=3)


@st.composite
def a_batch(draw: Any, n: int) -> dict[str, Any]:
    """What a batch of ``n`` chunks committed: its letters, values, durations and parameters. Most
    batches have values and parameters of one shape (the column path); some are mixed."""
    shape = draw(st.sampled_from(["none", "scalar", "text", "list", "dict", "tuple", "mixed"]))
    if shape == "dict":
        keys = draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=3, unique=True))
        values = [{k: draw(SCALAR) for k in keys} for _ in range(n)]
    elif shape == "tuple":  # the codec's tagged form, read as a list (codec.plain)
        values = [encode((draw(SCALAR), 1)) for _ in range(n)]
    else:
        one = {"none": st.none(), "scalar": SCALAR, "text": TEXT, "list": st.lists(SCALAR, max_size=2),
               "mixed": VALUE}[shape]
        values = [draw(one) for _ in range(n)]
    params = None
    kind = draw(st.sampled_from(["none", "same", "mixed"]))
    if kind == "same":
        keys = draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=3, unique=True))
        params = [{k: draw(SCALAR) for k in keys} for _ in range(n)]
    elif kind == "mixed":
        params = [draw(st.none() | st.dictionaries(st.sampled_from(KEYS), SCALAR, max_size=2)) for _ in range(n)]
    durations = [draw(st.none() | st.floats(0, 5) | st.integers(0, 3)) if draw(st.integers(0, 5)) == 0
                 else draw(st.floats(0.0001, 2)) for _ in range(n)]
    codes = draw(st.text("oooooofhb", min_size=n, max_size=n))
    started = None if draw(st.integers(0, 3)) == 0 else draw(st.floats(1.7e9, 1.8e9))
    shared = draw(st.sampled_from([{"agent": "h-cpu0", "host": "h", "device": "cpu", "gpu_id": 0},
                                   {"agent": "h-gpu1"}, {}]))
    return {"values": values, "params": params, "durations": durations, "codes": codes, "started_at": started,
            "shared": shared}


@st.composite
def a_run(draw: Any) -> list[tuple[str, Any]]:
    """A run's results, in chunk order: batches, and chunks of their own (ok or failed)."""
    parts = []
    for _ in range(draw(st.integers(1, 5))):
        if draw(st.integers(0, 3)) == 0:
            parts.append(("single", (draw(st.booleans()), draw(VALUE), draw(st.none() | st.dictionaries(
                st.sampled_from(KEYS), SCALAR, max_size=2)))))
        else:
            parts.append(("batch", draw(a_batch(draw(st.integers(1, 6))))))
    return parts


def job(chunk: int, chunks: int, epoch: str, batch: int | None = None, params: Any = None) -> Job:
    return Job(run=RUN, chunk_id=chunk, total_chunks=chunks, kind=JobKind.CALLABLE, target=TASK, batch=batch,
               epoch=epoch, params=params if batch is None else None, batch_params=params if batch else None)


def make(spool: Spool, parts: list[tuple[str, Any]]) -> None:
    chunks = sum(len(p["codes"]) if kind == "batch" else 1 for kind, p in parts)
    save_or_check(spool, RunSpec(RUN, JobKind.CALLABLE, TASK, chunks), fresh=False)
    spool.run_dirs(RUN)
    epoch, c = new_epoch(spool, RUN), 0
    for kind, p in parts:
        if kind == "single":
            ok, value, params = p
            j = job(c, chunks, epoch, params=params)
            rec = record(j, JobState.OK if ok else JobState.FAILED, agent="h-cpu1", started_at=time.time(),
                         duration_s=0.5, value=value if ok else None,
                         error=None if ok else {"type": "ValueError", "message": "no"})
            commit(spool, j, rec)
            c += 1
            continue
        n = len(p["codes"])
        j = job(c, chunks, epoch, batch=n, params=p["params"])
        rec = batches.batch_record(j, p["codes"], values=p["values"], durations=p["durations"],
                                   errors={c + i: {"type": "KeyError", "message": "k"}
                                           for i, k in enumerate(p["codes"]) if k in "fh"},
                                   started_at=p["started_at"], **p["shared"])
        assert batches.commit_batch(spool, j, rec)
        c += n


def both_ways(spool: Spool) -> tuple[list[Any], list[Any], list[C.Piece]]:
    """The table as collect makes it, and as the rows of every chunk's record make it."""
    pieces, _ = C.committed(spool, load_run(spool, RUN), partial=True)
    return C.table_of(pieces), C.rows(C.records(pieces)), pieces


def assert_same_output(fast: list[Any], slow: list[Any]) -> None:
    columns = C.columns_of(slow)
    assert C.columns_of(fast) == columns
    assert b"".join(C._csv(fast, columns)) == b"".join(C._csv(slow, columns))
    assert b"".join(C._jsonl(fast)) == b"".join(C._jsonl(slow))
    got, want = C.parquet_columns(fast, columns), C.parquet_columns(slow, columns)
    assert json.dumps(got, default=repr) == json.dumps(want, default=repr)  # NaN as NaN on both sides


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow, HealthCheck.data_too_large])
@given(parts=a_run())
def test_batch_columns_write_what_rows_one_by_one_write(tmp_path: Path, parts: list[tuple[str, Any]]) -> None:
    import shutil

    shutil.rmtree(tmp_path / "base", ignore_errors=True)
    spool = Spool(tmp_path / "base").ensure()
    make(spool, parts)
    try:
        fast, slow, _ = both_ways(spool)
    except C.CollectError:  # no ok chunk at all
        return
    assert_same_output(fast, slow)


def test_a_sweeps_batches_are_read_as_columns_and_match_their_rows(spool: Spool, tmp_path: Path) -> None:
    """A sweep's batches of dict values and tricky text: every batch goes the column way, and the
    files collect writes say what the records say."""
    texts = ["plain", "a,b", 'say "hi"', "two\nlines", "100%", ""]
    parts = [("batch", {"values": [{"loss": i / 7, "note": texts[i % len(texts)], "chunk_id": -i}
                                   for i in range(k, k + 6)],
                        "params": [{"lr": 10.0 ** -i, "seed": i} for i in range(k, k + 6)],
                        "durations": [0.25] * 6, "codes": "oooooo", "started_at": 1.8e9 + k,
                        "shared": {"agent": "h-cpu0", "host": "h", "device": "cpu", "gpu_id": 0}})
             for k in (0, 6, 12)]
    make(spool, parts)
    fast, slow, pieces = both_ways(spool)
    assert [type(p) for p in fast] == [C.Rows] * 3  # no batch went back to rows one by one
    assert_same_output(fast, slow)
    out = C.collect(spool, RUN, tmp_path / "s.csv")
    assert (out.rows, out.skipped, out.keys) == (18, [], ["loss", "note", "value.chunk_id"])
    got = list(csv.DictReader(io.StringIO((tmp_path / "s.csv").read_text())))
    assert [r["note"] for r in got] == texts * 3
    assert [float(r["lr"]) for r in got] == [10.0 ** -i for i in range(18)]
    assert [int(r["value.chunk_id"]) for r in got] == [-i for i in range(18)]
    assert float(got[1]["started_at_epoch"]) == float(got[0]["finished_at_epoch"]) == 1.8e9 + 0.25
    C.collect(spool, RUN, tmp_path / "s.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert lines == [json.loads(json.dumps(r)) for r in slow]
    assert math.isclose(lines[17]["loss"], 17 / 7)


def test_a_batch_of_mixed_shapes_goes_back_to_rows_one_by_one(spool: Spool) -> None:
    parts = [("batch", {"values": [{"a": 1}, {"b": 2}, 3], "params": None, "durations": [0.1] * 3, "codes": "ooo",
                        "started_at": 1.8e9, "shared": {}}),
             ("batch", {"values": [{"x": 1}, {"x": 2}], "params": [{"x": 1}, {"x": 5}], "durations": [0.1] * 2,
                        "codes": "oo", "started_at": 1.8e9, "shared": {}}),  # x: the parameter's, then value.x
             ("batch", {"values": [{"status": 1, "value.status": 2}], "params": None, "durations": [0.1],
                        "codes": "o", "started_at": 1.8e9, "shared": {}})]
    make(spool, parts)
    fast, slow, _ = both_ways(spool)
    assert fast == slow and len(fast) == 6 and all(type(p) is dict for p in fast)
    assert [(r["x"], r.get("value.x")) for r in fast[3:5]] == [(1, None), (5, 2)]
    assert (fast[5]["value.status"], fast[5]["value.value.status"]) == (1, 2)


def test_a_chunk_without_a_duration_has_no_finish(spool: Spool) -> None:
    """Each chunk started when the ones before it had run; one without a duration has no finish."""
    parts = [("batch", {"values": [1, 2, 3], "params": None, "durations": [0.5, None, 0.25], "codes": "ooo",
                        "started_at": 1.8e9, "shared": {}}),
             ("batch", {"values": [4], "params": None, "durations": [0.5], "codes": "o", "started_at": None,
                        "shared": {}})]
    make(spool, parts)
    fast, slow, _ = both_ways(spool)
    assert [type(p) for p in fast] == [C.Rows, C.Rows]
    assert list(fast[0].column("started_at_epoch")) == [1.8e9, 1.8e9 + 0.5, 1.8e9 + 0.5]
    assert list(fast[0].column("finished_at_epoch")) == [1.8e9 + 0.5, None, 1.8e9 + 0.75]
    assert fast[1].columns["started_at"] == fast[1].columns["finished_at_epoch"] == C.Same(None)
    assert_same_output(fast, slow)


@pytest.mark.parametrize("times", [[1.8e9, 1.8e9 + 0.0005, 1.8e9 + 0.9995, 1.8e9 + 0.99999999], [0.0, 1.5],
                                   [float("nan"), 2.0], [2.0**34], [1.8e9, None]])
def test_times_of_a_column_read_as_one_by_one(times: list[Any]) -> None:
    assert C.iso_times(times) == [C.iso_time(t) for t in times]
