"""Choosing and holding this agent's GPU (or CPU rank) for its whole life."""
from __future__ import annotations

import itertools
import os
import pwd
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpupool.agent.gpu import Gpu, NoGpu, free_gb, visible_gpus
from gpupool.agent.identity import agent_id
from gpupool.agent.pychild import is_agent_argv
from gpupool.agent.worker_control import agent_marks, has_marks
from gpupool.jobs.errors import LockHeld, SpoolError
from gpupool.jobs.locks import HolderLock
from gpupool.jobs.paths import Spool

MAX_CPU_RANKS = 1024


@dataclass
class Slot:
    agent_id: str
    number: int  # --gpu N as resolved: index into the visible GPUs (the first, for several), or the CPU rank
    gpu: Gpu | None  # its GPU (the first of them, with --gpus-per-agent); None on a CPU agent
    locks: list[HolderLock]
    gpus: tuple[Gpu, ...] = ()  # every GPU it holds, ``gpu`` first; () on a CPU agent
    numbers: tuple[int, ...] = ()  # their --gpu numbers
    slots: int = 1  # with --slots K: K agents share its GPU, this one among them
    slot: int | None = None  # its slot on the GPU, 0..slots-1; None: it holds its GPU(s) alone

    def __post_init__(self) -> None:
        if self.gpu is not None and not self.gpus:
            self.gpus = (self.gpu,)
        if self.gpus and not self.numbers:
            self.numbers = tuple(range(self.number, self.number + len(self.gpus)))

    @property
    def device(self) -> str:
        return "cpu" if self.gpu is None else "cuda:0"

    @property
    def visible(self) -> str:
        """The worker's CUDA_VISIBLE_DEVICES: its GPUs' UUIDs, so that its jobs see them as cuda:0..k-1."""
        return ",".join(g.token for g in self.gpus)

    def release(self) -> None:
        for lock in self.locks:
            lock.close()


def label(gpus: list[Gpu] | tuple[Gpu, ...], slot: int | None = None) -> str:
    """The GPU part of an agent id: ``gpu3``; ``gpu2+3`` for an agent holding two GPUs (minor numbers
    joined by '+', ``gpu3-mig1+3-mig2`` for MIG devices); ``gpu3s1`` for slot 1 of a shared GPU."""
    part = gpus[0].label if len(gpus) == 1 else "gpu" + "+".join(g.label[3:] for g in gpus)
    return part + ("" if slot is None else f"s{slot}")


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
    moment would be refused). A GPU shared by slots (--slots) names them all: ``agent`` is their
    ids, comma-separated."""
    note = _live(HolderLock(gpu_lock(gpu)).holder())
    slots = note.get("slots") if note else None
    if note and isinstance(slots, int) and 1 < slots <= 256:
        held = [n for j in range(slots) if (n := _live(HolderLock(slot_lock(gpu, j)).holder()))]
        note = {**note, "agent": ", ".join(str(n.get("agent")) for n in held) or note.get("agent")}
    return note


def _live(note: dict[str, Any]) -> dict[str, Any] | None:
    """A lock's holder note if the agent process it names still runs on this host, else None."""
    pid = note.get("pid")
    if not isinstance(pid, int) or note.get("host") != socket.gethostname():
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return None
    return note if state != "Z" and is_agent_argv(argv) else None


def claim(spool: Spool, probe: NoGpu, host: str, gpu: str, cpu: bool, min_free_gb: float,
          allow_shared: bool = False, per_agent: int | None = None, slots: int = 1, slot: int | None = None) -> Slot:
    """Resolve ``--gpu`` (a number, several numbers ``2,3``, or 'auto') to a slot and lock it, or
    raise SpoolError/LockHeld. ``per_agent`` (--gpus-per-agent): how many GPUs the agent holds, all
    locked or none; ``slots`` (--slots): agents sharing one GPU, ``slot`` this one's (None: the first
    free). A GPU that other processes already compute on is refused (``GpuBusy``; skipped by 'auto')
    unless ``allow_shared``."""
    gpus = [] if cpu else visible_gpus(probe)
    numbers = None if gpu == "auto" else _numbers(gpu)
    k = per_agent if per_agent is not None else len(numbers) if numbers else 1
    _check_shape(k, numbers, slots, slot, bool(gpus), cpu, per_agent)
    if numbers is not None:
        for n in numbers:
            if gpus and n >= len(gpus):
                raise SpoolError(f"--gpu {gpu}: there is no GPU {n} on this host; it has {len(gpus)} "
                                 f"visible GPU(s), numbered 0..{len(gpus) - 1}")
            if gpus and gpus[n].error:
                raise SpoolError(f"--gpu {gpu}: GPU {n} (NVML index {gpus[n].index}) is unusable ({gpus[n].error}); "
                                 "no agent runs on it, the others are not affected")
        return _take(spool, probe, host, numbers, [gpus[n] for n in numbers] if gpus else [], allow_shared,
                     slots=slots, slot=slot)
    candidates = [(i, g) for i, g in enumerate(gpus) if not g.error and free_gb(probe, g) >= min_free_gb] if gpus else \
        [(i, None) for i in range(MAX_CPU_RANKS)]
    busy, refused = [], set()  # refused: GPUs found held or busy, passed over in the groups after
    for group in itertools.combinations(candidates, k) if k > 1 else ([c] for c in candidates):
        if refused & {n for n, _ in group}:
            continue
        try:
            return _take(spool, probe, host, [n for n, _ in group], [g for _, g in group if g is not None],
                         allow_shared, explicit=False, slots=slots, slot=slot)
        except (LockHeld, GpuBusy) as e:
            refused.add(getattr(e, "number", group[0][0]))
            if isinstance(e, GpuBusy):
                busy.append(str(e))
    if gpus:
        what = "every GPU" if k == 1 else f"no {k} GPUs together: every GPU"
        raise SpoolError(f"--gpu auto: {what} with at least {min_free_gb:g} GB free is already held "
                         f"by an agent on this host or used by other processes ({len(gpus)} visible)"
                         + "".join(f"\n  {b}" for b in busy))
    raise SpoolError("--gpu auto: no free CPU rank")


def _numbers(gpu: str) -> list[int]:
    """``--gpu 3`` or ``--gpu 2,3``: the GPU numbers, or SpoolError."""
    try:
        numbers = [int(x) for x in gpu.split(",")]
    except ValueError:
        raise SpoolError(f"--gpu must be a number, numbers separated by commas (2,3) or 'auto', not {gpu!r}") from None
    if any(n < 0 for n in numbers):
        raise SpoolError(f"--gpu must be 0 or more, not {gpu}")
    if len(set(numbers)) != len(numbers):
        raise SpoolError(f"--gpu {gpu} names a GPU twice")
    return numbers


def _check_shape(k: int, numbers: list[int] | None, slots: int, slot: int | None, has_gpus: bool, cpu: bool,
                 per_agent: int | None) -> None:
    """--gpus-per-agent, --gpu N,M, --slots and --slot agree with each other and with the host."""
    if k < 1:
        raise SpoolError(f"--gpus-per-agent must be 1 or more, not {k}")
    if numbers is not None and len(numbers) != k:
        raise SpoolError(f"--gpus-per-agent {per_agent} with --gpu {','.join(map(str, numbers))}: give {k} GPU "
                         f"numbers (--gpu {','.join(str(numbers[0] + i) for i in range(k))}) or --gpu auto")
    if k > 1 and not has_gpus:
        raise SpoolError(f"--gpus-per-agent {k} needs GPUs, and this agent has none "
                         f"({'--cpu' if cpu else 'no GPU visible'}); CPU agents hold one rank each")
    if slots < 1:
        raise SpoolError(f"--slots must be 1 or more, not {slots}")
    if slots > 1 and k > 1:
        raise SpoolError(f"--slots {slots} with {k} GPUs per agent: slots share one GPU; use one or the other")
    if slots > 1 and not has_gpus:
        raise SpoolError(f"--slots {slots} shares a GPU, and this agent has none: start more CPU agents instead")
    if slot is not None and not 0 <= slot < slots:
        raise SpoolError(f"--slot {slot}: with --slots {slots} the slots are numbered 0..{slots - 1}"
                         if slots > 1 else f"--slot {slot} needs --slots K (how many agents share the GPU)")


class GpuBusy(SpoolError):
    """Processes that are not this pool's already compute on the GPU."""


def _take(spool: Spool, probe: NoGpu, host: str, numbers: list[int], gpus: list[Gpu], allow_shared: bool,
          explicit: bool = True, slots: int = 1, slot: int | None = None) -> Slot:
    """Lock GPUs ``gpus`` (numbers ``numbers``), all of them or none, or CPU rank ``numbers[0]``;
    ``explicit``: asked for by number, not by --gpu auto (which goes on to the next GPU at once if
    this one is busy). With ``slots`` > 1 the GPU's lock is shared with its other slots and slot
    ``slot`` (or the first free one) is locked as the agent's own. A refusal (LockHeld, GpuBusy)
    carries the GPU's number as ``number``."""
    shared = slots > 1
    locks: list[HolderLock] = []
    try:
        if shared:
            slot = _take_slot(gpus[0], numbers[0], slot, slots, host, locks)
        ident = agent_id(host, label(gpus, slot) if gpus else f"cpu{numbers[0]}")
        siblings = [agent_id(host, label(gpus, j)) for j in range(slots)] if shared else [ident]
        for n, gpu in zip(numbers, gpus):
            lk = HolderLock(gpu_lock(gpu), mode=LOCK_MODE, shared=shared)
            try:
                if not explicit and not allow_shared:  # --gpu auto passes over a busy GPU without taking its
                    _refuse_busy(probe, gpu, n, siblings, str(spool.base), 0.0)  # lock: one asked for by number may be starting
                what = f"GPU {n} ({gpu.name}, {gpu.uuid})" + (f" (to share as one of {slots} slots)" if shared else "")
                lk.take(what, agent=ident, base=str(spool.base), uuid=gpu.uuid, slots=slots)
                locks.append(lk)
                if not allow_shared:
                    _refuse_busy(probe, gpu, n, siblings, str(spool.base), BUSY_GRACE_S if explicit else 0.0)
            except PermissionError:
                raise SpoolError(_not_ours(lk.path), lk.path) from None
            except (LockHeld, GpuBusy) as e:
                e.number = n
                raise
        lk = HolderLock(spool.agent_lock(ident))
        lk.take(f"agent id {ident}", agent=ident, base=str(spool.base))
        locks.append(lk)
    except BaseException:
        for lk in locks:
            lk.close()
        raise
    return Slot(ident, numbers[0], gpus[0] if gpus else None, locks, tuple(gpus), tuple(numbers) if gpus else (),
                slots, slot if shared else None)


def slot_lock(gpu: Gpu, j: int) -> Path:
    """The host-local lock of slot ``j`` of ``gpu`` (--slots): one agent per slot."""
    return gpu_lock_dir() / f"gpu-{gpu.uuid}.s{j}.lock"


def _take_slot(gpu: Gpu, n: int, slot: int | None, slots: int, host: str, locks: list[HolderLock]) -> int:
    """Lock slot ``slot`` of ``gpu``, or the first free one; its number. The lock goes into ``locks``."""
    for j in range(slots) if slot is None else [slot]:
        lk = HolderLock(slot_lock(gpu, j), mode=LOCK_MODE)
        try:
            lk.take(f"slot {j} of GPU {n} ({gpu.name}, {gpu.uuid})", agent=agent_id(host, label([gpu], j)))
        except PermissionError:
            raise SpoolError(_not_ours(lk.path), lk.path) from None
        except LockHeld:
            if slot is not None:
                raise
            continue
        locks.append(lk)
        return j
    raise LockHeld(f"--slots {slots}: every slot of GPU {n} ({gpu.uuid}) is already held by an agent on this host")


def _not_ours(path: Path) -> str:
    try:
        owner = pwd.getpwuid(os.stat(path).st_uid).pw_name
    except (OSError, KeyError):
        owner = "another user"
    return (f"this GPU's lock file belongs to {owner} and only they may write it (made by an older version, "
            f"or by hand): ask them or root to run 'chmod 666 {path}' (it is safe: the lock is on the open file), "
            "or give every agent of this host another lock folder with $GPUPOOL_LOCK_DIR")


BUSY_GRACE_S = 3.0  # a process that just ended (the job before, a killed agent's worker) may stay listed a moment


def _refuse_busy(probe: NoGpu, gpu: Gpu, n: int, idents: list[str], base: str, grace: float = BUSY_GRACE_S) -> None:
    """Raise GpuBusy if processes other than this agent's own leftovers (they carry its marks, and
    ``kill_leftovers`` kills them after a crash) or, for a slot, its sibling slots' jobs (the agents
    ``idents``) compute on ``gpu``, still after ``grace`` seconds.
    NVML sees every process of the host, in any container; their pids are the host's, and those
    not in our pid namespace are another container's (or another user's we cannot read)."""
    deadline = time.monotonic() + grace
    while True:
        try:
            procs = probe.processes(gpu)
        except Exception:  # NVML cannot say: the lock alone decides
            return
        others = [(pid, mem) for pid, mem in procs or []
                  if not any(has_marks(pid, agent_marks(ident, base)) for ident in idents)]
        if not others:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    what = ", ".join(f"pid {pid}" + ("" if mem is None else f" using {mem / 2**30:.1f} GB") for pid, mem in others[:5])
    raise GpuBusy(f"--gpu {n}: {gpu.describe()} already runs {len(others)} compute process(es) that are not this "
                  f"pool's ({what}; a pid not on this host's /proc is in another container). Take another GPU, "
                  "or pass --allow-shared-gpu to share it anyway (./start_agents.sh N BASE -- --allow-shared-gpu)")
