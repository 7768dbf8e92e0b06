"""Real agents on a real spool, fed by the real main.py, as a user runs them."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpupool.jobs.mailbox import Mailbox
from gpupool.jobs.paths import Spool
from gpupool.agent.worker_control import cap_log
from tests.helpers import REPO, AgentProc, results, run_main, run_names, wait_for


def test_100_chunks_spread_over_two_agents_then_status(spool: Spool, agents, env) -> None:
    agents(2)
    r = run_main(["--base", str(spool.base), "--task", "gpupool.master.matmul:multiply", "--chunks", "100",
                  "--no-progress"], env)
    assert r.returncode == 0, r.stderr
    assert "100 ok, 0 failed" in r.stdout
    [run] = run_names(spool.base)
    res = results(spool.base, run)
    assert sorted(res) == list(range(100)) and all(v["status"] == "ok" for v in res.values())
    per_agent = {a: sum(v["agent"] == a for v in res.values()) for a in ("testhost-cpu0", "testhost-cpu1")}
    assert min(per_agent.values()) > 0, per_agent
    y = np.load(spool.result_dir(run) / res[42]["arrays"])["Y"]
    from gpupool.master.matmul import chunk_input, shared_matrix
    assert np.allclose(y, chunk_input(42) @ shared_matrix(), atol=1e-4)
    st = subprocess.run([sys.executable, "-m", "master", "status", "--base", str(spool.base), "--json"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    data = json.loads(st.stdout)
    assert {a["id"] for a in data["agents"]} == {"testhost-cpu0", "testhost-cpu1"}
    assert all(a["alive"] for a in data["agents"])
    [row] = data["runs"]
    assert row == {**row, "run": run, "kind": "callable", "target": "gpupool.master.matmul:multiply", "chunks": 100,
                   "ok": 100, "failed": 0, "running": 0, "queued": 0, "pending": 0}
    table = subprocess.run([sys.executable, "-m", "master", "status", "--base", str(spool.base)], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=60).stdout
    assert "testhost-cpu0" in table and run in table


def test_script_mode_gives_identical_outputs_to_running_by_hand(spool: Spool, agents, env, tmp_path: Path) -> None:
    agents(2)
    pool_out, hand_out = tmp_path / "pool", tmp_path / "hand"
    r = run_main(["--base", str(spool.base), "--script", "examples/octorun_script.py", "--chunks", "6",
                  "--kwargs", json.dumps({"out_dir": str(pool_out), "size": 50}), "--no-progress"], env)
    assert r.returncode == 0, r.stderr
    for c in range(6):
        subprocess.run([sys.executable, "examples/octorun_script.py", "--gpu_id", "0", "--chunk_id", str(c),
                        "--total_chunks", "6", "--out_dir", str(hand_out), "--size", "50"], cwd=REPO, check=True,
                       capture_output=True)
    for c in range(6):
        assert (pool_out / f"chunk_{c}.npy").read_bytes() == (hand_out / f"chunk_{c}.npy").read_bytes()
    [run] = run_names(spool.base)
    log = (spool.logs_dir / run / "000003.log").read_text()
    assert "--chunk_id 3 --total_chunks 6 --out_dir" in log and "chunk 3/6 did" in log


def test_failures_are_retried_then_reported_with_nonzero_exit(spool: Spool, agents, env) -> None:
    agents(1)
    r = run_main(["--base", str(spool.base), "--task", "examples.noop:fail_on", "--chunks", "4",
                  "--kwargs", '{"bad": [2]}', "--retries", "1", "--retry-delay", "0.05", "--no-progress"], env)
    assert r.returncode == 1
    assert "3 ok, 1 failed" in r.stdout and "FAILED chunk 2" in r.stdout and "ValueError" in r.stdout
    assert "000002.json" in r.stdout
    [run] = run_names(spool.base)
    rdir = spool.result_dir(run)
    assert json.loads((rdir / "000002.json").read_text())["attempt"] == 2
    assert (rdir / "000002.a1.json").exists() and (rdir / "000002.a2.json").exists()  # history of both attempts


COUNTING_TASK = """
import os, uuid
MARKS, FIXED = {marks!r}, {fixed!r}

def f(chunk_id, bad=()):
    open(os.path.join(MARKS, f"{{chunk_id}}-{{uuid.uuid4().hex}}"), "w").close()  # one file per execution
    if chunk_id in bad and not os.path.exists(FIXED):
        raise RuntimeError("not yet")
    return chunk_id
"""


def test_rerun_resumes_and_runs_no_completed_chunk_again(spool: Spool, agents, env, tmp_path: Path) -> None:
    agents(2)
    task = tmp_path / "count.py"
    marks = tmp_path / "marks"
    marks.mkdir()
    task.write_text(COUNTING_TASK.format(marks=str(marks), fixed=str(tmp_path / "fixed")))
    args = ["--base", str(spool.base), "--task", f"{task}:f", "--chunks", "10", "--kwargs", '{"bad": [7]}',
            "--retries", "0", "--no-progress"]
    first = run_main(args, env)
    assert first.returncode == 1 and "9 ok, 1 failed" in first.stdout
    (tmp_path / "fixed").touch()
    second = run_main(args, env)
    assert second.returncode == 0, second.stderr
    assert "9 of 10 chunks already done" in second.stderr
    runs = [m.split("-")[0] for m in os.listdir(marks)]
    assert sorted(map(int, runs)) == sorted([*range(10), 7])  # only the failed chunk ran again
    fresh = run_main(args + ["--fresh"], env)
    assert fresh.returncode == 0 and len(os.listdir(marks)) == 21


def test_builtin_kwargs_and_gpu_env_in_cpu_mode(spool: Spool, agents, env) -> None:
    agents(1)
    r = run_main(["--base", str(spool.base), "--task", "examples.noop:env_probe", "--chunks", "2", "--no-progress",
                  "--run", "probe"], env)
    assert r.returncode == 0, r.stderr
    v = results(spool.base, "probe")[1]["value"]
    assert v["device"] == "cpu" and v["gpu_id"] == 0 and v["CUDA_VISIBLE_DEVICES"] == ""
    assert v["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_fake_gpus_one_agent_per_gpu_sees_only_its_gpu(spool: Spool, agents, tmp_path: Path) -> None:
    from tests.helpers import base_env
    gpus = [{"name": "Fake A100", "mem_total_gb": 40, "mem_used_gb": 1, "util": 55, "temp": 61}] * 3
    genv = base_env(tmp_path, GPUPOOL_FAKE_GPUS=json.dumps(gpus))
    a = agents(1, first=2, env_=genv, cpu=False)[0]
    assert a.id == "testhost-gpu2"
    hb = a.heartbeat()
    assert hb["device"] == "cuda:0" and hb["gpu"]["name"] == "Fake A100" and hb["gpu"]["util"] == 55
    r = run_main(["--base", str(spool.base), "--task", "examples.noop:env_probe", "--chunks", "1", "--no-progress",
                  "--run", "gpuprobe"], genv)
    assert r.returncode == 0, r.stderr
    v = results(spool.base, "gpuprobe")[0]["value"]
    # the worker is given its GPU by UUID, never by an index (NVML's and CUDA's may differ)
    assert v == {**v, "device": "cuda:0", "gpu_id": 2, "CUDA_VISIBLE_DEVICES": "GPU-fake-2",
                 "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    # a second agent for the same GPU refuses, naming the holder
    dup = subprocess.run([sys.executable, "-m", "agent", "--base", str(spool.base), "--gpu", "2"], cwd=REPO,
                         env=genv, capture_output=True, text=True, timeout=60)
    assert dup.returncode == 3 and "GPU 2" in dup.stderr and "already held" in dup.stderr and "testhost-gpu2" in dup.stderr
    # --gpu auto skips held GPUs and those without enough free memory
    low_mem = base_env(tmp_path, GPUPOOL_FAKE_GPUS=json.dumps([{"mem_total_gb": 40, "mem_used_gb": 39.5}] + gpus[1:]))
    auto = AgentProc(spool.base, 1, low_mem, args=["--gpu", "auto", "--min-free-gb", "2"], cpu=False)
    try:
        auto.wait_ready()  # GPU 0 lacks memory, GPU 2 is held: auto takes GPU 1
    finally:
        auto.kill()
    # the scheduler's CUDA_VISIBLE_DEVICES is respected: --gpu 0 is the first listed GPU
    slurm = base_env(tmp_path, GPUPOOL_FAKE_GPUS=json.dumps(gpus), CUDA_VISIBLE_DEVICES="0")
    p = AgentProc(spool.base, 0, slurm, cpu=False)
    try:
        p.wait_ready()
    finally:
        p.kill()


def test_agent_for_missing_gpu_is_refused(spool: Spool, tmp_path: Path) -> None:
    from tests.helpers import base_env
    genv = base_env(tmp_path, GPUPOOL_FAKE_GPUS=json.dumps([{}, {}]))
    r = subprocess.run([sys.executable, "-m", "agent", "--base", str(spool.base), "--gpu", "5"], cwd=REPO, env=genv,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no GPU 5" in r.stderr and "2 visible GPU(s)" in r.stderr


def test_sigterm_finishes_the_current_job_then_exits(spool: Spool, agents, env) -> None:
    a = agents(1)[0]
    feeder = subprocess.Popen([sys.executable, "main.py", "--base", str(spool.base), "--task", "examples.noop:sleepy",
                               "--chunks", "3", "--kwargs", '{"seconds": 1.0}', "--run", "slow", "--no-progress"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (a.heartbeat() or {}).get("state") == "busy", what="agent busy")
        a.signal(signal.SIGTERM)
        assert a.proc.wait(timeout=30) == 0
        done = results(spool.base, "slow")
        assert len(done) == 1 and done[0 if 0 in done else min(done)]["status"] == "ok"
        assert (a.heartbeat() or {}).get("state") == "stopped"
        assert len(Spool(spool.base).mailbox(a.id).read_text()) > 0
        # a restarted agent carries on with its old mailbox and the run completes
        b = AgentProc(spool.base, 0, env)
        try:
            b.wait_ready()
            out, err = feeder.communicate(timeout=60)
            assert feeder.returncode == 0, err
            assert len(results(spool.base, "slow")) == 3
        finally:
            b.kill()
    finally:
        feeder.kill()


def test_second_master_for_the_same_run_refuses(spool: Spool, agents, env) -> None:
    agents(1)
    args = ["--base", str(spool.base), "--task", "examples.noop:sleepy", "--chunks", "4", "--kwargs",
            '{"seconds": 0.5}', "--run", "busy", "--no-progress"]
    first = subprocess.Popen([sys.executable, "main.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (spool.run_dir("busy") / "run.json").exists(), what="first master")
        second = run_main(args, env)
        assert second.returncode == 3 and "already held" in second.stderr and "pid=" in second.stderr
        assert first.wait(timeout=60) == 0
    finally:
        first.kill()


def test_master_waits_plainly_when_no_agent_is_alive(spool: Spool, env) -> None:
    p = subprocess.Popen([sys.executable, "main.py", "--base", str(spool.base), "--task", "examples.noop:noop",
                          "--chunks", "2", "--no-progress", "--run", "lonely"], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def said() -> bool:
            return p.poll() is None
        wait_for(lambda: spool.run_dir("lonely").exists())
        a = AgentProc(spool.base, 0, env).wait_ready()
        try:
            out, err = p.communicate(timeout=60)
        finally:
            a.kill()
        assert p.returncode == 0 and "no live agents" in err and "./start_agents.sh" in err
    finally:
        p.kill()


def test_start_agents_sh_starts_skips_and_stops(tmp_path: Path, env) -> None:
    base = tmp_path / "b"
    sh = str(REPO / "start_agents.sh")
    r = subprocess.run([sh, "2", str(base), "--cpu"], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("started") == 2 and "testhost-cpu0" in r.stdout and "log" in r.stdout
        again = subprocess.run([sh, "2", str(base), "--cpu"], env=env, capture_output=True, text=True, timeout=120)
        assert again.stdout.count("already running") == 2
        main = run_main(["--base", str(base), "--task", "examples.noop:square", "--chunks", "20", "--no-progress"], env)
        assert main.returncode == 0, main.stderr
    finally:
        stop = subprocess.run([sh, "stop", str(base)], env=env, capture_output=True, text=True, timeout=120)
    assert "stopped 2 agents" in stop.stdout
    for ident in ("testhost-cpu0", "testhost-cpu1"):
        assert json.loads((base / "agents" / f"{ident}.json").read_text())["state"] == "stopped"


def test_demo_runs_to_a_successful_summary(tmp_path: Path, env) -> None:
    r = subprocess.run([sys.executable, str(REPO / "main.py"), "--no-progress"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "32 ok, 0 failed" in r.stdout and "all 32 results checked" in r.stdout
    assert "stopped the 2 agents" in r.stdout
    # run from another folder, the next step names the checkout's files by a path that works from there
    # (or the commands pip install -e put on PATH) (issue 25)
    nxt = r.stdout.split("Next: ", 1)[1]
    assert nxt.startswith((f"{REPO / 'start_agents.sh'} 2 /tmp/b && python {REPO / 'main.py'} --base /tmp/b",
                           "gpupool-agents 2 /tmp/b && gpupool-run --base /tmp/b")), nxt


def test_a_log_held_open_in_append_mode_is_cut_past_its_limit(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    with open(log, "ab", buffering=0) as writer:
        writer.write(b"old line\n" * 100)
        assert not cap_log(log, 2000)  # 900 bytes: under the limit, untouched
        assert log.stat().st_size == 900 and not (tmp_path / "a.log.1").exists()
        writer.write(b"old line\n" * 200)
        assert cap_log(log, 2000)
        writer.write(b"new line\n")  # the writer goes on appending to the emptied file
    assert log.read_bytes() == b"new line\n"
    assert (tmp_path / "a.log.1").read_bytes() == b"old line\n" * 300
    assert not cap_log(log, 0)  # 0: never cut


def test_what_a_job_leaves_printing_cannot_grow_the_worker_log_past_the_limit(spool: Spool, agents, env) -> None:
    """A call's own output goes to its chunk's log; a thread it leaves behind prints to the worker log."""
    agents(1, args=["--log-limit-mb", "0.05"])
    r = run_main(["--base", str(spool.base), "--task", "tests.faulty:chatty_after", "--chunks", "1",
                  "--kwargs", json.dumps({"lines": 100, "rounds": 30}), "--no-progress"], env)  # 30 x 8 KB
    assert r.returncode == 0, r.stderr
    (worker,) = spool.logs_dir.glob("*.worker.log")
    old = worker.with_name(worker.name + ".1")
    # cut on a heartbeat (0.2 s here): at most one beat's output over the limit
    wait_for(lambda: old.exists() and worker.stat().st_size <= 52_429, 20, "the worker log cut")
    assert "line 99 xxx" in old.read_text() and worker.stat().st_size + old.stat().st_size < 250_000
    agent_log = worker.with_name(worker.name.replace(".worker.log", ".log"))  # said just after the cut
    wait_for(lambda: f"{worker.name} grew past --log-limit-mb" in agent_log.read_text(), 20, "the cut said")


@pytest.mark.timeout(120)
def test_an_error_every_chunk_would_repeat_stops_the_run_early_and_a_rerun_after_the_fix_resumes(
        spool: Spool, agents, env, tmp_path: Path) -> None:
    """A missing module fails every chunk the same way: after --max-failures chunks (none ok)
    the run stops, instead of 40 chunks x 3 attempts; fixed, the same command finishes it."""
    agents(2)
    code = tmp_path / "code"
    code.mkdir()
    (code / "task.py").write_text("def f(chunk_id):\n    import helper_not_written_yet\n"
                                  "    return helper_not_written_yet.scale * chunk_id\n")
    args = ["--base", str(spool.base), "--task", "task.py:f", "--chunks", "40", "--run", "early", "--no-progress"]
    r = run_main(args, env, cwd=code)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "STOPPED run early" in r.stdout and "stopped early: 3 chunks failed with the same error" in r.stdout
    assert "ModuleNotFoundError: No module named 'helper_not_written_yet'" in r.stdout
    attempts = [n for n in os.listdir(spool.result_dir("early")) if n.endswith(".json")]
    assert 3 <= len(attempts) <= 20, attempts  # not 40 x 3
    assert all(j.run != "early" for ident in spool.agent_ids() for j in Mailbox(spool, ident).read().jobs)
    (code / "helper_not_written_yet.py").write_text("scale = 3\n")
    again = run_main(args, env, cwd=code)
    assert again.returncode == 0, again.stdout + again.stderr
    res = results(spool.base, "early")
    assert sorted(res) == list(range(40)) and all(r["value"] == 3 * c for c, r in res.items())
    off = run_main(["--base", str(spool.base), "--task", "task.py:nothing_here", "--chunks", "1", "--no-progress",
                    "--max-failures", "-1"], env, cwd=code)
    assert off.returncode == 2 and "--max-failures must be 0" in off.stderr


@pytest.mark.timeout(120)
def test_durations_are_never_negative_with_pipelining(spool: Spool, agents, env) -> None:
    """A job sent ahead starts in the worker before the agent gets to it: its duration is the
    worker's own (start and end by one clock), never the agent's start to the worker's end."""
    agents(1)
    r = run_main(["--base", str(spool.base), "--task", "examples.noop:noop", "--chunks", "300", "--run", "durations",
                  "--no-progress"], env)
    assert r.returncode == 0, r.stderr
    res = results(spool.base, "durations")
    assert len(res) == 300
    assert all(rec["duration_s"] >= 0 and rec["started_at"] <= rec["finished_at"] for rec in res.values()), \
        sorted(rec["duration_s"] for rec in res.values())[:5]
    assert all(abs(rec["duration_s"] - (rec["finished_at"] - rec["started_at"])) < 1e-5 for rec in res.values())
    assert " -0." not in r.stdout  # the summary's MEAN S


@pytest.mark.timeout(120)
def test_one_unusable_gpu_stops_only_its_own_agent(tmp_path: Path) -> None:
    """NVML cannot describe GPU 1 (lost, NO_PERMISSION...): start_agents.sh starts the agents of
    GPUs 0 and 2, names the unusable one, and exits 1; gpus shows it."""
    from tests.helpers import base_env

    gpus = json.dumps([{"name": "Fake A"}, {"name": "Fake B", "broken": True}, {"name": "Fake C"}])
    env = base_env(tmp_path, GPUPOOL_FAKE_GPUS=gpus)
    base, sh = tmp_path / "b", str(REPO / "start_agents.sh")
    r = subprocess.run([sh, "3", str(base)], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert r.returncode == 1, r.stdout + r.stderr
        assert "testhost-gpu0" in r.stdout and "testhost-gpu2" in r.stdout and r.stdout.count("started") == 2
        assert "GPU 1 (NVML index 1) is unusable" in r.stderr and "Traceback" not in r.stderr
        listed = subprocess.run([sys.executable, "-m", "master", "gpus", "--json"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=60)
        rows = json.loads(listed.stdout)
        assert [bool(g["error"]) for g in rows] == [False, True, False] and rows[0]["agent"] == "testhost-gpu0"
    finally:
        subprocess.run([sh, "stop", str(base)], env=env, capture_output=True, timeout=120)


def test_an_agent_that_runs_dry_says_so_at_once_not_a_heartbeat_later(spool: Spool, agents, env) -> None:
    """Status right after a run: each agent idle, with every job it did counted, although the next
    regular heartbeat is a minute away (short chunks are pipelined, so no heartbeat is written per job)."""
    procs = agents(2, args=["--heartbeat", "60"])
    r = run_main(["--base", str(spool.base), "--task", "examples.noop:noop", "--chunks", "40", "--no-progress",
                  "--dead-after", "300"], env)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: all(p.heartbeat()["state"] == "idle" for p in procs)
             and sum(p.heartbeat()["jobs_done"] for p in procs) == 40, 20, "both agents idle with 40 jobs done")
