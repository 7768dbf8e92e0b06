"""Batches on the master's side (issue 27): the batch size rule, and one pass of the master's loop
at a time against a tmp spool, with hand-written heartbeats, slots committed as an agent commits
them (``jobs.batches``) and a fake clock."""
from __future__ import annotations

import json
from typing import Any

import pytest

from gpupool.jobs import batches
from gpupool.jobs.descriptor import Job, JobKind, JobState
from gpupool.jobs.mailbox import Mailbox
from gpupool.jobs.paths import Spool
from gpupool.jobs.results import chunk_result, commit, record, scan_run
from gpupool.master.core.batching import FILES, MAX_BATCH, batch_size
from gpupool.master.core.feeder import FeedConfig, Feeder
from gpupool.master.spec.runspec import RunSpec
from gpupool.jobs.descriptor import SCHEMA
from gpupool.jobs.heartbeat import write_status
from tests.test_feeder_step import Clock


def beat(spool: Spool, ident: str, seq: int, state: str = "idle", schema: int = SCHEMA) -> None:
    write_status(spool, ident, {"agent": ident, "seq": seq, "state": state, "pid": 1, "host": "h",
                                "job_schema": schema})


# the rule ---------------------------------------------------------------------------------------
def test_nothing_is_batched_before_a_chunk_duration_is_known() -> None:
    assert batch_size(None, 0.01, 1_000_000, 1_000_000, 2) == 1


def test_chunks_as_long_as_half_a_round_trip_are_never_batched() -> None:
    assert batch_size(0.005, 0.01, 1_000_000, 1_000_000, 2) == 1
    assert batch_size(3600.0, 0.01, 8, 8, 8) == 1


def test_a_short_chunks_batch_lasts_about_a_round_trip() -> None:
    assert batch_size(0.001, 0.1, 1000, 1000, 2) == 100  # 100 chunks of 1 ms: 0.1 s, the round trip
    assert batch_size(0.0001, 0.01, 1000, 1000, 2) == 100


def test_a_million_short_chunks_leave_at_most_a_few_thousand_files() -> None:
    n = batch_size(1e-6, 0.002, 1_000_000, 1_000_000, 2)
    assert n >= 1_000_000 / FILES and 1_000_000 / n <= FILES
    assert batch_size(0.01, 1.0, 1_000_000, 1_000_000, 2) == 100  # batches of at most a second's work


def test_batches_stay_within_a_fair_share_of_what_is_left_and_the_cap() -> None:
    assert batch_size(1e-6, 1.0, 10**6, 10**6, 2) == MAX_BATCH
    assert batch_size(0.0001, 0.01, 1000, 30, 3) == 10  # the run's last batches end together
    assert batch_size(None, 0.01, 1000, 1000, 2, given=50) == 50  # --batch K, from the start
    assert batch_size(None, 0.01, 1000, 7, 2, given=50) == 4
    assert batch_size(0.0001, 0.01, 1000, 1000, 2, given=1) == 1


# one pass at a time -------------------------------------------------------------------------------
def make(spool: Spool, chunks: int = 20, retries: int = 1, batch: int | None = 5, params: Any = None,
         **cfg: Any) -> tuple[Feeder, Clock, list]:
    spec = RunSpec("run1", JobKind.CALLABLE, "examples.noop:noop", chunks, retries=retries, batch=batch,
                   params=params)
    clock, events = Clock(), []
    f = Feeder(spool, spec, FeedConfig(**{"depth": 2, "max_depth": 2, "dead_after": 5.0, "retry_delay": 1.0,
                                          "max_failures": 0, **cfg}),
               on_event=lambda k, i: events.append((k, i)), clock=clock)
    f.recover()
    return f, clock, events


def jobs_at(spool: Spool, ident: str) -> list[Job]:
    return Mailbox(spool, ident).read().jobs


def queued(spool: Spool, ident: str) -> list[tuple[int, int | None, int]]:
    return [(j.chunk_id, j.batch, j.attempt) for j in jobs_at(spool, ident)]


def agent_commits(spool: Spool, job: Job, codes: str | None = None, agent: str = "h-cpu0") -> bool:
    """What an agent commits for batch ``job``: every chunk ok (value: its id) unless ``codes`` says."""
    n = job.batch or 1
    codes = codes or batches.OK * n
    errors = {c: {"type": "ValueError", "message": f"bad {c}"} for c, k in zip(job.chunks, codes)
              if k in (batches.HISTORY, batches.FINAL_FAILED)}
    rec = batches.batch_record(job, codes, values=[c if k == "o" else None for c, k in zip(job.chunks, codes)],
                               durations=[1e-5] * n, errors=errors, agent=agent, started_at=1.0, finished_at=2.0)
    return batches.commit_batch(spool, job, rec)


def test_a_fixed_batch_size_queues_batches_and_their_slots_settle_every_chunk(spool: Spool) -> None:
    beat(spool, "h-cpu0", 1)
    f, clock, events = make(spool, chunks=20, batch=5)
    f.step()
    assert queued(spool, "h-cpu0") == [(0, 5, 1), (5, 5, 1)]
    for job in jobs_at(spool, "h-cpu0"):
        assert agent_commits(spool, job)
    f.step()
    assert sorted(f.final) == list(range(10)) and [k for k, _ in events] == ["ok"] * 10
    assert queued(spool, "h-cpu0") == [(10, 5, 1), (15, 5, 1)]  # refilled, the finished pruned
    for job in jobs_at(spool, "h-cpu0"):
        agent_commits(spool, job)
    f.step()
    assert f.done and all(o.status == JobState.OK for o in f.final.values())
    assert sorted(p.name for p in spool.result_dir("run1").iterdir()) == \
        ["000000+5.json", "000005+5.json", "000010+5.json", "000015+5.json"]
    assert chunk_result(spool, "run1", 17)["value"] == 17


def test_an_agent_too_old_for_batches_gets_its_chunks_one_by_one(spool: Spool) -> None:
    beat(spool, "h-cpu0", 1, schema=3)
    f, clock, events = make(spool, chunks=20, batch=5)
    f.step()
    assert queued(spool, "h-cpu0") == [(0, None, 1), (1, None, 1)]
    assert f.why_not(f.liveness.views["h-cpu0"]) is None


def test_a_sweeps_batch_carries_each_chunks_parameters(spool: Spool) -> None:
    beat(spool, "h-cpu0", 1)
    f, _, _ = make(spool, chunks=4, batch=2, params=[{"x": i} for i in range(4)], depth=1, max_depth=1)
    f.step()
    (job,) = jobs_at(spool, "h-cpu0")
    assert job.batch == 2 and job.batch_params == [{"x": 0}, {"x": 1}] and job.params is None
    assert job.chunk_kwargs(1) == {"x": 1}


def test_failed_chunks_of_a_batch_are_retried_one_by_one_and_handed_back_ones_run_again(spool: Spool) -> None:
    beat(spool, "h-cpu0", 1)
    f, clock, events = make(spool, chunks=5, batch=5, retries=1, depth=1, max_depth=1)
    f.step()
    (job,) = jobs_at(spool, "h-cpu0")
    agent_commits(spool, job, "ohobo")  # chunk 1 failed with a retry left, chunk 3 handed back
    f.step()
    assert sorted(f.final) == [0, 2, 4]
    assert [k for k, _ in events].count("retry") == 1
    assert (3, None, 2) in queued(spool, "h-cpu0")  # the handed back one at no cost: its next attempt, alone
    clock.t += 1.5
    beat(spool, "h-cpu0", 2)
    Mailbox(spool, "h-cpu0").update(lambda jobs: [])
    f.step()
    f.step()
    assert {(c, a) for c, _, a in queued(spool, "h-cpu0")} <= {(1, 2), (3, 2)}
    assert f.max_attempts[3] == 3 and f.max_attempts[1] == 2  # the hand-back cost no attempt


def test_a_batch_of_a_dead_agent_is_fenced_and_its_chunks_go_on_one_by_one(spool: Spool) -> None:
    beat(spool, "h-cpu0", 1)
    f, clock, events = make(spool, chunks=10, batch=5, depth=1, max_depth=1)
    f.step()
    (job,) = jobs_at(spool, "h-cpu0")
    beat(spool, "h-cpu1", 1)
    for t in range(6):  # h-cpu0 is silent for 6 s of master clock
        clock.t += 1.0
        beat(spool, "h-cpu1", 2 + t)
        f.step()
    slot = spool.batch_json("run1", 0, 5)
    assert json.loads(slot.read_text())["fenced"]
    assert not agent_commits(spool, job)  # the dead agent's late commit can never count
    assert all(f.attempt[c] == 1 and f.max_attempts[c] == 3 for c in range(5))  # lost at no cost
    at1 = queued(spool, "h-cpu1")
    assert at1 and all(b is None and a == 2 for c, b, a in at1 if c < 5)  # one by one, next attempt


def test_a_batch_that_committed_before_its_fence_counts(spool: Spool) -> None:
    beat(spool, "h-cpu0", 1)
    f, clock, events = make(spool, chunks=5, batch=5, depth=1, max_depth=1)
    f.step()
    (job,) = jobs_at(spool, "h-cpu0")
    f.names = None  # no watch here: the pass looks at every job in flight
    assert agent_commits(spool, job)
    f._split(0, "taken back")  # the fence loses to the commit: nothing goes back
    assert 0 in f.inflight and not f.pending
    f.step()
    assert f.done and sorted(f.final) == list(range(5))


def test_short_chunks_get_batched_once_their_duration_is_known(spool: Spool) -> None:
    beat(spool, "h-cpu0", 1)
    f, clock, events = make(spool, chunks=2000, batch=None, depth=2, max_depth=2)
    f.step()
    first = queued(spool, "h-cpu0")
    assert first == [(0, None, 1), (1, None, 1)]  # no duration known: one chunk a job
    for c, _, a in first:
        j = Job(run="run1", chunk_id=c, total_chunks=2000, kind=JobKind.CALLABLE, target="x:y", attempt=a,
                max_attempts=3)
        commit(spool, j, record(j, JobState.OK, agent="h-cpu0", duration_s=1e-5))
    f.step()
    sizes = [b for _, b, _ in queued(spool, "h-cpu0")]
    assert sizes and all(b is not None and b >= 2 for b in sizes)


def test_long_chunks_are_never_batched(spool: Spool) -> None:
    beat(spool, "h-cpu0", 1)
    f, clock, events = make(spool, chunks=50, batch=None, depth=2, max_depth=2)
    f.step()
    for c, _, a in queued(spool, "h-cpu0"):
        j = Job(run="run1", chunk_id=c, total_chunks=50, kind=JobKind.CALLABLE, target="x:y", attempt=a,
                max_attempts=3)
        commit(spool, j, record(j, JobState.OK, agent="h-cpu0", duration_s=60.0))
    f.step()
    assert all(b is None for _, b, _ in queued(spool, "h-cpu0"))


def test_a_new_master_takes_over_queued_batches_and_committed_slots(spool: Spool) -> None:
    beat(spool, "h-cpu0", 1)
    f, clock, _ = make(spool, chunks=20, batch=5)
    f.step()
    first, second = jobs_at(spool, "h-cpu0")
    agent_commits(spool, first, "ooooh")
    g, _, _ = make(spool, chunks=20, batch=5)  # the first master died; a second one resumes the run
    assert sorted(g.final) == [0, 1, 2, 3] and g.span == {5: 5} and g.inflight[5] == ("h-cpu0", 1)
    assert 4 in g.pending and g.attempt[4] == 1  # failed in the batch: its next attempt alone
    assert not any(c in g.pending for c in range(5, 10))
    g.step()
    assert all(b is None for c, b, _ in queued(spool, "h-cpu0") if c == 4)


def test_chunks_of_a_fenced_batch_are_never_batched_under_its_name_again(spool: Spool) -> None:
    beat(spool, "h-cpu0", 1)
    f, clock, _ = make(spool, chunks=10, batch=5, depth=1, max_depth=1)
    f.step()
    f._split(0, "taken back")
    Mailbox(spool, "h-cpu0").update(lambda jobs: [])
    g, _, _ = make(spool, chunks=10, batch=5, depth=1, max_depth=1)  # a new master before they ran
    assert all(g.attempt[c] == 1 for c in range(5)) and not any(g.batchable(c) for c in range(5))
    assert all(g.batchable(c) for c in range(5, 10))


def test_a_torn_slot_is_refused_and_its_chunks_run_again(spool: Spool) -> None:
    beat(spool, "h-cpu0", 1)
    f, clock, _ = make(spool, chunks=5, batch=5, depth=1, max_depth=1)
    f.step()
    spool.batch_json("run1", 0, 5).write_text('{"first": 0, "count": 5, "run": "run1", "attempt": 1, "codes": "oo')
    f.names = None
    f.step()
    assert not f.final and 0 not in f.span
    assert any(p.name.endswith("000000+5.json") for p in spool.rejected_dir.iterdir())
    assert set(f.pending) | {c for c, _, _ in queued(spool, "h-cpu0")} == set(range(5))


def test_scan_counts_a_slots_chunks_once(spool: Spool) -> None:
    job = Job(run="run1", chunk_id=0, total_chunks=5, kind=JobKind.CALLABLE, target="x:y", batch=5, max_attempts=1)
    spool.result_dir("run1").mkdir(parents=True, exist_ok=True)
    agent_commits(spool, job, "oofob")
    scan = scan_run(spool, "run1")
    assert sorted(scan.finals) == [0, 1, 2, 3] and scan.history == {2: [1]}
    with pytest.raises(FileNotFoundError):
        chunk_result(spool, "run1", 4, scan)


def test_a_slot_of_an_earlier_start_of_the_run_is_moved_aside_on_resume(spool: Spool) -> None:
    from gpupool.jobs.results import new_epoch

    spool.result_dir("run1").mkdir(parents=True, exist_ok=True)
    old = Job(run="run1", chunk_id=0, total_chunks=10, kind=JobKind.CALLABLE, target="x:y", batch=5, epoch="old1")
    agent_commits(spool, old)
    new_epoch(spool, "run1")  # --fresh: what was committed before counts for nothing
    f, _, _ = make(spool, chunks=10, batch=5)
    assert not f.final and not spool.batch_json("run1", 0, 5).exists()
    assert all(f.batchable(c) for c in range(10))  # its chunks may go in a batch of that name again
    assert any(p.name.endswith("000000+5.json") for p in spool.rejected_dir.iterdir())


def test_a_sweeps_batches_stay_small_whatever_its_parameters_weigh(spool: Spool) -> None:
    beat(spool, "h-cpu0", 1)
    big = [{"text": "x" * 10_000, "i": i} for i in range(200)]  # 10 KB of parameters a chunk
    f, _, _ = make(spool, chunks=200, batch=100, params=big, depth=2, max_depth=2)
    f.step()
    jobs = jobs_at(spool, "h-cpu0")
    assert jobs and all(2 <= (j.batch or 1) <= 6 for j in jobs), [j.batch for j in jobs]  # 64 KB of them at most
    assert [c for j in jobs for c in j.chunks] == list(range(sum(len(j.chunks) for j in jobs)))  # in order
