"""The agent: holds one GPU (or CPU rank) and runs the jobs of its mailbox, one after another.

``step()`` runs at most one job; ``run()`` owns the loop, the stop flags and the waiting.
A job leaves the mailbox only after its result is committed (or found committed).

Pipelining: while the worker runs a job, the next callable job of the mailbox already waits in
its pipe, so it starts the moment the previous one ends and runs while the agent commits the
previous result. The price: a kill of the agent can cost two re-runs (the running chunk and the
one whose result was being committed), and a job already handed over runs even if the agent
is told to drain (the heartbeat lists it as ``ahead``, so masters leave it); on a graceful stop
the worker is killed instead and that job stays queued.

A fresh worker (``_replace_worker``) before the next job: when a failed job left the worker's
CUDA context unusable (its error says ``poisoned``; the job sent ahead is sent again, to the
fresh worker), and to give GPU memory back (``_recycle_reason``): when the next job is of another
run with another task module and the runs the worker served have nothing left queued here, and
after ``--max-jobs-per-worker`` jobs. A job that would need a fresh worker is never sent ahead.

A GPU agent whose chunks keep failing with errors that are not their own (``_gpu_fault``:
driver-level CUDA errors; out of memory, or a context found unusable after a job's other
error, in a worker that had run nothing before) drains itself after ``gpu_fault_limit``
different chunks in a row (``_drain_self``), so that masters hand its jobs to other agents.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from loguru import logger

from agent.beat import Beat
from agent.command import run_command
from agent.fairshare import FairShare
from agent.gpu import Gpu, NoGpu
from agent.script import run_script
from agent.gpumem import MemoryGate
from agent.identity import agent_id
from agent.slot import Slot, gpu_lock_dir, label
from agent.watcher import MailboxWatcher
from agent.worker_control import Worker, WorkerLost, agent_marks, has_marks, kill_leftovers
from jobs.descriptor import SCHEMA as JOB_SCHEMA, Job, JobKind, JobState
from jobs.atomic import purge_temp, read_bounded, server_now
from jobs.errors import BadFile
from jobs.heartbeat import AgentState, Heartbeat, read_status
from jobs.jsonio import load_json
from jobs.mailbox import HOLD_LIMIT, Mailbox, Snapshot
from jobs.paths import Spool
from jobs.losses import death_suspects
from jobs.results import Uncommittable, commit, has_outcome, read_epoch, record


@dataclass
class AgentConfig:
    watch: str = "auto"
    poll_interval: float = 0.5
    max_poll_interval: float = 1.0
    rescan: float = 2.0  # reread the mailbox at least this often, whatever the watcher says
    heartbeat: float = 2.0
    burst: bool = False  # exit once the mailbox is empty (tests, batch use)
    log_limit: int = 64 * 1024 * 1024  # each of the agent's logs is cut (to <name>.1) past this; 0: never
    prune_quiet: float = 30.0  # prune finished jobs only from a mailbox seen unchanged this long (see _prune)
    max_jobs_per_worker: int = 0  # a fresh worker process after this many jobs; 0: never
    gpu_fault_limit: int = 3  # drain after this many different chunks in a row failed with GPU faults; 0: never


PIPELINE_MAX_S = 0.5  # pipeline the next job only after chunks of a run that took at most this long
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # a result that fails with these pauses the agent, costs no attempt
MEMORY_RECHECK_S = 0.25  # how often a job waiting for its --gpu-mem looks at the GPU's free memory again
RESTART_DEFER_S = 30.0  # a restarted agent leaves the jobs its former process died under this long


class Agent:
    def __init__(self, spool: Spool, slot: Slot, probe: NoGpu, host: str, cfg: AgentConfig,
                 worker: Worker | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.spool, self.slot, self.probe, self.host, self.cfg = spool, slot, probe, host, cfg
        self.clock = clock  # every wait and deadline of the job loop (step tests pass a fake one)
        self.id = slot.agent_id
        self.mailbox = Mailbox(spool, self.id, clock)
        self.watcher = MailboxWatcher(self.mailbox.path, cfg.watch, cfg.poll_interval, cfg.max_poll_interval)
        # The job code sees only this agent's GPU; CUDA counts in PCI bus order like NVML.
        # GPUPOOL_AGENT and GPUPOOL_SPOOL also mark what jobs start, for kill_leftovers at a restart.
        self.marks = agent_marks(self.id, str(spool.base))
        base_env = {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", **self.marks}
        # Several GPUs (--gpus-per-agent): their UUIDs, so the job sees them as cuda:0..k-1. MPS, where the
        # host runs it, is used as CUDA uses it: CUDA_MPS_PIPE_DIRECTORY passes through with the rest.
        worker_env = {**base_env, "CUDA_VISIBLE_DEVICES": slot.visible}
        self.command_env = worker_env  # command jobs see this agent's GPU only, as callables do
        # scripts get the agent's own view, as OctoRun gives them, with --gpu_id its GPU; an agent holding
        # several GPUs narrows theirs too (no OctoRun script expects several), --gpu_id 0 the first of them
        self.script_env = base_env if len(slot.gpus) <= 1 else worker_env
        self._narrowed_env = worker_env  # a script under --visible-gpu-id: --gpu_id 0 must be its GPU
        self.worker = worker or Worker(worker_env, spool.worker_log(self.id))
        self.stop = False  # finish the current job, then exit
        self.stop_now = False  # stop at once
        self.state = AgentState.STARTING
        self.current: tuple[Job, float] | None = None
        self._finished: set[tuple] = set()  # Job.uid of the dispatches finished (or dropped) here
        self._ahead: Job | None = None  # sent to the worker before its turn (pipelining)
        self._epochs: dict[str, tuple[tuple[int, int, int], str | None]] = {}  # run -> (file signature, epoch)
        self._durations: dict[str, float] = {}  # run -> how long its last chunk here took
        self.share = FairShare()  # which run's job next, when the mailbox holds several runs
        self._dry = True  # nothing to run at the last look: the next job's arrival is a lag sample
        self._next_lag_sample = 0.0
        self.mailbox_lag: float | None = None  # seconds a refill took to reach this agent (see _sample_lag)
        self.done = self.failed = 0
        self.beat = Beat(spool, self.id, self._heartbeat, cfg.heartbeat,
                         (spool.agent_log(self.id), spool.worker_log(self.id)), cfg.log_limit)
        self.started_at = time.time()
        self.pause_until = 0.0  # after an I/O error (disk full): no job before this (monotonic)
        self._io_backoff = 0.0
        self.last_error: str | None = None
        self._deferred: set[tuple] = set()  # Job.uid of the jobs a former process of this agent died under
        self._defer_until = 0.0
        self.died_under: list[dict[str, Any]] = []  # what the former process may have died under (heartbeat)
        self._gpu_error: str | None = None  # the GPU stopped answering NVML (see _gpu_metrics)
        # What the current worker process was sent (see _worker_seen): its identity, how many
        # jobs, the task module of each run; the jobs that were the first of their process.
        self._wid: tuple | None = None
        self._wsent = 0
        self._wruns: dict[str, str] = {}
        self._first_of_worker: set[tuple] = set()
        self._faults: dict[tuple[str, int], str] = {}  # (run, chunk) -> GPU fault, of the failures in a row
        self._drained_why: str | None = None  # set when this agent drained itself
        siblings = {j: agent_id(host, label(slot.gpus, j)) for j in range(slot.slots)} if slot.slot is not None else {}
        self.memory = MemoryGate(probe, slot.gpus, self.id, str(spool.base), slot.slot, siblings,
                                 gpu_lock_dir() if slot.slot is not None else None)  # --gpu-mem
        self.waiting: str | None = None  # why the next job waits (its --gpu-mem is not free), for the heartbeat

    # lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        purge_temp([self.spool.pool_dir, self.spool.pool_tmp_dir, self.spool.agents_dir])  # killed writers' leftovers
        self.mailbox.ensure()
        # after a death only (a graceful stop kills its worker's group, and leaves what a job
        # detached on purpose alone): no /proc scan at every start
        leftovers = kill_leftovers(self.marks) if self._defer_what_killed_the_last_one() else []
        if leftovers:
            logger.warning("agent {}: killed {} process(es) that jobs of its former process had started and left "
                           "running (pids {})", self.id, len(leftovers), leftovers[:10])
        self.memory.release(always=True)  # a promise a killed former process of this slot left
        self.watcher.start()
        self.worker.start()
        self.state = AgentState.IDLE
        self.beat.write()  # the launcher waits for this to call the agent ready
        self.beat.start()
        logger.info("agent {} ready: base={} device={} gpu={} watch={} pid={}", self.id, self.spool.base,
                    self.slot.device, " + ".join(g.describe() for g in self.slot.gpus) or None, self.watcher.mode,
                    os.getpid())

    def _defer_what_killed_the_last_one(self) -> bool:
        """A supervisor restarts a dead agent within a second, and the job its former process was
        running may be what killed it. The suspects: the open jobs (no outcome yet) the former
        heartbeat names (running, or in the worker's pipe) or, where it names none (it died before
        a heartbeat showed its job), the first open jobs of the mailbox (``death_suspects``, a
        master's rule for a dead agent). They are left alone for ``RESTART_DEFER_S`` and the
        heartbeat names them (``died_under``): masters see the restart (``master.liveness``) and
        take them back under their loss rules, so a crash loop ends; if none does (no master is
        running), they run afterwards, alone. True if the former process died (did not stop)."""
        try:
            prev = read_status(self.spool.heartbeat(self.id))
        except (OSError, BadFile):
            return False
        if prev.pid == os.getpid() or prev.state in (AgentState.STOPPING.value, AgentState.STOPPED.value):
            return False
        try:
            jobs = self.mailbox.read().jobs
        except (OSError, BadFile):
            return True
        named = {(b.get("run"), b.get("chunk_id"), b.get("attempt")) for b in (prev.current, prev.ahead)
                 if isinstance(b, dict)}
        open_jobs = [j for j in jobs if not has_outcome(self.spool, j.key, j.max_attempts)]
        suspects = [j for j in open_jobs if j.key in named] or death_suspects(open_jobs)
        if not suspects:
            return True
        self._deferred = {j.uid for j in suspects}
        self._defer_until = self.clock() + RESTART_DEFER_S
        self.died_under = [{"run": j.run, "chunk_id": j.chunk_id, "attempt": j.attempt} for j in suspects]
        logger.warning("agent {}: its former process {} died while running {}{}; left alone for {:g} s for a master "
                       "to judge", self.id, prev.pid, "" if len(suspects) == 1 else "one of ",
                       ", ".join(f"{j.run} chunk {j.chunk_id} attempt {j.attempt}" for j in suspects), RESTART_DEFER_S)
        return True

    def shutdown(self) -> None:
        """Every step is tried whatever the others do (a full disk, a lost GPU): the worker is always
        stopped and the GPU and agent locks always released."""
        for step in (lambda: self._set_state(AgentState.STOPPING), self.watcher.stop, self.worker.stop,
                     self.beat.stop, lambda: self._set_state(AgentState.STOPPED), self.slot.release):
            try:
                step()
            except Exception:
                logger.exception("agent {}: a step of its shutdown failed; going on with the others", self.id)
        logger.info("agent {} stopped after {} ok / {} failed jobs", self.id, self.done, self.failed)

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only flags and a kick here: logging from a signal handler can deadlock.
        if self.stop:
            self.stop_now = True
        self.stop = True
        self.watcher.kick()

    def run(self) -> None:
        self.start()
        try:
            while not self.stop:
                try:
                    worked = self.step()
                except Exception:  # the loop edge: log, back off, carry on
                    logger.exception("agent {}: unexpected error in the job loop", self.id)
                    worked = False
                    time.sleep(min(self.cfg.rescan, 1.0))
                if worked:
                    continue  # the mailbox is read again at once: the watch rests (see _execute)
                if self.cfg.burst:
                    break
                if not self.stop:  # a job waiting for GPU memory (--gpu-mem) looks again soon
                    self.watcher.wait(min(self.cfg.rescan, MEMORY_RECHECK_S) if self.waiting else self.cfg.rescan)
            if self._ahead is not None:  # handed over, not started by us: it stays queued for later
                logger.info("agent {}: stopping; {} chunk {} stays queued", self.id, self._ahead.run,
                            self._ahead.chunk_id)
                self.worker.kill()
                self._ahead = None
        finally:
            self.shutdown()

    # one iteration -------------------------------------------------------------------------
    def step(self) -> bool:
        """Run the first job of the mailbox that is not finished here. True if it did work.

        Finished jobs are not removed one by one (a file rewrite per job): the master prunes
        them when it refills the mailbox, and the agent prunes them itself when it runs dry.
        """
        if self._ahead is not None:  # handed to the worker while the last one was committed: it runs
            job = self._ahead
            if self._execute(job, self._next_callable(self._read().jobs, job)):
                self._finished.add(job.uid)
            return True
        if self._gpu_error is not None and self._drained_why is None:  # not drained yet: now
            self._drain_self(f"drained itself: its GPU does not answer ({self._gpu_error}). Check it (nvidia-smi), "
                             f"then: python -m master undrain --base {self.spool.base} {self.id}")
        if self._draining() or self.clock() < self.pause_until:
            return False
        jobs = self._read().jobs
        if len(self._finished) > 2 * len(jobs) + 64:  # masters prune the mailbox: forget what left it
            self._finished = {j.uid for j in jobs if j.uid in self._finished}
        leave = self._finished | self._deferred if self._deferred and self.clock() < self._defer_until \
            else self._finished
        job = self.share.choose(jobs, leave)
        if job is None and not self._dry and self.mailbox.refresh():
            # just ran dry: a network filesystem's client may still show an older mailbox; listed
            # afresh (jobs.fsinfo.NameRefresh), it shows a refill that is there already
            jobs = self._read().jobs
            job = self.share.choose(jobs, leave)
        if job is None:
            self.waiting = None
            if not self._dry:  # just ran dry: status says idle, with the jobs done, now rather than a beat later
                self._dry = True
                self.beat.quietly()
            if jobs:
                self._prune()
            return False
        if self._dry:
            self._sample_lag()
        skip = self._skip_reason(job)
        if skip is not None:
            logger.info("{} chunk {} attempt {}: dropped: {}", job.run, job.chunk_id, job.attempt, skip)
            self._finished.add(job.uid)
        else:
            if job.gpu_mem is not None and not self._memory_for(job):
                return False
            why = self._recycle_reason(job, jobs)
            if why is not None:
                self._replace_worker(f"recycled: {why}")
            try:
                if self._execute(job, self._next_callable(jobs, job)):
                    self._finished.add(job.uid)
            finally:
                self.memory.release()
        return True

    def _memory_for(self, job: Job) -> bool:
        """Promise the job the GPU memory it declares (--gpu-mem), if free now (``agent.gpumem``);
        else it waits, its reason in the heartbeat (``waiting``) and said once in the log."""
        why = None if self.slot.gpu is None else self.memory.reserve(job.gpu_mem)
        if why is None:
            self.waiting = None
            return True
        why = f"{job.run} chunk {job.chunk_id} waits: {why} (--gpu-mem {job.gpu_mem:g})"
        new = why.split(";")[0] != (self.waiting or "").split(";")[0]  # another job, or another GPU
        self.waiting = why
        if new:  # said once; the heartbeat thread keeps the figures fresh
            logger.info("agent {}: {}", self.id, why)
            self.beat.quietly()
        return False

    # the worker process ----------------------------------------------------------------------
    def _worker_seen(self) -> None:
        """Forget what was sent to a worker process that is no longer the current one."""
        wid = (self.worker.pid, getattr(self.worker, "generation", 0))
        if wid != self._wid:
            self._wid, self._wsent, self._wruns = wid, 0, {}

    def _send(self, job: Job) -> bool:
        """Queue ``job`` in the worker's pipe, noting what the worker process was sent."""
        if not self.worker.send(self._request(job)):
            return False
        self._worker_seen()  # after the send: it starts a fresh process if the last one died idle
        if self._wsent == 0:
            self._first_of_worker.add(job.uid)
        self._wsent += 1
        if len(self._wruns) >= 64 and job.run not in self._wruns:  # one worker may serve runs for weeks
            self._wruns.pop(next(iter(self._wruns)))
        self._wruns[job.run] = module_of(job)
        return True

    def _may_send_ahead(self, job: Job) -> bool:
        """Pipelining never hands over a job that ``_recycle_reason`` could want a fresh worker for."""
        self._worker_seen()
        if 0 < self.cfg.max_jobs_per_worker <= self._wsent:
            return False
        return job.run in self._wruns or module_of(job) in self._wruns.values()

    def _recycle_reason(self, job: Job, jobs: list[Job]) -> str | None:
        """Why ``job`` must run in a fresh worker process (GPU memory given back), or None.

        After ``--max-jobs-per-worker`` jobs; and when ``job``'s run is not one the worker served
        and its task module is none of theirs (a finished run's model leaves GPU memory), unless
        one of those runs still has jobs queued here (two runs that share this agent would
        otherwise restart the worker at every switch). Chunks of one run never cause one."""
        if job.kind is not JobKind.CALLABLE:
            return None
        self._worker_seen()
        if not self._wsent:
            return None
        if 0 < self.cfg.max_jobs_per_worker <= self._wsent:
            return f"its worker ran {self._wsent} jobs (--max-jobs-per-worker {self.cfg.max_jobs_per_worker})"
        mod = module_of(job)
        if job.run in self._wruns or mod in self._wruns.values():
            return None
        if any(j.run in self._wruns for j in jobs if j.uid not in self._finished and j.uid != job.uid):
            return None
        return (f"{job.run} runs {mod}; the run(s) its worker served ran "
                f"{', '.join(sorted(set(self._wruns.values())))} and have nothing queued here")

    def _replace_worker(self, why: str, warn: bool = False) -> None:
        """A fresh worker process now. The job sent ahead to the old one (pipelining), which the
        old one never started, is sent to the new one."""
        ahead, old = self._ahead, self.worker.pid
        self._ahead = None
        self.worker.stop()  # a poisoned worker exits after its reply: no wait; a recycled one at end of input
        self.worker.start()
        self._wid = None
        if ahead is not None and self._send(ahead):
            self._ahead = ahead  # else it stays in the mailbox, not finished: it runs next as any job
        (logger.warning if warn else logger.info)(
            "agent {}: {}; worker {} replaced by a fresh one, pid {}{}", self.id, why, old, self.worker.pid,
            f" ({ahead.run} chunk {ahead.chunk_id}, sent ahead, goes to it)" if self._ahead else "")

    def _sample_lag(self) -> None:
        """Work came to an agent that had none: how long after the master wrote it (both times
        by the file server's clock: the mailbox's mtime and a file written now). Through a
        shared filesystem this is the cache delay a refill waits before an agent sees it; the
        heartbeat reports it (``mailbox_lag_s``), so that masters queue enough to cover it."""
        self._dry = False
        now = self.clock()
        if now < self._next_lag_sample or self.mailbox.mtime is None:
            return
        self._next_lag_sample = now + 1.0
        stamp = server_now(self.spool.mailbox_temp_dir() or self.spool.pool_dir)  # a folder no agent watches
        if stamp is not None:
            lag = min(30.0, max(0.0, stamp - self.mailbox.mtime))
            self.mailbox_lag = lag if self.mailbox_lag is None else 0.7 * self.mailbox_lag + 0.3 * lag

    def _next_callable(self, jobs: list[Job], after: Job) -> Job | None:
        """The job to hand the worker while ``after`` runs and is committed (pipelining): the one
        that would run next, if callable. None around a job marked ``alone`` (the master must be
        able to tell which of the two was running if this agent dies), and after a job whose run's
        chunks are long (``PIPELINE_MAX_S``): a job in the worker's pipe can no longer move to an
        idle agent, and the commit it hides is nothing next to a long chunk."""
        last = self._durations.get(after.run)
        if after.alone or after.uid in self._deferred or last is None or last > PIPELINE_MAX_S:
            return None
        nxt = self.share.choose(jobs, self._finished, running=after, expected=last)
        if nxt is None or nxt.kind is not JobKind.CALLABLE or nxt.alone or nxt.uid in self._deferred \
                or nxt.gpu_mem is not None \
                or self._skip_reason(nxt) is not None:
            return None
        return nxt

    def _prune(self) -> None:
        """Remove this agent's finished jobs from its mailbox (each has its outcome on disk), once
        the mailbox has looked the same for ``prune_quiet`` seconds. Through a shared filesystem
        both the mailbox and its lock's write count can read stale for a while after a master's
        refill (about 1 s on GlusterFS), and a prune based on that stale read would drop the new
        jobs (seen: 20 s stalls until the master queued them again as vanished). A master prunes
        its own run's finished jobs whenever it refills, so this only tidies what a finished run left."""
        if self.clock() - self.mailbox.changed_at < self.cfg.prune_quiet:
            return
        done = self._finished
        try:
            self.mailbox.update(lambda jobs: [j for j in jobs if j.uid not in done] if any(j.uid in done for j in jobs)
                                else None, wait=HOLD_LIMIT)
        except TimeoutError as e:  # its lock held by a frozen master: pruned next time (the prune is lazy)
            logger.warning("agent {}: {}", self.id, e)
            return
        self._finished = set()

    def _skip_reason(self, job: Job) -> str | None:
        """Why ``job`` must not run (it is then dropped from the mailbox), or None."""
        if self._cancelled(job.run) is not None:
            return "the run is cancelled"
        if self.spool.result_json(job.run, job.chunk_id).exists():
            return "the chunk already has a committed result"
        try:
            self.spool.run_dirs(job.run)
        except BadFile as e:
            self.spool.reject(job.encode().encode(), self.mailbox.path, str(e))
            return f"rejected: {e}"
        return None

    def _draining(self) -> bool:
        """A drain flag stops new jobs; the heartbeat says so at once (the master then takes
        back what is queued here)."""
        drain = self.spool.drain_flag(self.id).exists()
        if drain != (self.state is AgentState.DRAINING):
            self.state = AgentState.DRAINING if drain else AgentState.IDLE
            logger.info("agent {}: {}", self.id, "draining: no new jobs" if drain else "drain lifted")
            if not drain:  # undrained: GPU faults are counted afresh, and a GPU still lost drains it again
                self._faults.clear()
                self._gpu_error = None
                if self.last_error is not None and self.last_error == self._drained_why:
                    self.last_error = None
                self._drained_why = None
            self.beat.write()
        return drain

    def _cancelled(self, run: str) -> dict | None:
        """The cancel note of ``run`` ({"stop_running": bool}), or None if it is not cancelled."""
        path = self.spool.cancel_flag(run)
        if not path.exists():
            return None
        try:
            note = load_json(read_bounded(path, 4096) or b"{}", "cancel note", path)
            return note if isinstance(note, dict) else {}
        except (OSError, ValueError, BadFile):
            return {}

    def _read(self) -> Snapshot:
        try:
            snap = self.mailbox.read()
        except BadFile:
            self.mailbox.update(lambda jobs: None)  # moves it to rejected/, starts an empty one
            return Snapshot()
        if snap.bad:
            self.mailbox.update(lambda jobs: None)
        return snap

    def _execute(self, job: Job, lookahead: Job | None = None) -> bool:
        """Run ``job`` and record its outcome. False if it was interrupted (it stays queued)."""
        self.watcher.busy()  # nothing needs to wake this agent until it waits again (agent.watcher)
        started = time.time()
        self.current = (job, started)
        self.state = AgentState.BUSY
        if job.alone or job.uid in self._deferred or self._durations.get(job.run, math.inf) > PIPELINE_MAX_S:
            self.beat.quietly()  # named at once: if it kills this agent, the next one must know
        logger.debug("{} chunk {} attempt {}/{}: started", job.run, job.chunk_id, job.attempt, job.max_attempts)
        outcome = self._run_job(job, lookahead)
        first = job.uid in self._first_of_worker
        self._first_of_worker.discard(job.uid)
        self.current = None
        self.state = AgentState.IDLE
        if outcome is None:
            if self._cancelled(job.run) is not None:
                logger.warning("{} chunk {}: killed, the run was cancelled", job.run, job.chunk_id)
                return True
            logger.warning("{} chunk {}: interrupted by a stop; left in the mailbox", job.run, job.chunk_id)
            return False
        fields, arrays_tmp = outcome
        err = fields.get("error")
        if isinstance(err, dict) and err.get("errno") in DISK_FULL:  # the worker's save, or the job's own write
            return self._pause_for_io(job, f"{err.get('type')}: {err.get('message')}")
        current = self._epoch(job.run) if job.epoch is not None else None
        if current is not None and current != job.epoch:
            logger.warning("{} chunk {}: the run was started afresh while it ran; its result is dropped",
                           job.run, job.chunk_id)
            _discard(arrays_tmp)
            return True
        status = JobState.FAILED if "error" in fields else JobState.OK
        # One clock per duration: the worker's own start and end when it reports them (a job sent
        # ahead starts in the worker before this agent gets to it, so this agent's start may be later
        # than the job's end: durations came out negative), else this agent's.
        begun = fields.pop("started_at", None) or started
        finished = fields.pop("finished_at", None) or time.time()
        duration = max(0.0, finished - begun)
        if len(self._durations) > 256 and job.run not in self._durations:  # an agent serves runs for weeks
            self._durations.pop(next(iter(self._durations)))
        self._durations[job.run] = duration
        self.share.served(job, duration)
        rec = record(job, status, agent=self.id, host=self.host, pid=os.getpid(),
                     gpu_id=self.slot.number, device=self.slot.device,
                     **({"gpu_uuids": [g.uuid for g in self.slot.gpus]} if self.slot.gpus else {}),  # what it ran on
                     started_at=begun, finished_at=finished, duration_s=round(duration, 6), **fields)
        try:
            try:
                committed = commit(self.spool, job, rec, Path(arrays_tmp) if arrays_tmp else None)
            except Uncommittable as e:  # too large, too deep: no reader would take it; the attempt fails, once
                _discard(arrays_tmp)
                status = JobState.FAILED
                rec = {**{k: v for k, v in rec.items() if k not in ("value", "error", "arrays_bytes")},
                       "status": status.value, "arrays": None,
                       "error": {"type": type(e).__name__, "message": str(e), "traceback": ""}}
                committed = commit(self.spool, job, rec)
        except OSError as e:  # e.g. disk full: nothing partial is left; retried after a pause
            _discard(arrays_tmp)
            return self._pause_for_io(job, str(e))
        self._io_backoff = 0.0
        if status is JobState.OK:
            self.done += 1
            logger.debug("{} chunk {}: ok in {:.3f} s{}", job.run, job.chunk_id, rec["duration_s"],
                        "" if committed else " (another attempt had already committed)")
        else:
            self.failed += 1
            err = rec["error"]
            logger.warning("{} chunk {} attempt {}: failed: {}: {}", job.run, job.chunk_id, job.attempt,
                           err.get("type"), err.get("message"))
        if job.kind is JobKind.CALLABLE:
            self._count_gpu_fault(job, None if status is JobState.OK else rec["error"], first)
        return True

    # a GPU that keeps failing --------------------------------------------------------------------
    def _gpu_fault(self, err: dict[str, Any], first: bool) -> str | None:
        """The failure as a GPU fault that is not the job's own, or None. Only on a GPU agent (on
        a CPU one, a job that uses CUDA anyway fails by its own doing): a driver-level error
        (``agent.worker_process.DRIVER_ERROR``), or in a worker process that had run nothing before (so
        nothing a job did in it is to blame) out of memory or a context found unusable. A kernel's
        own failure (a device-side assert, an illegal address) is the job's: a run with such a
        bug fails its chunks, each in a fresh worker, but drains no agent."""
        kind = err.get("gpu_error")
        if self.slot.gpu is None or not (kind == "driver" or (first and kind in ("out_of_memory", "context"))):
            return None
        text = f"{err.get('type')}: {str(err.get('message') or '').strip()}"
        return text.splitlines()[0][:300] if text else kind

    def _count_gpu_fault(self, job: Job, err: dict[str, Any] | None, first: bool) -> None:
        """A callable job's outcome in the count of GPU faults in a row: a success or the job's
        own error ends it; a death or a time-out leaves it as it is (either may be the GPU's)."""
        fault = None if err is None else self._gpu_fault(err, first)
        if fault is None:
            if err is None or err.get("type") not in ("Timeout", "WorkerDied"):
                self._faults.clear()
            return
        self._faults.pop((job.run, job.chunk_id), None)
        self._faults[(job.run, job.chunk_id)] = fault  # a chunk counts once, however often it failed
        if 0 < self.cfg.gpu_fault_limit <= len(self._faults):
            self._drain_self()

    def _drain_self(self, why: str | None = None) -> None:
        """Set this agent's drain flag (``python -m master undrain`` lifts it) and say why in the
        heartbeat's ``last_error``: masters hand its queued jobs to other agents. ``why``: the
        GPU's faults in a row (``_count_gpu_fault``) when not given."""
        if why is None:
            chunks = ", ".join(f"{run} chunk {c}" for run, c in self._faults)
            why = (f"drained itself: {len(self._faults)} different chunks in a row failed with GPU errors that are "
                   f"not their own ({chunks}); the last: {list(self._faults.values())[-1]}. Check the GPU "
                   f"(nvidia-smi), then: python -m master undrain --base {self.spool.base} {self.id}")
        self._faults.clear()
        self._drained_why = self.last_error = f"{time.strftime('%H:%M:%S')} {why}"
        logger.error("agent {}: {}", self.id, why)
        note = {"by": f"{socket.gethostname()}:{os.getpid()}", "at": time.time(), "agent": self.id, "why": why}
        try:
            self.spool.write_over(self.spool.drain_flag(self.id), json.dumps(note).encode(), "flag")
        except OSError as e:
            logger.error("agent {}: cannot write its drain flag ({}); it goes on taking jobs", self.id, e)
            return
        if self._ahead is not None:  # not run on this GPU either: it stays queued, and masters take it back
            logger.info("agent {}: {} chunk {} was sent ahead to its worker; taken back", self.id, self._ahead.run,
                        self._ahead.chunk_id)
            self.worker.kill()  # a fresh one is started when a job comes again (after an undrain)
            self._ahead = None
        self._draining()  # says "draining" in the heartbeat at once

    def _pause_for_io(self, job: Job, error: str) -> bool:
        """A result could not be written (a full disk, most often): nothing of the attempt is
        kept and it costs no attempt; the job stays queued and no job starts here for a while
        (0.5 s, doubling up to 30 s while it goes on). False, as for an interrupted job."""
        self._io_backoff = min(30.0, max(0.5, self._io_backoff * 2))
        self.pause_until = self.clock() + self._io_backoff
        self.last_error = f"{time.strftime('%H:%M:%S')} cannot write the result of {job.run} chunk {job.chunk_id}: {error}"
        logger.error("{}; the job stays queued, next try in {:.1f} s", self.last_error, self._io_backoff)
        return False

    def _epoch(self, run: str) -> str | None:
        """The run's current epoch (None if it has none), reread only when its file changed."""
        try:
            st = os.stat(self.spool.run_epoch(run))
        except OSError:
            return None
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        hit = self._epochs.get(run)
        if hit is None or hit[0] != sig:
            hit = self._epochs[run] = (sig, read_epoch(self.spool, run))
        return hit[1]

    def _request(self, job: Job) -> dict[str, Any]:
        return {"job": job.to_dict(), "gpu_id": self.slot.number, "device": self.slot.device,
                "arrays_path": str(self.spool.result_npz(job.run, job.chunk_id, job.attempt))}

    def _run_job(self, job: Job, lookahead: Job | None = None) -> tuple[dict[str, Any], str | None] | None:
        """(result fields, temp arrays path) or None if interrupted by an immediate stop."""
        def abort() -> bool:  # polled a few times a second while the job runs
            return self.stop_now or bool((self._cancelled(job.run) or {}).get("stop_running"))

        if job.gpus is not None and job.gpus != len(self.slot.gpus):  # a master placed it wrongly: not run here
            return {"error": {"type": "WrongAgent", "message": f"the job needs {job.gpus} GPU(s) (--gpus-per-job) "
                              f"and agent {self.id} holds {len(self.slot.gpus)}", "traceback": ""}}, None
        if job.kind in (JobKind.SCRIPT, JobKind.COMMAND):
            log = self.spool.chunk_log(job.run, job.chunk_id)
            try:
                visible = job.visible_gpu_id and self.slot.gpu is not None
                gpu_id = 0 if visible else self.slot.number
                if job.kind is JobKind.SCRIPT:  # on an agent of several GPUs, or under --visible-gpu-id, it sees
                    narrowed = visible or len(self.slot.gpus) > 1  # only the agent's: its --gpu_id 0 is the first
                    err = run_script(job, 0 if narrowed else gpu_id, self._narrowed_env if narrowed else self.script_env,
                                     log, abort)
                    fields = {"log": str(log)} if err is None else {"log": str(log), "error": err}
                else:
                    fields = run_command(job, gpu_id, self.slot.device, self.command_env, log, abort)
                    err = fields.get("error")
            except OSError as e:  # its log cannot be made or written (a full disk?)
                return {"error": {"type": type(e).__name__, "message": f"cannot start the {job.kind.value}: {e}",
                                  "traceback": "", "errno": e.errno}}, None
            if err is not None and (err["type"] == "Stopped" or (self.stop and "SIGTERM" in err["message"])):
                return None  # stopped with the agent (e.g. Slurm's SIGTERM to the whole step): stays queued
            return fields, None
        try:
            if self._ahead is not None and self._ahead.uid == job.uid:
                self._ahead = None  # its request is already in the worker's pipe
            elif not self._send(job):
                raise self.worker.lost()
            if lookahead is not None and not (self.stop or self.spool.drain_flag(self.id).exists()) \
                    and self._may_send_ahead(lookahead):
                # Pipelining: the next job waits in the worker's pipe and starts the moment this one
                # ends, while the agent commits this one's result (not queued if the worker died).
                if self._send(lookahead):
                    self._ahead = lookahead
            reply = self.worker.receive(job.timeout, abort)
        except TimeoutError as e:
            self._ahead = None  # killed with the worker; it is still in the mailbox
            self.worker.start()  # a fresh worker at once, so the next job finds it warm
            return {"error": {"type": "Timeout", "message": str(e), "traceback": ""}}, None
        except WorkerLost as e:
            self._ahead = None
            if abort():
                return None
            logger.warning("agent {}: {} while running {} chunk {}; starting a fresh worker",
                           self.id, e.reason, job.run, job.chunk_id)
            self.worker.start()
            return {"error": {"type": "WorkerDied", "message": e.reason, "traceback": e.output}}, None
        times = {"started_at": reply.get("started_at"), "finished_at": reply.get("finished_at")}
        if not reply.get("ok"):
            err = reply.get("error")
            if isinstance(err, dict) and err.get("poisoned"):  # the worker exits after this reply
                self._replace_worker(f"CUDA context unusable after {job.run} chunk {job.chunk_id} "
                                     f"({err['poisoned']})", warn=True)
            return {**times, "error": err}, None
        tmp = reply.get("arrays_tmp")
        arrays = {"arrays": self.spool.result_npz(job.run, job.chunk_id, job.attempt).name,
                  "arrays_bytes": os.stat(tmp).st_size} \
            if tmp else {"arrays": None}
        if tmp and reply.get("arrays_form") in ("tuple", "list"):  # returned as a sequence (arr_0, arr_1, ...)
            arrays["arrays_form"] = reply["arrays_form"]
        return {**times, "value": reply.get("value"), **arrays}, tmp

    # heartbeat -----------------------------------------------------------------------------
    def _set_state(self, state: AgentState) -> None:
        self.state = state
        self.beat.write()

    def _reported_state(self) -> AgentState:
        """A busy agent with a drain flag says 'draining' at once, so that masters take its
        queued jobs back without waiting for the running chunk to end."""
        if self.state is AgentState.BUSY and self.spool.drain_flag(self.id).exists():
            return AgentState.DRAINING
        return self.state

    def _gpu_metrics(self) -> list[dict[str, Any]]:
        """Each GPU's figures for the heartbeat; a GPU that does not answer (lost, its driver gone)
        gives ``{"error": ...}``, said once in the log, and the agent drains itself (``step``):
        the heartbeat goes on, so masters see the drain and take its queued jobs back."""
        try:
            return [{**self.probe.metrics(g), "worker_mem": self._worker_gpu_memory(g)} for g in self.slot.gpus]
        except Exception as e:  # NVMLError_GpuIsLost and friends
            error = f"{type(e).__name__}: {e}"
            if self._gpu_error is None:
                logger.error("agent {}: its GPU does not answer: {}", self.id, error)
                self._gpu_error = error
            return [{"error": error}]

    def _worker_gpu_memory(self, gpu: Gpu) -> int | None:
        """Bytes of ``gpu``'s memory this agent's jobs hold: its worker process and the processes
        carrying its marks (command and script jobs, what they fork), NVML's per-process figures (0
        if they hold none), or None when NVML cannot say: per-process figures not supported, or
        NVML's pids are of another pid namespace (an agent in a container: NVML's pids are the host's)."""
        try:
            procs = self.probe.processes(gpu)
        except Exception:
            return None
        if procs is None:
            return None
        mine = [mem for pid, mem in procs if pid == self.worker.pid or has_marks(pid, self.marks)]
        if mine:
            return None if any(m is None for m in mine) else sum(mine)
        return 0 if all(os.path.exists(f"/proc/{pid}") for pid, _ in procs) else None

    def _heartbeat(self, seq: int) -> Heartbeat:
        """What the heartbeat says now (``agent.beat`` writes it)."""
        cur, ahead = self.current, self._ahead
        gpus = self._gpu_metrics() if self.slot.gpus else []
        return Heartbeat(**{
            "schema": 1, "agent": self.id, "host": self.host, "hostname": socket.gethostname(),
            "pid": os.getpid(), "base": str(self.spool.base), "state": self._reported_state().value,
            "seq": seq,
            "device": self.slot.device, "gpu_id": self.slot.number,
            "gpu_index": self.slot.gpu.index if self.slot.gpu else None,
            "gpu_uuid": self.slot.gpu.uuid if self.slot.gpu else None,
            "current": None if cur is None else {"run": cur[0].run, "chunk_id": cur[0].chunk_id,
                                                 "attempt": cur[0].attempt, "since": cur[1]},
            "ahead": None if ahead is None else {"run": ahead.run, "chunk_id": ahead.chunk_id,
                                                 "attempt": ahead.attempt},
            "jobs_done": self.done, "jobs_failed": self.failed, "started_at": self.started_at,
            "updated_at": time.time(), "heartbeat_s": self.cfg.heartbeat, "watch": self.watcher.mode,
            "job_schema": JOB_SCHEMA,  # the newest job descriptors it reads (see jobs.descriptor)
            "worker_pid": self.worker.pid, "log": str(self.spool.agent_log(self.id)),
            "last_error": self.last_error,
            "died_under": self.died_under,  # see master.dispatcher.Dispatcher._restarted
            "mailbox_lag_s": None if self.mailbox_lag is None else round(self.mailbox_lag, 4),
            "gpu": gpus[0] if gpus else None,  # its (first) GPU, as before several GPUs per agent
            "gpus": gpus,  # every GPU it holds (--gpus-per-agent), each as "gpu" is
            "gpu_ids": list(self.slot.numbers), "gpu_uuids": [g.uuid for g in self.slot.gpus],
            "slot": self.slot.slot, "slots": self.slot.slots,  # --slots: agents sharing its GPU
            "gpu_mem_reserved": self.memory.reserved or None,  # bytes the running job declared (--gpu-mem)
            "waiting": self.waiting,
            "mps": os.environ.get("CUDA_MPS_PIPE_DIRECTORY"),
        })


def module_of(job: Job) -> str:
    """The task module a callable job imports in the worker: its module name, or its file's path."""
    mod = job.target.rpartition(":")[0]
    if mod.endswith(".py") or os.sep in mod:
        return os.path.normpath(os.path.join(job.workdir or "", mod))
    return mod


def _discard(path: str | None) -> None:
    if path:
        with contextlib.suppress(OSError):
            os.unlink(path)
