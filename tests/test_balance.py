"""Every agent busy (issue 11), with real agents: few long chunks use every agent, an idle agent
takes queued work from a busy one, and Executor calls spread and can be cancelled while queued."""
from __future__ import annotations

import json
import time
from concurrent.futures import wait

from gpupool.jobs.paths import Spool
from gpupool.master.executor import Executor
from tests.helpers import results, run_main, wait_for
from tests.test_executor import nap


def test_n_long_chunks_on_n_agents_run_one_on_each(spool: Spool, agents, env) -> None:
    ids = [a.id for a in agents(4)]
    r = run_main(["--base", str(spool.base), "--task", "examples.noop:sleepy", "--chunks", "4", "--kwargs",
                  '{"seconds": 1.0}', "--run", "long", "--no-progress"], env)
    assert r.returncode == 0, r.stderr
    assert sorted(rec["agent"] for rec in results(spool.base, "long").values()) == sorted(ids)


def test_an_idle_agent_takes_the_queued_chunk_of_a_busy_one(spool: Spool, agents, env) -> None:
    """Chunk 0 is long, 1 and 2 short: chunks 0 and 2 first go to one agent (a fair share of 3 on
    2 agents is 2). The other agent, done with chunk 1, takes chunk 2 instead of idling while it
    waits behind chunk 0."""
    agents(2)
    r = run_main(["--base", str(spool.base), "--task", "examples.noop:sleep_for", "--chunks", "3", "--kwargs",
                  json.dumps({"seconds": [6.0, 0.2, 0.2]}), "--run", "uneven", "--depth", "2", "--no-progress"], env)
    assert r.returncode == 0, r.stderr
    res = results(spool.base, "uneven")
    assert res[2]["agent"] != res[0]["agent"] and res[2]["attempt"] == 2, res  # moved: it did not wait behind chunk 0
    assert res[2]["finished_at"] < res[0]["finished_at"]


def test_executor_calls_spread_over_idle_agents(spool: Spool, agents, env) -> None:
    ids = {a.id for a in agents(3)}
    with Executor(spool.base, keep=True) as ex:  # its results are read below
        futures = [ex.submit(nap, 1.0, tag=i) for i in range(3)]
        assert [f.result(timeout=60) for f in futures] == [0, 1, 2]
    assert {rec["agent"] for rec in results(spool.base, ex.run).values()} == ids  # not one after another


def test_executor_cancel_succeeds_on_a_call_queued_behind_another(spool: Spool, agents, env) -> None:
    agents(1)
    with Executor(spool.base, keep=True) as ex:  # its results are read below
        first = ex.submit(nap, 2.0, tag=1)
        queued = ex.submit(nap, 2.0, tag=2)
        wait_for(first.running, 30, "the first call running")  # its agent's heartbeat shows it
        assert queued.cancel() and queued.cancelled()  # not started: it can still be cancelled
        assert not first.cancel()  # running: too late
        done, _ = wait([first, queued], timeout=60)
        assert first.result() == 1
    t0 = time.monotonic()
    wait_for(lambda: 1 not in results(spool.base, ex.run) and 0 in results(spool.base, ex.run), 30, "results")
    assert time.monotonic() - t0 < 30 and set(results(spool.base, ex.run)) == {0}  # the cancelled call never ran
