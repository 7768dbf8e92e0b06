"""``concurrent.futures`` on the pool: ``Executor(base).submit(fn, *args, **kwargs)`` runs
``fn`` on a pool agent and returns a ``Future``.

    from concurrent.futures import as_completed
    from gpupool.master.executor import Executor

    with Executor("/tmp/b") as ex:                       # agents must be running
        futures = [ex.submit(my_mod.score, x, scale=2) for x in range(100)]
        for f in as_completed(futures):
            print(f.result())
        print(list(ex.map(my_mod.score, range(10))))
        print(sum(ex.map(pow, range(100_000), [2] * 100_000, chunksize=1000)))  # 1000 calls a chunk

Rules, because the call travels as a job descriptor through the spool (``master.calls``):
``fn`` is found again by name on the agent (a module-level function, a builtin or C function, a
method of a module-level class, a ``functools.partial`` of one of these; a function of the
``__main__`` script is imported from its file, like multiprocessing's spawn does, so the script
must create its Executor under ``if __name__ == "__main__":``, or the call fails with
``NestedExecutor``); its arguments and its result travel encoded by ``jobs.codec`` (JSON values,
tuples, sets, bytes, dicts with any keys, numpy arrays, datetimes, complex numbers; never
pickle); a dict, tuple or list of numpy arrays comes back as the chunk's ``.npz``. A failure
raises the remote exception's own class where the caller has it, else ``RemoteError``
(``master.remote``).

ThreadPoolExecutor's behaviour where it applies: ``max_workers`` calls at most run (or wait in
mailboxes) at once; outstanding calls are awaited when the interpreter exits, unless
``shutdown(wait=False)`` was called; ``Future.cancel()`` succeeds for every call that has not
started (one waiting in a mailbox is taken out of it). Each future is a ``CallFuture``: its
``job_id`` (``<run>/<chunk>``), ``attempts`` (the records of its attempts) and ``stdout()`` (what
the call printed, from its own log ``logs/<run>/<chunk>.log``, ``log_path()``).

Each executor is one run (``runs/executor-...``): ``status``, ``logs`` and ``cancel`` work on
it. A clean close (``shutdown(wait=True)`` or the ``with`` block ending without an exception, every
call done) removes that run, as ``python -m master rm`` does, unless ``keep=True`` or the run was
named with ``run=``; the futures keep their values. Its calls are fed by the one dispatcher (``master.core.dispatcher``), as a run's chunks are:
each call is one chunk with its own target and arguments, placed breadth first, retried,
handed back from dead agents and moved from busy agents to idle ones. A call counts as started
(and ``Future.cancel()`` then fails) once an agent's heartbeat shows it running. ``map`` is
``ProcessPoolExecutor``'s (results, order, exceptions, ``timeout``, ``chunksize`` groups); its
consecutive calls travel as one chunk where they are short (``master.calls.run_group`` runs them
on the agent, one result holds their values: ``_Map``).
"""
from __future__ import annotations

import bisect
import contextlib
import inspect
import itertools
import json
import math
import operator
import os
import secrets
import socket
import sys
import threading
import time
import weakref
from collections import deque
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from gpupool.jobs.logsetup import logger

from gpupool.jobs.atomic import write_replace
from gpupool.jobs.invoked import spell
from gpupool.jobs.codec import CodecError, decode, encode
from gpupool.jobs.descriptor import IN_WORKER_ENV, Job, JobKind, JobState
from gpupool.jobs.errors import BadFile
from gpupool.jobs.jsonio import is_int, is_num
from gpupool.jobs.locks import HolderLock
from gpupool.jobs.owners import check_run, claim_run
from gpupool.jobs.names import slug
from gpupool.jobs.paths import Spool
from gpupool.jobs.results import chunk_records
from gpupool.master.calls import GROUP, bind, describe, target_of, unwrap  # noqa: F401  (bind: the API of earlier versions)
from gpupool.master.core.batching import MAX_BATCH_S
from gpupool.master.core.dispatcher import Dispatcher, FeedConfig
from gpupool.master.remote import RemoteError, remote_exception
from gpupool.master.spec.runspec import KWARGS_LIMIT, RunSpec, kwargs_size_error
from gpupool.jobs.words import plural

__all__ = ["CallFuture", "Executor", "NestedExecutor", "RemoteError", "RunCancelled"]

EXECUTOR_MARK = "_executor"  # in run.json's kwargs: this run's chunks each carry their own call
# map's buffersize (Python 3.14): taken where the running Python's ProcessPoolExecutor.map takes it, never otherwise
MAP_BUFFERSIZE = "buffersize" in inspect.signature(ProcessPoolExecutor.map).parameters
# how map's calls travel (_Map)
BLOCK = 64  # with chunksize 1: calls whose arguments' JSON size is measured together (see _Map)
SEQUENCES = (list, tuple, range)  # map's iterables read as columns at once (no effect of reading them)
SAME = {int, str, bool, type(None)}  # a column of one value of these (equal ones are the same JSON) travels once
COLUMN_ROOM = 64  # bytes of a job's arguments a column takes beside its items (a range's or repeat's form)
MAP_DEPTH = 3  # jobs of a map queued at an agent at most, its running one included (_Calls._cut_maps)
JOB_COST = 0.1  # a job of short calls lasts so long that what a job costs beside them is this share of it
RESULT_BUDGET = 1 << 20  # bytes of values a job of map's calls returns at most (a result record holds 8 MB)
RECORD_ROOM = 1024  # bytes of a result record beside its value


def is_executor_run(spec: RunSpec) -> bool:
    """True for a run made by an Executor (its run.json does not describe its chunks)."""
    return bool(spec.kwargs.get(EXECUTOR_MARK))


class RunCancelled(Exception):
    """The executor's run was cancelled (``python -m master cancel``) before this call finished."""


class NestedExecutor(RuntimeError):
    """An Executor made inside a pool worker: a script that starts one at its top level, which
    the worker re-runs when it imports the script's functions."""


def _refuse_in_worker() -> None:
    """Refuse to start inside a pool worker: its calls would wait for the agent that runs it."""
    if os.environ.get(IN_WORKER_ENV) != str(os.getpid()):
        return
    here = os.path.abspath(__file__)
    script = next((f.filename for f in inspect.stack()[1:] if os.path.abspath(f.filename) != here), "?")
    raise NestedExecutor(
        f"an Executor was created inside a pool worker while it imported {script} to run a call: the script "
        f"creates its Executor at its top level, and every agent runs that top level again when it imports the "
        f"script's functions (as multiprocessing's spawn does). Put the code that creates the Executor under "
        f"'if __name__ == \"__main__\":' in {os.path.basename(script)}")


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


class CallFuture(futures.Future):
    """The Future of one call, with what the spool knows of it (submitit's ``job.job_id``, ``job.stdout()``)."""

    def __init__(self, ex: "Executor", chunk: int) -> None:
        super().__init__()
        self._ex, self.run, self.chunk = weakref.proxy(ex), ex.run, chunk
        self._spool = ex.spool

    @property
    def job_id(self) -> str:
        """``<run>/<chunk>``: ``python -m master logs --base BASE --run <run> --chunk <chunk>`` tells all."""
        return f"{self.run}/{self.chunk}"

    @property
    def attempts(self) -> list[dict[str, Any]]:
        """The records of the call's attempts so far, oldest first (agent, host, times, error...)."""
        final, history = chunk_records(self._spool, self.run, self.chunk)
        return history + ([final] if final is not None and final["status"] == JobState.OK else [])

    def agent(self) -> str | None:
        """The agent of the call's latest attempt (queued there, running or done), or None."""
        return self._latest()[0]

    def log_path(self) -> Path:
        """The call's own log, ``logs/<run>/<chunk>.log``: what each of its attempts printed
        (stdout and stderr), after a header line naming the attempt."""
        return self._spool.chunk_log(self.run, self.chunk)

    def stdout(self) -> str | None:
        """What the call's latest attempt printed (stdout and stderr) so far, or None if it has not
        started (or its output is gone). A call run by an older agent printed to its agent's worker
        log: read there."""
        from gpupool.master.report.logs import printed, worker_output

        agent, attempt = self._latest()
        if not (agent and attempt):
            return None
        out = printed(self._spool, self.run, self.chunk, attempt)
        return out if out is not None else worker_output(self._spool, agent, self.run, self.chunk, attempt)

    def _latest(self) -> tuple[str | None, int | None]:
        """(agent, attempt) of the latest attempt: the dispatcher's while it is in flight, else the
        newest record's."""
        with contextlib.suppress(ReferenceError):  # the executor is gone: the records tell
            placed = self._ex._dispatcher.inflight.get(self.chunk)
            if placed is not None:
                return placed
        done = self.attempts
        return (done[-1].get("agent"), done[-1].get("attempt")) if done else (None, None)


@dataclass
class _Call:
    chunk: int
    target: str
    workdir: str | None
    args: list[Any]
    kwargs: dict[str, Any]
    future: CallFuture
    group: int = 0  # a job of map's calls (run_group) holding this many; its future's value is (values, exception)
    map: "_Map | None" = None  # the map this job is of (a group, or one call); its value is then (values, exception)


_live: "weakref.WeakSet[Executor]" = weakref.WeakSet()


def _at_exit() -> None:
    """At interpreter exit, before threads are joined (as ThreadPoolExecutor's): every Executor
    not shut down with ``wait=False`` waits for its outstanding calls."""
    for ex in list(_live):
        if ex._no_wait:
            continue
        with ex._mutex:
            left = sum(not c.future.done() for c in ex._calls.values()) + sum(m.uncut() for m in ex._maps)
        if left:  # said, so that a program that seems to hang at its end says why
            print(f"gpupool: waiting for {left} outstanding call(s) of run {ex.run} to finish before exiting "
                  "(shutdown(wait=False) does not wait; Ctrl-C stops waiting)", file=sys.stderr, flush=True)
        if not ex._closing:  # never closed by the program (no with block, no shutdown): its run stays
            ex._keep = True
        ex.shutdown(wait=True)


threading._register_atexit(_at_exit)  # what concurrent.futures.thread itself uses


class Executor(futures.Executor):
    """A ``concurrent.futures.Executor`` whose calls run on the agents of the spool at ``base``
    (default: ``$GPUPOOL_BASE``, as for ``main.py``); at most ``max_workers`` of them at once
    (None: as many as there are agents). ``initializer``/``initargs`` mean what they mean for
    ``ProcessPoolExecutor``: ``initializer(*initargs)`` is called once in each worker process
    that runs this executor's calls (every agent's worker serves one executor only), before its
    first call there; if it raises, the executor is broken: pending calls and later submits
    raise ``BrokenProcessPool``."""

    def __init__(self, base: str | os.PathLike | None = None, max_workers: int | None = None,
                 initializer: Callable[..., Any] | None = None, initargs: tuple = (), *, retries: int = 0,
                 timeout: float | None = None, run: str | None = None, depth: int = 4, dead_after: float = 20.0,
                 poll: float = 0.1, keep: bool | None = None) -> None:
        _refuse_in_worker()
        base = os.environ.get("GPUPOOL_BASE") if base is None else base
        for bad, why in ((not base, "base (the spool folder the agents serve) is not given and $GPUPOOL_BASE is not set"),
                         (isinstance(base, (int, float)), f"base must be the spool folder, not {base!r} (the number "
                                                          "of calls at once is max_workers=...)"),
                         (max_workers is not None and (not isinstance(max_workers, int) or max_workers < 1),
                          f"max_workers must be None or 1 or more, not {max_workers!r}"),
                         (not isinstance(retries, int) or retries < 0, f"retries must be 0 or more, not {retries!r}"),
                         (timeout is not None and not 0 < timeout < math.inf,
                          f"timeout must be None or a positive number of seconds, not {timeout!r}"),
                         (not isinstance(depth, int) or depth < 1, f"depth must be 1 or more, not {depth!r}"),
                         (not 0 < dead_after < math.inf, f"dead_after must be a positive number of seconds, not {dead_after!r}"),
                         (not 0 < poll < math.inf, f"poll must be a positive number of seconds, not {poll!r}")):
            if bad:
                raise ValueError(f"Executor: {why}")
        self._setup = _initializer(initializer, initargs)
        self.spool = Spool(base).ensure()
        self.run = run or f"executor-{_caller_name()}-{time.strftime('%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        self.spool.mkdir(self.spool.run_dir(self.run))
        check_run(self.spool, self.run, False, "", hint="name a run of your own (run=...)")  # jobs.owners
        self.spool.run_dirs(self.run)
        self._lock = HolderLock(self.spool.master_lock(self.run))
        self._lock.take(f"run {self.run!r}", run=self.run)
        claim_run(self.spool, self.run)
        self.max_workers, self.retries, self.timeout, self.depth, self.poll = max_workers, retries, timeout, depth, poll
        self._calls: dict[int, _Call] = {}
        self._new: deque[int] = deque()
        self._maps: list[_Map] = []  # maps with calls not yet queued as jobs (the dispatcher cuts them: _Map)
        self._mutex = threading.Lock()
        self._cut = threading.Condition(self._mutex)  # a map's iterator waits here for its next job
        self._wake = threading.Event()
        self._closing = self._no_wait = False
        # the run is removed when the executor closes cleanly, unless kept: keep=True, or a run named with run=
        self._keep, self._run_removed = (run is not None) if keep is None else bool(keep), False
        self._broken: str | None = None  # why, once the initializer failed (ProcessPoolExecutor's BrokenProcessPool)
        cfg = FeedConfig(depth=depth, dead_after=dead_after, poll=poll, retry_delay=0.5, retry_cap=30.0)
        self._dispatcher = _Calls(self, cfg)
        self._thread = threading.Thread(target=self._dispatcher.loop_forever, name=f"executor-{self.run}",
                                        daemon=True)
        self._thread.start()
        _live.add(self)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> CallFuture:
        """Queue ``fn(*args, **kwargs)`` on the pool; the future gets its value or its exception."""
        target, workdir, pos, named = describe(fn, args, kwargs)
        if self._setup is not None:
            root = self._setup[1]
            if root is not None and workdir is not None and root != workdir:
                raise ValueError(f"{target} is imported from {workdir} and the initializer from {root}: a call's "
                                 f"worker puts one folder on its path; keep them in one project")
            workdir = workdir or root
        return self._queue(target, workdir, pos, named)

    def _queue(self, target: str, workdir: str | None, pos: list[Any], named: dict[str, Any]) -> CallFuture:
        """One chunk: a call; its future."""
        with self._mutex:
            self._open()
            call = self._add(target, workdir, pos, named)
            self._new.append(call.chunk)
        self._wake.set()
        return call.future

    def _open(self) -> None:
        """Raise where no call may be queued (under ``_mutex``), as ProcessPoolExecutor's submit."""
        if self._broken is not None:
            raise BrokenProcessPool(self._broken)
        if self._closing:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def _add(self, target: str, workdir: str | None, pos: list[Any], named: dict[str, Any], group: int = 0,
             of: "_Map | None" = None) -> _Call:
        """The next chunk (under ``_mutex``): a call, or a job of ``group`` calls of map ``of``."""
        chunk = len(self._calls)
        call = self._calls[chunk] = _Call(chunk, target, workdir, pos, named, CallFuture(self, chunk), group, of)
        return call

    def map(self, fn: Callable[..., Any], *iterables: Any, timeout: float | None = None, chunksize: int = 1,
            **options: Any) -> Any:
        """``fn(*args)`` for ``args`` in ``zip(*iterables)``, the results in order, lazily, as
        ``ProcessPoolExecutor.map``: the iterables are read at once (with ``buffersize``, where the
        running Python's map has it, ``buffersize`` groups of ``chunksize`` calls ahead of the
        results taken); ``timeout`` counts from this call (then ``TimeoutError``); a call's
        exception is raised when its result is reached, and every call runs whether an earlier one
        raised or not; an iterator closed early (or after it raised) cancels the calls not started.

        With ``chunksize`` K > 1, each K consecutive calls are a group, as ProcessPoolExecutor's
        work items: a call that raises ends its group (the calls after it in the group are not
        run), and is raised after the values of those before it. How the calls travel: a job
        holds one group (with K = 1: one call, as ``submit``'s) until their duration is known,
        then, where they are short, as many groups as make a job's own cost a small share of it
        (``_Map``)."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        unknown = sorted(set(options) - ({"buffersize"} if MAP_BUFFERSIZE else set()))
        if unknown:  # as the standard map says it (on a Python without buffersize, buffersize too)
            raise TypeError(f"map() got an unexpected keyword argument {unknown[0]!r}")
        buffersize = options.get("buffersize")
        if buffersize is not None and not isinstance(buffersize, int):
            raise TypeError("buffersize must be an integer or None")
        if buffersize is not None and buffersize < 1:
            raise ValueError("buffersize must be None or > 0")
        end = None if timeout is None else time.monotonic() + timeout
        job = _Map(self, fn, chunksize, iterables, buffersize)
        if job.read:
            with self._mutex:
                self._open()  # as ProcessPoolExecutor's submit of the first call
                self._maps.append(job)
            self._wake.set()
        return _results(job, end)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submits; with ``cancel_futures`` cancel every call that has not started
        (queued ones leave their mailboxes); with ``wait`` return when every call has finished,
        and without it, the interpreter does not wait for them at exit either."""
        with self._mutex:
            self._closing = True
            self._no_wait = self._no_wait or not wait
            calls = list(self._calls.values()) if cancel_futures else []
            if cancel_futures:  # map's calls not queued yet are cancelled too: its iterator raises CancelledError
                self._stop_maps(futures.CancelledError())
        for call in calls:
            call.future.cancel()  # False for a running or finished one
        self._wake.set()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()
            self._remove_run()

    def _stop_maps(self, exc: BaseException) -> None:
        """No more calls of any map are queued (under ``_mutex``); their iterators raise ``exc``
        where they reach them."""
        for m in self._maps:
            m.error = exc
        self._maps.clear()
        self._cut.notify_all()

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> bool:
        if exc_type is not None:  # the block raised: its run stays, for python -m master status and logs
            self._keep = True
        return super().__exit__(exc_type, exc_val, exc_tb)

    def _remove_run(self) -> None:
        """A clean close (every call done, the run neither cancelled nor broken, its dispatcher ended
        normally) removes the run from the spool, as ``python -m master rm`` does; the values the
        futures hold stay (each was decoded, its arrays read into memory, when its call finished)."""
        with self._mutex:
            clean = (self._dispatcher.ended_cleanly and self._broken is None
                     and all(c.future.done() for c in self._calls.values()))
            if self._keep or self._run_removed or not clean:
                return
            self._run_removed = True
        from gpupool.master.control import remove_run

        try:
            remove_run(self.spool, self.run)
        except Exception as e:  # never the caller's failure: the run is only left behind
            logger.warning("executor {}: its run could not be removed ({}: {}); {} rm --base {} --run {} removes it",
                           self.run, type(e).__name__, e, spell("master"), self.spool.base, self.run)


class _Calls(Dispatcher):
    """The executor's dispatcher: one chunk per call, each with its own target and kwargs."""

    def __init__(self, ex: Executor, cfg: FeedConfig) -> None:
        super().__init__(ex.spool, ex.run, cfg, on_event=self._say)
        self.ex = ex
        self.spec_chunks = 0
        self.ended_cleanly = False  # the loop ended with every call done, not cancelled, no error of its own

    def _say(self, kind: str, info: dict[str, Any]) -> None:
        """What a caller waiting on its futures must know (main.py's progress says the same)."""
        if kind == "no_agents":
            waited, base = info.get("waited_s") or 0.0, self.spool.base
            print(f"gpupool executor {self.run_name}: no live agents in {base}"
                  f"{f' for {waited / 60:.0f} min' if waited >= 60 else ''}; the calls wait for some. Start them "
                  f"with:  {spell('agents')} N {base}", file=sys.stderr, flush=True)

    def loop_forever(self) -> None:
        try:
            self.loop(self._finished, self.ex._wake)
            if not self.cancelled:
                self.tidy()  # every call is done: what is left in mailboxes (cancelled calls too) goes
                self.ended_cleanly = True
        except Exception as e:  # the loop edge: no future may hang
            logger.exception("executor {}: feeder failed", self.run_name)
            self._fail_all(e)
        finally:
            self.ex._lock.close()

    def _finished(self) -> bool:
        with self.ex._mutex:
            return self.cancelled or (self.ex._closing and not any(m.uncut() for m in self.ex._maps)
                                      and all(c.future.done() for c in self.ex._calls.values()))

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
        target = first.args[0] if first.group else first.target  # a group's: the function its calls call
        spec = RunSpec(self.run_name, JobKind.CALLABLE, target, total, {EXECUTOR_MARK: True},
                       retries=self.ex.retries, timeout=self.ex.timeout, workdir=first.workdir)
        write_replace(self.spool.run_spec(self.run_name), spec.to_json(), fsync=False)
        self.spec_chunks = total

    # hooks -----------------------------------------------------------------------------------
    def batch_given(self) -> int | None:
        """One call (or one job of map's calls, ``_Map``) per job: the dispatcher batches none of
        them (``batchable``), and its depth counts jobs of one."""
        return 1

    def _job(self, c: int) -> Job:
        call = self.ex._calls[c]  # (a group's target is GROUP: its args name the function and hold the calls')
        return Job(run=self.run_name, chunk_id=c, total_chunks=max(self.spec_chunks, c + 1),
                   kind=JobKind.CALLABLE, target=call.target, attempt=self.attempt[c] + 1,
                   max_attempts=self.max_attempts[c], kwargs=call.kwargs, args=call.args, encoded=True,
                   timeout=self.ex.timeout,
                   workdir=call.workdir, submitted_at=time.time(), alone=c in self.isolated,
                   setup=self.ex._setup[0] if self.ex._setup else None,
                   setup_args=self.ex._setup[2] if self.ex._setup else None)

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
        err = rec.get("error") if rec["status"] != JobState.OK else None
        if isinstance(err, dict) and err.get("setup"):
            self._break(c, rec)
            return
        failure: BaseException | None = None
        call = self.ex._calls[c]
        try:
            if rec.get("status") != JobState.OK:
                failure = remote_exception(rec.get("error"), rec.get("agent"), c, rec.get("attempt"))
            elif call.group:
                value = self._group(c, rec)
            elif rec.get("arrays"):
                value = self._arrays(rec)
            else:
                value = decode(rec.get("value"))
            if failure is None and call.map is not None:
                call.map.measure(call, rec, self.spool.result_json(self.run_name, c))
                value = value if call.group else ([value], None)
        except (OSError, BadFile, CodecError) as e:  # its arrays are gone or broken, its value is no valid
            failure = e  # encoding: the call fails, naming them
        except Exception as e:  # whatever else goes wrong with one record fails its call only, never the loop
            logger.opt(exception=True).warning("executor {}: the outcome of call {} could not be read",
                                               self.run_name, c)
            failure = e
        if failure is not None:
            future.set_exception(failure)
        else:
            future.set_result(value)

    def _group(self, c: int, rec: dict[str, Any]) -> tuple[list[Any], BaseException | None]:
        """A job of map's calls: (the values of its calls before the first that raised, that call's
        exception or None), from its record (``master.calls.run_group``'s value); CodecError where
        the record is no such value."""
        n, out = self.ex._calls[c].group, decode(rec.get("value"))
        values = out.get("values") if isinstance(out, dict) else None
        errors = out.get("errors", []) if isinstance(out, dict) else None
        if not (isinstance(values, list) and len(values) == n and isinstance(errors, list) and all(
                isinstance(e, list) and len(e) == 2 and is_int(e[0]) and 0 <= e[0] < n and isinstance(e[1], dict)
                for e in errors)):
            raise CodecError(f"the result of map's calls {c} is not the values of its {n} calls")
        if not errors:
            return values, None
        i, error = min(errors, key=lambda e: e[0])
        del values[i:]
        return values, remote_exception(error, rec.get("agent"), c, rec.get("attempt"))

    def _arrays(self, rec: dict[str, Any]) -> Any:
        from gpupool.jobs.npzio import load_npz  # numpy only where arrays are read

        arrays = load_npz(self.spool.arrays_of(self.run_name, rec), mmap=False)
        form = {"tuple": tuple, "list": list}.get(rec.get("arrays_form"))
        if form is None:
            return arrays
        try:
            return form(arrays[f"arr_{i}"] for i in range(len(arrays)))
        except KeyError:
            raise CodecError(f"the arrays of call {rec['chunk_id']} are not arr_0 to arr_{len(arrays) - 1}") from None

    def unplaceable(self, live: list[Any]) -> None:
        """Agents are alive but none may take the calls (agents of an older version, which cannot
        read their descriptors): every call fails, naming them, as a run does (never a silent wait)."""
        from gpupool.master.spec.placement import Unplaceable

        why = "; ".join(f"{v.id}: {self.why_not(v)}" for v in live[:8])
        raise Unplaceable(f"executor {self.run_name}: none of the {plural(len(live), 'live agent')} may take its calls: {why}")

    def _dispatch(self) -> None:
        """``max_workers``: only as many calls are queued at agents as may run at once (a call
        waiting in a mailbox could start any moment); the rest wait here. Maps' calls are cut into
        jobs first, as many as the agents have room for (``_Map``)."""
        self._cut_maps()
        room = math.inf if self.ex.max_workers is None else self.ex.max_workers - len(self.inflight)
        held: deque[int] = deque()
        while len(self.pending) > max(0, room):
            held.appendleft(self.pending.pop())
        try:
            super()._dispatch()
        finally:
            self.pending.extend(held)

    def _cut_maps(self) -> None:
        """Queue maps' calls as jobs (``_Map.cut``), oldest map first: as many jobs as keep every
        live agent ``depth`` deep, ``MAP_DEPTH`` at most (a job of short calls lasts many times
        its own cost: the one queued behind the one running covers the refill, and the calls cut
        later are cut by what more results measured); one while none is in flight (with no agent,
        or none that may take them, the calls say so); no more than ``max_workers`` allow."""
        with self.ex._mutex:
            if not self.ex._maps:
                return
        agents = len(self._candidates())
        room = max(1, agents) * min(self.depth, MAP_DEPTH) - len(self.inflight) - len(self.pending)
        if not self.pending and not self.inflight:
            room = max(room, 1)
        if self.ex.max_workers is not None:
            room = min(room, self.ex.max_workers - len(self.inflight) - len(self.pending))
        cut: list[int] = []
        with self.ex._mutex:
            for m in list(self.ex._maps):
                while room > 0 and m.uncut():
                    cut.append(m.cut(m.units_for(agents, self.rtt)).chunk)
                    room -= 1
                if m.exhausted and not m.uncut():  # all queued (with buffersize: what is read so far only)
                    self.ex._maps.remove(m)
            if cut:
                self.ex._cut.notify_all()
        for c in cut:
            self.add(c, 1 + self.ex.retries)
        if cut and len(self.ex._calls) != self.spec_chunks:
            self._write_spec(len(self.ex._calls))

    def _cancel(self) -> None:
        sent = set(self.inflight)
        super()._cancel()
        with self.ex._mutex:
            self.ex._closing = True
            self.ex._stop_maps(RunCancelled(f"run {self.run_name} was cancelled"))
            calls = list(self.ex._calls.values())
        for call in calls:
            _end(call.future, RunCancelled(f"run {self.run_name} was cancelled"), sent=call.chunk in sent)
        self.pending.clear()
        self.inflight.clear()

    def _break(self, c: int, rec: dict[str, Any]) -> None:
        """The initializer raised in a worker: as ProcessPoolExecutor, the executor is broken; this
        call and every other not done fail with BrokenProcessPool (the remote error its cause),
        calls still queued leave the mailboxes, and ``submit`` raises it from now on."""
        cause = remote_exception(rec.get("error"), rec.get("agent"), c, rec.get("attempt"))
        why = (f"A worker's initializer {self.ex._setup[0]} raised {type(cause).__name__}: "
               f"{str(rec['error'].get('message'))[:500]} (call {c}); the executor is broken")
        with self.ex._mutex:
            self.ex._broken = why
        exc = BrokenProcessPool(why)
        exc.__cause__ = cause
        self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        with self.ex._mutex:
            self.ex._closing = True
            self.ex._stop_maps(exc)
            calls = list(self.ex._calls.values())
        for call in calls:  # every call not done fails with it, sent or not: the caller learns why
            _end(call.future, exc, sent=True)


def _initializer(fn: Callable[..., Any] | None, initargs: tuple) -> tuple[str, str | None, list[Any]] | None:
    """``initializer``/``initargs`` as the jobs carry them: (its target, the folder of its module, the
    encoded initargs), or None; TypeError where it cannot travel (as for a call's function)."""
    if fn is None:
        return None
    if not callable(fn):
        raise TypeError(f"Executor: initializer must be a callable, not {fn!r}")
    target, root = target_of(fn)
    try:
        args = encode(list(initargs))
    except CodecError as e:
        raise TypeError(f"Executor: initargs cannot travel to the agents ({e})") from None
    if (too_large := kwargs_size_error({"initargs": args}, "initargs", "a file whose path you pass")):
        raise ValueError(f"Executor: {too_large}")
    return target, root, args


class _Map:
    """One ``Executor.map``: its calls, read from the iterables and encoded (``jobs.codec``) as
    columns (one per iterable; a range and a list of one value kept as such: ``_compact``) at
    once, with ``buffersize`` as its iterator goes (``take``); cut into jobs by the dispatcher's
    thread as the agents have room (``cut``, from ``_Calls._cut_maps``); the jobs cut, in order,
    for its iterator (``_results``).

    A job holds consecutive calls, whole groups of ``size`` (chunksize) calls (``run_group``):
    one group while their duration is unknown (with chunksize 1, one call as ``submit`` sends it:
    its value may come back as arrays, it is retried as submit's are). Once the duration of a
    call and what a job costs beside its calls are measured (the time an agent spends between two
    jobs: the trips through the spool, the agent's and the master's work; or the dispatcher's
    round trip, where longer), a job of short calls holds as many groups as make that cost
    ``JOB_COST`` of it, and never fewer than take as long as that cost; at most a fair share of
    the groups left (the agents end together, as guided scheduling does), ``MAX_BATCH_S`` of
    calls, ``RESULT_BUDGET`` of values, a quarter of the executor's ``timeout``. One call a job from the first that returned arrays (an .npz each); one call a
    job with chunksize 1 where the executor retries (a call that raises is retried alone).

    A job's arguments stay within 64 KB (``KWARGS_LIMIT``): the JSON size of each ``size`` calls
    (``BLOCK`` with chunksize 1) is measured as they are read, halved down to single calls where
    they pass it; a call that passes it alone is refused then, as ``submit`` refuses it."""

    def __init__(self, ex: Executor, fn: Callable[..., Any], size: int, iterables: tuple, buffersize: int | None
                 ) -> None:
        self.ex, self.fn, self.size, self.buffersize = ex, fn, size, buffersize
        # lists, tuples and ranges read as columns at once (reading them has no effect: zip's order does not matter)
        self.sequences = iterables if buffersize is None and all(type(i) in SEQUENCES for i in iterables) else None
        self.calls = zip(*iterables)
        # (target, workdir, a partial's own positional and keyword arguments, encoded), from the first call
        self.head: tuple[str, str | None, list[Any], dict[str, Any]] | None = None
        self.room = KWARGS_LIMIT  # JSON bytes of a job's columns at most (the limit, less the rest of its arguments)
        self.columns: list[Any] = []  # the encoded arguments of the calls read, one column per iterable (_compact)
        self.starts: list[int] = []  # the first call of each piece measured together (bisect)
        self.sizes: list[int] = []  # the JSON bytes of each piece's arguments
        self.read = self.queued = 0  # calls read from the iterables; calls queued as jobs
        self.exhausted = self.closed = False
        self.error: BaseException | None = None  # why the calls not queued never will be (the executor stopped)
        self.jobs: deque[tuple[int, _Call]] = deque()  # (end, the job of calls up to it), for the iterator
        self.call_s: float | None = None  # the seconds a call takes, measured (the dispatcher's thread)
        self.timed = (0.0, 0)  # the seconds and the calls of the jobs measured
        self.call_bytes = 0.0  # the most bytes of values per call seen
        self.gap: float | None = None  # seconds an agent spends between two jobs of this map, measured
        self.ends: dict[str, float] = {}  # agent -> when its latest job seen here ended
        self.arrays = False  # a call returned arrays
        self.take(None if buffersize is None else buffersize * size)

    def uncut(self) -> int:
        """Calls read and not queued (under the executor's mutex), that will be."""
        return 0 if self.closed or self.error is not None else self.read - self.queued

    def take(self, calls: int | None) -> None:
        """Read up to ``calls`` more calls (None: all) from the iterables: checked as ``submit``
        checks a call (the first: the function and its arguments; any that cannot travel, or
        whose arguments pass 64 KB alone, named), encoded and measured."""
        raw, exhausted = self._read(calls)
        n = len(raw[0]) if raw else 0
        columns: list[Any] = []
        pieces: list[tuple[int, int]] = []
        if n:
            if self.head is None:
                self._describe(tuple(column[0] for column in raw))
            try:  # a range is read as it is: its items are JSON already
                encoded = encode([[] if type(column) is range else column for column in raw])
            except CodecError:
                for i in range(n):  # the call that cannot travel, named as submit names it
                    describe(self.fn, tuple(column[i] for column in raw), {})
                raise
            columns, bounds = [], []
            for column, done in zip(raw, encoded):
                column, bound = _compact(column if type(column) is range else done, exhausted and not self.columns)
                columns.append(column)
                bounds.append(bound)
            step = self.size if self.size > 1 else BLOCK
            for a in range(0, n, step):
                self._measure(columns, bounds, a, min(a + step, n), pieces)
        with self.ex._mutex:
            if not self.columns:
                self.columns = columns
            else:
                for have, more in zip(self.columns, columns):
                    have.extend(more)
            for a, size in pieces:
                self.starts.append(self.read + a)
                self.sizes.append(size)
            self.read += n
            self.exhausted = exhausted
        if n:
            self.ex._wake.set()

    def _read(self, calls: int | None) -> tuple[list[list[Any]], bool]:
        """Up to ``calls`` more calls (None: all) as columns, one list per iterable, and whether the
        iterables are exhausted; read as ``zip`` reads them (sequences: sliced at once)."""
        sequences, self.sequences = self.sequences, None
        if sequences is not None:
            n = min(map(len, sequences)) if sequences else 0
            return ([i[:n] if type(i) is range else list(i[:n]) for i in sequences] if n else []), True
        new = tuple(self.calls if calls is None else itertools.islice(self.calls, calls))
        return ([list(map(operator.itemgetter(j), new)) for j in range(len(new[0]))] if new else [],
                calls is None or len(new) < calls)

    def _describe(self, first: tuple) -> None:
        """The first call checked as submit checks one: the function, its arguments."""
        target, workdir, _, _ = describe(self.fn, first, {})
        if self.ex._setup is not None:
            root = self.ex._setup[1]
            if root is not None and workdir is not None and root != workdir:
                raise ValueError(f"{target} is imported from {workdir} and the initializer from {root}: a "
                                 "call's worker puts one folder on its path; keep them in one project")
            workdir = workdir or root
        _, fixed, named = unwrap(self.fn, (), {})  # a partial's own arguments, given to every call
        self.head = (target, workdir, encode(list(fixed)), encode(named))
        rest = json.dumps({"args": [target, workdir, [], *self.head[2:], self.size, self.size]}, default=str)
        self.room = KWARGS_LIMIT - len(rest) - COLUMN_ROOM * len(first)

    def _measure(self, columns: list[Any], bounds: list[int | None], a: int, b: int,
                 out: list[tuple[int, int]]) -> None:
        """Calls ``a`` to ``b`` of ``columns`` as pieces whose arguments fit a job, into ``out``
        (``bounds``: ``_compact``'s bound of each column)."""
        size = sum(len(json.dumps(column[a:b])) if bound is None else bound * (b - a)
                   for column, bound in zip(columns, bounds))
        if size <= self.room:
            out.append((a, size))
        elif b - a > 1:
            self._measure(columns, bounds, a, (a + b) // 2, out)
            self._measure(columns, bounds, (a + b) // 2, b, out)
        else:  # a call alone: with chunksize 1 it travels as a plain call (cut alone: see cut), as submit's
            target, _, fixed, named = self.head
            call = {"args": fixed + [column[a] for column in columns], "kwargs": named} if self.size == 1 else \
                {"args": [target, self.head[1], [[column[a]] for column in columns], fixed, named, self.size, 0]}
            too_large = kwargs_size_error(call, "map's arguments", "a file and pass its path")
            if too_large is not None:
                raise ValueError(f"{target}: {too_large}")
            out.append((a, size))

    def units_for(self, agents: int, rtt: float) -> int:
        """Groups of calls for the next job (see the class); ``rtt``: the dispatcher's round trip."""
        cost = max(self.gap or 0.0, rtt)  # what a job costs beside its calls
        if self.call_s is None or not cost or self.arrays or (self.size == 1 and self.ex.retries):
            return 1
        group_s = max(self.call_s * self.size, 1e-9)
        left = -(-(self.read - self.queued) // self.size)
        fair = max(-(-left // max(1, agents)), cost / group_s)  # a job as long as its cost at least: no smaller
        n = min(cost / (JOB_COST * group_s), MAX_BATCH_S / group_s, fair)
        if self.call_bytes:
            n = min(n, RESULT_BUDGET / (self.call_bytes * self.size))
        if self.ex.timeout is not None:
            n = min(n, self.ex.timeout / 4 / group_s)
        return max(1, int(n))

    def cut(self, groups: int) -> _Call:
        """Queue the next job (under the executor's mutex; ``uncut()`` is not 0): its calls up to
        the end of ``groups`` groups, fewer where their arguments would pass the job's limit."""
        first = self.queued
        end = min(self.read, (first // self.size + groups) * self.size)
        p = bisect.bisect_right(self.starts, first) - 1
        size, stop = self.sizes[p], self._piece_end(p)
        while stop < end and size + self.sizes[p + 1] <= self.room:
            p += 1
            size, stop = size + self.sizes[p], self._piece_end(p)
        end = min(end, stop)
        target, workdir, fixed, named = self.head
        if self.size == 1 and end - first == 1:
            call = self.ex._add(target, workdir, fixed + [column[first] for column in self.columns], named, of=self)
        else:
            args = [target, workdir, [_wire(column, first, end) for column in self.columns], fixed, named,
                    self.size, first % self.size]
            call = self.ex._add(GROUP, workdir, args, {}, group=end - first, of=self)
        self.queued = end
        self.jobs.append((end, call))
        if self.exhausted and self.queued == self.read:
            self.columns = []  # every call is in its job's arguments
        return call

    def _piece_end(self, p: int) -> int:
        return self.starts[p + 1] if p + 1 < len(self.starts) else self.read

    def measure(self, call: _Call, rec: dict[str, Any], path: Path) -> None:
        """What a job's ok record tells of its calls (the dispatcher's thread): their duration (the
        mean over the calls measured), the size of their values (the result file's, less a
        record's own fields), arrays; and the time its agent spent between the job before and it
        (what a job costs beside its calls: its trips through the spool, the agent's own work and
        the master's)."""
        if rec.get("arrays"):
            self.arrays = True
            return
        n, took = call.group or 1, rec.get("duration_s")
        if is_num(took) and took >= 0:
            self.timed = (self.timed[0] + took, self.timed[1] + n)
            self.call_s = self.timed[0] / self.timed[1]
        agent, begun, ended = rec.get("agent"), rec.get("started_at"), rec.get("finished_at")
        if isinstance(agent, str) and is_num(begun) and is_num(ended):
            gap = begun - self.ends.get(agent, math.inf)
            if 0 <= gap < 1.0:
                self.gap = gap if self.gap is None else (self.gap + gap) / 2
            self.ends[agent] = max(ended, self.ends.get(agent, ended))
        with contextlib.suppress(OSError):
            self.call_bytes = max(self.call_bytes, (os.stat(path).st_size - RECORD_ROOM) / n)

    def next_job(self, end: float | None) -> tuple[int, _Call] | None:
        """The next job for the iterator (None after the last), waiting until it is cut;
        TimeoutError at ``end``, the map's error where its calls will never be queued."""
        with self.ex._cut:
            while not self.jobs:
                if self.error is not None:
                    raise self.error
                if self.exhausted and self.queued >= self.read:
                    return None
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    raise futures.TimeoutError()
                self.ex._cut.wait(left)
            return self.jobs.popleft()

    def more(self, upto: int) -> None:
        """With ``buffersize``: the calls read reach ``upto`` (ProcessPoolExecutor's map submits one
        more group before it waits for the next); RuntimeError after shutdown, as its submit."""
        if self.buffersize is None or self.exhausted or self.read >= upto:
            return
        with self.ex._mutex:
            self.ex._open()
        self.take(upto - self.read)

    def close(self) -> None:
        """The iterator is done (ended, raised or closed): what is not queued never will be, the
        jobs not started are cancelled."""
        with self.ex._mutex:
            self.closed = True
            if self in self.ex._maps:
                self.ex._maps.remove(self)
            jobs, self.columns = [call for _, call in self.jobs], []
            self.jobs.clear()
        for call in jobs:
            call.future.cancel()  # False for one running or done


class _Same:
    """A column of one value (``[2] * n``): it travels as the value and a count (``_wire``)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __getitem__(self, i: int) -> Any:
        return self.value


def _compact(column: Any, whole: bool) -> tuple[Any, int | None]:
    """An encoded column as it is kept (``_wire`` sends it): a range as it is, a column of one
    integer, string, boolean or None as ``_Same`` (``whole``: no more of it will be read), any
    other as its list; and the most JSON bytes one of its items takes with its separator where
    that is known without writing them (0 for these two: a job sends them in a few bytes; all
    integers or all floats), else None."""
    if type(column) is range:
        return column, 0
    kinds = set(map(type, column))
    if whole and len(kinds) == 1 and kinds <= SAME and column.count(column[0]) == len(column):
        return _Same(column[0]), 0
    if kinds <= {int, bool}:
        return column, max(len(repr(int(min(column)))), len(repr(int(max(column)))),
                           len("false") if bool in kinds else 0) + 2
    if kinds == {float}:  # finite (encode tags the others): repr gives 17 digits at most, a sign, a dot, e-308
        return column, 24 + 2
    return column, None


def _wire(column: Any, a: int, b: int) -> Any:
    """Items ``a`` to ``b`` of a column as a job sends them (``master.calls.run_group`` reads them)."""
    if type(column) is range:
        part = column[a:b]
        return {"range": [part.start, part.stop, part.step]}
    if type(column) is _Same:
        return {"repeat": column.value, "times": b - a}
    return column[a:b]


def _results(m: _Map, end: float | None) -> Any:
    """Map's iterator: the values of each job's calls in order, then the exception of the call
    that raised, if one did (a job's own failure, its timeout...: at its first call)."""
    try:
        while (job := m.next_job(end)) is not None:
            stop, call = job
            if m.buffersize is not None:
                m.more(stop + m.buffersize * m.size)
            values, exc = call.future.result(None if end is None else end - time.monotonic())
            del call  # the iterator holds no value it has given
            values.reverse()
            while values:
                yield values.pop()
            if exc is not None:
                raise exc
    finally:
        m.close()


def _end(future: futures.Future, exc: BaseException, sent: bool = False) -> None:
    """Cancel a call not yet sent, fail one that was: either way its waiters wake."""
    if sent and not future.done() and (future.running() or future.set_running_or_notify_cancel()):
        future.set_exception(exc)
    elif future.cancel():
        with contextlib.suppress(RuntimeError):  # already notified
            future.set_running_or_notify_cancel()
    elif not future.done():
        future.set_exception(exc)
