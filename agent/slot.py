"""Choosing and holding this agent's GPU (or CPU rank) for its whole life."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.gpu import Gpu, NoGpu, free_gb, visible_gpus
from agent.identity import agent_id
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


def gpu_lock_dir() -> Path:
    """Host-local folder of per-GPU locks, shared by every spool on this host."""
    d = Path(os.environ.get("GPUPOOL_LOCK_DIR") or "/tmp/gpupool-locks")
    d.mkdir(parents=True, exist_ok=True)
    try:
        d.chmod(0o1777)  # every user's agents must see each other's GPU locks
    except PermissionError:
        pass
    return d


def gpu_lock(gpu: Gpu) -> Path:
    """The host-local lock an agent holds on ``gpu`` for its whole life."""
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


def claim(spool: Spool, probe: NoGpu, host: str, gpu: str, cpu: bool, min_free_gb: float) -> Slot:
    """Resolve ``--gpu`` (a number or 'auto') to a slot and lock it, or raise SpoolError/LockHeld."""
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
        return _take(spool, host, n, gpus[n] if gpus else None)
    candidates = [(i, g) for i, g in enumerate(gpus) if not g.error and free_gb(probe, g) >= min_free_gb] if gpus else \
        [(i, None) for i in range(MAX_CPU_RANKS)]
    for n, g in candidates:
        try:
            return _take(spool, host, n, g)
        except LockHeld:
            continue
    if gpus:
        raise SpoolError(f"--gpu auto: every GPU with at least {min_free_gb:g} GB free is already held "
                         f"by an agent on this host ({len(gpus)} visible)")
    raise SpoolError("--gpu auto: no free CPU rank")


def _take(spool: Spool, host: str, n: int, gpu: Gpu | None) -> Slot:
    ident = agent_id(host, n if gpu is None else gpu.index, cpu=gpu is None)
    locks = []
    try:
        if gpu is not None:
            lk = HolderLock(gpu_lock(gpu))
            lk.take(f"GPU {gpu.index} ({gpu.name})", agent=ident, base=str(spool.base))
            locks.append(lk)
        lk = HolderLock(spool.agent_lock(ident))
        lk.take(f"agent id {ident}", agent=ident, base=str(spool.base))
        locks.append(lk)
    except BaseException:
        for lk in locks:
            lk.close()
        raise
    return Slot(ident, n, gpu, locks)
