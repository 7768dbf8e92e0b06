"""Disk full while writing results: the agent pauses, nothing partial is left, no attempt is used,
and every chunk commits once when space returns."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpupool.jobs.paths import Spool
from tests.faulty import tally
from tests.helpers import REPO, AgentProc, results, wait_for


@pytest.fixture
def small_fs(tmp_path: Path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("DISK-FULL TEST SKIPPED: needs root to mount a small tmpfs")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"DISK-FULL TEST SKIPPED: cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder: Path, leave: int) -> Path:
    """Fill the filesystem of ``folder`` until ``leave`` bytes are free."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        while True:
            st = os.statvfs(folder)
            free = st.f_bavail * st.f_frsize
            if free <= leave:
                break
            try:
                f.write(b"\0" * min(65536, free - leave))
                f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
    return filler


def _feed(base: Path, env: dict, task: str, chunks: int, kwargs: dict, run: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "main.py", "--base", str(base), "--task", task, "--chunks", str(chunks),
         "--kwargs", json.dumps(kwargs), "--retries", "0", "--retry-delay", "0.05", "--run", run, "--no-progress",
         *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _listing(spool: Spool, run: str) -> list[str]:
    return sorted(p.name for p in spool.result_dir(run).iterdir()) if spool.result_dir(run).exists() else []


def _ends_ok_when_space_returns(filler: Path, feeder: subprocess.Popen, spool: Spool, run: str, chunks: int) -> dict:
    """Space returns: the run ends ok, every chunk on its first attempt (no attempt was spent)."""
    filler.unlink()
    _, err = feeder.communicate(timeout=90)
    assert feeder.returncode == 0, err
    res = results(spool.base, run)
    assert sorted(res) == list(range(chunks))
    assert all(r["status"] == "ok" and r["attempt"] == 1 for r in res.values()), res
    return res


@pytest.mark.timeout(150)
def test_a_computed_value_waits_for_space_and_is_never_computed_again(small_fs: Path, tmp_path: Path, env) -> None:
    """The worker cannot save a chunk's arrays: it keeps the value and saves it again as space
    returns (said in the heartbeat); no chunk runs twice and no attempt is used (``--retries 0``:
    a single attempt used up would fail the chunk for good)."""
    spool = Spool(small_fs / "base").ensure()
    agent = AgentProc(spool.base, 0, env).wait_ready()
    marks, chunks = tmp_path / "marks", 4  # the marks live off the small disk
    filler = fill(small_fs, leave=256 * 1024)  # room for small files, not for a 0.5 MB result
    feeder = _feed(spool.base, env, "tests.pathological:array_marked", chunks, {"marks": str(marks), "mb": 0.5}, "full")
    try:
        wait_for(lambda: "cannot save the arrays" in ((agent.heartbeat() or {}).get("waiting") or ""), 60,
                 "the heartbeat saying the computed value waits for space")
        starts, _ = tally(str(marks))
        assert sum(starts.values()) == 1, starts  # the first chunk computed once, and waits; nothing else started
        names = _listing(spool, "full")
        assert not any(n.endswith(".json") or n.endswith(".npz") or ".tmp-" in n for n in names), names
        assert feeder.poll() is None and agent.proc.poll() is None
        res = _ends_ok_when_space_returns(filler, feeder, spool, "full", chunks)
        assert all((spool.result_dir("full") / r["arrays"]).stat().st_size >= 512 * 1024 for r in res.values())
        assert tally(str(marks))[0] == {c: 1 for c in range(chunks)}  # each computed exactly once
        assert not list(spool.result_dir("full").glob("*.a*.json"))  # no failed attempt anywhere
    finally:
        feeder.kill()
        agent.kill()


@pytest.mark.timeout(150)
def test_a_job_whose_own_write_fails_on_a_full_disk_pauses_the_agent_and_costs_no_attempt(
        small_fs: Path, tmp_path: Path, env) -> None:
    """The job cannot write its own output file on the full disk: nothing of it can be kept, so it
    runs again once space returns, after pauses; no attempt is used (``--retries 0``)."""
    spool = Spool(small_fs / "base").ensure()
    agent = AgentProc(spool.base, 0, env).wait_ready()
    marks, chunks = tmp_path / "marks", 4
    out = small_fs / "out"
    out.mkdir()
    filler = fill(small_fs, leave=256 * 1024)  # room for small files, not for a 0.5 MB output
    feeder = _feed(spool.base, env, "tests.pathological:own_file_marked", chunks,
                   {"marks": str(marks), "out_dir": str(out), "mb": 0.5}, "full")
    try:
        # the disk stays full while the agent tries again and again, pausing between tries
        wait_for(lambda: sum(tally(str(marks))[0].values()) >= 4, 60, "chunks tried again while the disk is full")
        names = _listing(spool, "full")
        assert not any(n.endswith(".json") for n in names), names  # nothing committed, no attempt on record
        assert feeder.poll() is None and agent.proc.poll() is None
        _ends_ok_when_space_returns(filler, feeder, spool, "full", chunks)
        assert not list(spool.result_dir("full").glob("*.a*.json"))  # no failed attempt anywhere
        # why it paused is in its heartbeat (written again now that there is room)
        wait_for(lambda: "No space left on device" in ((agent.heartbeat() or {}).get("last_error") or ""),
                 what="the heartbeat naming the full disk")
        assert agent.proc.poll() is None
    finally:
        feeder.kill()
        agent.kill()


@pytest.mark.timeout(200)
@pytest.mark.parametrize("batch", [1, 10])
def test_a_disk_full_to_the_last_byte_during_a_pipelined_run_burns_no_work(small_fs: Path, tmp_path: Path, env,
                                                                          batch: int) -> None:
    """Short chunks that return arrays (so the next job waits in the worker's pipe) on a disk
    filled to the last byte mid-run: each outcome waits for space instead of being thrown away,
    and the job already in the pipe waits behind it. Executions: the chunks, plus at most what
    was in flight when the disk filled (a job's start mark may be written before its value is
    lost to a stop; here nothing stops, so exactly one each is the expectation, bounded loosely).
    One chunk a job, and in batches of 10 (each chunk's arrays wait for space in the worker, the
    batch's slot in the agent)."""
    spool = Spool(small_fs / "base").ensure()
    agent = AgentProc(spool.base, 0, env, out_dir=tmp_path).wait_ready()  # its output off the full disk
    marks, chunks = tmp_path / "marks", 40
    gate = tmp_path / "gate"  # chunks from 10 on return only once the disk is full
    feeder = _feed(spool.base, env, "tests.pathological:array_marked", chunks,
                   {"marks": str(marks), "mb": 0.02, "gate": str(gate), "free": 10}, "piped", "--batch", str(batch))
    filler = None
    try:
        wait_for(lambda: len(list(spool.result_dir("piped").glob("*.npz"))) >= 5, 60, "a few chunks committed")
        filler = fill(small_fs, leave=0)  # not a byte left
        gate.touch()
        # (its heartbeat cannot be written either: its output says it)
        wait_for(lambda: "is kept, " in agent.output() or "the value is kept" in agent.output(), 60,
                 "the agent keeping an outcome until space returns")
        held = sum(tally(str(marks))[0].values())
        assert feeder.poll() is None
        filler.unlink()
        filler = None
        _, err = feeder.communicate(timeout=120)
        assert feeder.returncode == 0, err
        res = results(spool.base, "piped")
        assert sorted(res) == list(range(chunks)) and all(r["status"] == "ok" for r in res.values())
        starts, _ = tally(str(marks))
        assert sum(starts.values()) <= chunks + 2 * batch and max(starts.values()) <= 2, (held, starts)
        assert not list(spool.result_dir("piped").glob("*.a*.json"))
    finally:
        if filler is not None:
            filler.unlink()
        feeder.kill()
        agent.kill()
