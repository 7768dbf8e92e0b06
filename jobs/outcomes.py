"""What a failed attempt says: the ``error`` of a result record, made and read here only.

On disk (``results/<run>/<chunk>.json``, its history ``.a<N>.json``), on the worker's pipe and in
an agent's heartbeat (``uncommitted``) an error is a JSON object::

    {"type": "<name>", "message": "...", "traceback": "..."[, "log", "errno", "module", "qualname",
     "args", "attrs", "gpu_error", "poisoned", "setup"]}

``type`` is the name of the task's own exception (``ValueError``), or one of the pool's names
(``FailureKind``: ``Timeout``, ``WorkerDied``, ``AgentLost``, ...); the optional fields are written
only when set. ``Failure`` is that object typed: ``to_dict`` writes it, ``from_dict`` reads it
(from any source: a field of the wrong type is left out, never raised on), and ``FIELDS`` checks
it field by field where a result file is read (``jobs.results.read_result``). ``Failure.kind``
says what failed, derived from ``type`` (and ``gpu_error``): the names on disk stay as they are.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping

from gpupool.jobs.jsonio import is_int, is_str


class FailureKind(str, Enum):
    """What failed. Each of the pool's kinds is written as its own ``type`` (the value); a task's
    own exception (TASK_ERROR) or a GPU's fault (GPU_FAULT) keeps the exception's name as ``type``."""

    TASK_ERROR = "task error"  # the task's own exception (its type: the exception's name)
    GPU_FAULT = "GPU fault"  # an exception of the GPU's, not of the code (``GpuFault.of_the_gpu``)
    TIMEOUT = "Timeout"  # past the run's --timeout, killed
    WORKER_DIED = "WorkerDied"  # the worker process died under the job
    WORKER_RESTARTS = "WorkerRestarts"  # fresh workers kept asking for another before running it
    AGENT_LOST = "AgentLost"  # its agent died while running it (written by a master: jobs.losses)
    SUPERSEDED = "Superseded"  # taken back by a master, another attempt runs instead (jobs.results.supersede)
    STOPPED = "Stopped"  # the agent was told to stop at once
    WRONG_AGENT = "WrongAgent"  # queued at an agent that does not hold the GPUs it needs
    COMMIT_FAILED = "CommitFailed"  # its result could not be written (permission denied, read-only)
    BAD_RESULT_PATH = "BadResultPath"  # something that is no result file where its result belongs
    RESULT_TOO_LARGE = "ResultTooLarge"  # its result is over the size limit (jobs.results)
    RESULT_TOO_DEEP = "ResultTooDeep"  # its result is nested too deep (jobs.results)
    BAD_TEMPLATE = "BadTemplate"  # a command's placeholders cannot be filled
    SCRIPT_FAILED = "ScriptFailed"  # a script exited with an error
    COMMAND_FAILED = "CommandFailed"  # a command exited with a code not among --success-codes
    OUTPUT_CHECK = "OutputCheck"  # a command's output matched --fail-on-output
    RESULT_FILE_MISSING = "ResultFileMissing"  # a command wrote no --result-file
    BAD_RESULT_FILE = "BadResultFile"  # a command's --result-file cannot be read

    @property
    def of_the_pool(self) -> bool:
        """A failure of the pool or the machine, not of the code: the same code may pass elsewhere
        or later (it never counts towards failing a run fast)."""
        return self in _OF_THE_POOL


_OF_THE_POOL = frozenset({FailureKind.GPU_FAULT, FailureKind.TIMEOUT, FailureKind.WORKER_DIED,
                          FailureKind.WORKER_RESTARTS, FailureKind.AGENT_LOST, FailureKind.SUPERSEDED,
                          FailureKind.STOPPED, FailureKind.WRONG_AGENT, FailureKind.COMMIT_FAILED,
                          FailureKind.BAD_RESULT_PATH})
_BY_TYPE = {k.value: k for k in FailureKind if k not in (FailureKind.TASK_ERROR, FailureKind.GPU_FAULT)}


class GpuFault(str, Enum):
    """The kind of GPU failure behind a job's exception (``gpu_error``), as the worker judges it
    (``agent.worker_process.gpu_fault``, ``after_failure``)."""

    OUT_OF_MEMORY = "out_of_memory"  # not poisoned: the memory is freed before the next job
    DRIVER = "driver"  # the GPU or its driver is unusable, whatever the job does
    KERNEL = "kernel"  # a kernel of the job failed: the job's own, yet its context is left unusable
    CONTEXT = "context"  # no CUDA error, yet the context is found unusable after the job

    @property
    def of_the_gpu(self) -> bool:
        """A fault a broken GPU (or memory another process holds) gives every job alike, not the code's."""
        return self in (GpuFault.DRIVER, GpuFault.OUT_OF_MEMORY)

    @classmethod
    def named(cls, value: object) -> "GpuFault | None":
        """The fault ``value`` names, or None (none, or a name this version does not know)."""
        try:
            return cls(value) if isinstance(value, str) else None
        except ValueError:
            return None


def _is_dict(v: object) -> bool:
    return isinstance(v, dict)


# each field's check, for a record read from the spool (``jobs.jsonio.clean``) and for ``from_dict``
FIELDS: dict[str, Any] = {
    "type": is_str, "message": is_str, "traceback": is_str, "log": is_str, "errno": is_int, "module": is_str,
    "qualname": is_str, "attrs": _is_dict, "gpu_error": is_str, "poisoned": is_str, "setup": is_str,
}
_OPTIONAL = ("log", "errno", "module", "qualname", "args", "attrs", "gpu_error", "poisoned", "setup")


@dataclass(frozen=True)
class Failure:
    """A failed attempt's error (see the module). ``type``: a ``FailureKind`` of the pool's, or the
    name of the task's exception. ``args``/``attrs``: the exception's state, encoded (``jobs.codec``),
    so that an Executor's caller gets the same exception (``master.remote``)."""

    type: str
    message: str = ""
    traceback: str = ""
    log: str | None = None  # the chunk's log, where ``traceback`` is the end of what it printed
    errno: int | None = None  # of an OSError (a full disk is told apart from the job's own failure)
    module: str | None = None  # where the exception's class is, to raise it again (an Executor)
    qualname: str | None = None
    args: Any = None
    attrs: dict[str, Any] | None = None
    gpu_error: str | None = None  # a GpuFault's name (kept as written: see ``gpu_fault``)
    poisoned: str | None = None  # why the worker's CUDA context is unusable (it exits after the job)
    setup: str | None = None  # the run's --setup that raised

    def __post_init__(self) -> None:
        if isinstance(self.type, Enum):  # Failure(FailureKind.TIMEOUT, ...): its name on disk
            object.__setattr__(self, "type", self.type.value)

    @classmethod
    def of(cls, exc: BaseException, message: str | None = None, **fields: Any) -> "Failure":
        """``exc`` as an error of its own type (its message, or ``message``), with no traceback:
        a failure found outside the task (an OSError, a record no reader would take)."""
        errno = getattr(exc, "errno", None)
        if is_int(errno):
            fields.setdefault("errno", errno)
        return cls(type(exc).__name__, str(exc) if message is None else message, **fields)

    @property
    def kind(self) -> FailureKind:
        """What failed: a pool's kind by ``type``, else a GPU's fault or the task's own error."""
        kind = _BY_TYPE.get(self.type)
        if kind is not None:
            return kind
        fault = self.gpu_fault
        return FailureKind.GPU_FAULT if fault is not None and fault.of_the_gpu else FailureKind.TASK_ERROR

    @property
    def gpu_fault(self) -> GpuFault | None:
        return GpuFault.named(self.gpu_error)

    @property
    def line(self) -> str:
        """``Type: message``, its first line only, at most 300 characters (a "\\r" in it is kept,
        and shown escaped: ``jobs.names.printable``)."""
        return f"{self.type}: {self.message}".split("\n", 1)[0].rstrip("\r")[:300]

    def to_dict(self) -> dict[str, Any]:
        """The record as written (the optional fields only where set)."""
        d: dict[str, Any] = {"type": self.type, "message": self.message, "traceback": self.traceback}
        for name in _OPTIONAL:
            value = getattr(self, name)
            if value is not None:
                d[name] = value
        return d

    def shown(self, message_limit: int, traceback_limit: int) -> dict[str, str]:
        """Its type, the head of its message and the end of its traceback, for a page to show."""
        return {"type": self.type, "message": self.message[:message_limit],
                "traceback": self.traceback[-traceback_limit:]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Failure":
        """Read a record from anywhere (a result file, a worker's reply, a heartbeat): a field of the
        wrong type (``FIELDS``), or unknown, is left out; a missing ``type`` reads ``(unknown type)``."""
        given = {name: d.get(name) for name in ("type", "message", "traceback", *_OPTIONAL)}
        ok = {k: v for k, v in given.items() if v is not None and FIELDS.get(k, lambda _: True)(v)}
        return cls(ok.pop("type", "(unknown type)"), **ok)

    def replace(self, **changes: Any) -> "Failure":
        """This failure with ``changes`` (a message said otherwise, a field added)."""
        return dataclasses.replace(self, **changes)


def failure_of(rec: Mapping[str, Any]) -> Failure | None:
    """The ``error`` of a result record (``jobs.results.read_result``) as a Failure; None where it
    has none (an ok one), or none that is an object (refused when it was read)."""
    err = rec.get("error")
    return Failure.from_dict(err) if isinstance(err, Mapping) else None
