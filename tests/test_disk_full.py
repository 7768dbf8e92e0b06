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
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0755", "tmpfs", str(mnt)], capture_output=True, text=True)
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


def _feed(base: Path, env: dict, task: str, chunks: int, kwargs: dict, run: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "main.py", "--base", str(base), "--task", task, "--chunks", str(chunks),
         "--kwargs", json.dumps(kwargs), "--retries", "0", "--retry-delay", "0.05", "--run", run, "--no-progress"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("where", ["result", "own_file"])
def test_a_full_disk_pauses_the_agent_costs_no_attempt_and_every_chunk_commits_once_when_space_returns(
        where: str, small_fs: Path, tmp_path: Path, env) -> None:
    """The worker cannot save a chunk's arrays (``result``), or the job cannot write its own output
    file on the full disk (``own_file``): with ``--retries 0`` a single attempt used up would fail
    the chunk for good."""
    spool = Spool(small_fs / "base").ensure()
    agent = AgentProc(spool.base, 0, env).wait_ready()
    marks, chunks = tmp_path / "marks", 4  # the marks live off the small disk
    out = small_fs / "out"
    out.mkdir()
    task, kwargs = (("tests.pathological:array_marked", {"marks": str(marks), "mb": 0.5}) if where == "result" else
                    ("tests.pathological:own_file_marked", {"marks": str(marks), "out_dir": str(out), "mb": 0.5}))
    filler = fill(small_fs, leave=256 * 1024)  # room for small files, not for a 0.5 MB result
    feeder = _feed(spool.base, env, task, chunks, kwargs, "full")
    try:
        # the disk stays full while the agent tries again and again, pausing between tries
        wait_for(lambda: sum(tally(str(marks))[0].values()) >= 4, 60, "chunks tried again while the disk is full")
        names = sorted(p.name for p in spool.result_dir("full").iterdir()) if spool.result_dir("full").exists() else []
        assert not any(n.endswith(".json") for n in names), names  # nothing committed, no attempt on record
        assert not any(n.endswith(".npz") or ".tmp-" in n for n in names), names  # nothing partial
        assert feeder.poll() is None and agent.proc.poll() is None
        filler.unlink()  # space returns
        _, err = feeder.communicate(timeout=90)
        assert feeder.returncode == 0, err
        res = results(spool.base, "full")
        assert sorted(res) == list(range(chunks))
        assert all(r["status"] == "ok" and r["attempt"] == 1 for r in res.values()), res
        assert not list(spool.result_dir("full").glob("*.a*.json"))  # no failed attempt anywhere
        if where == "result":
            assert all((spool.result_dir("full") / r["arrays"]).stat().st_size >= 512 * 1024 for r in res.values())
        # why it paused is in its heartbeat (written again now that there is room)
        wait_for(lambda: "No space left on device" in ((agent.heartbeat() or {}).get("last_error") or ""),
                 what="the heartbeat naming the full disk")
        assert agent.proc.poll() is None
    finally:
        feeder.kill()
        agent.kill()
