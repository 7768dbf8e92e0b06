"""One step of the agent loop, in this process (the worker runs jobs in-process here)."""
from __future__ import annotations

import shutil
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpupool.agent.agent import Agent, AgentConfig
from gpupool.agent.gpu import NoGpu
from gpupool.agent.restart import RESTART_DEFER_S
from gpupool.agent.slot import Slot
from gpupool.agent.task import SharedCache
from gpupool.jobs.descriptor import Job, JobKind
from gpupool.jobs.heartbeat import write_status
from gpupool.jobs.mailbox import Mailbox
from gpupool.jobs.npzio import load_npz
from gpupool.jobs.paths import Spool
from gpupool.jobs.results import read_result
from tests.helpers import REPO, InProcessWorker
from tests.test_feeder_step import Clock


@pytest.fixture
def make_agent(spool: Spool):
    def make(clock: Any = None, **cfg: Any) -> Agent:
        slot = Slot("t-cpu0", 0, None, [])
        w = InProcessWorker()
        a = Agent(spool, slot, NoGpu(), "t",
                  AgentConfig(**{"watch": "poll", "prune_quiet": 0.0, "spare_worker": False, **cfg}),
                  make_worker=w.make, **({"clock": clock} if clock else {}))
        a.test_worker = w  # every worker of the agent (agent.worker is the latest job's, None before one)
        a.mailbox.ensure()
        return a
    return make


def put(spool: Spool, *jobs: Job, agent: str = "t-cpu0") -> None:
    for j in jobs:
        spool.result_dir(j.run).mkdir(parents=True, exist_ok=True)
    Mailbox(spool, agent).update(lambda js: js + list(jobs))


def cjob(chunk: int, target: str = "examples.noop:square", **kw: Any) -> Job:
    return Job(run="r", chunk_id=chunk, total_chunks=5, kind=JobKind.CALLABLE, target=target,
               workdir=str(REPO), max_attempts=kw.pop("max_attempts", 1), **kw)


def test_step_runs_first_job_commits_and_prunes_when_dry(spool: Spool, make_agent) -> None:
    agent = make_agent()
    put(spool, cjob(0), cjob(1))
    assert agent.step()
    rec = read_result(spool.result_json("r", 0))
    assert rec["status"] == "ok" and rec["value"]["square"] == 0 and rec["agent"] == "t-cpu0"
    assert [j.chunk_id for j in agent.mailbox.read().jobs] == [0, 1]  # finished, left for a lazy prune
    assert agent.step() and read_result(spool.result_json("r", 1))["status"] == "ok"
    assert not agent.step()  # nothing left to run: the finished jobs are pruned
    assert agent.mailbox.read().jobs == []


def test_a_mailbox_that_changed_lately_is_not_pruned(spool: Spool, make_agent) -> None:
    """Through a shared filesystem the agent's read may be older than a master's refill: a prune
    then would drop the new jobs. Finished jobs go only once the mailbox has looked the same a while."""
    agent = make_agent(prune_quiet=3600.0)
    put(spool, cjob(0))
    assert agent.step() and not agent.step()
    assert [j.chunk_id for j in agent.mailbox.read().jobs] == [0]  # left for the master's refill to prune
    agent.mailbox.changed_at -= 3600.0  # an hour later, nothing changed
    assert not agent.step() and agent.mailbox.read().jobs == []


def test_builtins_only_where_signature_accepts(spool: Spool, make_agent, tmp_path: Path) -> None:
    task = tmp_path / "t.py"
    task.write_text("def f(chunk_id, device):\n    return [chunk_id, device]\n")
    put(spool, cjob(2, target=f"{task}:f"), cjob(3))
    agent = make_agent()
    agent.step()
    agent.step()
    assert read_result(spool.result_json("r", 2))["value"] == [2, "cpu"]
    # **kwargs takes every built-in
    assert read_result(spool.result_json("r", 3))["value"]["builtins"] == [
        "data", "device", "gpu_id", "shared", "total_chunks"]


def test_misspelt_kwarg_fails_the_chunk_naming_it(spool: Spool, make_agent) -> None:
    put(spool, cjob(0, target="examples.noop:sleepy", kwargs={"secnds": 0}))
    agent = make_agent()
    agent.step()
    rec = read_result(spool.result_json("r", 0))
    assert rec["status"] == "failed" and "secnds" in rec["error"]["message"]
    assert rec["error"]["type"] == "TypeError" and "Traceback" in rec["error"]["traceback"]


def test_exception_keeps_agent_and_records_traceback(spool: Spool, make_agent) -> None:
    put(spool, cjob(1, target="examples.noop:fail_on", kwargs={"bad": [1]}), cjob(2))
    agent = make_agent()
    agent.step()
    agent.step()
    failed = read_result(spool.result_json("r", 1))
    assert failed["error"]["type"] == "ValueError" and "bad list" in failed["error"]["traceback"]
    assert read_result(spool.result_json("r", 2))["status"] == "ok"
    assert agent.failed == 1 and agent.done == 1


def test_shared_and_data_arrays_and_npz_result(spool: Spool, make_agent, tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", W=np.eye(4, dtype=np.float32) * 2)
    np.savez(tmp_path / "0.npz", X=np.ones((3, 4), dtype=np.float32))
    put(spool, cjob(0, target="gpupool.master.matmul:multiply", shared=str(tmp_path / "s.npz"),
                    data=str(tmp_path / "0.npz")))
    make_agent().step()
    rec = read_result(spool.result_json("r", 0))
    assert rec["arrays"] == "000000.a1.npz"
    assert load_npz(spool.result_npz("r", 0, 1))["Y"].tolist() == [[2.0] * 4] * 3


def test_unserialisable_return_fails_clearly(spool: Spool, make_agent, tmp_path: Path) -> None:
    (tmp_path / "t.py").write_text("def f():\n    return object()\n")
    put(spool, cjob(0, target=f"{tmp_path / 't.py'}:f"))
    make_agent().step()
    assert "neither a dict (or tuple or list) of numpy arrays nor a value that can travel back" in read_result(spool.result_json("r", 0))["error"]["message"]


def test_job_already_committed_is_dropped_without_running(spool: Spool, make_agent) -> None:
    put(spool, cjob(0))
    agent = make_agent()
    agent.step()
    put(spool, cjob(0, attempt=2, max_attempts=2))  # e.g. handed back, but the first attempt won
    assert agent.step() and not agent.step()
    assert agent.done == 1 and agent.mailbox.read().jobs == []
    assert read_result(spool.result_json("r", 0))["attempt"] == 1


def test_task_reimported_when_source_changes(spool: Spool, make_agent, tmp_path: Path) -> None:
    task = tmp_path / "hot.py"
    task.write_text("def f():\n    return 1\n")
    agent = make_agent()
    put(spool, cjob(0, target=f"{task}:f"))
    agent.step()
    task.write_text("def f():\n    return 2  # edited\n")
    put(spool, cjob(1, target=f"{task}:f"))
    agent.step()
    assert [read_result(spool.result_json("r", c))["value"] for c in (0, 1)] == [1, 2]


def test_garbage_mailbox_is_rejected_and_agent_carries_on(spool: Spool, make_agent) -> None:
    agent = make_agent()
    agent.mailbox.path.write_bytes(b"\x00garbage")
    assert not agent.step()
    assert agent.mailbox.read().jobs == [] and list(spool.rejected_dir.glob("*.why"))
    put(spool, cjob(0))
    assert agent.step()


def test_script_job_gets_octorun_flags_and_log(spool: Spool, make_agent, tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text(textwrap.dedent("""
        import argparse, sys
        p = argparse.ArgumentParser()
        for a in ("--gpu_id", "--chunk_id", "--total_chunks", "--tag"):
            p.add_argument(a)
        a = p.parse_args()
        print("ARGS", a.gpu_id, a.chunk_id, a.total_chunks, a.tag)
        sys.exit(0 if a.chunk_id == "1" else 4)
    """))
    mk = lambda c: Job(run="r", chunk_id=c, total_chunks=5, kind=JobKind.SCRIPT, target=str(script),
                       kwargs={"tag": "x"})
    put(spool, mk(1), mk(2))
    agent = make_agent()
    agent.step()
    agent.step()
    ok, bad = (read_result(spool.result_json("r", c)) for c in (1, 2))
    assert ok["status"] == "ok" and "ARGS 0 1 5 x" in Path(ok["log"]).read_text()
    assert bad["status"] == "failed" and "exited with code 4" in bad["error"]["message"]
    assert "ARGS 0 2 5 x" in bad["error"]["traceback"]


def test_next_job_is_sent_to_the_worker_while_the_last_one_is_committed(spool: Spool, make_agent) -> None:
    agent = make_agent()
    put(spool, cjob(0), cjob(1), cjob(2), cjob(3))
    agent.step()  # the run's first chunk here: how long its chunks take is not known yet, nothing goes ahead
    assert agent.test_worker.queue == [] and agent.runner.ahead is None
    agent.step()  # short chunks: chunk 2 is handed over while chunk 1 runs
    assert [r["job"]["chunk_id"] for r in agent.test_worker.queue] == [2]  # chunk 2 already handed over
    assert agent.runner.ahead is not None and agent.runner.ahead.chunk_id == 2
    agent.spool.drain_flag(agent.id).touch()  # draining: what was handed over runs, nothing more
    assert agent.step() and read_result(spool.result_json("r", 2))["status"] == "ok"
    assert agent.test_worker.queue == [] and agent.runner.ahead is None
    assert not agent.step() and not spool.result_json("r", 3).exists()
    agent.spool.drain_flag(agent.id).unlink()
    assert agent.step() and read_result(spool.result_json("r", 3))["status"] == "ok"


def test_nothing_is_handed_over_after_a_long_chunk(spool: Spool, make_agent) -> None:
    """A job in the worker's pipe cannot move to an idle agent: after long chunks, none waits there."""
    agent = make_agent()
    put(spool, cjob(0), cjob(1), cjob(2))
    agent._durations["r"] = 60.0  # the run's last chunk here took a minute
    agent.step()
    assert agent.test_worker.queue == [] and agent.runner.ahead is None


def test_nothing_is_handed_over_beside_a_job_marked_alone(spool: Spool, make_agent) -> None:
    agent = make_agent()
    put(spool, cjob(0), cjob(1, alone=True), cjob(2))
    agent.step()  # chunk 0 runs, the one after it is alone: not sent ahead
    assert agent.test_worker.queue == [] and agent.runner.ahead is None
    agent.step()  # chunk 1 runs alone: chunk 2 waits until its result is committed
    assert read_result(spool.result_json("r", 1))["status"] == "ok" and agent.test_worker.queue == []
    agent.step()
    assert read_result(spool.result_json("r", 2))["status"] == "ok"
    # only the suspect's descriptor carries the mark, so older agents read every other job
    assert "alone" not in cjob(3).to_dict() and Job.from_dict(cjob(3, alone=True).to_dict()).alone


def test_the_inotify_watch_rests_while_a_job_runs_and_nothing_is_missed(tmp_path: Path) -> None:
    from gpupool.agent.watcher import MailboxWatcher
    from gpupool.jobs.atomic import write_replace

    box = tmp_path / "a.POOL"
    write_replace(box, b"1")
    w = MailboxWatcher(box, "inotify")
    w.start()
    try:
        write_replace(box, b"2")
        assert w.wait(5)  # armed: a replaced mailbox wakes it
        w.busy()  # a job starts: unwatched, the job loop rereads the mailbox after every job anyway
        write_replace(box, b"3")
        assert w.wait(5)  # not armed: returns at once, so that the caller rereads what it may have missed
        assert not w.wait(0.3)  # armed again, nothing new
        write_replace(box, b"4")
        assert w.wait(5)
        write_replace(tmp_path / "other.POOL", b"x")  # another agent's mailbox does not wake it
        assert not w.wait(0.3)
    finally:
        w.stop()


def test_an_agent_running_a_job_is_not_watching_its_mailbox(spool: Spool, make_agent) -> None:
    """While a job runs nothing needs to wake the agent (it rereads its mailbox after the job), so
    its inotify watch rests: every mailbox change of a busy pool woke every watching agent."""
    agent = make_agent(watch="inotify")
    agent.watcher.start()
    watching: list[bool] = []
    receive = agent.test_worker.receive

    def spy(timeout: Any, abort: Any, note: Any = None, each: Any = None) -> dict[str, Any]:
        watching.append(agent.watcher._watch is not None)
        return receive(timeout, abort, note, each)

    agent.test_worker.receive = spy
    try:
        assert not agent.step() and agent.watcher.wait(0) is False  # idle: watching, nothing new
        assert agent.watcher._watch is not None
        put(spool, cjob(0))
        assert agent.step() and watching == [False]
        assert agent.watcher.wait(5)  # armed again on the way into a wait, which returns for a reread
        assert agent.watcher._watch is not None and not agent.step()
    finally:
        agent.watcher.stop()


def test_the_shared_cache_keeps_the_files_used_last_only(tmp_path: Path) -> None:
    paths = {}
    for name in "abc":
        paths[name] = str(tmp_path / f"{name}.npz")
        np.savez(paths[name], W=np.full(3, ord(name)))
    cache = SharedCache(size=2)
    a, b = cache.get(paths["a"]), cache.get(paths["b"])
    assert cache.get(paths["a"]) is a  # reused, not loaded again
    c = cache.get(paths["c"])  # a third file: b, used longest ago, goes
    assert cache.get(paths["a"]) is a and cache.get(paths["c"]) is c
    b2 = cache.get(paths["b"])
    assert b2 is not b and b2["W"].tolist() == [98] * 3


def test_a_job_queued_again_after_a_cancel_is_run(spool: Spool, make_agent) -> None:
    """Cancelling a run drops its queued attempt; resuming it queues that attempt number again."""
    agent = make_agent(prune_quiet=3600.0)
    spool.run_dir("r").mkdir(parents=True, exist_ok=True)
    spool.cancel_flag("r").write_text("{}")
    put(spool, cjob(0, submitted_at=1.0))
    assert agent.step() and not spool.result_json("r", 0).exists()  # dropped: the run is cancelled
    spool.cancel_flag("r").unlink()
    Mailbox(spool, "t-cpu0").update(lambda jobs: [cjob(0, submitted_at=2.0)])  # the resumed run's master
    assert agent.step() and read_result(spool.result_json("r", 0))["status"] == "ok"


def test_shutdown_stops_the_worker_and_releases_the_gpu_even_when_the_heartbeat_cannot_be_written(
        spool: Spool, tmp_path: Path) -> None:
    from gpupool.jobs.locks import HolderLock

    lock_path = tmp_path / "gpu.lock"
    gpu_lock = HolderLock(lock_path)
    gpu_lock.take("GPU 0", agent="t-cpu0")
    stopped: list[bool] = []

    class Worker(InProcessWorker):
        def stop(self) -> None:
            stopped.append(True)

        kill = stop

    a = Agent(spool, Slot("t-cpu0", 0, None, [gpu_lock]), NoGpu(), "t", AgentConfig(watch="poll"),
              make_worker=Worker().make)
    a.mailbox.ensure()
    a.runner.workers.start()  # the spare
    shutil.rmtree(spool.agents_dir)
    spool.agents_dir.write_text("a file where the agents folder was")  # every heartbeat write fails now
    a.shutdown()
    assert stopped == [True]
    other = HolderLock(lock_path)
    other.take("GPU 0", agent="next")  # released: the next agent gets the GPU
    other.close()


def test_a_dry_mailbox_is_pruned_once_it_has_looked_the_same_for_prune_quiet(spool: Spool, make_agent) -> None:
    """Through a shared filesystem a fresher refill may not show yet: the agent prunes only a
    mailbox that has not changed for --prune-quiet seconds (by its injected clock)."""
    clock = Clock()
    agent = make_agent(clock=clock, prune_quiet=30.0)
    put(spool, cjob(0))
    assert agent.step() and not agent.step()
    assert [j.chunk_id for j in agent.mailbox.read().jobs] == [0]  # finished, kept: changed just now
    clock.t += 29
    assert not agent.step() and len(agent.mailbox.read().jobs) == 1
    clock.t += 2
    assert not agent.step() and agent.mailbox.read().jobs == []


def test_a_restarted_agent_leaves_what_its_former_process_died_under_alone_for_a_while(
        spool: Spool, make_agent) -> None:
    clock = Clock()
    agent = make_agent(clock=clock, prune_quiet=3600.0)
    put(spool, cjob(0), cjob(1))
    write_status(spool, "t-cpu0", {"agent": "t-cpu0", "seq": 7, "state": "busy", "pid": 999_999_999, "host": "t",
                                   "current": {"run": "r", "chunk_id": 0, "attempt": 1, "since": 1.0}})
    assert agent.restart.judge_former()  # the former process died running chunk 0
    assert agent.restart.died_under == [{"run": "r", "chunk_id": 0, "attempt": 1}]
    assert agent.step() and spool.result_json("r", 1).exists() and not spool.result_json("r", 0).exists()
    assert not agent.step()  # only the suspect is left, and it waits for a master to judge it
    clock.t += RESTART_DEFER_S + 1
    assert agent.step() and read_result(spool.result_json("r", 0))["status"] == "ok"  # no master came: it runs
