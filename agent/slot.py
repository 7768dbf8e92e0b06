"""Choosing and holding this agent's GPU (or CPU rank) for its whole life."""
from __future__ import annotations

import os
import pwd
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.gpu import Gpu, NoGpu, free_gb, visible_gpus
from agent.identity import agent_id
from agent.worker_control import agent_marks, has_marks
from jobs.errors import LockHeld, SpoolError
from jobs.locks import HolderLock
from jobs.paths import Spool

MAX_CPU_RANKS = 1024


@dataclass
class Slot:
    agent_id: str
    number: int  # --gpu N as resolved: index into the visible GPUs, or the CPU rank
    gpu: Gpu | None
    locks: list[HolderLock]

    @property
    def device(self) -> str:
        return "cpu" if self.gpu is None else "cuda:0"

    def release(self) -> None:
        for lock in self.locks:
            lock.close()


LOCK_MODE = 0o666  # every user's agents take the same GPU locks, whoever made the file


def gpu_lock_dir() -> Path:
    """Host-local folder of per-GPU locks, shared by every spool and user on this host
    ($GPUPOOL_LOCK_DIR: one folder that every container of the host mounts, see docs/gpus.md)."""
    d = Path(os.environ.get("GPUPOOL_LOCK_DIR") or "/tmp/gpupool-locks")
    d.mkdir(parents=True, exist_ok=True)
    try:
        d.chmod(0o1777)  # every user's agents must see each other's GPU locks
    except PermissionError:
        pass
    return d


def gpu_lock(gpu: Gpu) -> Path:
    """The host-local lock an agent holds on ``gpu`` for its whole life, named by its UUID (the same
    in every cgroup and container of the host; NVML's index is not)."""
    return gpu_lock_dir() / f"gpu-{gpu.uuid}.lock"


def gpu_holder(gpu: Gpu) -> dict[str, Any] | None:
    """The agent holding ``gpu`` now (its lock's note: agent, base, pid, since), or None. Judged
    from the note and the process it names, never by taking the lock (an agent starting at that
    moment would be refused)."""
    note = HolderLock(gpu_lock(gpu)).holder()
    pid = note.get("pid")
    if not isinstance(pid, int) or note.get("host") != socket.gethostname():
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return None
    return note if state != "Z" and b"agent" in argv else None


def claim(spool: Spool, probe: NoGpu, host: str, gpu: str, cpu: bool, min_free_gb: float,
          allow_shared: bool = False) -> Slot:
    """Resolve ``--gpu`` (a number or 'auto') to a slot and lock it, or raise SpoolError/LockHeld.
    A GPU that other processes already compute on is refused (``GpuBusy``; skipped by 'auto')
    unless ``allow_shared``."""
    gpus = [] if cpu else visible_gpus(probe)
    if gpu != "auto":
        try:
            n = int(gpu)
        except ValueError:
            raise SpoolError(f"--gpu must be a number or 'auto', not {gpu!r}") from None
        if n < 0:
            raise SpoolError(f"--gpu must be 0 or more, not {n}")
        if gpus and n >= len(gpus):
            raise SpoolError(f"--gpu {n}: there is no GPU {n} on this host; it has {len(gpus)} "
                             f"visible GPU(s), numbered 0..{len(gpus) - 1}")
        if gpus and gpus[n].error:
            raise SpoolError(f"--gpu {n}: GPU {n} (NVML index {gpus[n].index}) is unusable ({gpus[n].error}); "
                             "no agent runs on it, the others are not affected")
        return _take(spool, probe, host, n, gpus[n] if gpus else None, allow_shared)
    candidates = [(i, g) for i, g in enumerate(gpus) if not g.error and free_gb(probe, g) >= min_free_gb] if gpus else \
        [(i, None) for i in range(MAX_CPU_RANKS)]
    busy = []
    for n, g in candidates:
        try:
            return _take(spool, probe, host, n, g, allow_shared, explicit=False)
        except LockHeld:
            continue
        except GpuBusy as e:
            busy.append(str(e))
    if gpus:
        raise SpoolError(f"--gpu auto: every GPU with at least {min_free_gb:g} GB free is already held "
                         f"by an agent on this host or used by other processes ({len(gpus)} visible)"
                         + "".join(f"\n  {b}" for b in busy))
    raise SpoolError("--gpu auto: no free CPU rank")


class GpuBusy(SpoolError):
    """Processes that are not this pool's already compute on the GPU."""


def _take(spool: Spool, probe: NoGpu, host: str, n: int, gpu: Gpu | None, allow_shared: bool,
          explicit: bool = True) -> Slot:
    """Lock slot ``n`` (``gpu``, or a CPU rank); ``explicit``: asked for by number, not by --gpu auto
    (which goes on to the next GPU at once if this one is busy)."""
    ident = agent_id(host, f"cpu{n}" if gpu is None else gpu.label)
    locks = []
    try:
        if gpu is not None:
            lk = HolderLock(gpu_lock(gpu), mode=LOCK_MODE)
            try:
                lk.take(f"GPU {n} ({gpu.name}, {gpu.uuid})", agent=ident, base=str(spool.base), uuid=gpu.uuid)
            except PermissionError:
                raise SpoolError(_not_ours(lk.path), lk.path) from None
            locks.append(lk)
            if not allow_shared:
                _refuse_busy(probe, gpu, n, ident, str(spool.base), BUSY_GRACE_S if explicit else 0.0)
        lk = HolderLock(spool.agent_lock(ident))
        lk.take(f"agent id {ident}", agent=ident, base=str(spool.base))
        locks.append(lk)
    except BaseException:
        for lk in locks:
            lk.close()
        raise
    return Slot(ident, n, gpu, locks)


def _not_ours(path: Path) -> str:
    try:
        owner = pwd.getpwuid(os.stat(path).st_uid).pw_name
    except (OSError, KeyError):
        owner = "another user"
    return (f"this GPU's lock file belongs to {owner} and only they may write it (made by an older version, "
            f"or by hand): ask them or root to run 'chmod 666 {path}' (it is safe: the lock is on the open file), "
            "or give every agent of this host another lock folder with $GPUPOOL_LOCK_DIR")


BUSY_GRACE_S = 3.0  # a process that just ended (the job before, a killed agent's worker) may stay listed a moment


def _refuse_busy(probe: NoGpu, gpu: Gpu, n: int, ident: str, base: str, grace: float = BUSY_GRACE_S) -> None:
    """Raise GpuBusy if processes other than this agent's own leftovers (they carry its marks, and
    ``kill_leftovers`` kills them after a crash) compute on ``gpu``, still after ``grace`` seconds.
    NVML sees every process of the host, in any container; their pids are the host's, and those
    not in our pid namespace are another container's (or another user's we cannot read)."""
    deadline = time.monotonic() + grace
    while True:
        try:
            procs = probe.processes(gpu)
        except Exception:  # NVML cannot say: the lock alone decides
            return
        others = [(pid, mem) for pid, mem in procs or [] if not has_marks(pid, agent_marks(ident, base))]
        if not others:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    what = ", ".join(f"pid {pid}" + ("" if mem is None else f" using {mem / 2**30:.1f} GB") for pid, mem in others[:5])
    raise GpuBusy(f"--gpu {n}: {gpu.describe()} already runs {len(others)} compute process(es) that are not this "
                  f"pool's ({what}; a pid not on this host's /proc is in another container). Take another GPU, "
                  "or pass --allow-shared-gpu to share it anyway (./start_agents.sh N BASE -- --allow-shared-gpu)")
