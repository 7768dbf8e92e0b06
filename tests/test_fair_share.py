"""Fair share between runs: which run's job an agent takes next (agent.board), from the other
agents' heartbeats, and two real masters sharing real agents."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from agent.board import Board, choose
from jobs.descriptor import Job, JobKind
from jobs.heartbeat import write_status
from jobs.paths import Spool
from tests.helpers import results, run_main, wait_for


def job(run: str, c: int, share: float = 1.0) -> Job:
    return Job(run=run, chunk_id=c, total_chunks=100, kind=JobKind.CALLABLE, target="x:y", share=share)


def running(spool: Spool, counts: dict[str, int]) -> None:
    n = 0
    for run, k in counts.items():
        for _ in range(k):
            write_status(spool, f"h-cpu{n}", {"agent": f"h-cpu{n}", "seq": 1, "state": "busy",
                                             "current": {"run": run, "chunk_id": n}})
            n += 1
    write_status(spool, "me-cpu0", {"agent": "me-cpu0", "seq": 1, "state": "idle"})


def test_one_run_is_taken_in_mailbox_order(spool: Spool) -> None:
    jobs = [job("a", 3), job("a", 1)]
    assert choose(jobs, Board(spool, "me-cpu0", 2.0)) is jobs[0] and choose([], None) is None


def test_the_run_furthest_below_its_share_goes_first(spool: Spool) -> None:
    running(spool, {"a": 3, "b": 0})
    board = Board(spool, "me-cpu0", 2.0)
    jobs = [job("a", 5), job("a", 6), job("b", 0)]
    assert choose(jobs, board).run == "b"  # a runs on 3 agents, b on none
    running(spool, {"a": 1, "b": 2})
    board = Board(spool, "me-cpu0", 2.0)
    assert choose(jobs, board).key == ("a", 5, 1)  # the first queued job of that run


def test_weights_set_the_shares(spool: Spool) -> None:
    jobs = [job("a", 0, share=3.0), job("b", 0)]
    running(spool, {"a": 2, "b": 1})  # 2/3 < 1/1: a is further below its 3:1 share
    assert choose(jobs, Board(spool, "me-cpu0", 2.0)).run == "a"
    running(spool, {"a": 3, "b": 0})
    assert choose(jobs, Board(spool, "me-cpu0", 2.0)).run == "b"
    running(spool, {"a": 3, "b": 1})  # at 3:1 exactly: the agent's own current run counts too
    assert choose(jobs, Board(spool, "me-cpu0", 2.0), mine="a").run == "b"
    assert choose(jobs, Board(spool, "me-cpu0", 2.0), mine="b").run == "a"


def test_agents_whose_heartbeat_stopped_run_nothing(spool: Spool) -> None:
    running(spool, {"a": 2})
    old = time.time() - 3600
    for n in range(2):
        os.utime(spool.heartbeat(f"h-cpu{n}"), (old, old))
    assert Board(spool, "me-cpu0", 2.0).running() == {}


def test_two_runs_on_one_pool_share_it(spool: Spool, agents, env) -> None:
    """Run a fills 4 agents with 100 ms chunks; run b, started later, gets agents as they free
    up instead of waiting for a's last job to start."""
    agents(4)
    base = str(spool.base)
    out: dict[str, object] = {}

    def feed(name: str, chunks: int) -> None:
        out[name] = run_main(["--base", base, "--task", "examples.noop:sleepy", "--chunks", str(chunks),
                              "--kwargs", '{"seconds": 0.1}', "--run", name, "--no-progress"], env, timeout=170)

    a = threading.Thread(target=feed, args=("a", 240))
    a.start()
    wait_for(lambda: len(results(spool.base, "a")) >= 8, 60, "run a under way")
    feed("b", 24)
    a.join(timeout=170)
    assert out["a"].returncode == 0 and out["b"].returncode == 0, (out["a"].stderr, out["b"].stderr)
    a_done = results(spool.base, "a")
    b_last = max(r["finished_at"] for r in results(spool.base, "b").values())
    after_b = [c for c, r in a_done.items() if r["started_at"] > b_last]
    assert len(results(spool.base, "b")) == 24 and after_b, "b waited for a to run dry"
