"""The agent: holds one GPU (or CPU rank) and runs the jobs of its mailbox, one after another.

``step()`` runs at most one job; ``run()`` owns the loop, the stop flags and the waiting.
A job leaves the mailbox only after its result is committed (or found committed).

The job itself runs in ``agent.runner`` (a callable in the worker process, sent ahead of its
turn where it may be; a script or a command on its own), which gives back its outcome.

Its policies are parts it calls at fixed points of the loop, each in its own module:
``restart.RestartDeferral`` (at the start, and when it chooses a job), ``drain.Drain`` (before it
chooses one), ``diskpause.DiskPause`` (before a job starts, and to commit its outcome) and
``gpufaults.GpuFaults`` (after a callable job, and when NVML does not answer: a GPU agent whose
chunks keep failing with errors that are not their own drains itself, ``_drain_self``). The
heartbeat is assembled from the agent's own state and theirs (``_heartbeat``).

A batch (``jobs.batches``: several short chunks in one job) is one job to the loop: chosen,
pipelined, timed and named (by its first chunk) as one; its chunks' outcomes are committed
together as its slot (``_commit_batch``), every chunk handed back where the batch did not end
well as a whole.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from gpupool.jobs.logsetup import logger

from gpupool.agent.beat import Beat, Notes
from gpupool.agent.diskpause import DiskPause, discard
from gpupool.agent.drain import Drain
from gpupool.agent.fairshare import FairShare
from gpupool.agent.gpu import Gpu, NoGpu
from gpupool.agent.gpufaults import GpuFaults
from gpupool.agent.lifetime import Lifetime
from gpupool.agent.gpumem import MemoryGate
from gpupool.agent.identity import agent_id
from gpupool.agent.restart import RestartDeferral
from gpupool.agent.runner import Runner
from gpupool.agent.slot import Slot, gpu_lock_dir, label
from gpupool.agent.watcher import MailboxWatcher
from gpupool.agent.threads import host_agents, share
from gpupool.agent.worker_control import agent_marks, has_marks, kill_leftovers
from gpupool.agent.worker_process import chunk_words
from gpupool.agent.workers import MakeWorker, WorkerLike
from gpupool.jobs.batches import BACK, FINAL_FAILED, HISTORY, OK, batch_record, outcome_code
from gpupool.jobs.descriptor import SCHEMA as JOB_SCHEMA, Job, JobKind, JobState
from gpupool.jobs.atomic import DISK_FULL, purge_temp, read_bounded, server_now
from gpupool.jobs.errors import BadFile
from gpupool.jobs.heartbeat import AgentState, Heartbeat, JobRef
from gpupool.jobs.jsonio import load_json
from gpupool.jobs.mailbox import HOLD_LIMIT, Mailbox, Snapshot
from gpupool.jobs.paths import Spool
from gpupool.jobs.outcomes import failure_of
from gpupool.jobs.results import read_epoch, record


def _batch_temps(fields: dict[str, Any]) -> dict[int, str]:
    """The temp files of a batch's arrays in its outcome, by chunk (none for a single job)."""
    return {int(c): a[0] for c, a in ((fields.get("batch") or {}).get("arrays") or {}).items()}


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
    threads: int | None = None  # the math libraries' threads in each worker (None: its share of the host's cores)
    run_workers: int = 2  # runs whose worker processes live at once (agent.workers)
    spare_worker: bool = True  # keep a worker ready, with the libraries of recent runs imported
    idle_exit: float | None = None  # stop after this many seconds with no job (agent.lifetime)
    end_at: float | None = None  # the time (epoch seconds) it must end by: no chunk started that would not fit
    end_why: str = "its --end-at"  # what that end is, for the log
    end_margin: float = 60.0  # stop this long before end_at


PIPELINE_MAX_S = 0.5  # pipeline the next job only after chunks of a run that took at most this long
MEMORY_RECHECK_S = 0.25  # how often a job waiting for its --gpu-mem looks at the GPU's free memory again


class Agent:
    def __init__(self, spool: Spool, slot: Slot, probe: NoGpu, host: str, cfg: AgentConfig,
                 make_worker: MakeWorker | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.spool, self.slot, self.probe, self.host, self.cfg = spool, slot, probe, host, cfg
        self.clock = clock  # every wait and deadline of the job loop (step tests pass a fake one)
        self.id = slot.agent_id
        self.mailbox = Mailbox(spool, self.id, clock)
        self.watcher = MailboxWatcher(self.mailbox.path, cfg.watch, cfg.poll_interval, cfg.max_poll_interval)
        # GPUPOOL_AGENT and GPUPOOL_SPOOL mark what jobs start (in the runner's env), for kill_leftovers at a restart
        self.marks = agent_marks(self.id, str(spool.base))
        self.stop = False  # finish the current job, then exit
        self.stop_now = False  # stop at once
        self.notes = Notes()  # the heartbeat's last_error and waiting
        self.restart = RestartDeferral(spool, self.id, self.mailbox, clock)
        self.drain = Drain(spool, self.id)
        self.life = Lifetime(self.id, clock, cfg.idle_exit, cfg.end_at, cfg.end_margin, cfg.end_why)
        self.faults = GpuFaults(self.id, slot.gpu is not None, cfg.gpu_fault_limit,
                                f"python -m master undrain --base {spool.base} {self.id}", self.notes)
        self.disk = DiskPause(spool, self.id, self.notes, clock=clock, stopping=lambda: self.stop,
                              cancelled=self._cancelled, stale=self._stale, tell=lambda: self.beat.quietly())
        threads = (lambda: cfg.threads) if cfg.threads else (lambda: share(host_agents(spool, self.id)))
        self.runner = Runner(spool, slot, self.marks, cfg.max_jobs_per_worker, aborted=self._aborted,
                             stopping=lambda: self.stop, started=lambda: self.watcher.busy(), threads=threads,
                             run_workers=cfg.run_workers, spare=cfg.spare_worker, make_worker=make_worker,
                             clock=clock, waiting=self.disk.no_space)
        self.state = AgentState.STARTING
        self.current: tuple[Job, float] | None = None
        self._finished: set[tuple] = set()  # Job.uid of the dispatches finished (or dropped) here
        self._epochs: dict[str, tuple[tuple[int, int, int], str | None]] = {}  # run -> (file signature, epoch)
        self._durations: dict[str, float] = {}  # run -> how long its last job (a chunk, a batch) here took
        self.share = FairShare()  # which run's job next, when the mailbox holds several runs
        self._dry = True  # nothing to run at the last look: the next job's arrival is a lag sample
        self._next_lag_sample = 0.0
        self.mailbox_lag: float | None = None  # seconds a refill took to reach this agent (see _sample_lag)
        self.done = self.failed = 0
        self.beat = Beat(spool, self.id, self._heartbeat, cfg.heartbeat,
                         (spool.agent_log(self.id), spool.worker_log(self.id)), cfg.log_limit)
        self.started_at = time.time()
        siblings = {j: agent_id(host, label(slot.gpus, j)) for j in range(slot.slots)} if slot.slot is not None else {}
        self.memory = MemoryGate(probe, slot.gpus, self.id, str(spool.base), slot.slot, siblings,
                                 gpu_lock_dir() if slot.slot is not None else None)  # --gpu-mem

    @property
    def worker(self) -> WorkerLike | None:
        """The worker process of the latest callable job's run (or the test double made for it)."""
        return self.runner.workers.current

    @property
    def last_error(self) -> str | None:
        """What went wrong last, as the heartbeat says it."""
        return self.notes.last_error

    # lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        purge_temp([self.spool.pool_dir, self.spool.pool_tmp_dir, self.spool.agents_dir])  # killed writers' leftovers
        self.mailbox.ensure()
        # after a death only (a graceful stop kills its worker's group, and leaves what a job
        # detached on purpose alone): no /proc scan at every start
        leftovers = kill_leftovers(self.marks) if self.restart.judge_former() else []
        if leftovers:
            logger.warning("agent {}: killed {} process(es) that jobs of its former process had started and left "
                           "running (pids {})", self.id, len(leftovers), leftovers[:10])
        self.memory.release(always=True)  # a promise a killed former process of this slot left
        self.watcher.start()
        self.runner.workers.start()  # the spare: the first run takes it
        self.state = AgentState.IDLE
        self.beat.write()  # the launcher waits for this to call the agent ready
        self.beat.start()
        logger.info("agent {} ready: base={} device={} gpu={} watch={} pid={}", self.id, self.spool.base,
                    self.slot.device, " + ".join(g.describe() for g in self.slot.gpus) or None, self.watcher.mode,
                    os.getpid())
        if self.cfg.end_at is not None:
            logger.info("agent {}: ends by {} ({}): no chunk started that would not end {:g} s before",
                        self.id, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.cfg.end_at)), self.cfg.end_why,
                        self.cfg.end_margin)

    def shutdown(self) -> None:
        """Every step is tried whatever the others do (a full disk, a lost GPU): the worker is always
        stopped and the GPU and agent locks always released."""
        for step in (lambda: self._set_state(AgentState.STOPPING), self.watcher.stop, self.runner.workers.stop_all,
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
                    continue  # the mailbox is read again at once; the watch rests (dropped by Runner.started)
                if self.cfg.burst:
                    break
                if not self.stop:  # a job waiting for GPU memory (--gpu-mem) looks again soon
                    self.watcher.wait(min(self.cfg.rescan, MEMORY_RECHECK_S) if self.notes.waiting else self.cfg.rescan)
            ahead = self.runner.ahead
            if ahead is not None:  # handed over, not started by us: it stays queued for later
                logger.info("agent {}: stopping; {} {} stays queued", self.id, ahead.run, chunk_words(ahead))
                self.runner.take_back()
        finally:
            self.shutdown()

    # one iteration -------------------------------------------------------------------------
    def step(self) -> bool:
        """Run the first job of the mailbox that is not finished here. True if it did work.

        Finished jobs are not removed one by one (a file rewrite per job): the master prunes
        them when it refills the mailbox, and the agent prunes them itself when it runs dry.
        """
        job = self.runner.ahead
        if job is not None:  # handed to the worker while the last one was committed: it runs
            if self._execute(job, self._next_callable(self._read().jobs, job)):
                self._finished.add(job.uid)
            return True
        lost = self.faults.lost()
        if lost is not None:  # its GPU does not answer, and it has not drained yet: now
            self._drain_self(lost)
        ending = self.life.ending()
        if ending is not None:
            return self._end(ending)
        if self._draining() or self.disk.paused():
            return False
        jobs = self._read().jobs
        if len(self._finished) > 2 * len(jobs) + 64:  # masters prune the mailbox: forget what left it
            self._finished = {j.uid for j in jobs if j.uid in self._finished}
        held = self.restart.held()
        leave = self._finished | held if held else self._finished
        job = self.share.choose(jobs, leave)
        if job is None and not self._dry and self.mailbox.refresh():
            # just ran dry: a network filesystem's client may still show an older mailbox; listed
            # afresh (jobs.fsinfo.NameRefresh), it shows a refill that is there already
            jobs = self._read().jobs
            job = self.share.choose(jobs, leave)
        if job is None:
            idle = self.life.idle_over()
            if idle is not None:
                return self._end(idle)
            self.notes.waiting = None
            quiet = self._dry  # dry at the last look too: no refill came within a wait (a spare may start now)
            if not self._dry:  # just ran dry: status says idle, with the jobs done, now rather than a beat later
                self._dry = True
                self.beat.quietly()
            self.runner.retire(jobs, self._finished, None, quiet)  # runs that are over give their GPU memory back
            if jobs:
                self._prune()
            return False
        if self._dry:
            self._sample_lag()
        skip = self._skip_reason(job)
        if skip is not None:
            logger.info("{} {} attempt {}: dropped: {}", job.run, chunk_words(job), job.attempt, skip)
            self._finished.add(job.uid)
        else:
            self.life.active()
            late = self.life.refuses(job, self._expected(job))
            if late is not None:
                return self._end(late)
            if job.gpu_mem is not None and not self._memory_for(job):
                return False
            self.runner.retire(jobs, self._finished, job)
            why = self.runner.recycle_reason(job)
            if why is not None:
                self.runner.replace_worker(job, f"recycled: {why}")
            try:
                if self._execute(job, self._next_callable(jobs, job)):
                    self._finished.add(job.uid)
            finally:
                self.memory.release()
        return True

    def _end(self, why: str) -> bool:
        """Stop by itself (``agent.lifetime``): as on a stop, what is queued here stays in the mailbox
        and masters hand it to other agents once the heartbeat says stopped. False (no work done)."""
        logger.warning("agent {}: stops: {}; its queued jobs go to other agents", self.id, why)
        self.stop = True
        return False

    def _memory_for(self, job: Job) -> bool:
        """Promise the job the GPU memory it declares (--gpu-mem), if free now (``agent.gpumem``);
        else it waits, its reason in the heartbeat (``waiting``) and said once in the log."""
        why = None if self.slot.gpu is None else self.memory.reserve(job.gpu_mem)
        if why is None:
            self.notes.waiting = None
            return True
        why = f"{job.run} chunk {job.chunk_id} waits: {why} (--gpu-mem {job.gpu_mem:g})"
        new = why.split(";")[0] != (self.notes.waiting or "").split(";")[0]  # another job, or another GPU
        self.notes.waiting = why
        if new:  # said once; the heartbeat thread keeps the figures fresh
            logger.info("agent {}: {}", self.id, why)
            self.beat.quietly()
        return False

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
        if after.alone or self.restart.holds(after) or last is None or last > PIPELINE_MAX_S:
            return None
        nxt = self.share.choose(jobs, self._finished, running=after, expected=last)
        if nxt is None or nxt.kind is not JobKind.CALLABLE or nxt.alone or self.restart.holds(nxt) \
                or nxt.gpu_mem is not None or self.life.refuses(nxt, self._expected(nxt)) is not None \
                or self._skip_reason(nxt) is not None:
            return None
        return nxt

    def _expected(self, job: Job) -> float | None:
        """How long ``job`` is expected to take here: its run's last job here (a batch counts as one
        job), else its --chunk-time (a batch's: that of each of its chunks); None: unknown."""
        if job.run in self._durations:
            return self._durations[job.run]
        return None if job.chunk_time is None else job.chunk_time * (job.batch or 1)

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
        if job.batch is not None and self.spool.batch_json(job.run, job.chunk_id, job.batch).exists():
            return "the batch already has its results (or its master took it back)"
        if job.batch is None and self.spool.result_json(job.run, job.chunk_id).exists():
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
        state = self.drain.follow(self.state)
        if state is not None:
            self.state = state
            if state is not AgentState.DRAINING:
                self.faults.lifted()
            self.beat.write()
        return self.state is AgentState.DRAINING

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
        started = time.time()
        self.current = (job, started, time.monotonic())  # status times the job by this clock (running_s)
        self.state = AgentState.BUSY
        if job.alone or self.restart.holds(job) or self._durations.get(job.run, math.inf) > PIPELINE_MAX_S:
            self.beat.quietly()  # named at once: if it kills this agent, the next one must know
        logger.debug("{} {} attempt {}/{}: started", job.run, chunk_words(job), job.attempt, job.max_attempts)
        outcome = self.runner.run(job, lookahead)
        first = self.runner.was_first(job)
        self.current = None
        self.state = AgentState.IDLE
        self.notes.waiting = None  # what it waited for (its arrays' space) is behind it
        if outcome is None:
            if self._cancelled(job.run) is not None:
                logger.warning("{} {}: killed, the run was cancelled", job.run, chunk_words(job))
                return True
            logger.warning("{} {}: interrupted by a stop; left in the mailbox", job.run, chunk_words(job))
            return False
        fields, arrays_tmp = outcome
        err = failure_of(fields)
        if err is not None and err.errno in DISK_FULL:  # the worker's save, or the job's own write
            return self.disk.pause_for_io(job, f"{err.type}: {err.message}")
        if self._stale(job):
            logger.warning("{} {}: the run was started afresh while it ran; its result is dropped",
                           job.run, chunk_words(job))
            discard(arrays_tmp)
            discard(_batch_temps(fields))
            return True
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
        # what it ran on: a batch's SHARED fields (jobs.batches), as a single chunk's record has them
        shared = {"agent": self.id, "host": self.host, "pid": os.getpid(), "gpu_id": self.slot.number,
                  "device": self.slot.device,
                  **({"gpu_uuids": [g.uuid for g in self.slot.gpus]} if self.slot.gpus else {})}
        if job.batch is not None:
            return self._commit_batch(job, fields, first, started_at=begun, finished_at=finished, **shared)
        status = JobState.FAILED if "error" in fields else JobState.OK
        rec = record(job, status, **shared, started_at=begun, finished_at=finished, duration_s=round(duration, 6),
                     **fields)
        done = self.disk.commit(job, rec, Path(arrays_tmp) if arrays_tmp else None)
        if done is None:  # stopped (or the run cancelled or started afresh) while waiting for space
            return self._cancelled(job.run) is not None or self._stale(job)
        rec, committed = done
        status = JobState(rec["status"])
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
            why = self.faults.after_job(job, failure_of(rec), first)
            if why is not None:
                self._drain_self(why)
        return True

    def _commit_batch(self, job: Job, fields: dict[str, Any], first: bool, **shared: Any) -> bool:
        """Commit batch ``job``'s slot (``jobs.batches``) from its outcome (``fields``: each chunk's,
        ``batch``, as its worker gave them; or the ``error`` that ended the whole batch, and then
        every chunk is handed back, ``b``, to run again alone). A chunk that failed on a full disk
        is handed back too (a single chunk's failure there costs no attempt). False, as for an
        interrupted job, where the agent stopped while the slot waited for disk space."""
        count, chunk0 = job.batch or 1, job.chunk_id
        out = fields.get("batch")
        whole = failure_of(fields)
        if out is None:
            why = f"{whole.type}: {whole.message}".splitlines()[0] if whole is not None else "no outcome"
            logger.warning("{} {} attempt {}: handed back, its chunks run again one by one: {}", job.run,
                           chunk_words(job), job.attempt, why)
            out = {"codes": BACK * count, "values": [None] * count, "durations": [None] * count}
        codes, errors, fault = out["codes"].replace("e", outcome_code(job, JobState.FAILED)), {}, None
        for c, error in (out.get("errors") or {}).items():
            failure = failure_of({"error": error})
            if failure is not None and failure.errno in DISK_FULL:
                i = int(c) - chunk0
                codes = codes[:i] + BACK + codes[i + 1:]
                continue
            errors[int(c)] = error
            fault = (int(c), failure) if failure is not None and failure.gpu_fault is not None else fault
        arrays, temps = {}, {}
        for c, (tmp, size, form) in (out.get("arrays") or {}).items():
            arrays[int(c)] = (self.spool.result_npz(job.run, int(c), job.attempt).name, size, form)
            temps[int(c)] = Path(tmp)
        rec = batch_record(job, codes, values=out["values"], durations=out["durations"], errors=errors,
                           arrays=arrays, **shared)
        done = self.disk.commit(job, rec, temps)
        if done is None:  # stopped (or the run cancelled or started afresh) while waiting for space
            return self._cancelled(job.run) is not None or self._stale(job)
        rec, committed = done
        codes = rec.get("codes", BACK * count)  # as committed (values too large for the slot handed back)
        ok, failed = codes.count(OK), codes.count(FINAL_FAILED) + codes.count(HISTORY)
        self.done += ok
        self.failed += failed
        logger.debug("{} {}: {} ok, {} failed, {} handed back{}", job.run, chunk_words(job), ok, failed,
                     codes.count(BACK), "" if committed else " (its slot was taken already)")
        if failed and errors:
            c = next(iter(errors))
            logger.warning("{} chunk {} attempt {} (of a batch): failed: {}: {}{}", job.run, c, job.attempt,
                           errors[c].get("type"), errors[c].get("message"),
                           f" (and {failed - 1} more of the batch)" if failed > 1 else "")
        gpu = fault[1] if fault is not None else whole  # the GPU's failure of a chunk, or the batch's end
        why = self.faults.after_job(job if fault is None else dataclasses.replace(job, chunk_id=fault[0], batch=None),
                                    gpu, first and (fault is None or fault[0] == chunk0))
        if why is not None:
            self._drain_self(why)
        return True

    def _drain_self(self, why: str) -> None:
        """Set this agent's drain flag (``python -m master undrain`` lifts it) and say ``why`` in the
        heartbeat's ``last_error`` (``GpuFaults.drained``): masters hand its queued jobs to other agents."""
        self.faults.drained(why)
        if not self.drain.raise_flag(why):
            return
        ahead = self.runner.ahead
        if ahead is not None:  # not run on this GPU either: it stays queued, and masters take it back
            logger.info("agent {}: {} chunk {} was sent ahead to its worker; taken back", self.id, ahead.run,
                        ahead.chunk_id)
            self.runner.take_back()  # a fresh worker is started when a job comes again (after an undrain)
        self._draining()  # says "draining" in the heartbeat at once

    def _stale(self, job: Job) -> bool:
        """``job`` is of an earlier start of its run (``--fresh``): its outcome counts for nothing."""
        current = self._epoch(job.run) if job.epoch is not None else None
        return current is not None and current != job.epoch

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

    def _aborted(self, job: Job) -> bool:
        """``job`` must end at once (the runner polls this while it runs): an immediate stop, or
        its run cancelled with ``stop_running``."""
        return self.stop_now or bool((self._cancelled(job.run) or {}).get("stop_running"))

    # heartbeat -----------------------------------------------------------------------------
    def _set_state(self, state: AgentState) -> None:
        self.state = state
        self.beat.write()

    def _gpu_metrics(self) -> list[dict[str, Any]]:
        """Each GPU's figures for the heartbeat; a GPU that does not answer (lost, its driver gone)
        gives ``{"error": ...}``, said once in the log, and the agent drains itself (``step``):
        the heartbeat goes on, so masters see the drain and take its queued jobs back."""
        try:
            return [{**self.probe.metrics(g), "worker_mem": self._worker_gpu_memory(g)} for g in self.slot.gpus]
        except Exception as e:  # NVMLError_GpuIsLost and friends
            error = f"{type(e).__name__}: {e}"
            self.faults.gpu_lost(error)
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
        workers = self.runner.workers.pids()
        mine = [mem for pid, mem in procs if pid in workers or has_marks(pid, self.marks)]
        if mine:
            return None if any(m is None for m in mine) else sum(mine)
        return 0 if all(os.path.exists(f"/proc/{pid}") for pid, _ in procs) else None

    def _heartbeat(self, seq: int) -> Heartbeat:
        """What the heartbeat says now (``agent.beat`` writes it)."""
        cur, ahead = self.current, self.runner.ahead
        gpus = self._gpu_metrics() if self.slot.gpus else []
        return Heartbeat(**{
            "schema": 1, "agent": self.id, "host": self.host, "hostname": socket.gethostname(),
            "pid": os.getpid(), "base": str(self.spool.base), "state": self.drain.reported(self.state).value,
            "seq": seq,
            "device": self.slot.device, "gpu_id": self.slot.number,
            "gpu_index": self.slot.gpu.index if self.slot.gpu else None,
            "gpu_uuid": self.slot.gpu.uuid if self.slot.gpu else None,
            "current": None if cur is None else JobRef(cur[0].run, cur[0].chunk_id, cur[0].attempt, cur[1],
                                                       round(max(0.0, time.monotonic() - cur[2]), 3), cur[0].batch),
            "ahead": None if ahead is None else JobRef(ahead.run, ahead.chunk_id, ahead.attempt, batch=ahead.batch),
            "jobs_done": self.done, "jobs_failed": self.failed, "started_at": self.started_at,
            "updated_at": time.time(), "heartbeat_s": self.cfg.heartbeat, "watch": self.watcher.mode,
            "job_schema": JOB_SCHEMA,  # the newest job descriptors it reads (see jobs.descriptor)
            "worker_pid": getattr(self.worker, "pid", None), "log": str(self.spool.agent_log(self.id)),
            "workers": [{"run": key[0], "pid": w.pid} for key, w in self.runner.workers.live.items()],
            "spare_pid": getattr(self.runner.workers.spare, "pid", None),
            "worker_threads": self.runner.threads or None,
            "last_error": self.notes.last_error,
            **self.restart.heartbeat_fields(),
            "mailbox_lag_s": None if self.mailbox_lag is None else round(self.mailbox_lag, 4),
            "gpu": gpus[0] if gpus else None,  # its (first) GPU, as before several GPUs per agent
            "gpus": gpus,  # every GPU it holds (--gpus-per-agent), each as "gpu" is
            "gpu_ids": list(self.slot.numbers), "gpu_uuids": [g.uuid for g in self.slot.gpus],
            "slot": self.slot.slot, "slots": self.slot.slots,  # --slots: agents sharing its GPU
            "gpu_mem_reserved": self.memory.reserved or None,  # bytes the running job declared (--gpu-mem)
            "waiting": self.notes.waiting,
            **self.disk.heartbeat_fields(),
            "mps": os.environ.get("CUDA_MPS_PIPE_DIRECTORY"),
            "uid": os.geteuid(),  # whose agent it is: drain/undrain by another user want --force (jobs.owners)
            "user": Heartbeat.user_of(os.geteuid()),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),  # an allocation's agents (master.alloc)
        })

