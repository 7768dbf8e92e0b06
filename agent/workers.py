"""The agent's worker processes: one per run it serves, and a spare made ready ahead of need.

A worker process serves one run (``run_key``: its name and epoch, so a run started afresh with
``--fresh`` is another run). It imports that run's code, loads its ``--shared`` data, calls its
``--setup`` once and keeps what the chunks build (a model on the GPU) from chunk to chunk; no
chunk of another run ever computes in it (issue 22: a warm process reused across runs computed
new runs with the previous run's code, model and settings, silently). It is started with the
run's ``--env`` in its environment, so that libraries read them when they are imported. Within
a run it stays warm unless a source file its chunks imported changes (``agent.sources``: the
worker then asks for a fresh one before its next chunk).

At most ``keep`` runs' workers live at once (``--run-workers``, default 2: two runs that share
the agent by weight keep their models loaded instead of loading them again at every switch; an
out-of-memory failure while another run's worker is alive stops that one and runs the job again,
see ``agent.runner``). Past ``keep``, the worker used longest ago is stopped. A worker is also
stopped, giving its GPU memory back, as soon as its run is over (sealed or cancelled) or after
``IDLE_S`` with nothing of its run queued here (``retire``).

The spare: a worker process started before any run needs it, which imports the libraries that
this agent's runs imported lately (their top-level names, as the workers report them; never the
user's own code) and then waits. A run without ``--env`` of its own takes it, so that a run
boundary costs neither the interpreter's start nor ``import torch``. The next spare is started
as soon as the run's first job is on its way (``busy``), or when the agent has been dry since a
wait, at idle CPU priority (SCHED_IDLE) where the system lets it back to the normal one when it
is taken (root, or an RLIMIT_NICE that allows it): its imports use only cores nothing else
wants, so runs fed back to back each find one ready. A stopped worker's shutdown runs at that
priority too. On its first job the spare checks that the run's folder has no module of a name it
preloaded (a user's own ``utils.py`` beside a preloaded ``utils``); if it has, it asks for a
worker started cold, as every worker of that run then is. Every worker is a fresh interpreter
(``subprocess``, never a fork), so CUDA is only ever initialised in the process that uses it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Protocol

from gpupool.jobs.logsetup import logger

from gpupool.agent.worker_control import Worker
from gpupool.jobs.descriptor import Job

RunKey = tuple[str, "str | None"]
IDLE_S = 300.0  # a run's worker with nothing of its run queued here is stopped after this long
STOP_S = 5.0  # a stopped worker has this long to exit at the end of its input, then it is killed
MAX_LIBS = 48  # library names a spare preloads at most (the most recently used)


def run_key(job: Job) -> RunKey:
    """What a worker serves: the run, and its epoch (``--fresh`` makes another)."""
    return (job.run, job.epoch)


class WorkerLike(Protocol):  # agent.worker_control.Worker, or a test's double
    pid: int | None
    preload: tuple[str, ...]
    sent: int

    def start(self) -> None: ...
    def close(self) -> None: ...
    def done(self) -> bool: ...
    def stop(self) -> None: ...
    def kill(self) -> None: ...
    def alive(self) -> bool: ...
    def idle_priority(self, idle: bool) -> bool: ...


MakeWorker = Callable[[dict[str, str], tuple[str, ...]], WorkerLike]


class Workers:
    """The workers of one agent, by run (see the module)."""

    def __init__(self, env: Callable[[], dict[str, str]], log_path: Path, keep: int = 2, spare: bool = True,
                 make: MakeWorker | None = None, clock: Callable[[], float] = time.monotonic,
                 name: str = "agent") -> None:
        self.env = env  # every worker's environment, asked for when one starts (a run's --env goes over it)
        self.keep, self.use_spare, self.clock, self.name = max(1, keep), spare, clock, name
        self.make: MakeWorker = make or (lambda env, preload: Worker(env, log_path, preload=preload))
        self.live: dict[RunKey, WorkerLike] = {}  # used longest ago first
        self.used: dict[RunKey, float] = {}  # when each was last handed a job
        self.spare: WorkerLike | None = None
        self.libs: dict[str, None] = {}  # library names recent runs imported, oldest first
        self.cold: set[RunKey] = set()  # runs whose folder shadows a preloaded name: never the spare
        self.current: WorkerLike | None = None  # the worker of the latest job
        self.stopping: list[tuple[WorkerLike, float]] = []  # stopped, not yet gone: (worker, kill it after)
        self._due = False  # the spare was taken (or dropped): the next one starts once a job is on its way
        self._idle_ok = True  # spares start at idle CPU priority, unless the system refuses to lift it
        self._idle_checked = False

    def start(self) -> None:
        """Make the spare ready (the agent's first run takes it)."""
        self._refill()

    def get(self, job: Job) -> WorkerLike:
        """The worker of ``job``'s run, started (or taken from the spare) if it has none."""
        key = run_key(job)
        if self.stopping:
            self.reap()
        worker = self.live.pop(key, None)
        if worker is None:
            worker = self._new(key, job.env)
        self.live[key] = worker
        self.used[key] = self.clock()
        self.current = worker
        return worker

    def busy(self) -> None:
        """A job was just handed to its worker: the moment to start the spare, if one is due
        (the agent only waits now, and the spare starts at idle priority)."""
        if self._due:
            self._refill()

    def of(self, job: Job) -> WorkerLike | None:
        return self.live.get(run_key(job))

    def _new(self, key: RunKey, env: dict[str, str] | None) -> WorkerLike:
        while len(self.live) >= self.keep:
            self.stop(next(iter(self.live)), f"it keeps at most {self.keep} runs' workers (--run-workers)")
        spare = self.spare
        if spare is not None and not env and key not in self.cold and spare.alive() \
                and (not self._idle_ok or spare.idle_priority(False)):  # a run's worker at the normal priority
            self.spare, self._due = None, True
            return spare
        worker = self.make({**self.env(), **(env or {})}, ())
        worker.start()
        return worker

    def _refill(self) -> None:
        """Start a spare with the libraries recent runs imported, unless there is one already."""
        self._due = False
        if self.use_spare and self.spare is None:
            self.spare = self.make(self.env(), tuple(self.libs))
            self.spare.start()
            if self._idle_ok and not self._lowered(self.spare):
                self._refill()

    def _lowered(self, spare: WorkerLike) -> bool:
        """Put ``spare`` at idle priority. The first time, check that it can be lifted again: if
        not (an unprivileged user, RLIMIT_NICE), spares stay at the normal priority from then on
        and this one, stuck, is killed (False)."""
        if self._idle_checked:
            return spare.idle_priority(True) or True
        self._idle_checked = True
        lowered = spare.idle_priority(True)
        if lowered and spare.idle_priority(False):
            return spare.idle_priority(True) or True
        self._idle_ok = False
        logger.info("{}: spare workers start at the normal CPU priority (SCHED_IDLE {})", self.name,
                    "could not be lifted again" if lowered else "is refused")
        if not lowered:
            return True
        spare.kill()
        self.spare = None
        return False

    def learn(self, libs: list[str]) -> None:
        """A worker imported these libraries: the spare preloads them from now on (a spare that
        lacks some is stopped, and the next one started as any is; it has run nothing)."""
        for name in libs:
            self.libs.pop(name, None)
            self.libs[name] = None
        while len(self.libs) > MAX_LIBS:
            self.libs.pop(next(iter(self.libs)))
        if self.spare is not None and not set(self.libs) <= set(self.spare.preload):
            self.spare.kill()
            self.spare, self._due = None, True

    def discard(self, job: Job, cold: bool = False) -> None:
        """``job``'s run's worker is done for (it died, was killed or exits on its own): the next
        job of the run gets a fresh one, started cold if ``cold``."""
        key = run_key(job)
        if cold:
            self.cold.add(key)
        worker = self._take_out(key)
        if worker is not None:
            worker.stop()

    def stop(self, key: RunKey, why: str, wait: bool = False) -> None:
        """Stop the worker of run ``key``: its pipe is closed and it exits at the end of its input
        (what it holds is given back as it exits; its interpreter's shutdown is not waited for,
        unless ``wait``: ``reap`` makes sure it is gone)."""
        worker = self._take_out(key)
        if worker is None:
            return
        logger.info("{}: the worker of run {} (pid {}) stopped: {}", self.name, key[0], worker.pid, why)
        if wait:
            worker.stop()
        else:  # its shutdown on cores nothing else wants (the next run's chunks run meanwhile)
            worker.idle_priority(True)
            worker.close()
            self.stopping.append((worker, self.clock() + STOP_S))

    def _take_out(self, key: RunKey) -> WorkerLike | None:
        """Run ``key``'s worker, no longer one of the live ones (None if it had none)."""
        worker = self.live.pop(key, None)
        self.used.pop(key, None)
        if worker is not None and worker is self.current:
            self.current = None
        return worker

    def reap(self) -> None:
        """Forget the stopped workers that have exited; kill those that are still there after ``STOP_S``."""
        now, left = self.clock(), []
        for worker, deadline in self.stopping:
            if worker.done() or now >= deadline:
                worker.kill()  # reaps it, closes its pipes; kills what it left in its process group
            else:
                left.append((worker, deadline))
        self.stopping = left

    def others(self, job: Job) -> list[RunKey]:
        """The runs other than ``job``'s that have a live worker here."""
        key = run_key(job)
        return [k for k in self.live if k != key]

    def retire(self, over: Callable[[str], bool], queued: set[RunKey]) -> None:
        """Stop the workers of runs that are ``over`` (sealed, cancelled), and of runs with nothing
        ``queued`` here for ``IDLE_S``."""
        self.reap()
        now = self.clock()
        for key in list(self.live):
            if key in queued:  # idle time counts from when its run last had nothing queued here
                self.used[key] = now
                continue
            if over(key[0]):
                self.stop(key, "its run is over")
            elif now - self.used[key] > IDLE_S:
                self.stop(key, f"nothing of its run came for {IDLE_S:g} s")

    def idle(self) -> None:
        """The agent ran dry: start the spare if there is none."""
        if self.spare is not None and not self.spare.alive():  # it died before any job: its preloads may be why
            logger.warning("{}: its spare worker (pid {}) died while it waited; the next one preloads nothing",
                           self.name, self.spare.pid)
            self.spare.stop()
            self.spare = None
            self.libs.clear()
        self._refill()

    def pids(self) -> list[int]:
        workers = (*self.live.values(), self.spare, *(w for w, _ in self.stopping))
        return [w.pid for w in workers if w is not None and w.pid is not None]

    def stop_all(self) -> None:
        for key in list(self.live):
            self.stop(key, "the agent stops")
        for worker, _ in self.stopping:
            worker.stop()
        self.stopping = []
        if self.spare is not None:
            self.spare.kill()  # it has run nothing: no teardown to wait for
            self.spare = None
