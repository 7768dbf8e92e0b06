"""``concurrent.futures`` on the pool: ``Executor(base).submit(fn, *args, **kwargs)`` runs
``fn`` on a pool agent and returns a ``Future``.

    from concurrent.futures import as_completed
    from master.executor import Executor

    with Executor("/tmp/b") as ex:                       # agents must be running
        futures = [ex.submit(my_mod.score, x, scale=2) for x in range(100)]
        for f in as_completed(futures):
            print(f.result())
        print(list(ex.map(my_mod.score, range(10))))

Rules, because the call travels as a job descriptor through the spool:

* ``fn`` is a module-level function of an importable module (``module:function``; a function
  of the ``__main__`` script is imported from its file, like multiprocessing's spawn does);
* its arguments are bound to parameter names (``inspect.signature(fn).bind``) and travel as
  keyword arguments, so they must be JSON-serialisable (no ``*args`` beyond named
  parameters); parameters named like the agent's built-ins (``device``, ``gpu_id``, ...) are
  filled in by the agent and cannot be passed;
* the result is the JSON value the function returns, or its dict of numpy arrays; a failure
  raises ``RemoteError`` carrying the remote type, message and traceback.

Each executor is one run (``runs/executor-...``): ``status``, ``logs`` and ``cancel`` work on
it. Its calls are fed by the one dispatcher (``master.dispatcher``), as a run's chunks are:
each call is one chunk with its own target and kwargs, placed breadth first, retried, handed
back from dead agents and moved from busy agents to idle ones. A call counts as started (and
``Future.cancel()`` then fails) once an agent's heartbeat shows it running; a cancelled call
still waiting in a mailbox is taken out of it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import math
import os
import secrets
import socket
import sys
import threading
import time
from collections import deque
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from loguru import logger

from jobs.atomic import write_replace
from jobs.descriptor import BUILTIN_KWARGS, Job, JobKind
from jobs.errors import BadFile
from jobs.locks import HolderLock
from jobs.names import slug
from jobs.paths import Spool
from master.dispatcher import Dispatcher, FeedConfig
from master.runspec import RunSpec, kwargs_size_error

EXECUTOR_MARK = "_executor"  # in run.json's kwargs: this run's chunks each carry their own call


def is_executor_run(spec: RunSpec) -> bool:
    """True for a run made by an Executor (its run.json does not describe its chunks)."""
    return bool(spec.kwargs.get(EXECUTOR_MARK))


class RemoteError(Exception):
    """The call raised on the agent. ``type``, ``message``, ``remote_traceback``, ``agent``, ``chunk``."""

    def __init__(self, error: dict[str, Any] | None, agent: str | None, chunk: int, attempt: int) -> None:
        error = error or {}
        self.type, self.message = str(error.get("type")), str(error.get("message"))
        self.remote_traceback, self.agent, self.chunk = error.get("traceback") or "", agent, chunk
        super().__init__(f"{self.type}: {self.message} (on {agent}, call {chunk}, attempt {attempt})")

    def __str__(self) -> str:
        tb = f"\n\nRemote traceback:\n{self.remote_traceback.rstrip()}" if self.remote_traceback else ""
        return super().__str__() + tb


class RunCancelled(Exception):
    """The executor's run was cancelled (``python -m master cancel``) before this call finished."""


def target_of(fn: Callable[..., Any]) -> tuple[str, str]:
    """(``module:function`` or ``/file.py:function``, the folder to put on the agent's sys.path)."""
    mod_name, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not mod_name or not qual.isidentifier():
        raise TypeError(f"{fn!r} is not a module-level function; the agents import it by name "
                        "(module:function), so define it at the top level of a module")
    module = sys.modules.get(mod_name)
    if module is None or getattr(module, qual, None) is not fn:
        raise TypeError(f"{mod_name}.{qual} cannot be found again by name in its module")
    path = getattr(module, "__file__", None)
    if mod_name == "__main__":
        if not path:
            raise TypeError(f"{qual} is defined in an interactive session; put it in a .py module")
        path = str(Path(path).resolve())
        return f"{path}:{qual}", str(Path(path).parent)
    if not path or importlib.util.find_spec(mod_name) is None:
        raise TypeError(f"module {mod_name} of {qual} has no importable source file")
    root = Path(path).resolve().parent
    for _ in range(mod_name.count(".") + (Path(path).name == "__init__.py")):
        root = root.parent
    return f"{mod_name}:{qual}", str(root)


def bind(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments as JSON keyword arguments; TypeError naming what cannot travel."""
    sig = inspect.signature(fn)
    bound = sig.bind_partial(*args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{fn.__qualname__}: extra positional arguments (*{name}) cannot be sent to an agent; "
                            "pass them as named parameters")
        out.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
    missing = [n for n, p in sig.parameters.items() if p.default is p.empty and n not in out
               and n not in BUILTIN_KWARGS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing:
        raise TypeError(f"{fn.__qualname__}() missing required argument(s): {', '.join(missing)}")
    clash = sorted(set(out) & set(BUILTIN_KWARGS))
    if clash:
        raise TypeError(f"{fn.__qualname__}: {clash} are filled in by the agent ({', '.join(BUILTIN_KWARGS)}); "
                        "do not pass them")
    try:
        out = json.loads(json.dumps(out, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{fn.__qualname__}: arguments must be JSON-serialisable to reach an agent ({e})") from None
    if (too_large := kwargs_size_error(out, f"{fn.__qualname__}(...) arguments", "a file and pass its path")):
        raise ValueError(too_large)
    return out


def _caller_name() -> str:
    """The name of the script (or module) running this Executor, so that its runs say whose they
    are in ``python -m master runs`` (``executor-sweep-1201-143005-ab12``); the host if unknown."""
    main = sys.modules.get("__main__")
    spec, path = getattr(main, "__spec__", None), getattr(main, "__file__", None)
    if spec is not None and spec.name:  # python -m pkg.tool: "tool" (python -m pkg: "pkg")
        parts = [p for p in spec.name.split(".") if p != "__main__"]
        if parts:
            return slug(parts[-1], 30)
    if path:
        return slug(Path(path).stem, 30)
    return slug(socket.gethostname(), 30)


@dataclass
class _Call:
    chunk: int
    target: str
    workdir: str
    kwargs: dict[str, Any]
    future: futures.Future


class Executor(futures.Executor):
    """A ``concurrent.futures.Executor`` whose calls run on the agents of the spool at ``base``."""

    def __init__(self, base: str | os.PathLike, *, retries: int = 0, timeout: float | None = None,
                 run: str | None = None, depth: int = 4, dead_after: float = 20.0, poll: float = 0.1) -> None:
        for bad, why in ((not isinstance(retries, int) or retries < 0, f"retries must be 0 or more, not {retries!r}"),
                         (timeout is not None and not 0 < timeout < math.inf,
                          f"timeout must be None or a positive number of seconds, not {timeout!r}"),
                         (not isinstance(depth, int) or depth < 1, f"depth must be 1 or more, not {depth!r}"),
                         (not 0 < dead_after < math.inf, f"dead_after must be a positive number of seconds, not {dead_after!r}"),
                         (not 0 < poll < math.inf, f"poll must be a positive number of seconds, not {poll!r}")):
            if bad:
                raise ValueError(f"Executor: {why}")
        self.spool = Spool(base).ensure()
        self.run = run or f"executor-{_caller_name()}-{time.strftime('%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        self.spool.run_dir(self.run).mkdir(parents=True, exist_ok=True)
        self.spool.run_dirs(self.run)
        self._lock = HolderLock(self.spool.master_lock(self.run))
        self._lock.take(f"run {self.run!r}", run=self.run)
        self.retries, self.timeout, self.depth, self.poll = retries, timeout, depth, poll
        self._calls: dict[int, _Call] = {}
        self._new: deque[int] = deque()
        self._mutex = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        cfg = FeedConfig(depth=depth, dead_after=dead_after, poll=poll, retry_delay=0.5, retry_cap=30.0)
        self._dispatcher = _Calls(self, cfg)
        self._thread = threading.Thread(target=self._dispatcher.loop_forever, name=f"executor-{self.run}",
                                        daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:
        """Queue ``fn(*args, **kwargs)`` on the pool; the Future gets its value or RemoteError."""
        target, workdir = target_of(fn)
        kw = bind(fn, args, kwargs)
        with self._mutex:
            if self._closing:
                raise RuntimeError("cannot schedule new futures after shutdown")
            chunk = len(self._calls)
            call = self._calls[chunk] = _Call(chunk, target, workdir, kw, futures.Future())
            self._new.append(chunk)
        self._wake.set()
        return call.future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submits; with ``cancel_futures`` cancel every call that has not started
        (queued ones leave their mailboxes); with ``wait`` return when every call has finished."""
        with self._mutex:
            self._closing = True
            calls = list(self._calls.values()) if cancel_futures else []
        for call in calls:
            call.future.cancel()  # False for a running or finished one
        self._wake.set()
        if wait:
            self._thread.join()


class _Calls(Dispatcher):
    """The executor's dispatcher: one chunk per call, each with its own target and kwargs."""

    def __init__(self, ex: Executor, cfg: FeedConfig) -> None:
        super().__init__(ex.spool, ex.run, cfg)
        self.ex = ex
        self.spec_chunks = 0

    def loop_forever(self) -> None:
        try:
            self.loop(self._finished, self.ex._wake)
            if not self.cancelled:
                self.tidy()  # every call is done: what is left in mailboxes (cancelled calls too) goes
        except Exception as e:  # the loop edge: no future may hang
            logger.exception("executor {}: feeder failed", self.run_name)
            self._fail_all(e)
        finally:
            self.ex._lock.close()

    def _finished(self) -> bool:
        with self.ex._mutex:
            return self.cancelled or (self.ex._closing and all(c.future.done() for c in self.ex._calls.values()))

    def step(self) -> None:
        with self.ex._mutex:
            while self.ex._new:
                self.add(self.ex._new.popleft(), 1 + self.ex.retries)
            total = len(self.ex._calls)
        self.pending = deque(c for c in self.pending if self.sendable(c))  # cancelled calls wake their waiters
        if total != self.spec_chunks:
            self._write_spec(total)
        super().step()

    def _write_spec(self, total: int) -> None:
        """run.json, so that status shows the run (its chunk count grows with the calls)."""
        first = self.ex._calls[0]
        spec = RunSpec(self.run_name, JobKind.CALLABLE, first.target, total, {EXECUTOR_MARK: True},
                       retries=self.ex.retries, timeout=self.ex.timeout, workdir=first.workdir)
        write_replace(self.spool.run_spec(self.run_name), spec.to_json(), fsync=False)
        self.spec_chunks = total

    # hooks -----------------------------------------------------------------------------------
    def _job(self, c: int) -> Job:
        call = self.ex._calls[c]
        return Job(run=self.run_name, chunk_id=c, total_chunks=max(self.spec_chunks, c + 1),
                   kind=JobKind.CALLABLE, target=call.target, attempt=self.attempt[c] + 1,
                   max_attempts=self.max_attempts[c], kwargs=call.kwargs, timeout=self.ex.timeout,
                   workdir=call.workdir, submitted_at=time.time(), alone=c in self.isolated)

    def sendable(self, c: int) -> bool:
        future = self.ex._calls[c].future
        if not future.cancelled():
            return True
        with contextlib.suppress(RuntimeError):  # already notified
            future.set_running_or_notify_cancel()  # wakes wait() and as_completed() on it
        return False

    def started(self, c: int) -> None:
        future = self.ex._calls[c].future
        if not future.running() and not future.done():
            future.set_running_or_notify_cancel()  # False if cancelled meanwhile: its result is ignored

    def settle(self, c: int, rec: dict[str, Any]) -> None:
        future = self.ex._calls[c].future
        if future.done() or not (future.running() or future.set_running_or_notify_cancel()):
            return  # cancelled after it was sent
        try:
            if rec["status"] != "ok":
                future.set_exception(RemoteError(rec.get("error"), rec.get("agent"), c, rec["attempt"]))
            elif rec.get("arrays"):
                from jobs.npzio import load_npz  # numpy only where arrays are read

                future.set_result(load_npz(self.spool.arrays_of(self.run_name, rec), mmap=False))
            else:
                future.set_result(rec.get("value"))
        except (OSError, BadFile) as e:  # its arrays are gone or broken: the call fails, naming them
            future.set_exception(e)

    def _cancel(self) -> None:
        sent = set(self.inflight)
        super()._cancel()
        with self.ex._mutex:
            self.ex._closing = True
            calls = list(self.ex._calls.values())
        for call in calls:
            _end(call.future, RunCancelled(f"run {self.run_name} was cancelled"), sent=call.chunk in sent)
        self.pending.clear()
        self.inflight.clear()

    def _fail_all(self, exc: BaseException) -> None:
        with self.ex._mutex:
            self.ex._closing = True
            calls = list(self.ex._calls.values())
        for call in calls:
            _end(call.future, exc)


def _end(future: futures.Future, exc: BaseException, sent: bool = False) -> None:
    """Cancel a call not yet sent, fail one that was: either way its waiters wake."""
    if sent and not future.done() and (future.running() or future.set_running_or_notify_cancel()):
        future.set_exception(exc)
    elif future.cancel():
        with contextlib.suppress(RuntimeError):  # already notified
            future.set_running_or_notify_cancel()
    elif not future.done():
        future.set_exception(exc)
