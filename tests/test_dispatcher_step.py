"""Placement by the one dispatcher (master.core.dispatcher), one pass at a time against a tmp spool
with hand-written heartbeats and a fake clock: breadth first, depth from the measured round
trip and chunk durations, a fair share of what is left, and moving queued jobs to idle agents."""
from __future__ import annotations

import dataclasses

from gpupool.jobs.heartbeat import write_status
from gpupool.jobs.paths import Spool
from gpupool.master.core.dispatcher import Dispatcher, FeedConfig, ResultNames
from gpupool.jobs.mailbox import Mailbox
from gpupool.master.core.feeder import Feeder
from tests.test_feeder_step import beat, make, queued


def agents(spool: Spool, n: int, seq: int = 1, **status) -> list[str]:
    ids = [f"h-cpu{i}" for i in range(n)]
    for ident in ids:
        beat(spool, ident, seq, **status)
    return ids


def test_few_chunks_go_one_to_each_agent(spool: Spool) -> None:
    ids = agents(spool, 8)
    f, _, _ = make(spool, chunks=8, depth=4, max_depth=64)
    f.step()
    assert [len(queued(spool, i)) for i in ids] == [1] * 8  # not 4 + 4 + 0 x 6


def test_idle_agents_get_work_before_busy_ones(spool: Spool) -> None:
    beat(spool, "h-cpu0", 1, state="busy")
    beat(spool, "h-cpu1", 1)
    beat(spool, "h-cpu2", 1)
    f, _, _ = make(spool, chunks=2, depth=4, max_depth=64)
    f.step()
    assert queued(spool, "h-cpu0") == [] and len(queued(spool, "h-cpu1")) == len(queued(spool, "h-cpu2")) == 1


def test_a_busy_agent_holds_no_more_than_its_fair_share(spool: Spool) -> None:
    ids = agents(spool, 3)
    f, _, _ = make(spool, chunks=7, depth=4, max_depth=64)
    f.step()
    assert sorted(len(queued(spool, i)) for i in ids) == [2, 2, 3]  # ceil(7 / 3), breadth first


def test_depth_follows_the_chunk_duration_and_the_round_trip(spool: Spool) -> None:
    f, _, _ = make(spool, chunks=10, depth=4, max_depth=64, poll=0.2, queue_s=0.5)
    assert f.depth == 4  # nothing measured yet
    f._mean_s = 3600.0  # hour-long chunks: one running, one queued
    assert f.depth == 2
    f._mean_s, f._latency = 0.04, 0.01
    f.names = ResultNames()  # results watched by inotify: no poll in the round trip
    assert f.depth == 13  # 0.5 s of work (more than the 2 x 20 ms round trip needs)
    f.names, f._latency = None, 1.0  # a shared filesystem: 1 s to see a result, master polls
    assert f.depth == 64  # 1 + 2 x 2.2 s / 40 ms, capped
    f._mean_s = 1e-9
    assert 1 <= f.depth <= 64


def test_results_set_the_depth_a_refill_uses(spool: Spool) -> None:
    agents(spool, 1)
    f, clock, _ = make(spool, chunks=20, depth=4, max_depth=64)
    f.step()
    assert len(queued(spool, "h-cpu0")) == 4
    from gpupool.jobs.descriptor import Job, JobKind, JobState
    from gpupool.jobs.results import commit, record
    for c, a in queued(spool, "h-cpu0"):
        j = Job(run="run1", chunk_id=c, total_chunks=20, kind=JobKind.CALLABLE, target="x:y", attempt=a,
                max_attempts=2)
        commit(spool, j, record(j, JobState.OK, agent="h-cpu0", duration_s=600.0))
    clock.t += 1
    beat(spool, "h-cpu0", 2)
    f.step()
    assert len(queued(spool, "h-cpu0")) == 2  # long chunks: no deep queue to strand behind a slow one


def test_an_idle_agent_takes_half_the_queued_jobs_of_a_busy_one(spool: Spool) -> None:
    agents(spool, 1)
    f, clock, events = make(spool, chunks=4, depth=4, max_depth=64)
    f.step()
    assert queued(spool, "h-cpu0") == [(0, 1), (1, 1), (2, 1), (3, 1)]
    write_status(spool, "h-cpu0", {"agent": "h-cpu0", "seq": 2, "state": "busy", "pid": 1, "host": "h",
                                   "current": {"run": "run1", "chunk_id": 0}})
    beat(spool, "h-cpu1", 1)  # joins, idle, while nothing is pending
    clock.t += 2
    f.step()
    assert queued(spool, "h-cpu0") == [(0, 1), (1, 1)]
    assert queued(spool, "h-cpu1") == [(2, 2), (3, 2)]  # a moved job's next attempt: never two of one number
    assert f.max_attempts[2] == 3  # and it costs no retry
    assert ("moved", {"from": "h-cpu0", "to": "h-cpu1", "chunks": [2, 3]}) in events


def test_the_first_and_handed_over_jobs_never_move(spool: Spool) -> None:
    agents(spool, 1)
    f, clock, _ = make(spool, chunks=2, depth=4, max_depth=64)
    f.step()
    write_status(spool, "h-cpu0", {"agent": "h-cpu0", "seq": 2, "state": "busy", "pid": 1, "host": "h",
                                   "current": {"run": "run1", "chunk_id": 0}, "ahead": {"run": "run1", "chunk_id": 1}})
    beat(spool, "h-cpu1", 1)
    clock.t += 2
    f.step()
    assert queued(spool, "h-cpu0") == [(0, 1), (1, 1)] and queued(spool, "h-cpu1") == []


def test_jobs_that_would_soon_start_anyway_are_not_moved(spool: Spool) -> None:
    agents(spool, 1)
    f, clock, _ = make(spool, chunks=4, depth=4, max_depth=64)
    f.step()
    f._mean_s, f._latency, f.names = 0.002, 0.001, ResultNames()  # 2 ms chunks: a move costs more than it saves
    beat(spool, "h-cpu1", 1)
    clock.t += 2
    f.step()
    assert len(queued(spool, "h-cpu0")) == 4 and queued(spool, "h-cpu1") == []


def test_jobs_behind_a_chunk_that_runs_long_are_moved(spool: Spool) -> None:
    agents(spool, 1)
    f, clock, _ = make(spool, chunks=2, depth=4, max_depth=64)
    f.step()
    f._mean_s, f._latency, f.names = 0.05, 0.001, ResultNames()  # chunks usually take 50 ms...
    busy = {"agent": "h-cpu0", "state": "busy", "pid": 1, "host": "h", "current": {"run": "run1", "chunk_id": 0}}
    write_status(spool, "h-cpu0", {**busy, "seq": 2})
    beat(spool, "h-cpu1", 1)
    clock.t += 2
    f.step()  # ...and chunk 0 has only just been seen running: chunk 1 starts there soon
    assert queued(spool, "h-cpu1") == []
    for t in range(3):  # but it runs on and on
        clock.t += 1
        write_status(spool, "h-cpu0", {**busy, "seq": 3 + t})
        beat(spool, "h-cpu1", 2 + t)
        f.step()
    assert queued(spool, "h-cpu0") == [(0, 1)] and queued(spool, "h-cpu1") == [(1, 2)]


def test_a_run_keeps_to_the_agents_it_may_use(spool: Spool) -> None:
    class OnlyOne(Feeder):  # the placement hook (master.spec.placement gives the real one)
        def eligible(self, view) -> bool:
            return view.id == "h-cpu1"

    ids = agents(spool, 3)
    f, _, _ = make(spool, chunks=4)
    f.__class__ = OnlyOne
    f.step()
    assert [len(queued(spool, i)) for i in ids] == [0, 2, 0]


def test_one_backoff_rule() -> None:
    from gpupool.master.core.dispatcher import backoff
    cfg = FeedConfig(retry_delay=1.0, retry_cap=5.0)
    assert [backoff(a, cfg) for a in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 5.0]
    from gpupool.master.executor import _Calls
    assert issubclass(Feeder, Dispatcher) and issubclass(_Calls, Dispatcher)  # one loop for a run and an Executor



def test_a_mailbox_lock_held_by_another_process_costs_that_agent_its_refills_not_the_pass(spool: Spool) -> None:
    """A process frozen holding one agent's mailbox lock (or a slow client): a pass waits for it
    once, briefly; after that it is tried without waiting, once per LOCK_RETRY_S, while the
    other agents get the run's work."""
    from gpupool.master.core.dispatcher import LOCK_RETRY_S, LOCK_WAIT_S
    from tests.helpers import frozen_holder
    from tests.test_feeder_step import finish

    ids = agents(spool, 2)
    f, clock, _ = make(spool, chunks=200, depth=4, max_depth=4)
    f.step()
    assert len(queued(spool, ids[0])) == len(queued(spool, ids[1])) == 4
    lock = f._mailbox(ids[0]).lock
    waits: list[float | None] = []
    real_acquire = lock.acquire
    lock.acquire = lambda blocking=True, timeout=None, poll=0.05: waits.append(timeout) or real_acquire(
        blocking, timeout, poll)
    holder = frozen_holder(spool.mailbox_lock(ids[0]))
    try:
        for n in range(10):  # both agents finish what they hold, over 1 s of master clock
            for ident in ids:
                for key in queued(spool, ident):
                    finish(spool, key, max_attempts=f.max_attempts[key[0]])
                beat(spool, ident, n + 2)
            clock.t += 0.1
            f.step()
    finally:
        holder.kill()
        holder.wait()
    assert waits and waits[0] == LOCK_WAIT_S and all(w == 0.0 for w in waits[1:]), waits  # waited once, briefly
    assert len(waits) <= 1 + 1.0 / LOCK_RETRY_S, waits
    assert len(f.final) >= 4 + 4 * 9  # the other agent was refilled on every pass


def test_a_mailbox_is_never_written_past_its_limit_and_the_work_goes_elsewhere(spool: Spool) -> None:
    """Jobs of other runs with large kwargs fill one agent's mailbox near its limit: a refill that
    would pass it is refused (readers would reject the whole mailbox, and every job in it would
    vanish), the mailbox is left as it was, and the run's chunks go to the other agent."""
    from gpupool.jobs.descriptor import Job, JobKind
    from gpupool.jobs.mailbox import MAILBOX_LIMIT, Mailbox

    ids = agents(spool, 2)
    big = {"blob": "x" * 60_000}
    others = [Job(run="other", chunk_id=c, total_chunks=300, kind=JobKind.CALLABLE, target="x:y", kwargs=big)
              for c in range((MAILBOX_LIMIT - 100_000) // 60_100)]
    Mailbox(spool, ids[0]).update(lambda jobs: others)
    before = spool.mailbox(ids[0]).read_bytes()
    f, _, events = make(spool, chunks=4, depth=4, max_depth=64)
    f._job = lambda c, job=f._job: dataclasses.replace(job(c), kwargs=big)  # this run's kwargs are large too
    f.step()
    assert spool.mailbox(ids[0]).read_bytes() == before and not list(spool.rejected_dir.iterdir())
    assert len(queued(spool, ids[1])) == 2 and sorted(f.pending) == [0, 2]  # the refused ones wait for room


def test_a_retry_goes_to_another_agent_than_the_one_it_failed_on(spool: Spool) -> None:
    """A chunk that failed on an agent (a broken GPU there, a poisoned context) is retried on
    another agent with room for it, even when the one it failed on is idler; a later chunk takes
    its place there."""
    from tests.test_feeder_step import finish

    ids = agents(spool, 2)
    f, clock, _ = make(spool, chunks=8, depth=2, max_depth=2, retry_delay=0.0)
    f.step()  # breadth first: 0, 2 at h-cpu0; 1, 3 at h-cpu1
    assert queued(spool, ids[0]) == [(0, 1), (2, 1)] and queued(spool, ids[1]) == [(1, 1), (3, 1)]
    finish(spool, (0, 1), ok=False, max_attempts=f.max_attempts[0])  # chunk 0 fails on h-cpu0 (finish's agent)
    for key in ((2, 1), (1, 1)):
        finish(spool, key, max_attempts=f.max_attempts[key[0]])
    clock.t += 1.0
    beat(spool, ids[0], 2)
    beat(spool, ids[1], 2)
    f.step()  # collects: chunk 0 pending again, at the front
    f.step()
    assert (0, 2) in queued(spool, ids[1]) and (0, 2) not in queued(spool, ids[0])
    assert 4 in {c for c, _ in queued(spool, ids[0])}  # the next chunk took its place there
    assert f.failed_on[0] == {"h-cpu0"}


def test_a_retry_with_nowhere_else_to_go_now_runs_where_it_failed(spool: Spool) -> None:
    """No agent waits for a busy one: when the others have no room, the retry runs where it
    failed (it may have failed by chance), and on a single agent all the more."""
    from tests.test_feeder_step import finish

    ids = agents(spool, 1)
    f, clock, _ = make(spool, chunks=1, depth=4, max_depth=4, retry_delay=0.0)
    f.step()
    finish(spool, (0, 1), ok=False, max_attempts=f.max_attempts[0])
    clock.t += 1.0
    beat(spool, ids[0], 2)
    f.step()
    f.step()
    assert (0, 2) in queued(spool, ids[0])


def test_jobs_of_a_newer_descriptor_schema_pass_over_agents_that_cannot_read_them(spool: Spool, monkeypatch) -> None:
    """The evolution rule (jobs.descriptor): a job that uses a field an older agent must not ignore
    is written with a newer schema, and goes only to agents whose heartbeat says they read it."""
    from gpupool.jobs import descriptor
    new = descriptor.SCHEMA + 1
    monkeypatch.setattr(descriptor, "MUST_UNDERSTAND", {"share": new})  # as if 'share' were new in a newer schema
    monkeypatch.setattr(descriptor, "SCHEMA", new)  # which this version reads
    write_status(spool, "h-cpu0", {"agent": "h-cpu0", "seq": 1, "state": "idle", "pid": 1, "host": "h"})  # says nothing: 1
    write_status(spool, "h-cpu1", {"agent": "h-cpu1", "seq": 1, "state": "idle", "pid": 2, "host": "h", "job_schema": new})
    f, _, _ = make(spool, chunks=4, depth=4, max_depth=64)
    f.spec = dataclasses.replace(f.spec, share=2.0)
    f.step()
    f.step()
    assert queued(spool, "h-cpu0") == [] and len(queued(spool, "h-cpu1")) == 4
    assert Mailbox(spool, "h-cpu1").read().jobs[0].needs_schema == new
    assert "reads job descriptors up to schema 1" in f.why_not(f.liveness.views["h-cpu0"])



def test_a_run_only_older_agents_could_take_fails_at_once_naming_them(spool: Spool, monkeypatch) -> None:
    import pytest

    from gpupool.jobs import descriptor
    from gpupool.master.spec.placement import Unplaceable
    monkeypatch.setattr(descriptor, "MUST_UNDERSTAND", {"share": descriptor.SCHEMA + 1})
    monkeypatch.setattr(descriptor, "SCHEMA", descriptor.SCHEMA + 1)
    agents(spool, 1)  # an agent of the version before: its heartbeat has no job_schema
    f, _, _ = make(spool, chunks=2)
    f.spec = dataclasses.replace(f.spec, share=2.0)
    f.step()  # learns the jobs' schema as it makes them; queues nothing the agent would refuse
    assert queued(spool, "h-cpu0") == []
    with pytest.raises(Unplaceable, match="h-cpu0 .*reads job descriptors up to schema 1.*restart it"):
        f.step()


def test_jobs_a_current_agent_reads_keep_schema_1(spool: Spool) -> None:
    agents(spool, 1)
    f, _, _ = make(spool, chunks=1)
    f.step()
    assert Mailbox(spool, "h-cpu0").read().jobs[0].to_dict()["schema"] == 1


def test_the_backoff_starts_from_the_base_for_each_master() -> None:
    from gpupool.master.core.dispatcher import backoff
    cfg = FeedConfig(retry_delay=1.0, retry_cap=60.0)
    assert [backoff(a, cfg, before=2) for a in (3, 4, 5)] == [1.0, 2.0, 4.0]  # attempts 1-2 were an earlier run's
