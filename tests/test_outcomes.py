"""The failure record (``jobs.outcomes``): written and read in one place, its names on disk unchanged."""
from __future__ import annotations

import json

import pytest

from gpupool.jobs.descriptor import Job, JobKind, JobState
from gpupool.jobs.losses import record_loss
from gpupool.jobs.outcomes import Failure, FailureKind, GpuFault, failure_of
from gpupool.jobs.paths import Spool
from gpupool.jobs.results import commit, read_result, record, supersede


def job(chunk: int = 0, attempt: int = 1, max_attempts: int = 2) -> Job:
    return Job(run="r1", chunk_id=chunk, total_chunks=4, kind=JobKind.CALLABLE, target="m:f", attempt=attempt,
               max_attempts=max_attempts)


def test_a_failure_round_trips_with_every_field() -> None:
    f = Failure("OSError", "disk", "Traceback ...", log="/l", errno=28, module="builtins", qualname="OSError",
                args=[28, "disk"], attrs={"x": 1}, gpu_error="driver", poisoned="why", setup="m:s")
    d = f.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert Failure.from_dict(d) == f
    assert f.kind is FailureKind.GPU_FAULT and f.gpu_fault is GpuFault.DRIVER


def test_optional_fields_are_written_only_when_set() -> None:
    assert Failure(FailureKind.TIMEOUT, "late").to_dict() == {"type": "Timeout", "message": "late", "traceback": ""}


def test_a_type_this_version_does_not_know_keeps_its_name() -> None:
    f = Failure.from_dict({"type": "FutureKindOfFailure", "message": "m", "traceback": "", "gpu_error": "quantum",
                           "unknown_field": 1})
    assert f.type == "FutureKindOfFailure" and f.kind is FailureKind.TASK_ERROR
    assert f.gpu_error == "quantum" and f.gpu_fault is None  # kept as written, read as no fault it knows
    assert f.to_dict()["type"] == "FutureKindOfFailure"


@pytest.mark.parametrize("kind", [k for k in FailureKind if k not in (FailureKind.TASK_ERROR, FailureKind.GPU_FAULT)])
def test_each_pool_kind_is_its_type_on_disk(kind: FailureKind) -> None:
    f = Failure(kind, "m")
    assert f.type == kind.value and type(f.type) is str and f.kind is kind
    assert Failure.from_dict(json.loads(json.dumps(f.to_dict()))).kind is kind


def test_the_kind_of_a_task_error_and_of_a_gpu_fault() -> None:
    assert Failure("ValueError", "bad").kind is FailureKind.TASK_ERROR
    assert Failure("RuntimeError", "CUDA error", gpu_error="kernel").kind is FailureKind.TASK_ERROR  # the job's own
    assert Failure("OutOfMemoryError", "oom", gpu_error="out_of_memory").kind is FailureKind.GPU_FAULT
    assert FailureKind.GPU_FAULT.of_the_pool and FailureKind.AGENT_LOST.of_the_pool
    assert not FailureKind.TASK_ERROR.of_the_pool and not FailureKind.RESULT_TOO_LARGE.of_the_pool


def test_of_an_exception_keeps_its_errno_and_its_line_is_one_line() -> None:
    f = Failure.of(OSError(28, "No space left on device"), "cannot start the script")
    assert (f.type, f.message, f.errno, f.traceback) == ("OSError", "cannot start the script", 28, "")
    assert Failure("E", "line one\r\nline two").line == "E: line one"


def test_records_the_masters_write_are_as_before(spool: Spool) -> None:
    """The records a master writes for an attempt it took back: the same JSON as before Failure."""
    spool.run_dirs("r1")
    j = job(attempt=2, max_attempts=2)
    supersede(spool, j, "taken back")
    rec = read_result(spool.history_json("r1", 0, 2))
    assert rec["error"] == {"type": "Superseded", "message": "taken back", "traceback": ""}
    assert failure_of(rec).kind is FailureKind.SUPERSEDED
    lost = job(chunk=1)
    assert record_loss(spool, lost, "h-cpu0", "no heartbeat", 1)
    rec = read_result(spool.history_json("r1", 1, 1))
    assert rec["error"]["type"] == "AgentLost" and set(rec["error"]) == {"type", "message", "traceback"}
    assert failure_of(rec).kind is FailureKind.AGENT_LOST


def test_a_failed_record_is_written_from_a_failure(spool: Spool) -> None:
    spool.run_dirs("r1")
    j = job(attempt=2, max_attempts=2)
    assert commit(spool, j, record(j, JobState.FAILED, error=Failure("KeyError", "'x'", "tb", errno=None)))
    rec = read_result(spool.result_json("r1", 0))
    assert rec["error"] == {"type": "KeyError", "message": "'x'", "traceback": "tb"}
    assert failure_of(rec) == Failure("KeyError", "'x'", "tb")
    assert failure_of(read_result(spool.history_json("r1", 0, 2))) == Failure("KeyError", "'x'", "tb")


def _written(spool: Spool, chunk: int, error: object) -> dict:
    path = spool.result_json("r1", chunk)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run": "r1", "chunk_id": chunk, "total_chunks": 4, "status": "failed",
                                "attempt": 1, "max_attempts": 1, "error": error}))
    return read_result(path)


def test_a_bad_error_record_on_disk_is_named_in_one_message(spool: Spool, monkeypatch) -> None:
    said: list[str] = []
    monkeypatch.setattr("gpupool.jobs.results.warn_once", said.append)
    rec = _written(spool, 0, {"type": 5, "message": "m", "traceback": 12, "errno": "e", "attrs": [1]})
    assert len(said) == 1 and "000000.json" in said[0], said
    assert said[0].endswith("result fields of the wrong type ignored: error.type, error.traceback, error.errno, "
                            "error.attrs"), said
    assert failure_of(rec) == Failure("(unknown type)", "m")  # what is left of it, typed
    said.clear()
    rec = _written(spool, 1, "just text")
    assert len(said) == 1 and said[0].endswith("ignored: error"), said
    assert failure_of(rec) is None
    said.clear()
    rec = _written(spool, 2, {"type": "ValueError", "message": "fine", "traceback": ""})
    assert said == [] and failure_of(rec).kind is FailureKind.TASK_ERROR


def test_gpu_fault_names() -> None:
    assert GpuFault.named("driver") is GpuFault.DRIVER and GpuFault.named("nonsense") is None
    assert GpuFault.named(None) is None and GpuFault.named(3) is None
    assert GpuFault.DRIVER.of_the_gpu and GpuFault.OUT_OF_MEMORY.of_the_gpu
    assert not GpuFault.KERNEL.of_the_gpu and not GpuFault.CONTEXT.of_the_gpu
