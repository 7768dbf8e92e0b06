"""The agent's policies, one step at a time, without an agent: restart deferral, drain state,
GPU faults and self-drain, and the disk-full pause (``agent.restart``, ``agent.drain``,
``agent.gpufaults``, ``agent.diskpause``). Time is a fake clock; no process is started."""
from __future__ import annotations

import errno
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from gpupool.agent.beat import Notes
from gpupool.agent.diskpause import UNCOMMITTED_KEPT, DiskPause
from gpupool.agent.drain import Drain
from gpupool.agent.gpufaults import GpuFaults
from gpupool.agent.lifetime import Lifetime, parse_end, slurm_end
from gpupool.agent.restart import RESTART_DEFER_S, RestartDeferral
from gpupool.jobs.descriptor import Job, JobKind
from gpupool.jobs.heartbeat import AgentState, write_status
from gpupool.jobs.mailbox import Mailbox
from gpupool.jobs.outcomes import Failure
from gpupool.jobs.paths import Spool
from gpupool.jobs.results import ResultTooLarge
from tests.test_feeder_step import Clock

AGENT = "h-gpu0"
UNDRAIN = f"python -m master undrain --base BASE {AGENT}"


def job(chunk: int, run: str = "r", **kw: Any) -> Job:
    return Job(run=run, chunk_id=chunk, total_chunks=8, kind=JobKind.CALLABLE, target="examples.noop:square", **kw)


# restart deferral ------------------------------------------------------------------------------
def _restarted(spool: Spool, clock: Clock, *jobs: Job, **former: Any) -> RestartDeferral:
    mailbox = Mailbox(spool, AGENT, clock)
    mailbox.ensure()
    mailbox.update(lambda js: js + list(jobs))
    if former:
        write_status(spool, AGENT, {"agent": AGENT, "seq": 7, "pid": 999_999_999, "host": "h", **former})
    return RestartDeferral(spool, AGENT, mailbox, clock)


def test_a_former_process_that_died_running_a_job_leaves_it_held_for_a_while(spool: Spool) -> None:
    clock = Clock()
    part = _restarted(spool, clock, job(0), job(1), job(2), state="busy",
                      current={"run": "r", "chunk_id": 1, "attempt": 1, "since": 1.0})
    assert part.judge_former()
    assert part.heartbeat_fields() == {"died_under": [{"run": "r", "chunk_id": 1, "attempt": 1}]}
    assert part.held() == {job(1).uid} and part.holds(job(1)) and not part.holds(job(0))
    clock.t += RESTART_DEFER_S - 1
    assert part.held() == {job(1).uid}
    clock.t += 2
    assert part.held() == set()  # no master came: it may run, and still runs alone
    assert part.holds(job(1))


def test_a_former_process_that_named_no_job_leaves_the_mailbox_first_open_jobs_held(spool: Spool) -> None:
    part = _restarted(spool, Clock(), job(0), job(1), job(2), state="idle")
    assert part.judge_former()
    assert [d["chunk_id"] for d in part.died_under] == [0, 1]  # pipelining: the first two


@pytest.mark.parametrize("state", ["stopping", "stopped"])
def test_a_former_process_that_stopped_or_none_at_all_holds_nothing(spool: Spool, state: str) -> None:
    assert not _restarted(spool, Clock(), job(0)).judge_former()  # no heartbeat: a first start
    part = _restarted(spool, Clock(), job(0), state=state)
    assert not part.judge_former()
    assert part.held() == set() and part.heartbeat_fields() == {"died_under": []}


# drain state -----------------------------------------------------------------------------------
def test_the_drain_flag_moves_the_state_once_each_way(spool: Spool) -> None:
    drain = Drain(spool, AGENT)
    assert drain.follow(AgentState.IDLE) is None
    spool.drain_flag(AGENT).write_text("{}")
    assert drain.follow(AgentState.IDLE) is AgentState.DRAINING
    assert drain.follow(AgentState.DRAINING) is None
    assert drain.reported(AgentState.BUSY) is AgentState.DRAINING  # at once, while its job runs
    assert drain.reported(AgentState.STOPPING) is AgentState.STOPPING
    spool.drain_flag(AGENT).unlink()
    assert drain.follow(AgentState.DRAINING) is AgentState.IDLE
    assert drain.reported(AgentState.BUSY) is AgentState.BUSY


def test_raising_the_flag_says_why_or_fails_where_it_cannot_be_written(spool: Spool,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    drain = Drain(spool, AGENT)
    assert drain.raise_flag("drained itself: test") and drain.flagged()
    note = json.loads(spool.drain_flag(AGENT).read_text())
    assert note["why"] == "drained itself: test" and note["agent"] == AGENT
    spool.drain_flag(AGENT).unlink()

    def full(*args: Any, **kw: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(spool, "write_over", full)
    assert not drain.raise_flag("drained itself: test") and not drain.flagged()


# GPU faults and self-drain ---------------------------------------------------------------------
def err(kind: str | None, message: str = "CUDA error: no CUDA-capable device is detected",
        type_: str = "RuntimeError") -> Failure:
    return Failure.from_dict({"type": type_, "message": message, "traceback": "", **({"gpu_error": kind} if kind else {})})


def faults(on_gpu: bool = True, limit: int = 3) -> GpuFaults:
    return GpuFaults(AGENT, on_gpu, limit, UNDRAIN, Notes())


def test_only_faults_that_are_not_the_jobs_own_count_and_only_on_a_gpu_agent() -> None:
    part = faults()
    assert part.classify(err("driver"), first=False) == "RuntimeError: CUDA error: no CUDA-capable device is detected"
    assert part.classify(err("out_of_memory", "CUDA out of memory"), first=True) is not None
    assert part.classify(err("out_of_memory", "CUDA out of memory"), first=False) is None  # an earlier job's doing
    assert part.classify(err("context"), first=True) is not None and part.classify(err("context"), False) is None
    assert part.classify(err("kernel", "device-side assert triggered"), first=True) is None  # the job's bug
    assert part.classify(err(None, "ValueError"), first=True) is None
    assert faults(on_gpu=False).classify(err("driver"), first=True) is None


def test_three_different_chunks_in_a_row_drain_and_the_reason_names_them() -> None:
    part = faults()
    assert part.after_job(job(0), err("driver"), False) is None
    assert part.after_job(job(0), err("driver"), False) is None  # the same chunk again counts once
    assert part.after_job(job(1), err(None, "killed", "WorkerDied"), False) is None  # a death leaves the count
    assert part.after_job(job(1), err(None, "too slow", "Timeout"), False) is None
    assert part.after_job(job(1), err("driver"), False) is None
    why = part.after_job(job(2), err("driver"), False)
    assert why is not None and why.startswith("drained itself: 3 different chunks in a row failed")
    assert "r chunk 0, r chunk 1, r chunk 2" in why and "no CUDA-capable device" in why and why.endswith(UNDRAIN)


def test_a_success_or_the_jobs_own_error_ends_the_count_and_a_limit_of_0_never_drains() -> None:
    part = faults()
    part.after_job(job(0), err("driver"), False)
    part.after_job(job(1), err("driver"), False)
    assert part.after_job(job(2), None, False) is None  # ok: counted afresh
    part.after_job(job(3), err("driver"), False)
    part.after_job(job(4), err("driver"), False)
    assert part.after_job(job(5), err(None, "bad input", "ValueError"), False) is None
    assert part.after_job(job(6), err("driver"), False) is None
    never = faults(limit=0)
    assert all(never.after_job(job(c), err("driver"), False) is None for c in range(10))


def test_a_lost_gpu_drains_once_and_an_undrain_clears_only_its_own_note() -> None:
    part = faults()
    assert part.lost() is None
    part.gpu_lost("NVMLError_GpuIsLost: GPU is lost")
    part.gpu_lost("NVMLError_Unknown: later")  # the first is kept
    why = part.lost()
    assert why == f"drained itself: its GPU does not answer (NVMLError_GpuIsLost: GPU is lost). Check it " \
                  f"(nvidia-smi), then: {UNDRAIN}"
    part.drained(why)
    assert part.notes.last_error is not None and part.notes.last_error.endswith(why)  # stamped with the time
    assert part.lost() is None  # drained already
    part.lifted()
    assert part.notes.last_error is None and part.lost() is None and part.gpu_error is None
    part.drained("drained itself: again")
    part.notes.error("cannot write the result of r chunk 3: disk full")  # a later error stays said
    part.lifted()
    assert part.notes.last_error is not None and "disk full" in part.notes.last_error


# the disk-full pause ---------------------------------------------------------------------------
class Disk:
    """A fake ``jobs.results.commit``: raises the errors it is given, in order, then commits."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls: list[dict[str, Any]] = []

    def __call__(self, spool: Spool, job: Job, rec: dict[str, Any], arrays: Path | None = None) -> bool:
        self.calls.append(rec)
        if self.errors:
            raise self.errors.pop(0)
        return True


class Sleeper:
    """The fake time the wait for space runs by: each sleep moves it on."""

    def __init__(self) -> None:
        self.t, self.slept = 0.0, 0.0
        self.notes: Notes | None = None
        self.waiting: list[str | None] = []  # what the heartbeat said the agent waited for, at each sleep

    def now(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s
        self.slept += s
        if self.notes is not None:
            self.waiting.append(self.notes.waiting)


def pause(spool: Spool, monkeypatch: pytest.MonkeyPatch, disk: Disk, clock: Clock | None = None,
          **kw: Any) -> tuple[DiskPause, Sleeper, list[int]]:
    monkeypatch.setattr("gpupool.agent.diskpause.commit", disk)
    time, told = Sleeper(), []
    part = DiskPause(spool, AGENT, Notes(), clock=clock or Clock(), now=time.now, sleep=time.sleep,
                     **{"stopping": lambda: False, "cancelled": lambda run: None, "stale": lambda j: False,
                        "tell": lambda: told.append(1), **kw})
    time.notes = part.notes
    return part, time, told


def full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_keeps_the_outcome_and_writes_it_once_space_returns(spool: Spool,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    disk = Disk(full(), full(), full())
    part, time, _ = pause(spool, monkeypatch, disk)
    rec = {"status": "ok", "value": 1}
    assert part.commit(job(0), rec, None) == (rec, True)
    assert len(disk.calls) == 4 and time.slept == pytest.approx(0.5 + 1.0 + 2.0)  # 0.5 s, doubling
    assert time.waiting and all(w is not None and "its outcome is kept, written again in" in w for w in time.waiting)
    assert part.notes.waiting is None and "No space left" in (part.notes.last_error or "")
    assert part.heartbeat_fields() == {"uncommitted": None}


@pytest.mark.parametrize("gone", ["stopping", "cancelled", "stale"])
def test_waiting_for_space_ends_without_an_outcome_when_it_is_not_wanted_any_more(
        spool: Spool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, gone: str) -> None:
    arrays = tmp_path / "x.npz"
    arrays.write_bytes(b"arrays")
    calls = []

    def now_true(*args: Any) -> Any:
        calls.append(args)
        return {} if gone == "cancelled" else True
    part, _, _ = pause(spool, monkeypatch, Disk(full()), **{gone: now_true})
    assert part.commit(job(0), {"status": "ok"}, arrays) is None
    assert calls and not arrays.exists()  # nothing kept: the job stays queued, or its run is over


def test_an_outcome_no_write_can_record_fails_its_attempt_and_the_heartbeat_names_it(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    denied = OSError(errno.EACCES, "Permission denied")
    denied.filename = "/results/r/0.json"
    part, _, told = pause(spool, monkeypatch, Disk(denied))
    done = part.commit(job(0, epoch="e1"), {"status": "ok", "value": 1, "arrays_bytes": 3}, None)
    assert done is not None
    rec, committed = done
    assert not committed and rec["status"] == "failed" and "value" not in rec and rec["arrays"] is None
    assert rec["error"]["type"] == "CommitFailed"
    assert "(/results/r/0.json): Permission denied" in rec["error"]["message"]
    (u,) = part.heartbeat_fields()["uncommitted"]
    assert (u["run"], u["chunk_id"], u["attempt"], u["epoch"]) == ("r", 0, 1, "e1") and u["error"] == rec["error"]
    assert told == [1] and "r chunk 0: agent h-gpu0 cannot write the result" in (part.notes.last_error or "")


def test_the_uncommitted_list_keeps_the_latest_and_a_stale_run_drops_its_outcome(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    n = UNCOMMITTED_KEPT + 5
    part, _, _ = pause(spool, monkeypatch, Disk(*(OSError(errno.EROFS, "Read-only file system") for _ in range(n))))
    for c in range(n):
        part.commit(job(c), {"status": "ok"}, None)
    assert [u["chunk_id"] for u in part.uncommitted] == list(range(5, n))
    stale, _, _ = pause(spool, monkeypatch, Disk(OSError(errno.EROFS, "Read-only file system")), stale=lambda j: True)
    assert stale.commit(job(0), {"status": "ok"}, None) is None and stale.uncommitted == []


def test_a_record_no_reader_would_take_fails_the_attempt(spool: Spool, monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    arrays = tmp_path / "x.npz"
    arrays.write_bytes(b"arrays")
    too_large = ResultTooLarge(99 * 2**20)
    disk = Disk(too_large)
    part, _, _ = pause(spool, monkeypatch, disk)
    done = part.commit(job(0), {"status": "ok", "value": "x" * 10, "arrays": "a"}, arrays)
    assert done is not None
    rec, committed = done
    assert committed and rec["status"] == "failed" and rec["arrays"] is None and "value" not in rec
    assert rec["error"] == {"type": "ResultTooLarge", "message": str(too_large), "traceback": ""}
    assert disk.calls[-1] is rec and not arrays.exists()


def test_a_failed_save_pauses_new_jobs_doubling_until_an_outcome_is_written(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    part, _, _ = pause(spool, monkeypatch, Disk(), clock=clock)
    assert not part.paused()
    for backoff in (0.5, 1.0, 2.0):
        assert part.pause_for_io(job(0), "OSError: No space left on device") is False
        assert part.paused()
        clock.t += backoff - 0.01
        assert part.paused()
        clock.t += 0.02
        assert not part.paused()
    assert "cannot write the result of r chunk 0: OSError: No space left" in (part.notes.last_error or "")
    part.commit(job(1), {"status": "ok"}, None)
    part.pause_for_io(job(0), "OSError: No space left on device")
    clock.t += 0.51
    assert not part.paused()  # back to 0.5 s


# its own end: --idle-exit, --end-at / --time-left (agent.lifetime) ------------------------------------
def test_an_agent_with_an_idle_exit_stops_only_after_that_long_without_a_job() -> None:
    clock = Clock()
    life = Lifetime(AGENT, clock, idle_exit=30.0)
    clock.t += 29.9
    assert life.idle_over() is None
    life.active()  # a job: the idle time counts again from here
    clock.t += 29.9
    assert life.idle_over() is None and life.ending() is None
    clock.t += 0.1
    assert life.idle_over() == "no job for 30 seconds (--idle-exit)"
    assert Lifetime(AGENT, clock).idle_over() is None  # none given: never


def test_an_agent_with_an_end_starts_only_chunks_that_fit_and_stops_a_margin_before_it() -> None:
    clock = Clock()
    life = Lifetime(AGENT, clock, end_at=1000.0 + 600, margin=60.0, why_end="Slurm job 7's time limit",
                    wall=lambda: 1000.0)  # the end 600 s from now, whatever the loop's clock reads
    assert life.refuses(job(0), None) is None  # a run's first chunk here: its length is unknown
    assert life.refuses(job(1), 540.0) is None  # 540 s + the margin end just in time
    assert life.refuses(job(1), 541.0) == ("600 s left before Slurm job 7's time limit, and r's chunks take about "
                                           "541 s here (plus 60 s to stop)")
    clock.t += 539.0
    assert life.ending() is None and life.refuses(job(2), 1.0) is None
    assert life.refuses(job(2), 2.0) is not None
    clock.t += 1.0  # 60 s left: the margin
    assert life.ending() == "60 s left before Slurm job 7's time limit"
    clock.t += 0.5
    assert life.refuses(job(3), None) is not None  # within the margin: not even a chunk of unknown length


def test_an_end_is_read_as_epoch_seconds_an_iso_time_or_a_time_of_today() -> None:
    assert parse_end("1765000000") == 1765000000.0
    assert parse_end("2026-12-07T18:00:00") == datetime(2026, 12, 7, 18, 0).timestamp()
    noon = datetime(2026, 12, 7, 12, 0).timestamp()
    assert parse_end("18:30", now=noon) == datetime(2026, 12, 7, 18, 30).timestamp()
    with pytest.raises(ValueError, match="--end-at 'soon': expected seconds since the epoch"):
        parse_end("soon")
    assert slurm_end({}) is None  # outside a Slurm job
