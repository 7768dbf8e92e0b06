"""A callable's own log (issue 25): its stdout and stderr, and what the programs it starts print,
go to ``logs/<run>/<chunk>.log`` after a header per attempt, as a script's do; the worker log
keeps the pool's lines only. And ``collect`` says which GPU (and host) ran each chunk."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpupool.jobs.descriptor import ATTEMPT_HEADER, JOB_MARK
from gpupool.jobs.paths import Spool
from tests.helpers import HOST, REPO, results, run_main, wait_for

TASK = """
import os, sys

def talk(chunk_id, marker):
    print(f"out {chunk_id}")  # buffered: the worker flushes it into the chunk's log
    print(f"err {chunk_id}", file=sys.stderr)
    os.system("echo from-a-child")  # another process, writing to the same descriptors
    if chunk_id == 1 and not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("the first attempt fails")
    return chunk_id

def quiet(chunk_id):
    if chunk_id == 2:
        print("only chunk 2 speaks")
    return chunk_id

def die(chunk_id):
    print(f"last words of {chunk_id}", flush=True)
    os.system("echo a-child-before-the-end")
    os._exit(3)
"""


def master(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "master", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)


def task_file(tmp_path: Path) -> Path:
    task = tmp_path / "talk.py"
    task.write_text(TASK)
    return task


@pytest.mark.timeout(120)
def test_a_callables_output_goes_to_its_chunk_log_one_part_per_attempt(spool: Spool, agents, env,
                                                                      tmp_path: Path) -> None:
    env = {k: v for k, v in env.items() if k != "PYTHONUNBUFFERED"}  # the job's stdout is buffered, as by default
    (agent,) = agents(1, env_=env)
    marker = tmp_path / "failed-once"
    r = run_main(["--base", str(spool.base), "--task", f"{task_file(tmp_path)}:talk", "--chunks", "2", "--run", "talk",
                  "--kwargs", json.dumps({"marker": str(marker)}), "--retries", "1", "--no-progress"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [results(spool.base, "talk")[c]["attempt"] for c in (0, 1)] == [1, 2]

    log = spool.chunk_log("talk", 1).read_text()
    headers = [m.group(0) for m in ATTEMPT_HEADER.finditer(log)]
    assert [int(ATTEMPT_HEADER.match(h).group(1)) for h in headers] == [1, 2], log
    assert all("talk.py:talk (worker pid " in h for h in headers), headers
    parts = ATTEMPT_HEADER.split(log)  # ['', '1', <attempt 1's output>, '2', <attempt 2's output>]
    for output in (parts[2], parts[4]):  # each attempt printed its three lines, and nothing else is there
        assert sorted(output.splitlines()) == ["err 1", "from-a-child", "out 1"], log
    first = spool.chunk_log("talk", 0).read_text()
    assert len(ATTEMPT_HEADER.findall(first)) == 1 and sorted(ATTEMPT_HEADER.sub("", first).splitlines()) == \
        ["err 0", "from-a-child", "out 0"], first

    worker = spool.worker_log(agent.id).read_text()  # the worker's own lines only: its marks
    assert f"{JOB_MARK} talk chunk 1 attempt 2" in worker
    assert not re.search(r"^(out|err) \d|from-a-child", worker, re.M), worker

    r = master(["logs", "--base", str(spool.base), "--run", "talk", "--chunk", "1"], env)
    assert r.returncode == 0, r.stderr
    assert f"--- output of every attempt ({spool.chunk_log('talk', 1)}) ---" in r.stdout, r.stdout
    assert r.stdout.count("from-a-child") == 2 and r.stdout.count("out 1\n") == 2, r.stdout  # once per attempt
    assert "RuntimeError: the first attempt fails" in r.stdout and "worker log" not in r.stdout


@pytest.mark.timeout(120)
def test_a_callable_that_prints_nothing_leaves_no_chunk_log(spool: Spool, agents, env, tmp_path: Path) -> None:
    """A run of short silent chunks makes no file per chunk (nor pays a file creation for each):
    the output waits in the agent's scratch file and becomes a chunk log only where there is some."""
    agents(1)
    r = run_main(["--base", str(spool.base), "--task", f"{task_file(tmp_path)}:quiet", "--chunks", "6", "--run", "quiet",
                  "--no-progress"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    logs = sorted(p.name for p in spool.run_log_dir("quiet").iterdir()) if spool.run_log_dir("quiet").exists() else []
    assert logs == ["000002.log"], logs
    assert spool.chunk_log("quiet", 2).read_text().splitlines()[1:] == ["only chunk 2 speaks"]


@pytest.mark.timeout(120)
def test_a_job_that_kills_its_worker_leaves_what_it_printed_in_its_failed_result(spool: Spool, agents, env,
                                                                                 tmp_path: Path) -> None:
    (agent,) = agents(1)
    r = run_main(["--base", str(spool.base), "--task", f"{task_file(tmp_path)}:die", "--chunks", "1", "--run", "die",
                  "--retries", "0", "--no-progress"], env)
    assert r.returncode != 0
    err = results(spool.base, "die")[0]["error"]
    assert err["type"] == "WorkerDied" and "exited with code 3" in err["message"], err
    assert err["traceback"].splitlines() == ["last words of 0", "a-child-before-the-end"], err  # this attempt's only
    assert err["log"] == str(spool.chunk_log("die", 0))
    assert "last words of 0" in spool.chunk_log("die", 0).read_text()
    wait_for(lambda: f"{JOB_MARK} die chunk 0 attempt 1" in spool.worker_log(agent.id).read_text(), 10, "the mark")
    assert "last words" not in spool.worker_log(agent.id).read_text()


@pytest.mark.timeout(120)
def test_collect_writes_the_gpu_id_and_host_of_each_chunk(spool: Spool, agents, env, tmp_path: Path) -> None:
    agents(2, first=2)  # testhost-cpu2, testhost-cpu3: gpu_id 2 and 3
    r = run_main(["--base", str(spool.base), "--task", "examples.noop:square", "--chunks", "6", "--run", "sq",
                  "--no-progress"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "sq.csv"
    r = master(["collect", "--base", str(spool.base), "--run", "sq", "--out", str(out)], env)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0])[:9] == ["run", "chunk_id", "status", "attempt", "agent", "host", "device", "gpu_id",
                                 "started_at"]
    recs = results(spool.base, "sq")
    assert len(rows) == 6
    for row in rows:
        rec = recs[int(row["chunk_id"])]
        assert row["host"] == HOST == rec["host"] and row["agent"] == rec["agent"]
        assert int(row["gpu_id"]) == rec["gpu_id"] == int(rec["agent"].rsplit("cpu", 1)[1]), (row, rec)
    jsonl = tmp_path / "sq.jsonl"
    assert master(["collect", "--base", str(spool.base), "--run", "sq", "--out", str(jsonl)], env).returncode == 0
    assert {json.loads(x)["gpu_id"] for x in jsonl.read_text().splitlines()} <= {2, 3}
