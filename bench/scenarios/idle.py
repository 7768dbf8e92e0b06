"""7. Idle cost: an agent with nothing to do, waiting with inotify and with polling (defaults:
``--poll-interval 0.5 --max-poll-interval 1``, rescan and heartbeat every 2 s).

Filesystem operations: ``strace -c -f`` attached to the agent (all its threads) and its worker
for a window, counting the syscalls that reach a filesystem (open, stat, read, write, rename,
unlink, getdents, lock, fsync, ...). CPU: utime + stime from ``/proc/<pid>/stat`` of both over a
second window without strace (tracing slows what it traces). Both agents idle side by side. Peer: Ray's idle daemons and
workers (every process started under this one), CPU over the same window."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import agents, descendants, feed, log, proc_cpu_s, wait_workers
from bench.context import Ctx

FS_SYSCALLS = {
    "open", "openat", "openat2", "creat", "stat", "lstat", "fstat", "newfstatat", "statx", "access", "faccessat",
    "faccessat2", "read", "pread64", "readv", "write", "pwrite64", "writev", "rename", "renameat", "renameat2",
    "unlink", "unlinkat", "link", "linkat", "mkdir", "mkdirat", "getdents", "getdents64", "flock", "fcntl",
    "fsync", "fdatasync", "ftruncate", "truncate", "readlink", "readlinkat", "statfs", "fstatfs", "lseek",
}


def strace_start(pids: list[int], out: Path) -> subprocess.Popen:
    cmd = ["strace", "-c", "-f", "-o", str(out)] + [x for p in pids for x in ("-p", str(p))]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def strace_stop(proc: subprocess.Popen, out: Path) -> dict[str, int]:
    proc.terminate()
    proc.wait(timeout=30)
    counts: dict[str, int] = {}
    for line in out.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            counts[parts[-1]] = int(parts[3])
    return counts


def cpu_times(pids: list[int]) -> tuple[dict[int, float], float]:
    """Each live process's CPU seconds so far, and when they were read."""
    return {p: proc_cpu_s(p) for p in pids if os.path.exists(f"/proc/{p}")}, time.monotonic()


def cpu_share(pids: list[int], window: float) -> float:
    """Fraction of one core used by ``pids`` over ``window`` seconds."""
    c0, t0 = sum(proc_cpu_s(p) for p in pids), time.monotonic()
    time.sleep(window)
    return (sum(proc_cpu_s(p) for p in pids) - c0) / (time.monotonic() - t0)


def run(ctx: Ctx) -> dict[str, Any]:
    """Both agents (inotify and polling, each on its own spool) idle side by side."""
    w = ctx.sizes.idle_window
    out: dict[str, Any] = {"window_s": w, "strace": bool(shutil.which("strace"))}
    modes = {"inotify": ["--watch", "inotify"], "poll": ["--watch", "poll"]}
    with contextlib.ExitStack() as stack:
        pids = {}
        for mode, args in modes.items():
            base = ctx.dir(f"idle-{mode}")
            ag = stack.enter_context(agents(base, 1, args))
            feed(base, "warm", 1, task="bench.tasks:noop")
            pids[mode] = ag.pids + wait_workers(ag)
        time.sleep(min(w, 2.0))  # settle: the poll back-off reaches its idle rate
        res: dict[str, dict[str, Any]] = {m: {} for m in modes}
        if out["strace"]:
            files = {m: ctx.tmp / f"strace-{m}.txt" for m in modes}
            procs = {m: strace_start(pids[m], files[m]) for m in modes}
            time.sleep(w)
            for m in modes:
                counts = strace_stop(procs[m], files[m])
                fs = {k: v for k, v in counts.items() if k in FS_SYSCALLS}
                res[m].update(fs_ops_per_s=sum(fs.values()) / w, syscalls_per_s=sum(counts.values()) / w,
                              fs_ops=dict(sorted(fs.items(), key=lambda kv: -kv[1])))
        before = {m: cpu_times(pids[m]) for m in modes}
        time.sleep(w)
        for m in modes:
            (c0, t0), (c1, t1) = before[m], cpu_times(pids[m])
            # the processes alive at both ends: one that exits meanwhile (a worker retired late) took its
            # CPU time with it, and summed as 0 it made the share negative
            res[m]["cpu_core_pct"] = 100 * sum(c1[p] - c0[p] for p in c0.keys() & c1.keys()) / (t1 - t0)
            res[m]["exited"] = len(c0.keys() - c1.keys())
    for m in modes:
        out[m] = res[m]
        log(f"7. idle {m}: {res[m].get('fs_ops_per_s', float('nan')):.1f} fs ops/s, "
            f"{res[m]['cpu_core_pct']:.2f}% of a core; {res[m].get('fs_ops')}")
    return out


def ray(ctx: Ctx, rs: Any, out: dict[str, Any]) -> None:
    rs.tasks("noop", 4)
    time.sleep(1.0)
    pids = descendants(os.getpid())
    out["ray_idle"] = {"processes": len(pids), "cpu_core_pct": 100 * cpu_share(pids, ctx.sizes.idle_window)}
    log(f"7. idle Ray: {len(pids)} processes, {out['ray_idle']['cpu_core_pct']:.2f}% of a core")
