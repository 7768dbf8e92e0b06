"""The runner: one job of the agent into an outcome, the result fields its agent commits.

A callable job runs in the worker process of its run (``agent.workers``: one per run, started
with the run's environment, warm from chunk to chunk of that run and of no other), which the
runner's ``Workers`` own; a script or a command job in a process of its own (``agent.script``,
``agent.command``). Each kind prints to the chunk's log (``logs/<run>/<chunk>.log``, a header line
per attempt; a callable's stdout and stderr are pointed there by its worker for the time of the
call). A time-out or the worker's death becomes the outcome's error (with the end of what the
attempt printed); an immediate stop, or a script stopped with the agent, gives no outcome (the
job stays queued). Which job runs, and what its outcome becomes, is the agent's (``agent.agent``):
the runner reads no mailbox and commits nothing.

Pipelining: while the worker runs a job, the next callable job of the same run already waits in
its pipe, so it starts the moment the previous one ends and runs while the agent commits the
previous result. The price: a kill of the agent can cost two re-runs (the running chunk and the
one whose result was being committed), and a job already handed over runs even if the agent
is told to drain (the heartbeat lists it as ``ahead``, so masters leave it); on a graceful stop
the worker is killed instead and that job stays queued.

A fresh worker for the run: when a failed job left the worker's CUDA context unusable (its error
says ``poisoned``) or the run's --setup failed (``replace_worker``; the job sent ahead is sent
again, to the fresh worker); when the worker asks for one before running a job (a source file
it imported changed; it runs nothing then, and the job goes to the fresh one, costing no
attempt); after ``--max-jobs-per-worker`` jobs (``recycle_reason``). A job that would need a
fresh worker is never sent ahead. An out-of-memory failure while other runs' workers live here
stops those (their GPU memory back) and runs the job again, once.

A batch (``jobs.batches``) is one job here: one request to the worker, which runs its chunks and
replies with each one's outcome (``agent.worker_process.run_batch``), its output in the batch's
log, its time-out ``timeout`` a chunk (counted from each chunk's start: the worker says which
chunk it starts, ``{"progress": c}`` notes at most every ``PROGRESS_EVERY``); the agent commits the batch's slot. A batch that does not
end well as a whole (its worker died or was killed, it ran past its time-out, its setup or
import failed) gives an outcome with ``error`` and no ``batch``: every chunk is handed back. A
chunk that ran out of GPU memory while other runs' workers live here is handed back too, once
those are stopped (as a single job runs again): it runs again as a single chunk.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from gpupool.jobs.logsetup import logger

from gpupool.agent.command import run_command
from gpupool.agent.script import run_script
from gpupool.agent.slot import Slot
from gpupool.agent.threads import share, thread_env
from gpupool.agent.worker_control import Worker, WorkerLost
from gpupool.agent.worker_process import chunk_words
from gpupool.agent.workers import MakeWorker, WorkerLike, Workers, run_key
from gpupool.jobs.atomic import read_tail
from gpupool.jobs.descriptor import Job, JobKind, attempt_output
from gpupool.jobs.errors import BadFile
from gpupool.jobs.outcomes import Failure, FailureKind, GpuFault, failure_of
from gpupool.jobs.paths import Spool

Produced = tuple[dict[str, Any], str | None]  # a result's fields, and the temp file of its arrays (or None)
THREADS_RECOUNT_S = 30.0  # the agents of the host are counted again for a new worker after this long
RESTARTS = 3  # fresh workers a job is sent to at most when each asks for another before running it
PRINTED_READ = 64 * 1024  # the end of a chunk's log read for what a dead worker's job printed


class Runner:
    """The agent's jobs, one at a time, and the worker processes that run its callables.

    ``aborted(job)``: the running ``job`` must end at once (polled a few times a second while it
    runs); ``stopping()``: the agent stops after this job. Both are the agent's to say.
    ``started()``: the job is on its way (in the worker's pipe, or its process about to start), for
    what the agent does while it runs and that must not delay its start. ``threads``: the thread
    count of every worker's math libraries, asked when a worker starts (``agent.threads``)."""

    def __init__(self, spool: Spool, slot: Slot, marks: dict[str, str], max_jobs_per_worker: int, *,
                 aborted: Callable[[Job], bool], stopping: Callable[[], bool],
                 started: Callable[[], None] = lambda: None, threads: Callable[[], int] | None = None,
                 run_workers: int = 2, spare: bool = True, make_worker: MakeWorker | None = None,
                 clock: Callable[[], float] = time.monotonic, waiting: Callable[[str], None] = lambda why: None) -> None:
        self.spool, self.slot, self.id = spool, slot, slot.agent_id
        self.max_jobs_per_worker = max_jobs_per_worker  # a fresh worker process after this many jobs; 0: never
        self.aborted, self.stopping, self.started = aborted, stopping, started
        self.waiting = waiting  # told why a job's computed value waits (no space to save it)
        # The job code sees only this agent's GPU; CUDA counts in PCI bus order like NVML.
        # ``marks`` (GPUPOOL_AGENT, GPUPOOL_SPOOL) mark what jobs start, for the agent's kill_leftovers at a restart.
        base_env = {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", **marks}
        # Several GPUs (--gpus-per-agent): their UUIDs, so the job sees them as cuda:0..k-1. MPS, where the
        # host runs it, is used as CUDA uses it: CUDA_MPS_PIPE_DIRECTORY passes through with the rest.
        worker_env = {**base_env, "CUDA_VISIBLE_DEVICES": slot.visible}
        self.threads = 0  # what the last worker started was given (the heartbeat says it)
        self._count_threads = threads or (lambda: share(1))
        self._threads_at = -THREADS_RECOUNT_S  # when they were counted (the agents of the host come and go)
        self.clock = clock
        self.command_env = worker_env  # command jobs see this agent's GPU only, as callables do
        # scripts get the agent's own view, as OctoRun gives them, with --gpu_id its GPU; an agent holding
        # several GPUs narrows theirs too (no OctoRun script expects several), --gpu_id 0 the first of them
        self.script_env = base_env if len(slot.gpus) <= 1 else worker_env
        self._narrowed_env = worker_env  # a script under --visible-gpu-id: --gpu_id 0 must be its GPU
        log = spool.worker_log(self.id)
        make = make_worker or (lambda env, preload: Worker(env, log, preload=preload, open_log=spool.open_log))
        self.workers = Workers(lambda: self._with_threads(worker_env), log, run_workers, spare, make, clock,
                               name=f"agent {self.id}")
        self.ahead: Job | None = None  # sent to its run's worker before its turn (pipelining)
        self._first_of_worker: set[tuple] = set()  # the jobs that were the first of their worker process

    def _with_threads(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` with the thread counts of the math libraries (``agent.threads``) where it has none."""
        if self.clock() - self._threads_at >= THREADS_RECOUNT_S:
            self.threads, self._threads_at = self._count_threads(), self.clock()
        return {**env, **thread_env(env, self.threads)}

    def run(self, job: Job, lookahead: Job | None = None) -> Produced | None:
        """``job``'s outcome, or None if interrupted by an immediate stop. ``lookahead``: the job
        to send ahead while this one runs (pipelining), where it may be."""
        def abort() -> bool:
            return self.aborted(job)

        if job.gpus is not None and job.gpus != len(self.slot.gpus):  # a master placed it wrongly: not run here
            return _failed(Failure(FailureKind.WRONG_AGENT, f"the job needs {job.gpus} GPU(s) (--gpus-per-job) "
                                   f"and agent {self.id} holds {len(self.slot.gpus)}"))
        if job.kind in (JobKind.SCRIPT, JobKind.COMMAND):
            return self._run_process(job, abort)
        evicted = False
        for _ in range(RESTARTS):
            worker = self.workers.get(job)
            try:
                reply = self._exchange(worker, job, lookahead, abort)
            except TimeoutError as e:
                self._drop_ahead()  # killed with the worker; it is still in the mailbox
                self.workers.discard(job)
                return _failed(Failure(FailureKind.TIMEOUT, str(e), *self._printed(job)))
            except WorkerLost as e:
                self._drop_ahead()
                self.workers.discard(job)
                if abort():
                    return None
                logger.warning("agent {}: {} while running {} {}; its run gets a fresh worker",
                               self.id, e.reason, job.run, chunk_words(job))
                # the end of what the job printed (its chunk's log); the worker log's where it never started
                return _failed(Failure(FailureKind.WORKER_DIED, e.reason, *self._printed(job, e.output)))
            if reply.get("libs"):
                self.workers.learn(reply["libs"])
            if reply.get("restart"):  # it ran nothing and exits: the job (and the one sent ahead) go to a fresh one
                self._drop_ahead()
                self.workers.discard(job, cold=bool(reply.get("cold")))
                logger.info("agent {}: {} chunk {}: a fresh worker: {}", self.id, job.run, job.chunk_id,
                            reply["restart"])
                lookahead = None
                continue
            err = failure_of(reply) if not reply.get("ok") else None
            short = _out_of_memory(reply)  # a batch's chunk that did
            if (short is not None or (err is not None and err.gpu_fault is GpuFault.OUT_OF_MEMORY)) and not evicted \
                    and (others := self.workers.others(job)):
                evicted = True  # other runs' models hold the memory: theirs goes
                for key in others:  # waited for: their memory is back before the job runs again
                    self.workers.stop(key, f"{job.run} {chunk_words(job)} ran out of GPU memory beside it", wait=True)
                if short is not None:  # handed back: it runs again as a single chunk
                    _hand_back(reply["batch"], job, short)
                elif self.ahead is None:  # and the job runs again (not with a job sent ahead in the pipe before it)
                    lookahead = None
                    continue
            return self._outcome(job, reply)
        return _failed(Failure(FailureKind.WORKER_RESTARTS, f"{RESTARTS} fresh workers in a row asked for another "
                               "before running the job (see the agent's log)"))

    def _run_process(self, job: Job, abort: Callable[[], bool]) -> Produced | None:
        """A script or command job, in a process of its own."""
        self.started()
        log = self.spool.chunk_log(job.run, job.chunk_id)
        try:
            visible = job.visible_gpu_id and self.slot.gpu is not None
            gpu_id = 0 if visible else self.slot.number
            if job.kind is JobKind.SCRIPT:  # on an agent of several GPUs, or under --visible-gpu-id, it sees
                narrowed = visible or len(self.slot.gpus) > 1  # only the agent's: its --gpu_id 0 is the first
                err = run_script(job, 0 if narrowed else gpu_id,
                                 self._with_threads(self._narrowed_env if narrowed else self.script_env), log, abort,
                                 open_log=self.spool.open_log)
                fields = {"log": str(log)} if err is None else {"log": str(log), "error": err.to_dict()}
            else:
                fields = run_command(job, gpu_id, self.slot.device, self._with_threads(self.command_env), log, abort,
                                     open_log=self.spool.open_log)
                err = failure_of(fields)
        except OSError as e:  # its log cannot be made or written (a full disk?)
            return _failed(Failure.of(e, f"cannot start the {job.kind.value}: {e}"))
        if err is not None and (err.kind is FailureKind.STOPPED or (self.stopping() and "SIGTERM" in err.message)):
            return None  # stopped with the agent (e.g. Slurm's SIGTERM to the whole step): stays queued
        return fields, None

    def _exchange(self, worker: WorkerLike, job: Job, lookahead: Job | None,
                  abort: Callable[[], bool]) -> dict[str, Any]:
        """Send ``job`` to its run's worker (unless it was sent ahead), send ``lookahead`` after it
        where it may go, and wait for ``job``'s reply."""
        if self.ahead is not None and self.ahead.uid == job.uid:
            self.ahead = None  # its request is already in the worker's pipe
        elif not self._send(worker, job):
            raise worker.lost()
        self.started()
        self.workers.busy()
        if lookahead is not None and not (self.stopping() or self.spool.drain_flag(self.id).exists()) \
                and self._may_send_ahead(worker, job, lookahead):
            # Pipelining: the next job waits in the worker's pipe and starts the moment this one
            # ends, while the agent commits this one's result (not queued if the worker died).
            if self._send(worker, lookahead):
                self.ahead = lookahead
        timeout = job.timeout * (job.batch or 1) if job.timeout is not None else None  # a batch: each chunk's,
        each = job.timeout if job.batch else None  # from each chunk's start (progress notes)
        return worker.receive(timeout, abort, lambda note: self.waiting(str(note.get("waiting"))), each)

    def _outcome(self, job: Job, reply: dict[str, Any]) -> Produced:
        times = {"started_at": reply.get("started_at"), "finished_at": reply.get("finished_at")}
        if not reply.get("ok"):
            failure = failure_of(reply)
            if failure is not None and (failure.poisoned or failure.setup):  # the worker exits after this reply
                why = f"CUDA context unusable after {job.run} {chunk_words(job)} ({failure.poisoned})" \
                    if failure.poisoned else f"the run's setup {failure.setup} failed in {job.run} {chunk_words(job)}"
                self.replace_worker(job, why, warn=True)
            return {**times, "error": reply.get("error")}, None  # as the worker made it (Failure.to_dict)
        if job.batch is not None:  # each chunk's outcome (agent.worker_process.run_batch), for the agent's slot
            if reply["batch"].get("poisoned"):  # the worker exits after this reply
                self.replace_worker(job, f"CUDA context unusable after {job.run} {chunk_words(job)} "
                                         f"({reply['batch']['poisoned']})", warn=True)
            return {**times, "batch": reply["batch"]}, None
        tmp = reply.get("arrays_tmp")
        arrays = {"arrays": self.spool.result_npz(job.run, job.chunk_id, job.attempt).name,
                  "arrays_bytes": os.stat(tmp).st_size} \
            if tmp else {"arrays": None}
        if tmp and reply.get("arrays_form") in ("tuple", "list"):  # returned as a sequence (arr_0, arr_1, ...)
            arrays["arrays_form"] = reply["arrays_form"]
        return {**times, "value": reply.get("value"), **arrays}, tmp

    def was_first(self, job: Job) -> bool:
        """Whether ``job`` was the first job its worker process was sent (so nothing run before
        it there is to blame for its failure); asked once, when its outcome is in."""
        first = job.uid in self._first_of_worker
        self._first_of_worker.discard(job.uid)
        return first

    def take_back(self) -> None:
        """The job sent ahead is not to run here after all (the agent stops, or drained itself):
        its run's worker, which has not started it, is killed with it, so it stays queued. A
        fresh worker is started when a job of that run comes again."""
        if self.ahead is not None:
            worker = self.workers.of(self.ahead)
            if worker is not None:
                worker.kill()
            self.workers.discard(self.ahead)
            self._drop_ahead()

    def _drop_ahead(self) -> None:
        """The job sent ahead died with its worker, or was taken back: it stays queued, and is no
        longer the first of any worker process (it was, sent again to a fresh one: see
        ``replace_worker``)."""
        if self.ahead is not None:
            self._first_of_worker.discard(self.ahead.uid)
            self.ahead = None

    def recycle_reason(self, job: Job) -> str | None:
        """Why ``job`` must run in a fresh worker process of its run, or None: its worker ran
        ``--max-jobs-per-worker`` jobs."""
        if job.kind is not JobKind.CALLABLE:
            return None
        worker = self.workers.of(job)
        if worker is not None and self._worn(worker):
            return f"its worker ran {worker.sent} jobs (--max-jobs-per-worker {self.max_jobs_per_worker})"
        return None

    def _worn(self, worker: WorkerLike) -> bool:
        """``worker`` ran its ``--max-jobs-per-worker`` jobs."""
        return 0 < self.max_jobs_per_worker <= worker.sent

    def replace_worker(self, job: Job, why: str, warn: bool = False) -> None:
        """A fresh worker process for ``job``'s run now. The job sent ahead to the old one
        (pipelining, always of the same run), which the old one never started, is sent to the new one."""
        ahead = self.ahead
        old = self.workers.of(job)
        self.ahead = None
        self.workers.discard(job)  # a poisoned worker exits after its reply: no wait; a recycled one at end of input
        fresh = self.workers.get(job)
        if ahead is not None and self._send(fresh, ahead):
            self.ahead = ahead  # else it stays in the mailbox, not finished: it runs next as any job
        (logger.warning if warn else logger.info)(
            "agent {}: {}; worker {} of run {} replaced by a fresh one, pid {}{}", self.id, why,
            old.pid if old is not None else None, job.run, fresh.pid,
            f" ({ahead.run} chunk {ahead.chunk_id}, sent ahead, goes to it)" if self.ahead else "")

    def retire(self, jobs: list[Job], finished: set[tuple], next_job: Job | None, quiet: bool = False) -> None:
        """Stop the workers of runs that are over, or that have had nothing queued here for long
        (``Workers.retire``); ``jobs``: the mailbox's, ``finished``: the ``Job.uid`` of those
        finished here. ``next_job``: the job about to run, or None when the agent is dry; before a
        job, only where a worker of another run lives (a finished run's model must not stay on
        the GPU while the agent works on the next run). ``quiet``: dry since a wait already, and
        not only between two refills of a busy run: the spare is started now, if there is none."""
        if next_job is None or self.workers.others(next_job):
            queued = {run_key(j) for j in jobs if j.uid not in finished}
            self.workers.retire(self._over, queued)
        if next_job is None and quiet:
            self.workers.idle()

    def _over(self, run: str) -> bool:
        return self.spool.sealed_flag(run).exists() or self.spool.cancel_flag(run).exists()

    def _request(self, job: Job) -> dict[str, Any]:
        """What the worker is sent for ``job``; ``log``: where its stdout and stderr go (the chunk's
        log, as a script's: ``agent.worker_process.ChunkOutput``), opened there through ``spool``."""
        return {"job": job.to_dict(), "gpu_id": self.slot.number, "device": self.slot.device,
                "arrays_path": str(self.spool.result_npz(job.run, job.chunk_id, job.attempt)),
                "log": str(self._log(job)), "spool": str(self.spool.base),
                "scratch": str(self.spool.scratch_log(self.id))}

    def _log(self, job: Job) -> Path:
        """Where what ``job`` prints goes: its chunk's log, or its batch's (one for all its chunks)."""
        return self.spool.chunk_log(job.run, job.chunk_id) if job.batch is None else \
            self.spool.batch_log(job.run, job.chunk_id, job.batch)

    def _printed(self, job: Job, otherwise: str = "") -> tuple[str, str | None]:
        """A failed callable's (``traceback``, ``log``): the end of what ``job``'s attempt printed to its
        chunk's log (its part after its header), and that log (as a script's error has it); ``otherwise``
        and None where the log has no header of the attempt (it did not start)."""
        log = self._log(job)
        try:  # what it printed before it died waits in the scratch file (agent.worker_process.ChunkOutput)
            self.spool.keep_output(self.spool.scratch_log(self.id), log, job.attempt, f"{job.target} (its worker died)")
        except OSError as e:
            logger.warning("agent {}: the output of {} {} could not be kept in {}: {}", self.id, job.run,
                           chunk_words(job), log, e)
        try:
            data = read_tail(log, PRINTED_READ)  # no link followed
        except (OSError, BadFile):
            return otherwise, None
        printed = attempt_output(data.decode(errors="replace"), job.attempt, whole=len(data) < PRINTED_READ)
        return (otherwise, None) if printed is None else (printed[-4000:], str(log))

    def _send(self, worker: WorkerLike, job: Job) -> bool:
        """Queue ``job`` in the worker's pipe, noting whether it is that process's first."""
        if not worker.send(self._request(job)):
            return False
        if worker.sent == 1:  # counted after the send: it starts a fresh process if the last one died idle
            self._first_of_worker.add(job.uid)
        return True

    def _may_send_ahead(self, worker: WorkerLike, job: Job, nxt: Job) -> bool:
        """Pipelining hands over only a job of the same run, never one that needs a fresh worker."""
        return run_key(nxt) == run_key(job) and not self._worn(worker)


def _out_of_memory(reply: dict[str, Any]) -> int | None:
    """The chunk of a batch's reply that ran out of GPU memory (its last run: the batch ends at a
    GPU fault), or None."""
    batch = reply.get("batch") if reply.get("ok") else None
    if not isinstance(batch, dict) or not batch.get("errors"):
        return None
    chunk, error = next(reversed(batch["errors"].items()))
    failure = failure_of({"error": error})
    return int(chunk) if failure is not None and failure.gpu_fault is GpuFault.OUT_OF_MEMORY else None


def _hand_back(batch: dict[str, Any], job: Job, chunk: int) -> None:
    """Chunk ``chunk`` of a batch's reply is handed back (``b``): not its error, not run here."""
    i = chunk - job.chunk_id
    batch["codes"] = batch["codes"][:i] + "b" + batch["codes"][i + 1:]
    batch["errors"].pop(str(chunk), None)
    batch["values"][i] = batch["durations"][i] = None


def _failed(failure: Failure) -> Produced:
    """A job that failed before it could give anything else."""
    return {"error": failure.to_dict()}, None
