"""The runner: one job of the agent into an outcome, the result fields its agent commits.

A callable job runs in the agent's long-lived worker process (``agent.worker_control.Worker``),
which the runner owns; a script or a command job in a process of its own (``agent.script``,
``agent.command``). A time-out or the worker's death becomes the outcome's error; an immediate
stop, or a script stopped with the agent, gives no outcome (the job stays queued). Which job
runs, and what its outcome becomes, is the agent's (``agent.agent``): the runner reads no
mailbox and commits nothing.

Pipelining: while the worker runs a job, the next callable job of the mailbox already waits in
its pipe, so it starts the moment the previous one ends and runs while the agent commits the
previous result. The price: a kill of the agent can cost two re-runs (the running chunk and the
one whose result was being committed), and a job already handed over runs even if the agent
is told to drain (the heartbeat lists it as ``ahead``, so masters leave it); on a graceful stop
the worker is killed instead and that job stays queued.

A fresh worker (``replace_worker``) before the next job: when a failed job left the worker's
CUDA context unusable (its error says ``poisoned``; the job sent ahead is sent again, to the
fresh worker), and to give GPU memory back (``recycle_reason``): when the next job is of another
run with another task module and the runs the worker served have nothing left queued here, and
after ``--max-jobs-per-worker`` jobs. A job that would need a fresh worker is never sent ahead.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from loguru import logger

from gpupool.agent.command import run_command
from gpupool.agent.script import run_script
from gpupool.agent.slot import Slot
from gpupool.agent.worker_control import Worker, WorkerLost
from gpupool.jobs.descriptor import Job, JobKind
from gpupool.jobs.paths import Spool

Outcome = tuple[dict[str, Any], str | None]  # a result's fields, and the temp file of its arrays (or None)


class Runner:
    """The agent's jobs, one at a time, and the worker process that runs its callables.

    ``aborted(job)``: the running ``job`` must end at once (polled a few times a second while it
    runs); ``stopping()``: the agent stops after this job. Both are the agent's to say.
    ``started()``: the job is on its way (in the worker's pipe, or its process about to start), for
    what the agent does while it runs and that must not delay its start."""

    def __init__(self, spool: Spool, slot: Slot, marks: dict[str, str], max_jobs_per_worker: int, *,
                 aborted: Callable[[Job], bool], stopping: Callable[[], bool],
                 started: Callable[[], None] = lambda: None, worker: Worker | None = None) -> None:
        self.spool, self.slot, self.id = spool, slot, slot.agent_id
        self.max_jobs_per_worker = max_jobs_per_worker  # a fresh worker process after this many jobs; 0: never
        self.aborted, self.stopping, self.started = aborted, stopping, started
        # The job code sees only this agent's GPU; CUDA counts in PCI bus order like NVML.
        # ``marks`` (GPUPOOL_AGENT, GPUPOOL_SPOOL) mark what jobs start, for the agent's kill_leftovers at a restart.
        base_env = {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", **marks}
        # Several GPUs (--gpus-per-agent): their UUIDs, so the job sees them as cuda:0..k-1. MPS, where the
        # host runs it, is used as CUDA uses it: CUDA_MPS_PIPE_DIRECTORY passes through with the rest.
        worker_env = {**base_env, "CUDA_VISIBLE_DEVICES": slot.visible}
        self.command_env = worker_env  # command jobs see this agent's GPU only, as callables do
        # scripts get the agent's own view, as OctoRun gives them, with --gpu_id its GPU; an agent holding
        # several GPUs narrows theirs too (no OctoRun script expects several), --gpu_id 0 the first of them
        self.script_env = base_env if len(slot.gpus) <= 1 else worker_env
        self._narrowed_env = worker_env  # a script under --visible-gpu-id: --gpu_id 0 must be its GPU
        self.worker = worker or Worker(worker_env, spool.worker_log(self.id))
        self.ahead: Job | None = None  # sent to the worker before its turn (pipelining)
        # What the current worker process was sent (see _worker_seen): its identity, how many
        # jobs, the task module of each run; the jobs that were the first of their process.
        self._wid: tuple | None = None
        self._wsent = 0
        self._wruns: dict[str, str] = {}
        self._first_of_worker: set[tuple] = set()

    def run(self, job: Job, lookahead: Job | None = None) -> Outcome | None:
        """``job``'s outcome, or None if interrupted by an immediate stop. ``lookahead``: the job
        to send ahead while this one runs (pipelining), where it may be."""
        def abort() -> bool:
            return self.aborted(job)

        if job.gpus is not None and job.gpus != len(self.slot.gpus):  # a master placed it wrongly: not run here
            return {"error": {"type": "WrongAgent", "message": f"the job needs {job.gpus} GPU(s) (--gpus-per-job) "
                              f"and agent {self.id} holds {len(self.slot.gpus)}", "traceback": ""}}, None
        if job.kind in (JobKind.SCRIPT, JobKind.COMMAND):
            self.started()
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
            if err is not None and (err["type"] == "Stopped" or (self.stopping() and "SIGTERM" in err["message"])):
                return None  # stopped with the agent (e.g. Slurm's SIGTERM to the whole step): stays queued
            return fields, None
        try:
            if self.ahead is not None and self.ahead.uid == job.uid:
                self.ahead = None  # its request is already in the worker's pipe
            elif not self._send(job):
                raise self.worker.lost()
            self.started()
            if lookahead is not None and not (self.stopping() or self.spool.drain_flag(self.id).exists()) \
                    and self._may_send_ahead(lookahead):
                # Pipelining: the next job waits in the worker's pipe and starts the moment this one
                # ends, while the agent commits this one's result (not queued if the worker died).
                if self._send(lookahead):
                    self.ahead = lookahead
            reply = self.worker.receive(job.timeout, abort)
        except TimeoutError as e:
            self._drop_ahead()  # killed with the worker; it is still in the mailbox
            self.worker.start()  # a fresh worker at once, so the next job finds it warm
            return {"error": {"type": "Timeout", "message": str(e), "traceback": ""}}, None
        except WorkerLost as e:
            self._drop_ahead()
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
                self.replace_worker(f"CUDA context unusable after {job.run} chunk {job.chunk_id} "
                                    f"({err['poisoned']})", warn=True)
            return {**times, "error": err}, None
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
        the worker, which has not started it, is killed with it, so it stays queued. A fresh
        worker is started when a job comes again."""
        if self.ahead is not None:
            self.worker.kill()
            self._drop_ahead()

    def _drop_ahead(self) -> None:
        """The job sent ahead died with its worker, or was taken back: it stays queued, and is no
        longer the first of any worker process (it was, sent again to a fresh one: see
        ``replace_worker``)."""
        if self.ahead is not None:
            self._first_of_worker.discard(self.ahead.uid)
            self.ahead = None

    def recycle_reason(self, job: Job, jobs: list[Job], finished: set[tuple]) -> str | None:
        """Why ``job`` must run in a fresh worker process (GPU memory given back), or None.
        ``jobs``: the mailbox's, ``finished``: the ``Job.uid`` of those finished here.

        After ``--max-jobs-per-worker`` jobs; and when ``job``'s run is not one the worker served
        and its task module is none of theirs (a finished run's model leaves GPU memory), unless
        one of those runs still has jobs queued here (two runs that share this agent would
        otherwise restart the worker at every switch). Chunks of one run never cause one."""
        if job.kind is not JobKind.CALLABLE:
            return None
        self._worker_seen()
        if not self._wsent:
            return None
        if 0 < self.max_jobs_per_worker <= self._wsent:
            return f"its worker ran {self._wsent} jobs (--max-jobs-per-worker {self.max_jobs_per_worker})"
        mod = module_of(job)
        if job.run in self._wruns or mod in self._wruns.values():
            return None
        if any(j.run in self._wruns for j in jobs if j.uid not in finished and j.uid != job.uid):
            return None
        return (f"{job.run} runs {mod}; the run(s) its worker served ran "
                f"{', '.join(sorted(set(self._wruns.values())))} and have nothing queued here")

    def replace_worker(self, why: str, warn: bool = False) -> None:
        """A fresh worker process now. The job sent ahead to the old one (pipelining), which the
        old one never started, is sent to the new one."""
        ahead, old = self.ahead, self.worker.pid
        self.ahead = None
        self.worker.stop()  # a poisoned worker exits after its reply: no wait; a recycled one at end of input
        self.worker.start()
        self._wid = None
        if ahead is not None and self._send(ahead):
            self.ahead = ahead  # else it stays in the mailbox, not finished: it runs next as any job
        (logger.warning if warn else logger.info)(
            "agent {}: {}; worker {} replaced by a fresh one, pid {}{}", self.id, why, old, self.worker.pid,
            f" ({ahead.run} chunk {ahead.chunk_id}, sent ahead, goes to it)" if self.ahead else "")

    def _request(self, job: Job) -> dict[str, Any]:
        return {"job": job.to_dict(), "gpu_id": self.slot.number, "device": self.slot.device,
                "arrays_path": str(self.spool.result_npz(job.run, job.chunk_id, job.attempt))}

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
        """Pipelining never hands over a job that ``recycle_reason`` could want a fresh worker for."""
        self._worker_seen()
        if 0 < self.max_jobs_per_worker <= self._wsent:
            return False
        return job.run in self._wruns or module_of(job) in self._wruns.values()


def module_of(job: Job) -> str:
    """The task module a callable job imports in the worker: its module name, or its file's path."""
    mod = job.target.rpartition(":")[0]
    if mod.endswith(".py") or os.sep in mod:
        return os.path.normpath(os.path.join(job.workdir or "", mod))
    return mod
