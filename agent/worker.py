"""The worker: a long-lived child of the agent that imports task code and runs callable jobs.

It is started with CUDA_VISIBLE_DEVICES already narrowed to the agent's GPU, so CUDA
state created by a task lives here for the agent's whole life. Protocol, one JSON line
each way on two inherited pipes:
  request ``{"job": {...}, "gpu_id": N, "device": "cuda:0", "arrays_path": "<final .npz>"}``
  reply   ``{"ok": true, "value": ..., "arrays_tmp": "<temp .npz>"|null}`` or
          ``{"ok": false, "error": {"type", "message", "traceback"[, "errno"]}}``
          (``errno`` where the exception is an OSError, so that the agent can tell a full
          disk from the job's own failure)

A job may fork: a forked child that returns from the job function (instead of ``os._exit``)
leaves quietly here, never answering a request or reading the next one.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def _die_with_parent(parent: int) -> None:
    """PR_SET_PDEATHSIG: the kernel kills us if the agent dies, whatever kills it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the agent died before prctl took effect
        os._exit(1)


TEXT_LIMIT = 64 * 1024  # an error's message and traceback are cut past this many characters
VALUE_ROOM = 64 * 1024  # what a result record needs beside the value (agent, times, names)


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars made plain; raises TypeError if it is not JSON, and
    ResultTooLarge if it is too big for a result record (it then never crosses the pipe)."""
    import numpy as np

    from jobs.results import RESULT_LIMIT, ResultTooLarge

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        raise TypeError(f"{type(o).__name__} is not JSON serialisable")

    text = json.dumps(value, default=default)
    if len(text) > RESULT_LIMIT - VALUE_ROOM:
        raise ResultTooLarge(len(text), "the value the task returned")
    return json.loads(text)


def run_one(req: dict[str, Any], tasks: Any, shared: Any) -> dict[str, Any]:
    from agent.task import build_kwargs
    from jobs.atomic import writing
    from jobs.descriptor import Job
    from jobs.npzio import check_arrays, load_npz, save_npz

    job = Job.from_dict(req["job"])
    fn = tasks.get(job.target, job.workdir)
    builtins = {
        "chunk_id": lambda: job.chunk_id,
        "total_chunks": lambda: job.total_chunks,
        "gpu_id": lambda: req["gpu_id"],
        "device": lambda: req["device"],
        "shared": lambda: shared.get(job.shared) if job.shared else None,
        "data": lambda: load_npz(job.data) if job.data else None,
    }
    value = fn(**build_kwargs(fn, job, builtins))
    arrays = check_arrays(value)
    if arrays is not None:
        with writing(Path(req["arrays_path"]), fsync=False) as (f, tmp):  # see results.sync_run
            save_npz(f, arrays)
        return {"ok": True, "value": None, "arrays_tmp": str(tmp)}
    from jobs.results import ResultTooLarge
    try:
        return {"ok": True, "value": jsonable(value), "arrays_tmp": None}
    except ResultTooLarge:
        raise
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"the task returned a {type(value).__name__}, which is neither a dict of numpy arrays "
            f"nor JSON-serialisable ({e})"
        ) from None


def cut(text: str, limit: int = TEXT_LIMIT) -> str:
    """``text``, or its head and tail with a note between them when it is over ``limit``."""
    if len(text) <= limit:
        return text
    tail = limit // 4
    return f"{text[:limit - tail]} ... [cut: {len(text)} characters in all] ... {text[-tail:]}"


def error_of(exc: BaseException) -> dict[str, Any]:
    """The failed reply's error; a job's huge exception message is cut (results have a size limit)."""
    err: dict[str, Any] = {"type": type(exc).__name__, "message": cut(str(exc)), "traceback": cut(traceback.format_exc())}
    code = _errno_of(exc)
    if code is not None:
        err["errno"] = code
    return err


def _errno_of(exc: BaseException) -> int | None:
    """The errno of ``exc`` or of the OSError it was raised from or while handling (a library's
    own exception around a failed write), nearest first."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and isinstance(e.errno, int):
            return e.errno
        e = e.__cause__ or e.__context__
    return None


_worker_pid: int | None = None  # set by main(): a forked child has another pid


def handle(request: dict[str, Any], tasks: Any, shared: Any) -> dict[str, Any]:
    """One request to one reply; a job's exception becomes a failed reply, never our death."""
    started = time.time()
    try:
        reply = run_one(request, tasks, shared)
    except BaseException as e:  # SystemExit and KeyboardInterrupt from task code too
        if _worker_pid is not None and os.getpid() != _worker_pid:
            raise  # a child the job forked: it exits as Python makes it (sys.exit(3) gives 3)
        reply = {"ok": False, "error": error_of(e)}
    reply.update(started_at=started, finished_at=time.time())
    return reply


def main() -> None:
    rfd, wfd, parent = (int(x) for x in sys.argv[1:4])
    _die_with_parent(parent)
    # The agent decides when we stop: Ctrl-C goes to the whole foreground group, and Slurm
    # sends SIGTERM to every process of a job step before its time limit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from agent.task import SharedCache, TaskCache

    tasks, shared = TaskCache(), SharedCache()
    for fd in (rfd, wfd):  # programs the job runs do not hold our pipes (a fork still does)
        os.set_inheritable(fd, False)
    global _worker_pid
    me = _worker_pid = os.getpid()
    rd, wr = os.fdopen(rfd, "rb"), os.fdopen(wfd, "wb", buffering=0)
    for line in rd:
        reply = handle(json.loads(line), tasks, shared)
        sys.stdout.flush()
        sys.stderr.flush()
        if os.getpid() != me:  # a child the job forked returned into our loop: it is not the worker
            os._exit(0)
        wr.write(json.dumps(reply).encode() + b"\n")


if __name__ == "__main__":
    main()
