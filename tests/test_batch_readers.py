"""Every reader of results reads a batch's chunks (issue 27: ``jobs.batches``, one slot file
``results/<run>/<first>+<count>.json`` for a batch of short chunks) as it reads single ones, through
``jobs.results``: ``status`` (text, ``--json``, ``--run``), ``collect``, the API's ``results()``,
``logs --chunk``, the run page's timeline, ``master.core.states``, ``retry``. A real spool: slots
committed by ``jobs.batches.commit_batch`` (and ``fence``), single results by ``jobs.results.commit``,
a batch queued and one running at an agent (its mailbox and heartbeat), read by the real CLI.

The run ``r`` of 20 chunks::

    0..3    slot, max 1 attempt:  o o f b      (2 failed for good; 3 handed back: pending)
    4..7    slot, max 2 attempts: o h o b      (5 failed with attempts left: pending, its error shown)
    8, 9    own files: 8 ok, 9 failed
    10, 11  a fenced slot: nothing
    12, 13  a slot of an earlier start of the run (--fresh): stale, nothing
    14, 15  a corrupt slot: nothing, said once naming the file
    16, 17  a batch running at agent h-cpu0;  18, 19  a batch queued there
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpupool.jobs import batches
from gpupool.jobs.descriptor import Job, JobKind, JobState
from gpupool.jobs.heartbeat import write_status
from gpupool.jobs.mailbox import Mailbox
from gpupool.jobs.paths import Spool
from gpupool.jobs.results import (chunk_result, chunk_results, commit, final_status, job_outcome, new_epoch, record,
                                  reopen_failed, scan_run)
from gpupool.master.spec.runspec import RunSpec, save_or_check
from tests.helpers import REPO, AgentProc, wait_for

RUN, CHUNKS, TASK, AGENT = "r", 20, "examples.noop:square", "h-cpu0"
OK_CHUNKS, FAILED_CHUNKS = [0, 1, 4, 6, 8], [2, 9]


def master(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "master", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def job(chunk: int, epoch: str | None, batch: int | None = None, max_attempts: int = 1, attempt: int = 1,
        run: str = RUN, chunks: int = CHUNKS) -> Job:
    return Job(run=run, chunk_id=chunk, total_chunks=chunks, kind=JobKind.CALLABLE, target=TASK, batch=batch,
               epoch=epoch, max_attempts=max_attempts, attempt=attempt)


def commit_slot(spool: Spool, j: Job, codes: str, t0: float, errors: dict[int, dict] | None = None) -> None:
    n = len(codes)
    rec = batches.batch_record(j, codes, values=[{"sq": c * c} if k == "o" else None for c, k in zip(j.chunks, codes)],
                               durations=[0.5] * n, errors=errors or {}, agent=AGENT, host="h", device="cpu",
                               started_at=t0, finished_at=t0 + 0.5 * n)
    assert batches.commit_batch(spool, j, rec)


def beat(spool: Spool) -> None:
    """h-cpu0's heartbeat, fresh: it runs the batch of chunks 16, 17."""
    write_status(spool, AGENT, {"agent": AGENT, "seq": 1, "state": "busy", "pid": 1, "host": "h",
                                "current": {"run": RUN, "chunk_id": 16, "attempt": 1, "since": time.time()}})


@pytest.fixture
def made(spool: Spool) -> tuple[Spool, str]:
    save_or_check(spool, RunSpec(RUN, JobKind.CALLABLE, TASK, CHUNKS), fresh=False)
    spool.run_dirs(RUN)
    epoch = new_epoch(spool, RUN)
    t0 = time.time() - 60
    commit_slot(spool, job(0, epoch, 4), "oofb", t0, {2: {"type": "ValueError", "message": "two is bad"}})
    commit_slot(spool, job(4, epoch, 4, max_attempts=2), "ohob", t0 + 2,
                {5: {"type": "KeyError", "message": "five, try again"}})
    for c, status in ((8, JobState.OK), (9, JobState.FAILED)):
        j = job(c, epoch)
        commit(spool, j, record(j, status, agent="h-cpu1", value={"sq": c * c} if status == JobState.OK else None,
                                error={"type": "OSError", "message": "nine"} if status == JobState.FAILED else None))
    assert batches.fence(spool, RUN, 10, 2, 1, "agent h-cpu3 died")
    commit_slot(spool, job(12, "0123456789abcdef", 2), "oo", t0)  # queued before the run was started afresh
    spool.batch_json(RUN, 14, 2).write_text('{"first": 14, "count": 2, "run": "r", "attempt": 1, "codes": "o')
    Mailbox(spool, AGENT).update(lambda _: [job(16, epoch, 2), job(18, epoch, 2)])
    beat(spool)
    spool.mkdir(spool.run_log_dir(RUN))
    spool.batch_log(RUN, 0, 4).write_text("# chunk 0\nhello from zero\n# chunk 1\nhello from one\n")
    return spool, epoch


def test_status_counts_batched_chunks_as_single_ones(made: tuple[Spool, str], env: dict[str, str]) -> None:
    spool, _ = made
    beat(spool)
    r = master(["status", "--base", str(spool.base), "--json"], env)
    assert r.returncode == 0, r.stderr
    [row] = json.loads(r.stdout)["runs"]
    assert (row["ok"], row["failed"], row["running"], row["queued"], row["pending"]) == (5, 2, 2, 2, 9)
    [agent] = json.loads(r.stdout)["agents"]
    assert agent["current"]["chunk_id"] == 16 and agent["current"]["batch"] == 2
    assert r.stderr.count("000014+2.json") == 1 and "chunks 14 .. 15 count as not done" in r.stderr  # said once
    beat(spool)
    text = master(["status", "--base", str(spool.base)], env)
    line = next(x for x in text.stdout.splitlines() if x.startswith(f"{RUN} "))
    assert line.split()[2:8] == ["20", "5", "2", "2", "2", "9"]  # chunks ok failed running queued pending
    assert f"{RUN}#16+2" in text.stdout  # the agent's current job: a batch of two from chunk 16


def test_status_of_the_run_gives_each_batched_chunk_its_row(made: tuple[Spool, str], env: dict[str, str]) -> None:
    spool, _ = made
    beat(spool)
    r = master(["status", "--base", str(spool.base), "--run", RUN, "--json"], env)
    assert r.returncode == 0, r.stderr
    rows = {x["chunk"]: x for x in json.loads(r.stdout)}
    states = {c: rows[c]["state"] for c in rows}
    assert [c for c in states if states[c] == "ok"] == OK_CHUNKS
    assert [c for c in states if states[c] == "failed"] == FAILED_CHUNKS
    assert (states[16], states[17], states[18], states[19]) == ("running", "running", "queued", "queued")
    assert {states[c] for c in (3, 5, 7, 10, 11, 12, 13, 14, 15)} == {"pending"}
    assert rows[2]["error"] == "ValueError: two is bad" and rows[2]["agent"] == AGENT and rows[2]["seconds"] == 0.5
    assert rows[5]["error"] == "KeyError: five, try again" and rows[5]["attempt"] == 1  # its history, in the slot
    assert rows[17]["agent"] == AGENT and rows[19]["agent"] == AGENT


def test_collect_writes_batched_chunks_rows_as_single_ones(made: tuple[Spool, str], env: dict[str, str],
                                                           tmp_path: Path) -> None:
    spool, _ = made
    out = tmp_path / "r.csv"
    refused = master(["collect", "--base", str(spool.base), "--run", RUN, "--out", str(out)], env)
    assert refused.returncode != 0 and "2 chunk(s) failed (2, 9)" in refused.stderr
    assert "13 chunk(s) have no result yet (3, 5, 7, 10, 11, 12, 13, 14, 15, 16 ...)" in refused.stderr
    r = master(["collect", "--base", str(spool.base), "--run", RUN, "--out", str(out), "--partial"], env)
    assert r.returncode == 0, r.stderr
    assert "5 chunks" in r.stdout and "left out 15 chunks" in r.stdout
    assert "000014+2.json" in r.stderr and "chunks 14 .. 15 count as not done" in r.stderr
    rows = list(csv.DictReader(out.open()))
    assert [int(x["chunk_id"]) for x in rows] == OK_CHUNKS
    assert [int(x["sq"]) for x in rows] == [c * c for c in OK_CHUNKS]
    assert [x["agent"] for x in rows] == [AGENT] * 4 + ["h-cpu1"]
    one = rows[1]  # chunk 1 ran second in its batch: half a second after its start
    assert float(one["started_at_epoch"]) == pytest.approx(float(rows[0]["started_at_epoch"]) + 0.5)
    assert float(one["duration_s"]) == 0.5 and one["status"] == "ok" and one["attempt"] == "1"
    jl = tmp_path / "r.jsonl"
    assert master(["collect", "--base", str(spool.base), "--run", RUN, "--out", str(jl), "--partial"],
                  env).returncode == 0
    assert [json.loads(x)["chunk_id"] for x in jl.read_text().splitlines()] == OK_CHUNKS


def test_the_api_reads_batched_results(made: tuple[Spool, str]) -> None:
    from gpupool.master.api import Pool

    spool, _ = made
    run = Pool(spool.base, create=False).run(RUN)
    got = {r.chunk_id: r for r in run.results()}
    assert sorted(got) == sorted(OK_CHUNKS + FAILED_CHUNKS)
    assert [c for c in got if got[c].ok] == OK_CHUNKS and got[6].value == {"sq": 36}
    assert got[2].record["error"]["message"] == "two is bad" and got[2].record["batch"] == [0, 4]


def test_logs_of_a_chunk_say_its_batch_and_show_the_batchs_output(made: tuple[Spool, str],
                                                                   env: dict[str, str]) -> None:
    spool, _ = made
    r = master(["logs", "--base", str(spool.base), "--run", RUN, "--chunk", "1"], env)
    assert r.returncode == 0, r.stderr
    assert f"run {RUN} chunk 1: OK on attempt 1/1, agent {AGENT}" in r.stdout
    assert f"sent in the batch of chunks 0 .. 3 (committed; its results: {spool.batch_json(RUN, 0, 4)})" in r.stdout
    assert f"--- output of the batch of chunks 0 .. 3 ({spool.batch_log(RUN, 0, 4)}) ---" in r.stdout
    assert "hello from one" in r.stdout and 'value: {"sq": 1}' in r.stdout
    failed = master(["logs", "--base", str(spool.base), "--run", RUN, "--chunk", "2"], env).stdout
    assert "chunk 2: FAILED on attempt 1/1" in failed and "ValueError: two is bad" in failed
    again = master(["logs", "--base", str(spool.base), "--run", RUN, "--chunk", "5", "--json"], env)
    rep = json.loads(again.stdout)
    assert rep["result"] is None and [a["error"]["type"] for a in rep["attempts"]] == ["KeyError"]
    assert rep["batch"]["first"] == 4 and rep["batch"]["state"] == "committed" and rep["batch"]["output"] is None
    fenced = master(["logs", "--base", str(spool.base), "--run", RUN, "--chunk", "11"], env).stdout
    assert "sent in the batch of chunks 10 .. 11 (fenced; taken back (agent h-cpu3 died)" in fenced
    flying = master(["logs", "--base", str(spool.base), "--run", RUN, "--chunk", "19"], env).stdout
    assert f"sent in the batch of chunks 18 .. 19 (in flight; at agent {AGENT})" in flying
    single = master(["logs", "--base", str(spool.base), "--run", RUN, "--chunk", "8"], env).stdout
    assert "batch" not in single and "chunk 8: OK on attempt 1/1, agent h-cpu1" in single


def test_the_timeline_draws_a_batchs_chunks_one_after_another(made: tuple[Spool, str]) -> None:
    from gpupool.master.report.timeline import AttemptReader

    spool, _ = made
    attempts = {(a["chunk"], a["attempt"]): a for a in AttemptReader(spool).attempts(RUN)}
    assert sorted(c for c, _ in attempts) == [0, 1, 2, 4, 5, 6, 8, 9]
    slot_end = spool.batch_json(RUN, 0, 4).stat().st_mtime
    bars = [attempts[(c, 1)] for c in (0, 1, 2)]
    assert all(b["agent"] == AGENT for b in bars) and bars[2]["status"] == "failed"
    assert [round(b["end"] - b["start"], 6) for b in bars] == [0.5] * 3
    assert bars[0]["end"] <= bars[1]["start"] + 1e-6 and bars[1]["end"] <= bars[2]["start"] + 1e-6  # in turn
    assert bars[2]["end"] == pytest.approx(slot_end - 0.5)  # chunk 3 (handed back) took the batch's last half second
    assert attempts[(5, 1)]["error"]["message"] == "five, try again"


def test_chunk_and_run_states_follow_batches(made: tuple[Spool, str]) -> None:
    from gpupool.master.core.liveness import Liveness
    from gpupool.master.core.states import AtAgents, final_states, holdings

    spool, epoch = made
    beat(spool)
    finals = final_states(spool, RUN, CHUNKS)
    assert [c for c, s in finals.items() if s is JobState.OK] == OK_CHUNKS
    assert [c for c, s in finals.items() if s is JobState.FAILED] == FAILED_CHUNKS
    at = AtAgents.of(holdings(spool, Liveness(spool, 20.0).refresh()))
    assert at.running[RUN] == {16: AGENT, 17: AGENT} and set(at.queued[RUN]) == {16, 17, 18, 19}
    assert at.counts(RUN, CHUNKS, finals, False)[JobState.QUEUED] == 2
    # a batch's job is over once its slot exists, committed or fenced
    assert job_outcome(spool, job(0, epoch, 4)) and job_outcome(spool, job(10, epoch, 2))
    assert not job_outcome(spool, job(16, epoch, 2))
    assert job_outcome(spool, job(8, epoch)) and not job_outcome(spool, job(3, epoch))
    commit_slot(spool, job(16, epoch, 2), "oo", time.time())
    at = AtAgents.of(holdings(spool, Liveness(spool, 20.0).refresh()))
    assert RUN not in at.running and set(at.queued[RUN]) == {18, 19}  # its heartbeat names a batch that is over


def test_a_chunk_failed_in_a_slot_runs_again_and_its_own_result_is_then_read(made: tuple[Spool, str],
                                                                             env: dict[str, str]) -> None:
    from gpupool.master.control import retry_run

    spool, epoch = made
    _, failed, missing = retry_run(spool, RUN)
    assert failed == FAILED_CHUNKS and missing == CHUNKS - 7
    scan = scan_run(spool, RUN)
    assert reopen_failed(spool, RUN, 2, scan) and not reopen_failed(spool, RUN, 1, scan)
    assert spool.batch_json(RUN, 0, 4).exists()  # the slot stays: its other chunks' results are in it
    again = job(2, epoch, max_attempts=2, attempt=2)
    assert commit(spool, again, record(again, JobState.OK, agent="h-cpu7", value={"sq": 4}))
    scan = scan_run(spool, RUN)
    assert final_status(spool, RUN, 2, scan) == JobState.OK
    assert chunk_result(spool, RUN, 2, scan)["agent"] == "h-cpu7" and "batch" not in chunk_result(spool, RUN, 2)
    assert dict(chunk_results(spool, RUN, [1, 2], scan))[2]["attempt"] == 2
    r = master(["logs", "--base", str(spool.base), "--run", RUN, "--chunk", "2"], env).stdout
    assert "chunk 2: OK on attempt 2/2, agent h-cpu7" in r and "attempt 1 failed on h-cpu0" in r
    assert "ValueError: two is bad" in r
    beat(spool)
    [row] = json.loads(master(["status", "--base", str(spool.base), "--json"], env).stdout)["runs"]
    assert (row["ok"], row["failed"]) == (6, 1)


def test_a_fenced_stale_or_corrupt_slot_counts_nothing(made: tuple[Spool, str]) -> None:
    spool, epoch = made
    scan = scan_run(spool, RUN)
    assert not {10, 11, 12, 13, 14, 15} & scan.finals.keys() and not {10, 11, 12, 13} & scan.history.keys()
    assert set(scan.fenced) == {10} and set(scan.stale) == {12} and set(scan.slots) == {0, 4}
    assert scan.sent_in(11) is not None and scan.sent_in(11).fenced == "agent h-cpu3 died"
    for c in (10, 12, 14):
        with pytest.raises(FileNotFoundError):
            chunk_result(spool, RUN, c, scan, epoch)
    # the corrupt slot mended (committed again, whole): its chunks count
    spool.batch_json(RUN, 14, 2).unlink()
    commit_slot(spool, job(14, epoch, 2), "of", time.time())
    scan = scan_run(spool, RUN)
    assert [final_status(spool, RUN, c, scan) for c in (14, 15)] == [JobState.OK, JobState.FAILED]


@pytest.mark.timeout(120)
def test_retry_runs_again_only_the_chunk_failed_in_its_slot(spool: Spool, env: dict[str, str]) -> None:
    save_or_check(spool, RunSpec("s", JobKind.CALLABLE, TASK, 6), fresh=False)
    spool.run_dirs("s")
    epoch = new_epoch(spool, "s")
    commit_slot(spool, job(0, epoch, 6, run="s", chunks=6), "oofooo", time.time(),
                {2: {"type": "ValueError", "message": "two is bad"}})
    agent = AgentProc(spool.base, 0, env)
    try:
        agent.wait_ready()
        r = master(["retry", "--base", str(spool.base), "--run", "s", "--no-progress"], env, timeout=90)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        agent.kill()
    assert wait_for(lambda: spool.result_json("s", 2).exists(), 10, "chunk 2's own result")
    assert sorted(p.name for p in spool.result_dir("s").glob("*.json")) == ["000000+6.json", "000002.json"]
