"""``--gpu-mem GB``: a job that declares the GPU memory it needs starts only while its agent's GPU
has that much free, as NVML says, less what the GPU's other slots (``--slots``) have promised to
jobs that may not have allocated it yet.

A slot that starts such a job writes its promise (``reserve``) into a host-local note beside its
slot lock (``gpu-<uuid>.s<J>.mem``, in the GPU lock folder), and clears it when the job ends
(``release``). A sibling's promise counts only for what its jobs do not hold yet: NVML's figure for
the processes that carry the sibling's marks (its worker, its command jobs and what they fork) is
taken off it, since that part is already in NVML's used memory. Check and promise happen under
one host-local lock per GPU (``gpu-<uuid>.mem.lock``), so two slots never both take the last
gigabytes. Memory this agent's own processes hold (a worker's cached allocator) is counted as
free for its own next job. Where NVML gives no per-process figures, a promise counts whole (the
safe side: a slot may wait longer than it had to, never overcommit).
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from gpupool.agent.gpu import GIB, Gpu, NoGpu
from gpupool.agent.worker_control import agent_marks, has_marks
from gpupool.jobs.atomic import read_bounded
from gpupool.jobs.errors import BadFile
from gpupool.jobs.jsonio import is_int, is_num, load_json
from gpupool.jobs.locks import FileLock


LOCK_WAIT_S = 10.0  # the most a slot waits for the GPU's memory lock before it says so and tries again later


class MemoryGate:
    def __init__(self, probe: NoGpu, gpus: tuple[Gpu, ...], ident: str, base: str, slot: int | None = None,
                 siblings: dict[int, str] | None = None, lock_dir: Path | None = None) -> None:
        """``siblings``: slot number -> agent id of every slot of this GPU (this one's included)."""
        self.probe, self.gpus, self.id, self.base, self.slot = probe, gpus, ident, base, slot
        self.siblings = siblings or {}
        self.lock_dir = lock_dir
        self.reserved = 0  # bytes promised to the job running now

    def _note(self, gpu: Gpu, j: int) -> Path:
        return self.lock_dir / f"gpu-{gpu.uuid}.s{j}.mem"

    def reserve(self, need_gb: float) -> str | None:
        """Promise ``need_gb`` GiB of each of the agent's GPUs to the job about to start: None if
        done, else why not (the job waits)."""
        need = int(need_gb * GIB)
        shared = self.slot is not None and self.lock_dir is not None
        locks = [FileLock(self.lock_dir / f"gpu-{g.uuid}.mem.lock", mode=0o666) for g in self.gpus] if shared else []
        try:
            for lk in locks:
                if not lk.acquire(timeout=LOCK_WAIT_S):
                    return f"{lk.path} stayed locked {LOCK_WAIT_S:g} s (another slot of the GPU frozen while judging?)"
            for gpu in self.gpus:
                why = self._short(gpu, need)
                if why is not None:
                    return why
            if shared:
                for gpu in self.gpus:
                    self._write(gpu, need)
            self.reserved = need
            return None
        finally:
            for lk in locks:
                lk.close()

    def release(self, always: bool = False) -> None:
        """The running job ended: its promise is withdrawn (``always``: whatever this process knows,
        as an agent starts, over what a former process of its slot left)."""
        if (self.reserved or always) and self.slot is not None and self.lock_dir is not None:
            for gpu in self.gpus:
                self._write(gpu, 0)
        self.reserved = 0

    def _short(self, gpu: Gpu, need: int) -> str | None:
        """Why ``gpu`` cannot give ``need`` bytes now, or None."""
        try:
            m = self.probe.metrics(gpu)
            procs = self.probe.processes(gpu)
        except Exception as e:  # the GPU does not answer: the agent drains itself (Agent._gpu_metrics)
            return f"NVML cannot say how much memory {gpu.describe()} has free ({type(e).__name__}: {e})"
        if not (is_num(m.get("mem_total")) and is_num(m.get("mem_used"))):
            return None  # no figures (a fake or odd driver): nothing to judge by
        free = m["mem_total"] - m["mem_used"]
        own = held(procs, agent_marks(self.id, self.base))
        promised = 0
        for j, ident in self.siblings.items():
            if j == self.slot:
                continue
            r = self._read(gpu, j)
            if r:
                promised += max(0, r - held(procs, agent_marks(ident, self.base)))
        avail = free + own - promised
        if avail >= need:
            return None
        parts = [f"{free / GIB:.1f} GB free"] + ([f"{promised / GIB:.1f} GB promised to the jobs of other slots"]
                                                 if promised else []) + ([f"{own / GIB:.1f} GB held by this agent's "
                                                                          "own processes"] if own else [])
        return f"needs {need / GIB:.1f} GB of {gpu.describe()}; it has {avail / GIB:.1f} GB ({', '.join(parts)})"

    def _write(self, gpu: Gpu, nbytes: int) -> None:
        """This slot's promise, written in place (a note another user's agent made for this slot
        before cannot be replaced in the sticky lock folder, but it is mode 0666: it can be
        rewritten). Readers read under the GPU's memory lock, as ``reserve`` writes; a withdrawal
        read half-written reads as no promise, which it is."""
        fd = os.open(self._note(gpu, self.slot), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
        try:
            if os.fstat(fd).st_uid == os.geteuid():
                os.fchmod(fd, 0o666)  # whatever the umask: the next user's agent of this slot rewrites it
            os.write(fd, json.dumps({"agent": self.id, "host": socket.gethostname(), "pid": os.getpid(),
                                     "bytes": nbytes}).encode())
        finally:
            os.close(fd)

    def _read(self, gpu: Gpu, j: int) -> int:
        """The bytes slot ``j`` has promised, 0 if none or if the agent that promised them is gone."""
        path = self._note(gpu, j)
        try:
            note = load_json(read_bounded(path, 4096), "slot memory note", path)
        except (OSError, BadFile):
            return 0
        if not isinstance(note, dict) or not is_int(note.get("bytes")) or not is_int(note.get("pid")):
            return 0
        if note.get("host") == socket.gethostname() and not os.path.exists(f"/proc/{note['pid']}"):
            return 0  # its agent died holding it
        return max(0, note["bytes"])


def held(procs: list[tuple[int, int | None]] | None, marks: dict[str, str]) -> int:
    """Bytes NVML says the processes carrying ``marks`` hold (0 where it cannot say)."""
    return sum(mem or 0 for pid, mem in procs or [] if has_marks(pid, marks))

