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
it. A small feeder variant below queues each call as one chunk, with its own target and
kwargs, retries failures and hands jobs of dead agents to others, like ``master.feeder``.
"""
from __future__ import annotations

import heapq
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
from collections import Counter, deque
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from loguru import logger

from jobs.atomic import write_replace
from jobs.descriptor import BUILTIN_KWARGS, Job, JobKind
from jobs.errors import BadFile
from jobs.heartbeat import AgentState
from jobs.locks import HolderLock
from jobs.mailbox import HOLD_LIMIT, Mailbox, drop_run
from jobs.names import slug
from jobs.npzio import load_npz
from jobs.paths import Spool
from jobs.results import read_result
from master.feeder import FeedConfig, charge_loss, death_suspects, record_loss
from master.liveness import Liveness
from master.runspec import RunSpec

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
        return json.loads(json.dumps(out, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{fn.__qualname__}: arguments must be JSON-serialisable to reach an agent ({e})") from None


@dataclass
class _Call:
    chunk: int
    target: str
    workdir: str
    kwargs: dict[str, Any]
    future: futures.Future
    attempt: int = 0  # attempts sent so far
    max_attempts: int = 1
    agent: str | None = None


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
        self.run = run or f"executor-{slug(socket.gethostname(), 30)}-{os.getpid()}-{secrets.token_hex(3)}"
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
        self._cancel_unsent = False
        self._feeder = _Feeder(self, Liveness(self.spool, dead_after))
        self._thread = threading.Thread(target=self._feeder.loop, name=f"executor-{self.run}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:
        """Queue ``fn(*args, **kwargs)`` on the pool; the Future gets its value or RemoteError."""
        target, workdir = target_of(fn)
        kw = bind(fn, args, kwargs)
        with self._mutex:
            if self._closing:
                raise RuntimeError("cannot schedule new futures after shutdown")
            chunk = len(self._calls)
            call = self._calls[chunk] = _Call(chunk, target, workdir, kw, futures.Future(),
                                              max_attempts=1 + self.retries)
            self._new.append(chunk)
        self._wake.set()
        return call.future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submits; with ``cancel_futures`` cancel calls not yet sent to an agent;
        with ``wait`` return when every call has finished."""
        with self._mutex:
            self._closing = True
            self._cancel_unsent = self._cancel_unsent or cancel_futures  # done by the feeder thread
        self._wake.set()
        if wait:
            self._thread.join()


class _Feeder:
    """The executor's master loop: one chunk per call, each with its own target and kwargs."""

    def __init__(self, ex: Executor, live: Liveness) -> None:
        self.ex, self.spool, self.run, self.live = ex, ex.spool, ex.run, live
        self.pending: deque[int] = deque()
        self.delayed: list[tuple[float, int]] = []
        self.inflight: dict[int, _Call] = {}
        self.by_agent: dict[str, set[int]] = {}
        self._missing: dict[int, float] = {}  # call -> when it was first seen gone from its mailbox
        self.losses: Counter[int] = Counter()  # call -> agents that died while perhaps running it
        self.isolated: set[int] = set()  # calls with a loss: queued with ``alone`` from then on
        self.spec_chunks = 0
        self._next_check = 0.0

    def loop(self) -> None:
        try:
            while not self._finished():
                self.step()
                self.ex._wake.wait(self.ex.poll)
                self.ex._wake.clear()
        except Exception as e:  # the loop edge: no future may hang
            logger.exception("executor {}: feeder failed", self.run)
            self._fail_all(e)
        finally:
            self.ex._lock.close()

    def _finished(self) -> bool:
        with self.ex._mutex:
            return self.ex._closing and all(c.future.done() for c in self.ex._calls.values())

    def step(self) -> None:
        with self.ex._mutex:
            while self.ex._new:
                self.pending.append(self.ex._new.popleft())
            total = len(self.ex._calls)
            cancel_unsent = self.ex._cancel_unsent
        if cancel_unsent:  # shutdown(cancel_futures=True): calls never sent are cancelled
            for c in [c for c in self.pending if self.ex._calls[c].attempt == 0]:
                _end(self.ex._calls[c].future, futures.CancelledError())
            self.pending = deque(c for c in self.pending if self.ex._calls[c].attempt > 0)
        if total != self.spec_chunks:
            self._write_spec(total)
        now = time.monotonic()
        if now >= self._next_check:
            if self.spool.cancel_flag(self.run).exists():
                return self._cancel()
            self.live.refresh()
            self._hand_back()
            self._find_lost()
            self._next_check = now + 0.5
        self._collect()
        while self.delayed and self.delayed[0][0] <= now:
            self.pending.appendleft(heapq.heappop(self.delayed)[1])
        self._dispatch()

    def _write_spec(self, total: int) -> None:
        """run.json, so that status shows the run (its chunk count grows with the calls)."""
        first = self.ex._calls[0]
        spec = RunSpec(self.run, JobKind.CALLABLE, first.target, total, {EXECUTOR_MARK: True},
                       retries=self.ex.retries, timeout=self.ex.timeout, workdir=first.workdir)
        write_replace(self.spool.run_spec(self.run), spec.to_json(), fsync=False)
        self.spec_chunks = total

    # results ---------------------------------------------------------------------------------
    def _collect(self) -> None:
        for c, call in list(self.inflight.items()):
            if self.spool.result_json(self.run, c).exists():
                try:
                    rec = read_result(self.spool.result_json(self.run, c))
                except (FileNotFoundError, BadFile):
                    continue
                self._untrack(c)
                self._settle(call, rec)
            elif self.spool.history_json(self.run, c, call.attempt).exists():
                self._untrack(c)
                heapq.heappush(self.delayed, (time.monotonic() + min(30.0, 0.5 * 2 ** (call.attempt - 1)), c))

    def _settle(self, call: _Call, rec: dict[str, Any]) -> None:
        if rec["status"] != "ok":
            call.future.set_exception(RemoteError(rec.get("error"), rec.get("agent"), call.chunk, rec["attempt"]))
        elif rec.get("arrays"):
            call.future.set_result(load_npz(self.spool.arrays_of(self.run, rec), mmap=False))
        else:
            call.future.set_result(rec.get("value"))

    def _untrack(self, c: int) -> None:
        self._missing.pop(c, None)
        call = self.inflight.pop(c, None)
        if call is not None and call.agent is not None:
            self.by_agent.get(call.agent, set()).discard(c)

    def _cancel(self) -> None:
        drop_run(self.spool, self.run)
        with self.ex._mutex:
            self.ex._closing = True
            calls = list(self.ex._calls.values())
        for call in calls:
            _end(call.future, RunCancelled(f"run {self.run} was cancelled"))
        self.pending.clear()
        self.inflight.clear()

    def _fail_all(self, exc: BaseException) -> None:
        with self.ex._mutex:
            self.ex._closing = True
            calls = list(self.ex._calls.values())
        for call in calls:
            _end(call.future, exc)

    # agents ----------------------------------------------------------------------------------
    def _hand_back(self) -> None:
        """Calls queued on dead (or draining) agents go back to pending, as in master.feeder."""
        for ident, view in self.live.views.items():
            draining = view.alive and view.state == AgentState.DRAINING.value
            mine = self.by_agent.get(ident)
            if not mine or (view.alive and not draining):
                continue
            # a draining agent still runs its current call and the one already in its worker's pipe
            busy = [view.status.get(k) or {} for k in ("current", "ahead")] if draining else []
            keep = {b.get("chunk_id") for b in busy if b.get("run") == self.run}
            back = {c for c in mine if c not in keep}
            taken: list[Job] = []  # in mailbox order

            def drop(jobs: list[Job]) -> list[Job]:
                taken.extend(j for j in jobs if j.run == self.run and j.chunk_id in back)
                return [j for j in jobs if not (j.run == self.run and j.chunk_id in back)]

            try:
                Mailbox(self.spool, ident).update(drop, wait=HOLD_LIMIT, force=not draining)
            except OSError as e:  # as in master.feeder
                logger.warning("could not take back the calls of {}: {}", ident, e)
                continue
            died = not draining and view.state != AgentState.STOPPED.value
            suspects = death_suspects([j for j in taken if j.attempt == self.inflight[j.chunk_id].attempt
                                       and not self._has_outcome(j.chunk_id)]) if died else []
            for c in back - {j.chunk_id for j in suspects}:
                self._requeue_lost(c)
            for job in suspects:  # as in master.feeder: a call that kills its agent cannot take down the pool
                if not charge_loss(self.losses, self.isolated, job.chunk_id, FeedConfig.free_losses,
                                   len(suspects) == 1) or not record_loss(
                        self.spool, job, ident, f"no heartbeat for {view.age:.0f} s", self.losses[job.chunk_id]):
                    self._requeue_lost(job.chunk_id)

    def _find_lost(self) -> None:
        """Calls that left a live agent's mailbox with no outcome (e.g. a rejected mailbox)."""
        for ident, mine in self.by_agent.items():
            view = self.live.views.get(ident)
            if not mine or view is None or not view.alive:
                continue
            try:
                keys = {j.key for j in Mailbox(self.spool, ident).read().jobs}  # before the results
            except (OSError, BadFile):
                continue
            now = time.monotonic()
            for c in list(mine):
                if (self.run, c, self.inflight[c].attempt) in keys:
                    self._missing.pop(c, None)
                elif now - self._missing.setdefault(c, now) >= self.live.dead_after:  # see master.feeder
                    self._requeue_lost(c)

    def _has_outcome(self, c: int) -> bool:
        return self.spool.result_json(self.run, c).exists() or \
            self.spool.history_json(self.run, c, self.inflight[c].attempt).exists()

    def _requeue_lost(self, c: int) -> None:
        if self._has_outcome(c):
            return  # _collect takes it
        call = self.inflight[c]
        self._untrack(c)
        call.max_attempts += 1  # a lost attempt costs no retry
        self.pending.appendleft(c)

    def _dispatch(self) -> None:
        live = [v for v in self.live.views.values() if v.accepting]
        for view in sorted(live, key=lambda v: len(self.by_agent.get(v.id, ()))):
            if not self.pending:
                return
            room = self.ex.depth - len(self.by_agent.get(view.id, ()))
            if room > 0:
                self._fill(view.id, room)

    def _fill(self, agent: str, room: int) -> None:
        taken: list[tuple[_Call, Job]] = []
        while self.pending and len(taken) < room:
            call = self.ex._calls[self.pending.popleft()]
            if not (call.future.running() or call.future.set_running_or_notify_cancel()):
                continue  # cancelled before it was sent
            call.attempt += 1
            taken.append((call, self._job(call)))
        if not taken:
            return
        try:
            Mailbox(self.spool, agent).update(lambda jobs: jobs + [j for _, j in taken], wait=HOLD_LIMIT)
        except OSError as e:  # e.g. its lock held by a frozen process: the calls wait for the next pass
            logger.warning("could not queue calls for {}: {}", agent, e)
            for call, _ in reversed(taken):
                call.attempt -= 1
                self.pending.appendleft(call.chunk)
            return
        for call, _ in taken:
            call.agent = agent
            self.inflight[call.chunk] = call
            self.by_agent.setdefault(agent, set()).add(call.chunk)

    def _job(self, call: _Call) -> Job:
        return Job(run=self.run, chunk_id=call.chunk, total_chunks=max(self.spec_chunks, call.chunk + 1),
                   kind=JobKind.CALLABLE, target=call.target, attempt=call.attempt, max_attempts=call.max_attempts,
                   kwargs=call.kwargs, timeout=self.ex.timeout, workdir=call.workdir, submitted_at=time.time(),
                   alone=call.chunk in self.isolated)


def _end(future: futures.Future, exc: BaseException) -> None:
    """Cancel a call not yet sent, fail one that was: either way its waiters wake."""
    if future.cancel():
        try:
            future.set_running_or_notify_cancel()
        except RuntimeError:  # already notified
            pass
    elif not future.done():
        future.set_exception(exc)
