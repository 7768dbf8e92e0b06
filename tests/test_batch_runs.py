"""Batches end to end (issue 27): real agents, real masters (``main.py``), real kills. Every chunk
is committed exactly once, counted raw on disk (``claims``: its own file, and every batch slot
that says it is final there), whatever is killed in the middle of batches."""
from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gpupool.jobs import batches
from gpupool.jobs.paths import BATCH_RE, Spool
from tests.faulty import tally
from tests.helpers import REPO, claims, results, run_main, wait_for


def _cmd(spool: Spool, run: str, chunks: int, task: str, kwargs: dict, *extra: str) -> list[str]:
    return ["--base", str(spool.base), "--task", task, "--chunks", str(chunks), "--run", run,
            "--kwargs", json.dumps(kwargs), "--no-progress", "--dead-after", "3", *extra]


def _start(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "main.py", *cmd], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _slots(spool: Spool, run: str) -> list[batches.Slot]:
    folder = spool.result_dir(run)
    return [batches.read_slot(p) for p in folder.iterdir() if BATCH_RE.match(p.name)] if folder.exists() else []


def _exactly_once(spool: Spool, run: str, chunks: int) -> None:
    got = claims(spool.base, run)
    assert set(got) == set(range(chunks)) and set(got.values()) == {1}, \
        {c: n for c, n in got.items() if n != 1} or sorted(set(range(chunks)) - set(got))[:20]


@pytest.mark.timeout(180)
def test_many_short_chunks_go_in_batches_and_leave_few_files(spool: Spool, agents, env, tmp_path: Path) -> None:
    agents(2)
    out = run_main(_cmd(spool, "short", 3000, "examples.noop:noop", {}), env, timeout=150)
    assert out.returncode == 0, out.stdout + out.stderr
    _exactly_once(spool, "short", 3000)
    files = list(spool.result_dir("short").iterdir())
    assert _slots(spool, "short") and len(files) < 3000 / 4, len(files)  # batched once durations were known
    got = results(spool.base, "short")
    assert all(r["status"] == "ok" and r["value"] is None for r in got.values())
    table = tmp_path / "short.csv"
    collect = subprocess.run([sys.executable, "-m", "master", "collect", "--base", str(spool.base), "--run", "short",
                              "--out", str(table)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert collect.returncode == 0, collect.stdout + collect.stderr
    rows = list(csv.DictReader(table.open()))
    assert [int(r["chunk_id"]) for r in rows] == list(range(3000)) and {r["value"] for r in rows} == {""}


@pytest.mark.timeout(240)
def test_killing_an_agent_in_the_middle_of_batches_loses_nothing(spool: Spool, agents, env, tmp_path: Path) -> None:
    a0, a1 = agents(2)
    marks = tmp_path / "marks"
    master = _start(_cmd(spool, "kill", 400, "tests.faulty:counted", {"marks": str(marks), "seconds": 0.01},
                         "--batch", "10"), env)
    try:
        wait_for(lambda: len(_slots(spool, "kill")) >= 4, 60, "a few batches committed")
        a0.kill()  # SIGKILL: its worker dies with it, its queued and running batches are lost
        out, _ = master.communicate(timeout=180)
    finally:
        master.kill()
    assert master.returncode == 0, out
    _exactly_once(spool, "kill", 400)
    fenced = [s for s in _slots(spool, "kill") if s.fenced is not None]
    assert fenced, "the dead agent's batches were taken back by fencing their slots"
    starts, _ = tally(str(marks))
    assert set(starts) == set(range(400))


@pytest.mark.timeout(240)
def test_a_killed_master_resumes_batches_exactly_once(spool: Spool, agents, env, tmp_path: Path) -> None:
    agents(2)
    cmd = _cmd(spool, "resume", 400, "tests.faulty:counted", {"marks": str(tmp_path / "marks"), "seconds": 0.01},
               "--batch", "10")
    master = _start(cmd, env)
    try:
        wait_for(lambda: len(_slots(spool, "resume")) >= 3, 60, "a few batches committed")
        master.send_signal(signal.SIGKILL)
        master.wait(timeout=30)
    finally:
        master.kill()
    again = run_main(cmd, env, timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already done; resuming" in again.stdout + again.stderr
    _exactly_once(spool, "resume", 400)


@pytest.mark.timeout(240)
def test_a_chunk_that_kills_its_worker_in_a_batch_fails_alone(spool: Spool, agents, env) -> None:
    agents(1)
    modes = ["fine"] * 30
    modes[7] = "exit"  # os._exit: its worker dies in the middle of the batch
    out = run_main(_cmd(spool, "poison", 30, "tests.faulty:misbehave", {"modes": modes}, "--batch", "10",
                        "--retries", "1", "--retry-delay", "0.05"), env, timeout=200)
    assert out.returncode == 1, out.stdout + out.stderr
    _exactly_once(spool, "poison", 30)
    got = results(spool.base, "poison")
    assert got[7]["status"] == "failed" and "batch" not in got[7], got[7]  # it ran alone, and failed
    assert all(got[c]["status"] == "ok" and got[c]["value"] == "fine" for c in range(30) if c != 7)
    first = batches.read_slot(spool.batch_json("poison", 0, 10))
    assert first.codes == batches.BACK * 10  # the batch it was in was handed back whole
