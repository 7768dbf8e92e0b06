"""One pass of the master's loop against a tmp spool, with hand-written heartbeats and a fake clock."""
from __future__ import annotations

from typing import Any

import pytest

from gpupool.jobs.descriptor import Job, JobKind, JobState
from gpupool.jobs.heartbeat import write_status
from gpupool.jobs.mailbox import Mailbox
from gpupool.jobs.paths import Spool
from gpupool.jobs.results import commit, record
from gpupool.master.core.feeder import FeedConfig, Feeder
from gpupool.master.spec.runspec import RunSpec


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def beat(spool: Spool, ident: str, seq: int, state: str = "idle") -> None:
    write_status(spool, ident, {"agent": ident, "seq": seq, "state": state, "pid": 1, "host": "h"})


def make(spool: Spool, chunks: int = 6, retries: int = 1, **cfg: Any) -> tuple[Feeder, Clock, list]:
    spec = RunSpec("run1", JobKind.CALLABLE, "examples.noop:noop", chunks, retries=retries)
    clock, events = Clock(), []
    f = Feeder(spool, spec, FeedConfig(**{"depth": 2, "max_depth": 2, "dead_after": 5.0, "retry_delay": 1.0, **cfg}),
               on_event=lambda k, i: events.append((k, i)), clock=clock)
    f.recover()
    return f, clock, events


def queued(spool: Spool, ident: str) -> list[tuple[int, int]]:
    return [(j.chunk_id, j.attempt) for j in Mailbox(spool, ident).read().jobs]


def finish(spool: Spool, job_key: tuple[int, int], ok: bool = True, max_attempts: int = 2) -> None:
    c, a = job_key
    j = Job(run="run1", chunk_id=c, total_chunks=6, kind=JobKind.CALLABLE, target="x:y", attempt=a,
            max_attempts=max_attempts)
    commit(spool, j, record(j, JobState.OK if ok else JobState.FAILED, agent="h-cpu0",
                            **({} if ok else {"error": {"type": "E", "message": "boom"}})))


def test_dispatches_up_to_depth_to_live_agents_only(spool: Spool) -> None:
    beat(spool, "h-cpu0", 1)
    beat(spool, "h-cpu1", 1, state="stopped")
    f, clock, _ = make(spool)
    f.step()
    assert queued(spool, "h-cpu0") == [(0, 1), (1, 1)]
    assert queued(spool, "h-cpu1") == []


def test_no_agents_is_reported_and_nothing_lost(spool: Spool) -> None:
    f, clock, events = make(spool)
    f.step()
    assert events == [("no_agents", {"waited_s": 0.0})] and len(f.pending) == 6
    clock.t += 30.0
    f.step()
    assert len(events) == 1  # said once a minute, not on every pass
    clock.t += 31.0
    f.step()
    assert events[-1] == ("no_agents", {"waited_s": 61.0}) and len(f.pending) == 6


def test_a_master_told_to_wait_for_agents_only_so_long_gives_up(spool: Spool) -> None:
    from gpupool.jobs.errors import NoAgents

    f, clock, _ = make(spool, wait_agents=5.0)
    f.step()
    clock.t += 4.0
    f.step()
    clock.t += 1.0
    with pytest.raises(NoAgents, match=r"no live agent came in 5 s \(--wait-agents\); 6 chunks not run"):
        f.step()


def test_results_are_collected_and_refilled(spool: Spool) -> None:
    beat(spool, "h-cpu0", 1)
    f, clock, events = make(spool)
    f.step()
    for key in queued(spool, "h-cpu0"):
        finish(spool, key)  # the agent leaves finished jobs in its mailbox
    f.step()
    assert [k for k, _ in events] == ["ok", "ok"] and set(f.final) == {0, 1}
    assert queued(spool, "h-cpu0") == [(2, 1), (3, 1)]  # the master pruned them as it refilled


def test_failed_attempt_is_retried_after_backoff_with_next_attempt(spool: Spool) -> None:
    beat(spool, "h-cpu0", 1)
    f, clock, events = make(spool, chunks=1)
    f.step()
    finish(spool, (0, 1), ok=False)
    Mailbox(spool, "h-cpu0").update(lambda jobs: [])
    f.step()
    assert events[-1][0] == "retry" and queued(spool, "h-cpu0") == []  # backing off
    clock.t += 1.1
    beat(spool, "h-cpu0", 2)
    f.step()
    assert queued(spool, "h-cpu0") == [(0, 2)]
    finish(spool, (0, 2), ok=False)  # the last attempt: committed as failed for good
    f.step()
    assert f.done and f.final[0].status == "failed" and events[-1][0] == "failed"


def test_dead_agent_jobs_are_handed_back_to_a_live_one(spool: Spool) -> None:
    beat(spool, "h-cpu0", 1)
    f, clock, events = make(spool)
    f.step()
    assert queued(spool, "h-cpu0") == [(0, 1), (1, 1)]
    beat(spool, "h-cpu1", 1)
    for t in range(6):  # h-cpu1 keeps beating, h-cpu0 is silent for 6 s of master clock
        clock.t += 1.0
        beat(spool, "h-cpu1", 2 + t)
        f.step()
    assert queued(spool, "h-cpu0") == []
    assert ("handback" in [k for k, _ in events])
    assert queued(spool, "h-cpu1") == [(2, 1), (3, 1)]  # it took fresh work while h-cpu0 was silent
    assert sorted(list(f.pending)[:2]) == [0, 1]  # handed-back chunks go first
    for key in queued(spool, "h-cpu1"):
        finish(spool, key)
    Mailbox(spool, "h-cpu1").update(lambda jobs: [])
    f.step()
    assert sorted(queued(spool, "h-cpu1")) == [(0, 2), (1, 2)]
    assert f.max_attempts[0] == 3  # a lost attempt costs no retry


def test_a_chunk_that_keeps_killing_its_agent_fails_after_its_free_loss(spool: Spool) -> None:
    f, clock, events = make(spool, chunks=1, retries=1)
    for n, ident in enumerate(["h-cpu0", "h-cpu1", "h-cpu2"]):
        for t in range(3):  # a fresh agent beats: the chunk is queued there
            beat(spool, ident, t + 1)
            clock.t += 1.0
            f.step()
        assert queued(spool, ident) == [(0, n + 1)]
        clock.t += 6.0  # then it dies (no heartbeat change for more than dead_after)
        f.step()
        if n == 0:  # the first loss is free (nodes fail on their own)
            assert f.max_attempts[0] == 3 and not spool.history_json("run1", 0, 1).exists()
        elif n == 1:  # the second costs an attempt, recorded like any failure
            hist = spool.history_json("run1", 0, 2).read_text()
            assert "AgentLost" in hist and "h-cpu1" in hist and not f.done
    assert f.done and f.final[0].status == "failed" and f.final[0].attempt == 3
    assert f.final[0].error.startswith("AgentLost: agent h-cpu2 died") and f.losses[0] == 3


def test_an_agent_restarted_at_once_under_the_same_id_counts_as_a_death(spool: Spool) -> None:
    """A supervisor brings the agent back within a second: its heartbeat never goes stale, but
    its process changes, and the new one names what the old one died under."""
    f, clock, events = make(spool, chunks=3, retries=0)
    write_status(spool, "h-cpu0", {"agent": "h-cpu0", "seq": 1, "state": "idle", "pid": 10, "host": "h"})
    f.step()
    assert queued(spool, "h-cpu0") == [(0, 1), (1, 1)]
    clock.t += 1.0
    write_status(spool, "h-cpu0", {"agent": "h-cpu0", "seq": 1, "state": "idle", "pid": 11, "host": "h",
                                   "died_under": [{"run": "run1", "chunk_id": 0, "attempt": 1}]})
    f.step()
    assert ("handback", {"agent": "h-cpu0", "chunks": [0], "why": "restarted: its process 10 was replaced by 11"}) \
        in events
    # attempt 1 left the mailbox; the first loss is free, and the next attempt runs alone
    assert queued(spool, "h-cpu0") == [(1, 1), (0, 2)] and f.isolated == {0} and f.max_attempts[0] == 2
    assert [j.alone for j in Mailbox(spool, "h-cpu0").read().jobs] == [False, True]
    clock.t += 1.0  # and it kills the agent again: this loss is its last attempt
    write_status(spool, "h-cpu0", {"agent": "h-cpu0", "seq": 1, "state": "idle", "pid": 12, "host": "h",
                                   "died_under": [{"run": "run1", "chunk_id": 0, "attempt": 2}]})
    f.step()
    clock.t += 1.0
    f.step()
    assert f.final[0].status == "failed" and f.final[0].error.startswith("AgentLost: agent h-cpu0 died (its process 11")
    clock.t += 1.0  # a restart that names another run's job costs this run nothing
    write_status(spool, "h-cpu0", {"agent": "h-cpu0", "seq": 1, "state": "idle", "pid": 13, "host": "h",
                                   "died_under": [{"run": "other", "chunk_id": 0, "attempt": 1}]})
    f.step()
    assert 1 not in f.isolated and 2 not in f.isolated and not f.done


def test_the_neighbour_of_a_chunk_that_killed_its_agent_runs_alone_and_pays_nothing(spool: Spool) -> None:
    f, clock, events = make(spool, chunks=2)
    beat(spool, "h-cpu0", 1)
    f.step()
    assert queued(spool, "h-cpu0") == [(0, 1), (1, 1)]
    clock.t += 6.0  # h-cpu0 dies: with pipelining either chunk may have been running
    beat(spool, "h-cpu1", 1)
    f.step()
    # both go back free and are marked to run alone (no pipelining), so their next loss is sure
    assert f.isolated == {0, 1} and f.max_attempts[0] == f.max_attempts[1] == 3
    (first, _), (second, _) = queued(spool, "h-cpu1")
    assert {first, second} == {0, 1} and all(j.alone for j in Mailbox(spool, "h-cpu1").read().jobs)
    finish(spool, (first, 2), max_attempts=3)  # the innocent one
    for t in range(2):  # h-cpu1 beats a while, then dies while chunk 1 runs
        clock.t += 1.0
        beat(spool, "h-cpu1", 2 + t)
        f.step()
    clock.t += 6.0
    beat(spool, "h-cpu2", 1)
    f.step()
    assert f.final[first].status == "ok" and f.final[first].attempt == 2
    hist = spool.history_json("run1", second, 2).read_text()
    assert "AgentLost" in hist and "h-cpu1" in hist and f.losses[second] == 2


def test_a_restarted_master_remembers_which_chunks_are_suspected_of_killing_agents(spool: Spool) -> None:
    spool.result_dir("run1").mkdir(parents=True)
    beat(spool, "h-cpu0", 1)
    Mailbox(spool, "h-cpu0").update(lambda jobs: [Job(run="run1", chunk_id=2, total_chunks=6, kind=JobKind.CALLABLE,
                                                      target="x:y", attempt=2, max_attempts=3, alone=True)])
    lost = Job(run="run1", chunk_id=3, total_chunks=6, kind=JobKind.CALLABLE, target="x:y", attempt=1, max_attempts=3)
    commit(spool, lost, record(lost, JobState.FAILED, agent="h-cpu1", error={"type": "AgentLost", "message": "m"}))
    f, clock, _ = make(spool)
    # queued alone, or last seen killing its agent: each runs alone, its free loss used
    assert f.isolated == {2, 3} and f.losses[2] == f.losses[3] == 1
    assert 3 in f.pending and f._job(3).alone and not f._job(4).alone


def test_recover_rebuilds_state_from_disk(spool: Spool) -> None:
    spool.result_dir("run1").mkdir(parents=True)
    finish(spool, (0, 1))
    finish(spool, (1, 1), ok=False)  # attempt 1 of 2 failed: history only
    beat(spool, "h-cpu0", 1)
    Mailbox(spool, "h-cpu0").update(lambda jobs: [Job(run="run1", chunk_id=2, total_chunks=6,
                                                      kind=JobKind.CALLABLE, target="x:y", attempt=1, max_attempts=2)])
    f, clock, _ = make(spool)
    assert set(f.final) == {0}
    assert f.inflight == {2: ("h-cpu0", 1)}
    assert list(f.pending) == [1, 3, 4, 5] and f.attempt[1] == 1


def test_vanished_job_is_queued_again(spool: Spool) -> None:
    beat(spool, "h-cpu0", 1)
    f, clock, events = make(spool)
    f.step()
    Mailbox(spool, "h-cpu0").update(lambda jobs: [])  # gone, no result
    clock.t += 2
    beat(spool, "h-cpu0", 2)
    f.step()
    # not yet: through a shared filesystem the result may show up after the pruned mailbox
    assert queued(spool, "h-cpu0") == [] and set(f.inflight) == {0, 1}
    clock.t += 5  # gone for dead_after (5 s here)
    beat(spool, "h-cpu0", 3)
    f.step()
    assert sorted(queued(spool, "h-cpu0")) == [(0, 2), (1, 2)]


@pytest.mark.parametrize("content", [b"{}", b"garbage", b'{"status": "maybe"}'])
def test_invalid_result_file_is_rejected_and_chunk_reruns(spool: Spool, content: bytes) -> None:
    spool.result_dir("run1").mkdir(parents=True)
    spool.result_json("run1", 3).write_bytes(content)
    f, _, _ = make(spool)
    assert 3 in f.pending and not spool.result_json("run1", 3).exists()
    assert list(spool.rejected_dir.glob("*.why"))


def test_sealed_run_is_resumed_from_file_names_alone(spool: Spool) -> None:
    from gpupool.jobs.results import seal
    spool.result_dir("run1").mkdir(parents=True)
    for c in range(6):
        finish(spool, (c, 1))
    f, _, _ = make(spool)
    assert f.done
    seal(spool, "run1")
    spool.result_json("run1", 4).write_bytes(b"")  # not read again once sealed: names are exact
    f, _, _ = make(spool)
    assert f.done and f.final[4].status == "ok"
    spool.sealed_flag("run1").unlink()  # not sealed (e.g. an OS crash mid-run): every result is checked
    f, _, _ = make(spool)
    assert list(f.pending) == [4] and not spool.result_json("run1", 4).exists()


def test_torn_arrays_of_an_unsealed_run_are_rejected(spool: Spool) -> None:
    spool.result_dir("run1").mkdir(parents=True)
    j = Job(run="run1", chunk_id=2, total_chunks=6, kind=JobKind.CALLABLE, target="x:y")
    commit(spool, j, record(j, JobState.OK, arrays="000002.a1.npz", arrays_bytes=1000))
    spool.result_npz("run1", 2, 1).write_bytes(b"\0" * 10)  # what an OS crash may leave
    f, _, _ = make(spool)
    assert 2 in f.pending and list(spool.rejected_dir.glob("*.why"))


def test_last_attempt_history_waits_for_its_final_or_a_hand_back(spool: Spool) -> None:
    beat(spool, "h-cpu0", 1)
    f, clock, events = make(spool, chunks=1, retries=0)
    f.step()
    # the agent wrote the last attempt's history, then died before its final result
    from gpupool.jobs.atomic import write_replace
    write_replace(spool.history_json("run1", 0, 1), b'{"status": "failed", "chunk_id": 0, "attempt": 1}')
    f.step()
    assert not [k for k, _ in events if k == "retry"] and 0 in f.inflight  # waits for the final
    beat(spool, "h-cpu1", 1)
    for _ in range(6):
        clock.t += 1.0
        beat(spool, "h-cpu1", int(clock.t))
        f.step()
    assert queued(spool, "h-cpu1") == [(0, 2)]  # handed back: the chunk is not lost


def test_draining_agent_keeps_its_current_and_handed_over_jobs(spool: Spool) -> None:
    beat(spool, "h-cpu0", 1)
    f, clock, events = make(spool, depth=3, max_depth=3)
    f.step()
    assert queued(spool, "h-cpu0") == [(0, 1), (1, 1), (2, 1)]
    write_status(spool, "h-cpu0", {"agent": "h-cpu0", "seq": 2, "state": "draining", "pid": 1, "host": "h",
                                   "current": {"run": "run1", "chunk_id": 0}, "ahead": {"run": "run1", "chunk_id": 1}})
    clock.t += 2
    f.step()
    assert queued(spool, "h-cpu0") == [(0, 1), (1, 1)]  # only the job not yet handed over comes back
    assert ("handback", {"agent": "h-cpu0", "chunks": [2], "why": "draining"}) in events


def test_a_folder_where_a_result_belongs_fails_that_chunk_instead_of_hanging_the_run(spool: Spool) -> None:
    beat(spool, "h-cpu0", 1)
    f, clock, events = make(spool, chunks=1)
    f.step()
    spool.result_json("run1", 0).mkdir()  # no agent can ever commit chunk 0 now
    f.step()
    assert f.done and f.final[0].status == "failed" and "000000.json is not a readable result file" in f.final[0].error


def test_the_saved_placement_places_the_run_and_travels_in_its_jobs(spool: Spool) -> None:
    """A run's placement is its spec's (issue 24): no Placement need be passed for a resumed or retried run."""
    spec = RunSpec("run1", JobKind.CALLABLE, "examples.noop:noop", 4, hosts="h2", timeout=9.0, share=2.0)
    f = Feeder(spool, spec, FeedConfig(depth=2, max_depth=2), clock=Clock())
    f.recover()
    beat(spool, "h-cpu0", 1)
    write_status(spool, "h2-cpu0", {"agent": "h2-cpu0", "seq": 1, "state": "idle", "pid": 1, "host": "h2"})
    f.step()
    assert queued(spool, "h-cpu0") == [] and queued(spool, "h2-cpu0") == [(0, 1), (1, 1)]
    job = f._job(2)
    assert (job.timeout, job.workdir, job.share, job.gpus, job.env) == (9.0, None, 2.0, None, None)
