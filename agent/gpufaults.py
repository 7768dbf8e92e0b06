"""GPU faults and self-drain: a GPU agent whose chunks keep failing with errors that are not
their own drains itself, so that masters hand its jobs to other agents.

What counts (``GpuFaults.classify``): driver-level CUDA errors; out of memory, or a context found
unusable after a job's other error, in a worker that had run nothing before. The worker process
names the kind (``agent.worker_process``), the runner replaces a poisoned worker
(``agent.runner``), and here they are counted: ``gpu_fault_limit`` different chunks in a row
(``after_job``), or a GPU that stops answering NVML (``gpu_lost``, then ``lost``), give the
reason the agent drains itself for (``drained``: noted as its last error); an undrain
(``lifted``) counts afresh.
"""
from __future__ import annotations


from gpupool.jobs.logsetup import logger

from gpupool.agent.beat import Notes
from gpupool.jobs.descriptor import Job
from gpupool.jobs.outcomes import Failure, FailureKind, GpuFault


class GpuFaults:
    def __init__(self, agent_id: str, on_gpu: bool, limit: int, undrain: str, notes: Notes) -> None:
        """``on_gpu``: the agent holds a GPU; ``limit``: drain after this many different chunks in a
        row failed with GPU faults (0: never); ``undrain``: the command that lifts its drain."""
        self.agent_id, self.on_gpu, self.limit, self.undrain, self.notes = agent_id, on_gpu, limit, undrain, notes
        self.faults: dict[tuple[str, int], str] = {}  # (run, chunk) -> GPU fault, of the failures in a row
        self.gpu_error: str | None = None  # the GPU stopped answering NVML (see gpu_lost)
        self.drained_why: str | None = None  # set when this agent drained itself

    def classify(self, err: Failure, first: bool) -> str | None:
        """The failure as a GPU fault that is not the job's own, or None. Only on a GPU agent (on
        a CPU one, a job that uses CUDA anyway fails by its own doing): a driver-level error
        (``agent.worker_process.DRIVER_ERROR``), or in a worker process that had run nothing before (so
        nothing a job did in it is to blame) out of memory or a context found unusable. A kernel's
        own failure (a device-side assert, an illegal address) is the job's: a run with such a
        bug fails its chunks, each in a fresh worker, but drains no agent."""
        kind = err.gpu_fault
        if not self.on_gpu or not (kind is GpuFault.DRIVER or
                                   (first and kind in (GpuFault.OUT_OF_MEMORY, GpuFault.CONTEXT))):
            return None
        return f"{err.type}: {err.message.strip()}".splitlines()[0][:300]

    def after_job(self, job: Job, err: Failure | None, first: bool) -> str | None:
        """A callable job's outcome in the count of GPU faults in a row: a success or the job's
        own error ends it; a death or a time-out leaves it as it is (either may be the GPU's).
        Returns why the agent must drain itself now, or None."""
        fault = None if err is None else self.classify(err, first)
        if fault is None:
            if err is None or err.kind not in (FailureKind.TIMEOUT, FailureKind.WORKER_DIED):
                self.faults.clear()
            return None
        self.faults.pop((job.run, job.chunk_id), None)
        self.faults[(job.run, job.chunk_id)] = fault  # a chunk counts once, however often it failed
        if not 0 < self.limit <= len(self.faults):
            return None
        chunks = ", ".join(f"{run} chunk {c}" for run, c in self.faults)
        return (f"drained itself: {len(self.faults)} different chunks in a row failed with GPU errors that are "
                f"not their own ({chunks}); the last: {list(self.faults.values())[-1]}. Check the GPU "
                f"(nvidia-smi), then: {self.undrain}")

    def gpu_lost(self, error: str) -> None:
        """The GPU does not answer NVML (``error``): said once in the log; the agent drains itself
        at its next step (``lost``)."""
        if self.gpu_error is None:
            logger.error("agent {}: its GPU does not answer: {}", self.agent_id, error)
            self.gpu_error = error

    def lost(self) -> str | None:
        """Why the agent must drain itself now because its GPU does not answer (once), or None."""
        if self.gpu_error is None or self.drained_why is not None:
            return None
        return (f"drained itself: its GPU does not answer ({self.gpu_error}). Check it (nvidia-smi), "
                f"then: {self.undrain}")

    def drained(self, why: str) -> None:
        """The agent drains itself for ``why``: noted as its last error (the heartbeat's
        ``last_error``) and in the log; the count starts afresh."""
        self.faults.clear()
        self.drained_why = self.notes.error(why)
        logger.error("agent {}: {}", self.agent_id, why)

    def lifted(self) -> None:
        """Undrained: GPU faults are counted afresh, and a GPU still lost drains it again."""
        self.faults.clear()
        self.gpu_error = None
        if self.notes.last_error is not None and self.notes.last_error == self.drained_why:
            self.notes.last_error = None
        self.drained_why = None
