"""Nothing lost: jobs that crash or hang, agents and masters killed mid-run, zombie agents."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from gpupool.jobs.paths import Spool
from tests.faulty import tally
from tests.helpers import REPO, AgentProc, frozen_holder, results, run_main, wait_for

MODES = ["raise", "exit", "segv", "hang", "memory", "oomkill", "ok", "ok"]


@pytest.mark.timeout(120)
def test_each_way_a_job_can_die_is_a_failed_result_and_the_agent_keeps_serving(spool: Spool, agents, env) -> None:
    a = agents(1)[0]
    r = run_main(["--base", str(spool.base), "--task", "tests.faulty:misbehave", "--chunks", str(len(MODES)),
                  "--kwargs", json.dumps({"modes": MODES}), "--retries", "0", "--timeout", "3", "--run", "bad",
                  "--no-progress"], env)
    assert r.returncode == 1
    res = results(spool.base, "bad")
    err = {c: res[c].get("error") or {} for c in res}
    assert err[0]["type"] == "ValueError"
    assert err[1]["type"] == "WorkerDied" and "exited with code 3" in err[1]["message"], res
    assert "about to exit with 3" in err[1]["traceback"]  # the last lines of the worker's output
    assert err[2]["type"] == "WorkerDied" and "SIGSEGV" in err[2]["message"]
    assert err[3]["type"] == "Timeout" and "timeout of 3 s" in err[3]["message"]
    assert err[4]["type"] == "MemoryError"
    assert err[5]["type"] == "WorkerDied" and "SIGKILL" in err[5]["message"], res[5]
    assert res[6]["status"] == res[7]["status"] == "ok"
    assert a.proc.poll() is None  # the agent itself never died
    assert "FAILED chunk 3" in r.stdout and "Timeout" in r.stdout


@pytest.mark.timeout(60)
def test_a_worker_death_is_reported_for_its_own_job_not_for_the_one_queued_behind_it(env, tmp_path: Path) -> None:
    from gpupool.agent.worker_control import Worker, WorkerLost
    from gpupool.jobs.descriptor import Job, JobKind

    def request(chunk: int) -> dict:
        job = Job(run="r", chunk_id=chunk, total_chunks=2, kind=JobKind.CALLABLE, target="tests.faulty:misbehave",
                  kwargs={"modes": ["exit", "segv"]})
        return {"job": job.to_dict(), "gpu_id": 0, "device": "cpu", "arrays_path": str(tmp_path / f"{chunk}.npz")}

    w = Worker(env, tmp_path / "worker.log", cwd=str(REPO))
    assert w.send(request(0))
    w.proc.wait(timeout=30)  # chunk 0 exits before the next one is queued behind it (pipelining)
    assert not w.send(request(1))  # not handed to a fresh worker: the dead one still owes a reply
    with pytest.raises(WorkerLost, match="exited with code 3"):
        w.receive(30, lambda: False)
    assert w.send(request(1))  # nothing owed any more: a fresh worker takes it
    with pytest.raises(WorkerLost, match="SIGSEGV"):
        w.receive(30, lambda: False)


@pytest.mark.timeout(60)
def test_transient_failure_is_retried_then_ok(spool: Spool, agents, env, tmp_path: Path) -> None:
    agents(1)
    r = run_main(["--base", str(spool.base), "--task", "tests.faulty:misbehave", "--chunks", "2", "--kwargs",
                  json.dumps({"modes": ["flaky", "ok"], "flaky_dir": str(tmp_path)}), "--retries", "2",
                  "--retry-delay", "0.1", "--run", "flaky", "--no-progress"], env)
    assert r.returncode == 0, r.stderr
    assert results(spool.base, "flaky")[0]["attempt"] == 2
    assert "attempt 1 failed" in r.stderr and "transient failure" in r.stderr
    assert (spool.result_dir("flaky") / "000000.a1.json").exists()


@pytest.mark.timeout(150)
def test_a_chunk_that_kills_its_agent_fails_instead_of_taking_every_agent_down(spool: Spool, agents, env) -> None:
    procs = agents(4)
    modes = ["ok"] * 6 + ["killagent"]
    r = run_main(["--base", str(spool.base), "--task", "tests.faulty:misbehave", "--chunks", str(len(modes)),
                  "--kwargs", json.dumps({"modes": modes}), "--retries", "1", "--dead-after", "1.5",
                  "--retry-delay", "0.05", "--run", "poison", "--no-progress"], env)
    assert r.returncode == 1, r.stderr
    res = results(spool.base, "poison")
    assert sorted(res) == list(range(7)) and [c for c in res if res[c]["status"] != "ok"] == [6]
    # its first agent's death is free, each further one costs an attempt: 1 + (1 + --retries) agents
    assert res[6]["error"]["type"] == "AgentLost" and res[6]["attempt"] == 3
    assert "AgentLost" in json.loads((spool.result_dir("poison") / "000006.a2.json").read_text())["error"]["type"]
    assert sum(p.proc.poll() is not None for p in procs) == 3
    assert "FAILED chunk 6" in r.stdout


@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", ["killagent_late", "killagent"])
def test_a_chunk_that_kills_its_agent_ends_even_when_a_supervisor_restarts_the_agent_at_once(
        spool: Spool, env, mode: str) -> None:
    """The agent comes back under the same id within a second (start_agents.sh's loop, systemd):
    its heartbeat never goes stale, yet each death is counted and the crash loop ends."""
    procs = [AgentProc(spool.base, 0, env).wait_ready()]
    stop = threading.Event()

    def supervise() -> None:
        while not stop.wait(0.05):
            if procs[-1].proc.poll() is not None and len(procs) < 12:
                procs.append(AgentProc(spool.base, 0, env))

    threading.Thread(target=supervise, daemon=True).start()
    try:
        modes = ["ok", mode, "ok", "ok"]
        r = run_main(["--base", str(spool.base), "--task", "tests.faulty:misbehave", "--chunks", str(len(modes)),
                      "--kwargs", json.dumps({"modes": modes}), "--retries", "1", "--retry-delay", "0.05",
                      "--run", "loop", "--no-progress"], env, timeout=120)
    finally:
        stop.set()
        for p in procs:
            p.kill()
    assert r.returncode == 1, r.stdout + r.stderr
    res = results(spool.base, "loop")
    assert sorted(res) == [0, 1, 2, 3] and [c for c in res if res[c]["status"] != "ok"] == [1], res
    assert res[1]["error"]["type"] == "AgentLost" and "replaced" in res[1]["error"]["message"]
    # its first death is free, each further one costs an attempt: 1 + (1 + --retries) deaths
    assert len(procs) - 1 == 3, f"{len(procs) - 1} agent deaths: " + r.stderr


def _feed(spool: Spool, env: dict, marks: Path, chunks: int, seconds: float, run: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "main.py", "--base", str(spool.base), "--task", "tests.faulty:counted", "--chunks", str(chunks),
         "--kwargs", json.dumps({"marks": str(marks), "seconds": seconds}), "--run", run, "--dead-after", "1.5",
         "--retry-delay", "0.05", "--no-progress", *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def _assert_exactly_once(spool: Spool, run: str, chunks: int, marks: Path, kills: int) -> None:
    res = results(spool.base, run)
    assert sorted(res) == list(range(chunks)) and all(r["status"] == "ok" for r in res.values())
    starts, ends = tally(str(marks))
    assert set(ends) == set(range(chunks))
    # A kill interrupts at most two executions: the running chunk, and the one before it whose
    # result was being committed while the worker had already started the next (pipelining).
    assert sum(starts.values()) - chunks <= 2 * kills
    assert sum(ends.values()) - chunks <= 2 * kills


@pytest.mark.timeout(180)
def test_kill_9_busy_agents_repeatedly_loses_nothing(spool: Spool, agents, env, tmp_path: Path) -> None:
    procs = agents(2)
    marks, chunks, kills = tmp_path / "marks", 300, 0
    feeder = _feed(spool, env, marks, chunks, 0.01, "killme")
    try:
        interrupted = set()
        for round_ in range(4):
            victim = procs[round_ % 2]
            wait_for(lambda: (victim.heartbeat() or {}).get("state") == "busy" and victim.heartbeat().get("current"),
                     what="busy victim")
            victim.kill()  # SIGKILL, the worker dies with it (PR_SET_PDEATHSIG)
            kills += 1
            starts, ends = tally(str(marks))
            interrupted |= {c for c in starts if starts[c] > ends[c]}
            procs[round_ % 2] = AgentProc(spool.base, victim.number, env).wait_ready()
            procs.append(victim)
        out, err = feeder.communicate(timeout=120)
        assert feeder.returncode == 0, err
        _assert_exactly_once(spool, "killme", chunks, marks, kills)
        starts, ends = tally(str(marks))
        assert interrupted and all(ends[c] >= 1 for c in interrupted)  # the killed chunks were re-run
    finally:
        feeder.kill()
        for p in procs:
            p.kill()


@pytest.mark.timeout(180)
def test_kill_9_master_and_restart_finishes_without_rerunning(spool: Spool, agents, env, tmp_path: Path) -> None:
    agents(2)
    marks, chunks = tmp_path / "marks", 200
    for round_ in range(2):
        feeder = _feed(spool, env, marks, chunks, 0.005, "mkill")
        target = 50 * (round_ + 1)
        wait_for(lambda: len(results(spool.base, "mkill")) >= target if spool.result_dir("mkill").exists() else False,
                 timeout=60, what=f"{target} results")
        feeder.kill()
        feeder.wait()
    again = _feed(spool, env, marks, chunks, 0.005, "mkill")
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    _assert_exactly_once(spool, "mkill", chunks, marks, kills=0)  # no agent died: nothing ran twice


@pytest.mark.timeout(90)
def test_zombie_agent_cannot_replace_a_committed_result(spool: Spool, agents, env, tmp_path: Path) -> None:
    slow, spare = agents(2)
    marks = tmp_path / "marks"
    feeder = _feed(spool, env, marks, 1, 3.0, "zombie", "--depth", "1")
    try:
        wait_for(lambda: (slow.heartbeat() or {}).get("current") or (spare.heartbeat() or {}).get("current"),
                 what="a busy agent")
        first = slow if (slow.heartbeat() or {}).get("current") else spare
        other = spare if first is slow else slow
        first.signal(signal.SIGSTOP)  # heartbeat stops: declared dead, but its worker runs on
        out, err = feeder.communicate(timeout=60)
        assert feeder.returncode == 0, err
        assert "re-queued chunks [0]" in err
        first.signal(signal.SIGCONT)
        wait_for(lambda: "another attempt had already committed" in Path(spool.agent_log(first.id)).read_text()
                 or "already has a committed result" in Path(spool.agent_log(first.id)).read_text(),
                 what="the zombie gives up")
        [rec] = results(spool.base, "zombie").values()
        assert rec["agent"] == other.id and rec["attempt"] == 2
        assert sorted(p.name for p in spool.result_dir("zombie").iterdir() if not p.name.startswith(".")) == [
            "000000.json"]
    finally:
        feeder.kill()
        for p in (slow, spare):
            try:
                p.signal(signal.SIGCONT)
            except ProcessLookupError:
                pass


@pytest.mark.timeout(90)
def test_second_master_with_wait_takes_over_after_the_first(spool: Spool, agents, env, tmp_path: Path) -> None:
    agents(1)
    marks = tmp_path / "marks"
    first = _feed(spool, env, marks, 6, 0.2, "waited")
    try:
        wait_for(lambda: spool.run_spec("waited").exists(), what="first master")
        second = _feed(spool, env, marks, 6, 0.2, "waited", "--wait")
        assert first.wait(timeout=60) == 0
        out, err = second.communicate(timeout=60)
        assert second.returncode == 0 and "6 of 6 chunks already done" in err
    finally:
        first.kill()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["callable", "script"])
def test_killing_the_agent_leaves_no_orphaned_job_process(spool: Spool, agents, env, tmp_path: Path, kind: str) -> None:
    import os
    [agent] = agents(1)
    script = tmp_path / "sleeper.py"
    script.write_text("import argparse, os, time\np = argparse.ArgumentParser()\n"
                      "for a in ('--gpu_id', '--chunk_id', '--total_chunks', '--pidfile'): p.add_argument(a)\n"
                      "a = p.parse_args()\nopen(a.pidfile, 'w').write(str(os.getpid()))\ntime.sleep(600)\n")
    pidfile = tmp_path / "job.pid"
    what = ["--task", "tests.faulty:counted", "--kwargs", json.dumps({"marks": str(tmp_path / "m"), "seconds": 600})] \
        if kind == "callable" else ["--script", str(script), "--kwargs", json.dumps({"pidfile": str(pidfile)})]
    feeder = subprocess.Popen([sys.executable, "main.py", "--base", str(spool.base), "--chunks", "1", "--run", "orphan",
                               "--no-progress", *what], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: (agent.heartbeat() or {}).get("state") == "busy", what="busy agent")
        if kind == "callable":
            job_pid = agent.heartbeat()["worker_pid"]
        else:
            job_pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), what="script pid"))
        os.kill(agent.proc.pid, signal.SIGKILL)  # the supervisor only, not its process group
        agent.proc.wait(timeout=10)
        from gpupool.agent.launcher import pid_alive
        wait_for(lambda: not pid_alive(job_pid), timeout=10, what=f"job process {job_pid} gone")
    finally:
        feeder.kill()


@pytest.mark.timeout(180)
def test_agents_frozen_at_any_moment_stall_nothing_and_their_late_arrays_are_dropped(spool: Spool, agents,
                                                                                      env) -> None:
    procs = agents(3)
    chunks = 600
    feeder = subprocess.Popen(
        [sys.executable, "main.py", "--base", str(spool.base), "--task", "tests.faulty:big_array", "--chunks",
         str(chunks), "--kwargs", json.dumps({"mb": 0.01, "seconds": 0.01}), "--run", "frozen", "--dead-after", "1.5",
         "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    frozen: list[AgentProc] = []
    try:
        for victim in procs[:2]:  # SIGSTOP (as Slurm's suspend does) mid-run, wherever they are
            wait_for(lambda: (victim.heartbeat() or {}).get("state") == "busy", what="a busy victim")
            victim.signal(signal.SIGSTOP)
            frozen.append(victim)
        out, err = feeder.communicate(timeout=120)
        assert feeder.returncode == 0, err
        for v in frozen:  # thawed, they finish what they held, lose every commit and drop their arrays
            v.signal(signal.SIGCONT)
        seq = {v.id: v.heartbeat()["seq"] for v in frozen}
        wait_for(lambda: all(v.heartbeat()["seq"] > seq[v.id] + 1 and v.heartbeat()["state"] == "idle"
                             for v in frozen), 30, "the thawed agents idle again")
        rdir = spool.result_dir("frozen")
        names = sorted(n for n in os.listdir(rdir) if not n.startswith("."))
        assert len(names) == 2 * chunks, names  # one .json and one .npz per chunk, nothing else
        assert all(p.proc.poll() is None for p in procs)
        for c, rec in results(spool.base, "frozen").items():
            assert rec["status"] == "ok" and float(np.load(rdir / rec["arrays"])["x"][0]) == c
    finally:
        feeder.kill()
        for p in frozen:
            p.signal(signal.SIGCONT)


@pytest.mark.timeout(120)
def test_a_mailbox_lock_held_by_a_slow_client_costs_that_agent_its_refills_not_the_run(spool: Spool, agents,
                                                                                     env) -> None:
    """Both agents live; a third process holds one agent's mailbox lock (a slow client, a
    frozen tool): no pass of the master waits the 5 s that make a holder count as frozen, the
    other agent is refilled meanwhile, and the held one is refilled once the lock is free."""
    a, b = agents(2)
    holder = frozen_holder(spool.mailbox_lock(a.id))
    feeder = _feed(spool, env, spool.base / "marks", 200, 0.05, "slowlock")
    try:  # 60 of 200 chunks of 50 ms: what is left takes the free agent 7 s alone; the held one is retried each second
        wait_for(lambda: len(results(spool.base, "slowlock")) >= 60 if spool.result_dir("slowlock").exists()
                 else False, 60, "part of the run done by the agent whose lock is free")
        holder.kill()
        holder.wait()
        out, err = feeder.communicate(timeout=90)
    finally:
        feeder.kill()
        holder.kill()
    assert feeder.returncode == 0, err
    assert "for over 5 s" not in err and "may be frozen" not in err, err  # never waited for a frozen holder
    assert f"the mailbox lock of {a.id} is held by another process" in err
    res = results(spool.base, "slowlock")
    assert sorted(res) == list(range(200)) and all(r["status"] == "ok" for r in res.values())
    assert {r["agent"] for r in res.values()} == {a.id, b.id}  # refilled once its lock was free


@pytest.mark.timeout(120)
def test_a_thawed_agents_stale_failure_never_overrides_the_newer_attempt_in_flight(spool: Spool, agents, env,
                                                                                   tmp_path: Path) -> None:
    """Attempt 1 (the last, --retries 0) runs on an agent that freezes; the master hands the chunk
    to another agent, free (attempt 2). Thawed, the first agent reports attempt 1's failure: it is
    kept as history, and attempt 2's ok result is the chunk's."""
    [a] = agents(1)
    frozen, finish = tmp_path / "frozen", tmp_path / "finish"
    feeder = subprocess.Popen(
        [sys.executable, "main.py", "--base", str(spool.base), "--task", "tests.faulty:stale", "--chunks", "1",
         "--kwargs", json.dumps({"fail_on": a.id, "frozen": str(frozen), "finish": str(finish)}), "--run", "stale",
         "--retries", "0", "--dead-after", "1.5", "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: ((a.heartbeat() or {}).get("current") or {}).get("chunk_id") == 0, what="a runs chunk 0")
        a.signal(signal.SIGSTOP)
        frozen.touch()  # its worker fails the job now; the agent reports it when thawed
        [b] = agents(1, first=1)
        wait_for(lambda: ((b.heartbeat() or {}).get("current") or {}).get("attempt") == 2, 60, "attempt 2 on b")
        seq = a.heartbeat()["seq"]
        a.signal(signal.SIGCONT)
        wait_for(lambda: a.heartbeat()["seq"] > seq + 1 and a.heartbeat()["state"] == "idle", 30, "a thawed, idle")
        assert "Superseded" in (spool.result_dir("stale") / "000000.a1.json").read_text()  # its late failure: dropped
        assert not spool.result_json("stale", 0).exists()  # attempt 1's failure was not committed as final
        finish.touch()
        out, err = feeder.communicate(timeout=60)
    finally:
        feeder.kill()
        a.signal(signal.SIGCONT)
    assert feeder.returncode == 0, out + err
    rec = results(spool.base, "stale")[0]
    assert rec["status"] == "ok" and rec["attempt"] == 2 and rec["agent"] == b.id


@pytest.mark.timeout(120)
def test_an_agent_frozen_with_its_mailbox_lock_held_does_not_stall_the_master(spool: Spool, agents,
                                                                               env) -> None:
    a, b = agents(2)
    feeder = subprocess.Popen(
        [sys.executable, "main.py", "--base", str(spool.base), "--task", "tests.faulty:counted", "--chunks", "40",
         "--kwargs", json.dumps({"marks": str(spool.base / "marks"), "seconds": 0.05}), "--run", "held",
         "--dead-after", "1.5", "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    holder = None
    try:
        wait_for(lambda: (a.heartbeat() or {}).get("state") == "busy", what="agent a busy")
        a.signal(signal.SIGSTOP)
        holder = frozen_holder(spool.mailbox_lock(a.id))  # a's lock stays held, as if a froze inside it
        out, err = feeder.communicate(timeout=60)
        assert feeder.returncode == 0, err
        assert "changed without it" in err and "may be frozen" in err
        res = results(spool.base, "held")
        assert sorted(res) == list(range(40)) and all(r["status"] == "ok" for r in res.values())
    finally:
        feeder.kill()
        if holder is not None:
            holder.kill()
        a.signal(signal.SIGCONT)


@pytest.mark.timeout(120)
def test_a_run_started_afresh_gets_no_result_of_its_former_self(spool: Spool, agents, env) -> None:
    (agent,) = agents(1)
    old = subprocess.Popen(
        [sys.executable, "main.py", "--base", str(spool.base), "--task", "tests.faulty:tagged", "--chunks", "2",
         "--kwargs", json.dumps({"tag": "old", "seconds": 3}), "--run", "redo", "--no-progress"], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (agent.heartbeat() or {}).get("current"), what="the old run's first chunk running")
        old.kill()  # Ctrl-C, a bug fixed: the same run again, afresh; the agent still runs the old chunk
        old.wait()
        r = run_main(["--base", str(spool.base), "--task", "tests.faulty:tagged", "--chunks", "2", "--kwargs",
                      json.dumps({"tag": "new"}), "--run", "redo", "--fresh", "--no-progress"], env)
        assert r.returncode == 0, r.stderr
        res = results(spool.base, "redo")
        assert [res[c]["value"] for c in (0, 1)] == ["new 0", "new 1"]
    finally:
        old.kill()
