"""Fuzzing the spool (issue 12): any byte sequence, and any kind of file, in any spool file.

* In-process: every reader of spool files (mailbox, heartbeat, result, a batch's slot, run spec, notes, status
  rendering, a master's recovery) over hypothesis-made content: each either accepts it or
  refuses it with a BadFile (or, for what cannot be read at all, an OSError), never anything else.
* Real processes: two real CPU agents (shared by all examples) and real ``main.py`` runs, with
  hostile content written into every kind of spool file first; the run ends, every chunk whose
  files were left alone is committed once with the right value, ``status`` and ``cancel``
  answer, the agents live on, and nothing outside BASE changes.
* The corpus (``tests/fuzz_corpus/``): cases that crashed something before issue 12, replayed.

``GPUPOOL_FUZZ_EXAMPLES`` sets the number of real-process examples (default 6, about a minute on
two cores); the in-process tests run ten times as many.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpupool.jobs.atomic import write_replace
from gpupool.jobs.descriptor import Job, JobKind
from gpupool.jobs.errors import BadFile
from gpupool.jobs.heartbeat import Heartbeat, read_status
from gpupool.jobs.jsonio import load_json
from gpupool.jobs.locks import FileLock, HolderLock
from gpupool.jobs.mailbox import Mailbox, parse_mailbox
from gpupool.jobs.paths import Spool
from gpupool.jobs.results import read_epoch
from tests.helpers import REPO, AgentProc, base_env, run_main, wait_for

EXAMPLES = int(os.environ.get("GPUPOOL_FUZZ_EXAMPLES", "6"))
# CI's short budget draws the same examples every time (a landing never hangs on a new random
# find); a longer run (GPUPOOL_FUZZ_EXAMPLES set) explores at random and its finds go to the corpus.
EXPLORE = "GPUPOOL_FUZZ_EXAMPLES" in os.environ
CORPUS = Path(__file__).parent / "fuzz_corpus"

GOOD_JOB = Job(run="decoy", chunk_id=0, total_chunks=3, kind=JobKind.CALLABLE, target="examples.noop:square",
               workdir=str(REPO)).to_dict()
TEMPLATES: dict[str, dict[str, Any]] = {
    "mailbox": {"schema": 1, "agent": "testhost-cpu90", "seq": 3, "jobs": [GOOD_JOB]},
    "job": GOOD_JOB,
    "heartbeat": {"schema": 1, "agent": "testhost-cpu90", "host": "h", "hostname": "h", "pid": 1, "state": "draining",
                  "seq": 1, "device": "cpu", "gpu_id": 0, "gpu_index": None, "current": {"run": "decoy", "chunk_id": 0,
                  "attempt": 1, "since": 1.0}, "ahead": None, "jobs_done": 0, "jobs_failed": 0, "started_at": 1.0,
                  "updated_at": 2.0, "log": "x", "mailbox_lag_s": 0.1,
                  "gpu": {"name": "g", "util": 1, "mem_used": 1, "mem_total": 2, "temp": 3}},
    "result": {"schema": 1, "run": "decoy", "chunk_id": 1, "total_chunks": 3, "status": "ok", "attempt": 1,
               "max_attempts": 3, "submitted_at": 1.0, "agent": "a", "host": "h", "device": "cpu",
               "started_at": 1.0, "finished_at": 2.0, "duration_s": 1.0, "value": {"square": 1}, "arrays": None,
               "error": None},
    "spec": {"name": "decoy", "kind": "callable", "target": "examples.noop:square", "chunks": 3, "kwargs": {},
             "shared": None, "data_dir": None, "retries": 2, "timeout": None, "workdir": str(REPO), "share": 1.0,
             "schema": 1, "created_at": 1.0},
    "note": {"stop_running": False, "by": "x", "at": 1.0},
    "slot": {"schema": 1, "run": "decoy", "first": 1, "count": 2, "total_chunks": 3, "attempt": 1, "max_attempts": 3,
             "submitted_at": 1.0, "codes": "of", "values": [{"square": 1}, None], "durations": [0.5, 0.25],
             "errors": {"2": {"type": "ValueError", "message": "x"}}, "params": [{"a": 1}, {"a": 2}], "agent": "a",
             "host": "h", "device": "cpu", "gpu_id": 0, "started_at": 1.0, "finished_at": 2.0},
}

# content ------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=10**30, max_value=10**80)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


@st.composite
def wrong_typed(draw: st.DrawFn, kind: str) -> bytes:
    """A valid-shaped document of ``kind`` with some fields (maybe nested ones) of the wrong type."""
    doc = json.loads(json.dumps(TEMPLATES[kind]))
    targets = [doc] + [v for v in doc.values() if isinstance(v, dict)]
    if kind == "mailbox":
        targets.append(doc["jobs"][0])
    for _ in range(draw(st.integers(1, 4))):
        d = draw(st.sampled_from(targets))
        key = draw(st.sampled_from(sorted(d) + ["extra"]))
        d[key] = draw(json_values)
    return _dumps(doc)


def deep(draw: st.DrawFn) -> bytes:
    n = draw(st.sampled_from([65, 500, 5000, 100_000]))
    opener = draw(st.sampled_from([b"[", b"{\"a\":", b"[{\"a\":"]))
    closer = {b"[": b"]", b"{\"a\":": b"}", b"[{\"a\":": b"}]"}[opener]
    return opener * n + (closer * n if draw(st.booleans()) else b"")


SPECIAL_TOKENS = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"9" * 5000, b"1" * 4000, b"-0",
                  b"1e-400", b'"\\ud800"', b"true", b"null"]


@st.composite
def content(draw: st.DrawFn, kind: str) -> bytes:
    """Bytes for a spool file of ``kind``: random, wrong-typed, deep, or with special numbers."""
    how = draw(st.sampled_from(["bytes", "typed", "typed", "deep", "token", "empty"]))
    if how == "bytes":
        return draw(st.binary(max_size=200))
    if how == "typed":
        return draw(wrong_typed(kind))
    if how == "deep":
        return deep(draw)
    if how == "token":  # a special number in one field of a valid document
        doc = dict(TEMPLATES[kind])
        key = draw(st.sampled_from(sorted(doc)))
        token = draw(st.sampled_from(SPECIAL_TOKENS))
        return _dumps({k: v for k, v in doc.items() if k != key})[:-1] + b', "' + key.encode() + b'": ' + token + b"}"
    return b""


FILE_KINDS = ["dir", "fifo", "link-out-file", "link-out-dir", "link-loop", "link-dangling"]


def place(path: Path, what: tuple[str, Any], outside: Path) -> None:
    """Put ``what`` (("data", bytes) or ("kind", name)) at ``path``, replacing what is there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_name(f".{path.name}.fuzz-{os.getpid()}")
    _remove(aside)
    kind, value = what
    if kind == "data":
        aside.write_bytes(value)
    elif value == "dir":
        aside.mkdir()
        (aside / "inside.json").write_bytes(b'{"a": 1}')
    elif value == "fifo":
        os.mkfifo(aside)
    else:
        aside.symlink_to({"link-out-file": outside / "victim.json", "link-out-dir": outside,
                          "link-loop": aside.name, "link-dangling": outside / "nothing-here"}[value])
    if path.is_dir() and not path.is_symlink() or aside.is_dir() and not aside.is_symlink():
        _remove(path)
    os.rename(aside, path)


def _remove(path: Path) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        import shutil
        shutil.rmtree(path)


@st.composite
def hostile(draw: st.DrawFn, kind: str) -> tuple[str, Any]:
    if draw(st.integers(0, 3)) == 0:
        return ("kind", draw(st.sampled_from(FILE_KINDS)))
    return ("data", draw(content(kind)))


# readers, in process ----------------------------------------------------------------------------
def exercise(spool: Spool) -> None:
    """Run every reader of the spool over it; each must accept or refuse, never crash."""
    from gpupool.master.report.collect import CollectError, columns_of, committed
    from gpupool.master.report.collect import _csv as collect_csv
    from gpupool.master.report.collect import _jsonl as collect_jsonl
    from gpupool.master.report.collect import table_of as collect_table
    from gpupool.master.control import chunk_statuses, failed_chunks
    from gpupool.master.report.dashboard import tables
    from gpupool.master.core.feeder import Feeder
    from gpupool.master.core.liveness import Liveness
    from gpupool.master.report.logs import chunk_report, format_chunk
    from gpupool.master.spec.runspec import RunSpec
    from gpupool.master.report.status import StatusReader, render

    data = StatusReader(spool, 20.0).gather()
    json.dumps(data, allow_nan=False)  # the dashboard's browser parses this
    render(data, color=True)
    tables(data)
    Liveness(spool, 20.0).refresh()
    for ident in spool.agent_ids():
        box = Mailbox(spool, ident)
        try:
            {job.uid for job in box.read().jobs}  # the agent keeps the dispatches it finished in a set
        except (BadFile, OSError):
            pass
        box.update(lambda jobs: None, wait=1.0, force=True)  # repairs what it can, raises nothing
        box.lock.close()
        HolderLock(spool.agent_lock(ident)).holder()
    for run in spool.run_names():
        read_epoch(spool, run)
        try:
            spec = RunSpec.load(spool.run_spec(run))
        except (BadFile, OSError):
            continue
        failed_chunks(spool, spec), chunk_statuses(spool, spec)
        for c in range(min(spec.chunks, 4)):  # python -m master logs --run R --chunk C
            format_chunk(chunk_report(spool, run, c))
        try:  # python -m master collect, its CSV and JSON lines made in memory
            table = collect_table(committed(spool, spec, partial=True)[0])
            b"".join(collect_csv(table, columns_of(table))), b"".join(collect_jsonl(table))
        except CollectError:
            pass
        Feeder(spool, spec).recover()


def _spool(tmp: Path) -> tuple[Spool, Path]:
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    outside = tmp / "outside"
    outside.mkdir(parents=True)
    (outside / "victim.json").write_bytes(_dumps(TEMPLATES["result"]))
    return Spool(tmp / "base").ensure(), outside


def _snapshot(folder: Path) -> list[tuple[str, bytes]]:
    return sorted((str(p), p.read_bytes() if p.is_file() and not p.is_symlink() else b"<" + p.name.encode())
                  for p in folder.rglob("*"))


IN_PROCESS = settings(max_examples=EXAMPLES * 10, deadline=None, derandomize=not EXPLORE,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@IN_PROCESS
@given(kind=st.sampled_from(sorted(TEMPLATES)), data=st.data())
def test_every_parser_accepts_or_refuses_with_badfile(kind: str, data: st.DataObject) -> None:
    raw = data.draw(content(kind))
    try:
        load_json(raw, kind, "x")
    except BadFile:
        pass
    try:
        parse_mailbox(raw, Path("x.POOL"), {})
    except BadFile:
        pass
    try:
        Job.from_dict(load_json(raw, kind, "x"), "x")
    except BadFile:
        pass


@IN_PROCESS
@given(data=st.data())
def test_every_reader_of_a_hostile_spool_survives(tmp_path_factory, data: st.DataObject) -> None:
    spool, outside = _spool(tmp_path_factory.getbasetemp() / "inproc")
    before = _snapshot(outside)
    spool.run_dir("decoy").mkdir(parents=True)
    write_replace(spool.run_spec("decoy"), _dumps(TEMPLATES["spec"]))
    ident = "testhost-cpu90"
    targets = {spool.mailbox(ident): "mailbox", spool.mailbox_lock(ident): "note", spool.heartbeat(ident): "heartbeat",
               spool.agent_lock(ident): "note", spool.run_spec("decoy"): "spec", spool.cancel_flag("decoy"): "note",
               spool.run_epoch("decoy"): "note", spool.result_json("decoy", 1): "result",
               spool.history_json("decoy", 2, 1): "result", spool.result_json("decoy", 0): "result",
               spool.agents_dir / "bad name.json": "heartbeat", spool.run_spec("other"): "spec",
               spool.batch_json("decoy", 1, 2): "slot"}
    for path in data.draw(st.lists(st.sampled_from(sorted(targets)), min_size=1, max_size=6, unique=True)):
        place(path, data.draw(hostile(targets[path])), outside)
    if data.draw(st.integers(0, 5)) == 0:
        _remove(spool.rejected_dir)
        place(spool.rejected_dir, ("kind", data.draw(st.sampled_from(["link-out-dir", "link-loop", "fifo"]))), outside)
    exercise(spool)
    assert _snapshot(outside) == before


# the corpus -----------------------------------------------------------------------------------
def _corpus() -> list[Path]:
    return sorted(CORPUS.glob("*.json"))


@pytest.mark.parametrize("case", _corpus(), ids=lambda p: p.stem)
def test_corpus_case_no_longer_crashes_anything(case: Path, tmp_path: Path) -> None:
    """Each corpus file: {"found": what crashed, "files": {spool path: {"b64": bytes} | {"kind": k}}}."""
    spec = json.loads(case.read_text())
    assert spec["found"], "every corpus case says what it crashed"
    spool, outside = _spool(tmp_path)
    before = _snapshot(outside)
    for rel, what in spec["files"].items():
        path = spool.base / rel
        if rel == "rejected":
            _remove(path)
        place(path, ("data", base64.b64decode(what["b64"])) if "b64" in what else ("kind", what["kind"]), outside)
    exercise(spool)
    assert _snapshot(outside) == before


# real processes -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Two real CPU agents on one spool, shared by every example (starting agents costs seconds)."""
    tmp = tmp_path_factory.mktemp("fuzzpool")
    spool, outside = _spool(tmp)
    env = base_env(tmp)
    procs = [AgentProc(spool.base, i, env).wait_ready() for i in range(2)]
    yield spool, outside, env, procs
    for p in procs:
        p.kill()


RUNS = iter(range(10**6))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not EXPLORE,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
@pytest.mark.timeout(600)
def test_real_pool_survives_hostile_spool_files(pool, data: st.DataObject) -> None:
    spool, outside, env, procs = pool
    before = _snapshot(outside)
    n, run = 6, f"fuzz-{next(RUNS)}"
    live = [p.id for p in procs]
    fake = "testhost-cpu9" + str(data.draw(st.integers(0, 9)))
    targets: dict[Path, str] = {
        spool.mailbox(fake): "mailbox", spool.mailbox_lock(fake): "note", spool.heartbeat(fake): "heartbeat",
        spool.agent_lock(fake): "note", spool.drain_flag(fake): "note",
        spool.run_spec("decoy"): "spec", spool.cancel_flag("decoy"): "note", spool.run_epoch("decoy"): "note",
        spool.sealed_flag("decoy"): "note", spool.master_lock("decoy"): "note",
        spool.result_json("decoy", 1): "result", spool.history_json("decoy", 1, 1): "result",
        spool.agents_dir / "bad name.json": "heartbeat", spool.rejected_dir / "junk": "note",
    }
    for ident in live:  # an agent's mailbox (it repairs it) and heartbeat (it rewrites it)
        targets[spool.mailbox(ident)] = "mailbox"
        targets[spool.heartbeat(ident)] = "heartbeat"
    sabotaged = set(data.draw(st.lists(st.integers(0, n - 1), max_size=2, unique=True)))
    for c in sabotaged:  # this run's own result files, before it starts (a resume)
        targets[spool.result_json(run, c) if data.draw(st.booleans()) else spool.history_json(run, c, 1)] = "result"
    spec_broken = data.draw(st.integers(0, 7)) == 0
    if spec_broken:
        targets[spool.run_spec(run)] = "spec"
    picked = data.draw(st.lists(st.sampled_from(list(targets)), min_size=1, max_size=8, unique=True))  # (in order:
    # the run's name changes between examples, so a sorted order would not replay)
    picked += [p for p in targets if p.parent.name in (run,) and p not in picked]
    for path in picked:
        what = data.draw(hostile(targets[path]))
        if path.parent == spool.rejected_dir and (spool.rejected_dir.is_symlink() or not spool.rejected_dir.is_dir()):
            continue  # rejected/ was made a link by an earlier example: we would write through it ourselves
        lock = spool.mailbox_lock(path.stem) if path.parent == spool.pool_dir else None
        if lock is not None and lock.is_file() and not lock.is_symlink():  # as a writer following
            with FileLock(lock):  # the protocol does: under the lock
                place(path, what, outside)
        else:
            place(path, what, outside)
    if data.draw(st.integers(0, 5)) == 0:  # agents may be writing into it: renamed away, not removed
        old = spool.base / f"rejected-before-{run}"
        os.rename(spool.rejected_dir, old) if spool.rejected_dir.is_dir() and not spool.rejected_dir.is_symlink() \
            else _remove(spool.rejected_dir)
        place(spool.rejected_dir, ("kind", data.draw(st.sampled_from(["link-out-dir", "link-loop", "fifo"]))), outside)

    r = run_main(["--base", str(spool.base), "--task", "examples.noop:square", "--chunks", str(n), "--run", run,
                  "--no-progress", "--dead-after", "5", "--retries", "1", "--retry-delay", "0.05"], env, timeout=180)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    if spec_broken:  # not this tool's run spec: refused, naming it
        assert r.returncode == 2 and "run.json" in r.stderr, (r.returncode, r.stderr)
    else:
        assert r.returncode in (0, 1), (r.returncode, r.stdout, r.stderr)
        assert r.returncode == 0 or sabotaged, (r.stdout, r.stderr)
        for c in set(range(n)) - sabotaged:  # every chunk whose files were left alone: once, right
            path = spool.result_json(run, c)
            assert path.is_file() and not path.is_symlink()
            rec = json.loads(path.read_text())
            assert rec["status"] == "ok" and rec["value"]["square"] == c * c and rec["agent"] in live
    st_ = subprocess.run([sys.executable, "-m", "master", "status", "--base", str(spool.base), "--json"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=60)
    assert st_.returncode == 0 and "Traceback" not in st_.stderr, st_.stderr
    status = json.loads(st_.stdout, parse_constant=lambda c: pytest.fail(f"status --json printed {c}"))
    assert set(live) <= {a["id"] for a in status["agents"]}
    cancel = subprocess.run([sys.executable, "-m", "master", "cancel", "--base", str(spool.base), "--run", "decoy",
                             "--timeout", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert cancel.returncode in (0, 2) and "Traceback" not in cancel.stderr, cancel.stderr
    for p in procs:
        assert p.proc.poll() is None, p.output()[-3000:]
        wait_for(lambda p=p: getattr(read_ok(spool, p.id), "state", None) == "idle", 30, f"{p.id} idle again")
    after = _snapshot(outside)
    assert after == before, (set(after) - set(before), set(before) - set(after))


def read_ok(spool: Spool, ident: str) -> Heartbeat | None:
    try:
        return read_status(spool.heartbeat(ident))
    except (BadFile, OSError):
        return None
