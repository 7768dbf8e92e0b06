"""Fenced fresh starts (issue 23): a result committed for an earlier epoch of a run never counts
in the newer one. The late commit of an old agent is made here by the real commit code, at the
worst moment (after the fresh master cleared the run, before its own job of that chunk commits):
the window is made wide on purpose, not hit by luck."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gpupool.jobs.descriptor import Job, JobKind, JobState
from gpupool.jobs.paths import Spool
from gpupool.jobs.results import commit, read_epoch, record
from tests.helpers import REPO, results, run_main, wait_for


def _master(base, args: list[str], env) -> list[str]:
    return [sys.executable, "main.py", "--base", str(base), "--task", "tests.faulty:tagged", "--chunks", "3",
            "--run", "fenced", "--no-progress", *args]


@pytest.mark.timeout(180)
def test_a_result_of_an_earlier_epoch_committed_after_a_fresh_start_never_counts(spool: Spool, agents, env) -> None:
    (agent,) = agents(1)
    first = run_main(["--base", str(spool.base), "--task", "tests.faulty:tagged", "--chunks", "3", "--run", "fenced",
                      "--kwargs", json.dumps({"tag": "old"}), "--no-progress"], env)
    assert first.returncode == 0, first.stderr
    old_epoch = read_epoch(spool, "fenced")
    old = results(spool.base, "fenced")[0]
    # the agent takes nothing while the fresh master clears the run and queues its jobs
    drained = subprocess.run([sys.executable, "-m", "master", "drain", "--base", str(spool.base), agent.id],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert drained.returncode == 0, drained.stderr
    fresh = subprocess.Popen(_master(spool.base, ["--fresh", "--kwargs", json.dumps({"tag": "new"})], env),
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: read_epoch(spool, "fenced") not in (None, old_epoch), 60, "the fresh start's new epoch")
        wait_for(lambda: spool.result_dir("fenced").is_dir() and not spool.result_json("fenced", 0).exists(), 60,
                 "the earlier results cleared and the run's folder made again")
        # now an agent of the earlier start, thawed, commits chunk 0 with the old kwargs' value
        late = Job(run="fenced", chunk_id=0, total_chunks=3, kind=JobKind.CALLABLE, target="tests.faulty:tagged",
                   kwargs={"tag": "old"}, attempt=1, max_attempts=old["max_attempts"], epoch=old_epoch)
        assert commit(spool, late, record(late, JobState.OK, agent=agent.id, value="old 0", duration_s=0.1))
        undrained = subprocess.run([sys.executable, "-m", "master", "undrain", "--base", str(spool.base), agent.id],
                                   cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert undrained.returncode == 0, undrained.stderr
        _, err = fresh.communicate(timeout=120)
        assert fresh.returncode == 0, err
    finally:
        fresh.kill()
    res = results(spool.base, "fenced")
    assert {c: r["value"] for c, r in res.items()} == {c: f"new {c}" for c in range(3)}, res
    assert all(r.get("epoch") == read_epoch(spool, "fenced") for r in res.values())
    whys = [p.read_text() for p in spool.rejected_dir.glob("*.why")]
    assert any("earlier start of the run" in w for w in whys), whys  # the stale one kept, with its reason


def test_a_fresh_start_unseals_the_run_before_it_reads_its_results(spool: Spool) -> None:
    """A result of the earlier start committed between the clearing and the master's first look
    is read and refused (its epoch), never trusted by its name as a sealed run's results are."""
    from gpupool.jobs.results import seal, sealed
    from gpupool.master.api import Pool

    spool.run_dirs("sealedrun")
    seal(spool, "sealedrun")
    assert sealed(spool, "sealedrun")
    Pool(spool.base).submit(task="examples.noop:noop", chunks=2, run="sealedrun", fresh=True)._clear()
    assert not sealed(spool, "sealedrun")
