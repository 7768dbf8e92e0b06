"""Fail fast on repetition (issue 25): a run stops once its first failed attempts all fail alike
(numbers in the message aside) while no chunk is ok, whatever the error's type; a varied error
or a run with an ok chunk runs on. Real agents, real main.py runs; executions counted by marks."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gpupool.jobs.mailbox import Mailbox
from gpupool.jobs.paths import Spool
from gpupool.master.core.feeder import alike
from tests.faulty import tally
from tests.helpers import REPO, results, run_main

TASK = "tests.repeating:fails"


def _run(spool: Spool, env: dict[str, str], run: str, chunks: int, kwargs: dict, *flags: str):
    return run_main(["--base", str(spool.base), "--task", TASK, "--chunks", str(chunks), "--run", run,
                     "--kwargs", json.dumps(kwargs), "--no-progress", *flags], env)


def _attempts_failed(stdout: str) -> int:
    m = re.search(r"\d+ failed \((\d+) failed attempts?[,)]", stdout)
    assert m, stdout
    return int(m.group(1))


def _stopped_alike(spool: Spool, r, run: str, marks: Path, chunks: int, error: str) -> None:
    """Stopped after its first attempts failed alike: none was retried (--retry-delay 60), far
    fewer executions than chunks, nothing of it left queued, and the summary says so."""
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert f"STOPPED run {run}:" in r.stdout and "stopped early: 3 failed attempts in a row" in r.stdout, out
    assert "and none is ok: " + error in r.stdout and "every chunk would fail the same way" in r.stdout, out
    assert ", 0 failed (" in r.stdout and _attempts_failed(r.stdout) >= 3, out  # attempts, not chunks, counted
    starts, _ = tally(str(marks))
    assert 3 <= sum(starts.values()) <= chunks // 2 and max(starts.values()) == 1, starts
    assert not [n for n in __import__("os").listdir(spool.result_dir(run)) if ".a2." in n]
    assert all(j.run != run for ident in spool.agent_ids() for j in Mailbox(spool, ident).read().jobs)


def test_what_is_alike() -> None:
    assert alike("FileNotFoundError: [Errno 2] No such file or directory: '/data/chunk_17.npy'") == \
        alike("FileNotFoundError: [Errno 2] No such file or directory: '/data/chunk_18.npy'")
    assert alike("RuntimeError: <Net object at 0x7f3a2b1c90d0> broke") == \
        alike("RuntimeError: <Net object at 0x7f11aa0b3e20> broke")
    assert alike("ValueError: bad row in alpha.csv") != alike("ValueError: bad row in bravo.csv")


@pytest.mark.timeout(150)
def test_a_wrong_data_path_on_every_chunk_stops_the_run_after_three_first_attempts(
        spool: Spool, agents, env, tmp_path: Path) -> None:
    agents(2)
    marks = tmp_path / "marks"
    r = _run(spool, env, "path", 30, {"marks": str(marks), "how": "path", "pause": 0.2}, "--retry-delay", "60")
    _stopped_alike(spool, r, "path", marks, 30, "FileNotFoundError: [Errno 2] No such file or directory: '/data/chunk_")


@pytest.mark.timeout(150)
def test_the_same_runtime_error_stops_the_run_for_a_callable_and_for_a_script(
        spool: Spool, agents, env, tmp_path: Path) -> None:
    agents(1)
    marks = tmp_path / "marks"
    r = _run(spool, env, "rt", 12, {"marks": str(marks), "how": "runtime", "pause": 0.2}, "--retry-delay", "60")
    _stopped_alike(spool, r, "rt", marks, 12, "RuntimeError: the config has no section 'model'")
    # a script that exits 1 on every chunk with the same traceback: alike by the last line of its output
    smarks = tmp_path / "smarks"
    s = run_main(["--base", str(spool.base), "--script", str(REPO / "tests" / "repeating.py"), "--chunks", "12",
                  "--run", "srt", "--kwargs", json.dumps({"marks": str(smarks), "how": "runtime", "pause": 0.2}), "--no-progress",
                  "--retry-delay", "60"], env)
    _stopped_alike(spool, s, "srt", smarks, 12, "ScriptFailed: the script exited with code 1")


@pytest.mark.timeout(150)
def test_an_error_that_varies_or_a_pool_error_does_not_stop_the_run(spool: Spool, agents, env, tmp_path: Path) -> None:
    agents(1)
    marks = tmp_path / "marks"
    r = _run(spool, env, "varied", 6, {"marks": str(marks), "how": "varied"}, "--retry-delay", "0.05")
    assert r.returncode == 1 and "STOPPED" not in r.stdout and "stopped early" not in r.stdout, r.stdout + r.stderr
    assert "6 chunks, 0 ok, 6 failed (18 failed attempts, 12 of them retried)" in r.stdout, r.stdout
    starts, _ = tally(str(marks))
    assert starts == {c: 3 for c in range(6)}, starts  # every attempt of every chunk ran
    # a timeout on every chunk is the pool's verdict, not the code's error: it never stops a run
    tmarks = tmp_path / "tmarks"
    t = _run(spool, env, "slow", 4, {"marks": str(tmarks), "how": "runtime", "pause": 5}, "--timeout", "0.3",
             "--retries", "1", "--retry-delay", "0.05")
    assert t.returncode == 1 and "STOPPED" not in t.stdout and "Timeout" in t.stdout, t.stdout + t.stderr
    res = results(spool.base, "slow")  # every attempt of every chunk was made (whether its code had started or not)
    assert {c: (r["attempt"], r["error"]["type"]) for c, r in res.items()} == {c: (2, "Timeout") for c in range(4)}


@pytest.mark.timeout(150)
def test_a_run_with_an_ok_chunk_does_not_stop(spool: Spool, agents, env, tmp_path: Path) -> None:
    """Chunk 0 is ok, every other chunk fails alike: with --max-failures 0 all run; the same run
    resumed with fail fast on re-runs its failed chunks in full, for it has an ok chunk."""
    agents(1)
    marks = tmp_path / "marks"
    kwargs = {"marks": str(marks), "how": "runtime", "ok": [0]}
    first = _run(spool, env, "someok", 5, kwargs, "--retries", "1", "--retry-delay", "0.05", "--max-failures", "0")
    assert first.returncode == 1 and "5 chunks, 1 ok, 4 failed (8 failed attempts, 4 of them retried)" in first.stdout, \
        first.stdout + first.stderr
    again = _run(spool, env, "someok", 5, kwargs, "--retries", "1", "--retry-delay", "0.05")
    assert again.returncode == 1 and "STOPPED" not in again.stdout, again.stdout + again.stderr
    assert "1 ok, 4 failed (8 failed attempts" in again.stdout, again.stdout
    assert tally(str(marks))[0] == {0: 1, 1: 4, 2: 4, 3: 4, 4: 4}
