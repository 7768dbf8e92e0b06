"""Legal but awkward job code: a value too large to commit, jobs that fork children that outlive
them, functions added to a module a warm worker already imported. Real agents, real main.py."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gpupool.jobs.paths import Spool
from gpupool.jobs.results import RESULT_LIMIT
from tests.faulty import tally
from tests.helpers import REPO, results, run_main, wait_for


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def read_pid(path: Path) -> int:
    return int(wait_for(lambda: path.exists() and path.read_text(), what=f"{path.name} written"))


@contextlib.contextmanager
def killed_after(*pidfiles: Path):
    """Whatever the test's outcome, no process it made outlives it."""
    try:
        yield
    finally:
        for p in pidfiles:
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(p.read_text()), signal.SIGKILL)


@pytest.mark.timeout(120)
def test_a_value_too_large_or_too_deep_to_commit_fails_its_attempts_once_each_naming_the_limit(
        spool: Spool, agents, env, tmp_path: Path) -> None:
    agents(1)
    marks = tmp_path / "marks"
    modes = ["value", "error", "ok", "deep"]
    try:
        r = run_main(["--base", str(spool.base), "--task", "tests.pathological:oversized", "--chunks", str(len(modes)),
                      "--kwargs", json.dumps({"modes": modes, "marks": str(marks), "mb": 9}), "--retries", "1",
                      "--retry-delay", "0.05", "--run", "big", "--no-progress"], env, timeout=90)
    except subprocess.TimeoutExpired:
        starts, _ = tally(str(marks))
        pytest.fail(f"the run never finished: executions per chunk {dict(starts)}")
    assert r.returncode == 1, r.stderr
    res = results(spool.base, "big")
    err = res[0]["error"]
    assert res[0]["status"] == "failed" and res[0]["attempt"] == 2  # --retries 1: two attempts, not forever
    assert err["type"] == "ResultTooLarge", err
    assert f"{RESULT_LIMIT // 2**20} MB" in err["message"] and ".npz" in err["message"] and "file" in err["message"]
    assert json.loads((spool.result_dir("big") / "000000.a1.json").read_text())["error"]["type"] == "ResultTooLarge"
    # a job's own huge exception message is cut, not a reason to run it again and again
    assert res[1]["status"] == "failed" and res[1]["attempt"] == 2 and res[1]["error"]["type"] == "ValueError"
    assert len(res[1]["error"]["message"]) < RESULT_LIMIT // 8 and "cut" in res[1]["error"]["message"]
    assert res[2]["status"] == "ok" and res[2]["value"] == {"small": 2}
    err = res[3]["error"]  # readers refuse JSON nested past jobs.jsonio.MAX_DEPTH: so is the value
    assert res[3]["status"] == "failed" and res[3]["attempt"] == 2 and err["type"] == "ResultTooDeep", err
    assert "levels deep" in err["message"] and ".npz" in err["message"]
    starts, _ = tally(str(marks))
    assert starts == {0: 2, 1: 2, 2: 1, 3: 2}
    for p in spool.result_dir("big").iterdir():
        assert p.stat().st_size < RESULT_LIMIT, p  # every record readable by the master


@pytest.mark.timeout(120)
def test_a_job_that_forks_a_long_lived_child_and_dies_is_seen_dead_at_once_and_its_child_dies(
        spool: Spool, agents, env, tmp_path: Path) -> None:
    a = agents(1)[0]
    pidfile = tmp_path / "child.pid"
    with killed_after(pidfile):
        try:  # no --timeout: before, the worker's death was seen only when its child let go of the pipe
            r = run_main(["--base", str(spool.base), "--task", "tests.pathological:fork_then_die", "--chunks", "1",
                          "--kwargs", json.dumps({"pidfile": str(pidfile)}), "--retries", "0", "--run", "forked",
                          "--no-progress"], env, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the worker's death went unnoticed while its forked child held the reply pipe")
        assert r.returncode == 1, r.stderr
        err = results(spool.base, "forked")[0]["error"]
        assert err["type"] == "WorkerDied" and "exited with code 3" in err["message"], err
        child = read_pid(pidfile)
        wait_for(lambda: gone(child), what="the forked child killed with its worker")
        # the agent goes on with a fresh worker
        r = run_main(["--base", str(spool.base), "--task", "tests.pathological:tagged", "--chunks", "2",
                      "--kwargs", json.dumps({"tag": "after"}), "--run", "after", "--no-progress"], env, timeout=60)
        assert r.returncode == 0, r.stderr
        assert [results(spool.base, "after")[c]["value"] for c in (0, 1)] == ["after 0", "after 1"]
        assert a.proc.poll() is None


@pytest.mark.timeout(120)
def test_a_forked_child_that_returns_into_the_worker_exits_quietly_and_answers_nothing(
        spool: Spool, agents, env, tmp_path: Path) -> None:
    """One run (an Executor's calls), so one warm worker throughout: the child a call forked and
    that returns into the worker's loop leaves, and the worker goes on serving the run."""
    from gpupool.master.executor import Executor
    from tests import pathological

    a = agents(1)[0]
    pidfile, gate = tmp_path / "child.pid", tmp_path / "gate"
    with killed_after(pidfile), Executor(spool.base) as ex:
        assert ex.submit(pathological.fork_and_return, pidfile=str(pidfile), gate=str(gate)).result(60) == "parent 0"
        child = read_pid(pidfile)
        assert not gone(child)  # a child left by a job that returned lives on with its worker
        # the heartbeat written after the call names its worker (one written before it does not yet)
        worker = wait_for(lambda: (a.heartbeat() or {}).get("worker_pid"), what="the heartbeat naming the worker")
        gate.touch()  # the child now returns from the job function into the worker's code
        wait_for(lambda: gone(child), what="the forked child leaving instead of serving the worker's pipe")
        assert [ex.submit(pathological.tagged, tag="next").result(60) for _ in range(3)] == ["next 1", "next 2",
                                                                                             "next 3"]
        assert a.heartbeat()["worker_pid"] == worker  # the same warm worker served them


@pytest.mark.timeout(120)
def test_a_script_that_exits_leaving_children_in_its_group_has_them_killed_but_not_detached_ones(
        spool: Spool, agents, env, tmp_path: Path) -> None:
    agents(1)
    pidfile = tmp_path / "kid.pid"
    detached = tmp_path / "kid.pid.detached"
    with killed_after(pidfile, detached):
        r = run_main(["--base", str(spool.base), "--script", "tests/forking_script.py", "--chunks", "1",
                      "--kwargs", json.dumps({"pidfile": str(pidfile)}), "--run", "script", "--no-progress"],
                     env, timeout=60)
        assert r.returncode == 0, r.stderr
        kid, loose = read_pid(pidfile), read_pid(detached)
        wait_for(lambda: gone(kid), what="the script's leftover child killed with its process group")
        assert not gone(loose)  # it left the group on purpose (setsid): the job's own business


@pytest.mark.timeout(120)
def test_a_function_added_to_a_module_a_warm_worker_already_imported_is_found(
        spool: Spool, agents, env, tmp_path: Path) -> None:
    a = agents(1)[0]
    work = tmp_path / "work"
    work.mkdir()
    mod = work / "warm_tasks.py"
    mod.write_text("def f1(chunk_id):\n    return 'one'\n")

    def run(fn: str, name: str) -> object:
        r = run_main(["--base", str(spool.base), "--task", f"warm_tasks:{fn}", "--chunks", "1", "--run", name,
                      "--retries", "0", "--no-progress"], env, timeout=60, cwd=work)
        assert r.returncode == 0, (r.stdout, r.stderr)
        return results(spool.base, name)[0]["value"]

    assert run("f1", "first") == "one"
    workers = [a.heartbeat()["worker_pid"]]
    mod.write_text("def f1(chunk_id):\n    return 'one, edited'\n\n\ndef f2(chunk_id):\n    return 'two'\n")
    assert run("f2", "added") == "two"
    workers.append(a.heartbeat()["worker_pid"])
    assert run("f1", "edited") == "one, edited"
    workers.append(a.heartbeat()["worker_pid"])
    assert len(set(workers)) == 3  # every run in a worker of its own


@pytest.mark.timeout(120)
def test_what_a_job_forked_before_its_agent_was_killed_dies_when_the_agent_comes_back(
        spool: Spool, agents, env, tmp_path: Path) -> None:
    """kill -9 of the agent: its worker dies with it (PR_SET_PDEATHSIG), but a child the job
    forked does not (the setting is not inherited across fork) and may hold GPU memory; the agent
    restarted under the same id kills it, and nothing of another spool's agent of the same id."""
    from tests.helpers import AgentProc

    a = agents(1)[0]
    other_spool = Spool(tmp_path / "other").ensure()
    b = AgentProc(other_spool.base, 0, env).wait_ready()  # the same agent id, another spool
    pidfile, other_pid = tmp_path / "child.pid", tmp_path / "other.pid"
    with killed_after(pidfile, other_pid):
        feeders = [subprocess.Popen(
            [sys.executable, "main.py", "--base", str(base), "--task", "tests.pathological:fork_and_hang", "--chunks",
             "1", "--kwargs", json.dumps({"pidfile": str(pf)}), "--run", "orphan", "--no-progress"], cwd=REPO, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for base, pf in ((spool.base, pidfile),
                                                                                    (other_spool.base, other_pid))]
        try:
            child, other = read_pid(pidfile), read_pid(other_pid)
            a.signal(signal.SIGKILL)  # the agent alone, as the OOM killer would
            a.proc.wait(timeout=30)
            worker = a.heartbeat()["worker_pid"]
            wait_for(lambda: gone(worker), what="the worker dead with its agent")
            assert not gone(child)  # what the job forked lives on
            restarted = AgentProc(spool.base, 0, env).wait_ready()
            try:
                wait_for(lambda: gone(child), what="the orphan killed by the restarted agent")
                # the orphan among them (the former process's spare worker, if it was still starting when
                # the agent was killed, has no parent-death signal yet and is killed too)
                killed = re.search(r"killed \d+ process\(es\) that jobs of its former process had started and left "
                                   r"running \(pids \[([\d, ]+)\]\)", restarted.output())
                assert killed and child in {int(p) for p in killed.group(1).split(",")}, restarted.output()
                assert not gone(other)  # another spool's agent of the same id: untouched
            finally:
                restarted.kill()
        finally:
            for f in feeders:
                f.kill()
            b.kill()
