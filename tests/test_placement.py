"""Placement the user asks for (master.spec.placement): --target HOST::GPU, --hosts, --exclude-hosts,
--min-free-gb, judged against heartbeats, and a run no live agent may take failing at once."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gpupool.jobs.heartbeat import Heartbeat
from gpupool.master.spec.placement import Placement
from gpupool.master.spec.runspec import UsageError
from tests.helpers import REPO, results, run_main

GPU_AGENT = Heartbeat("node1-gpu2", 1, "idle", host="node1", hostname="node1.lab", gpu_id=2, device="cuda:0",
                      gpu={"mem_used": 30 * 2**30, "mem_total": 80 * 2**30})


def test_targets_hosts_and_free_memory() -> None:
    ok = lambda p: p.why_not(GPU_AGENT) is None  # noqa: E731
    assert ok(Placement()) and ok(Placement.parse(["node1::0,2"])) and ok(Placement.parse(["node1"]))
    assert ok(Placement.parse(["node9::0", "node1.lab::2"]))  # repeatable; the full hostname matches too
    assert Placement.parse(["node1::0,1"]).why_not(GPU_AGENT) == "--target node1::0,1"
    assert ok(Placement.parse(hosts="node0,node1")) and not ok(Placement.parse(hosts="node0"))
    assert Placement.parse(exclude_hosts="node1").why_not(GPU_AGENT) == "--exclude-hosts node1"
    assert ok(Placement.parse(min_free_gb=50)) and not ok(Placement.parse(min_free_gb=51))
    assert Placement.parse(min_free_gb=1).why_not(Heartbeat("cpuhost-cpu0", 1, "idle", host="cpuhost", gpu_id=0)) == "--min-free-gb 1"


@pytest.mark.parametrize("bad", ["node1::x", "::0", "node 1::0", "node1::-1"])
def test_a_bad_target_is_named(bad: str) -> None:
    with pytest.raises(UsageError, match="--target"):
        Placement.parse([bad])


def test_a_run_goes_only_where_it_is_targeted(spool, agents, env) -> None:
    agents(2)
    r = run_main(["--base", str(spool.base), "--task", "examples.noop:square", "--chunks", "6", "--run", "t",
                  "--target", "testhost::1", "--no-progress"], env)
    assert r.returncode == 0, r.stderr
    assert {rec["agent"] for rec in results(spool.base, "t").values()} == {"testhost-cpu1"}


def test_a_run_no_agent_may_take_fails_at_once_naming_the_constraint(spool, agents, env) -> None:
    agents(1)
    r = run_main(["--base", str(spool.base), "--task", "examples.noop:square", "--chunks", "3", "--run", "u",
                  "--target", "otherhost::0", "--no-progress"], env, timeout=60)
    assert r.returncode == 2 and "--target otherhost::0" in r.stderr and "testhost-cpu0" in r.stderr, r.stderr
    assert results(spool.base, "u") == {}


def test_retry_and_a_rerun_keep_the_placement_saved_with_the_run(spool, agents, env, tmp_path) -> None:
    """Placement is saved in run.json (issue 24): a rerun without --target and `master retry` run the
    failed chunks on the targeted agent only; a rerun with another --target says what changed."""
    agents(2)
    flaky = tmp_path / "flaky"
    flaky.mkdir()
    kwargs = json.dumps({"modes": ["flaky"] * 6, "flaky_dir": str(flaky)})
    cmd = ["--base", str(spool.base), "--task", "tests.faulty:misbehave", "--chunks", "6", "--kwargs", kwargs,
           "--run", "p", "--retries", "0", "--max-failures", "0", "--no-progress"]
    agents_of = lambda: {rec["agent"] for rec in results(spool.base, "p").values()}  # noqa: E731
    first = run_main([*cmd, "--target", "testhost::1"], env)
    assert first.returncode == 1 and agents_of() == {"testhost-cpu1"}, first.stderr
    assert json.loads((spool.base / "runs" / "p" / "run.json").read_text())["targets"] == ["testhost::1"]
    for f in flaky.iterdir():  # every chunk fails once more
        f.unlink()
    again = run_main(cmd, env)  # the same command without --target
    assert again.returncode == 1 and "placement changed" not in again.stdout + again.stderr, again.stderr
    assert {rec["status"] for rec in results(spool.base, "p").values()} == {"failed"}
    assert agents_of() == {"testhost-cpu1"}
    retry = subprocess.run([sys.executable, "-m", "master", "retry", "--base", str(spool.base), "--run", "p",
                            "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert {rec["status"] for rec in results(spool.base, "p").values()} == {"ok"}
    assert agents_of() == {"testhost-cpu1"}
    moved = run_main([*cmd, "--target", "testhost::0"], env)
    assert moved.returncode == 0, moved.stderr
    assert "run p: placement changed: --target testhost::1 -> testhost::0" in moved.stderr, moved.stderr
    assert json.loads((spool.base / "runs" / "p" / "run.json").read_text())["targets"] == ["testhost::0"]
