"""Disk full while writing results: a clear failure, no partial result, recovery when space returns."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.paths import Spool
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


@pytest.mark.timeout(120)
def test_disk_full_fails_clearly_leaves_nothing_partial_and_recovers(small_fs: Path, tmp_path: Path, env) -> None:
    spool = Spool(small_fs / "base").ensure()
    agent = AgentProc(spool.base, 0, env).wait_ready()
    gate = tmp_path / "gate"
    feeder = subprocess.Popen(
        [sys.executable, "main.py", "--base", str(spool.base), "--task", "tests.faulty:gated_array", "--chunks", "1",
         "--kwargs", json.dumps({"gate": str(gate), "mb": 1.0}), "--retries", "3", "--retry-delay", "3",
         "--run", "full", "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (agent.heartbeat() or {}).get("state") == "busy", what="agent busy at the gate")
        filler = fill(small_fs, leave=256 * 1024)  # room for small files, not for a 1 MB result
        gate.touch()
        # attempt 1 fails; attempt 2 waits out a 3 s back-off, so the folder is quiet now
        wait_for(lambda: spool.history_json("full", 0, 1).exists(), what="a failed attempt on record")
        hist = json.loads(spool.history_json("full", 0, 1).read_text())
        assert "No space left on device" in hist["error"]["message"]
        names = [p.name for p in spool.result_dir("full").iterdir()]
        assert not any(n.endswith(".npz") or ".tmp-" in n for n in names), names  # nothing partial
        assert agent.proc.poll() is None
        filler.unlink()  # space returns
        out, err = feeder.communicate(timeout=90)
        assert feeder.returncode == 0, err
        res = results(spool.base, "full")
        assert res[0]["status"] == "ok" and res[0]["attempt"] == 2
        assert agent.proc.poll() is None
    finally:
        feeder.kill()
        agent.kill()
