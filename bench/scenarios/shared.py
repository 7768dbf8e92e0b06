"""5. Shared data: one big uncompressed ``.npz`` used by every chunk (each chunk reads all of it).

Bytes read from storage: ``read_bytes`` of ``/proc/<pid>/io`` (block-layer reads charged to the
process that caused them, page faults of a memory map included) of each agent's worker, with the
file's pages first evicted from the page cache by ``posix_fadvise(POSIX_FADV_DONTNEED)`` on that
file alone (no root, no global drop_caches, nothing else on the machine is disturbed). Copies:
``rchar`` (bytes returned by read() calls; a memory map does not go through read()).
Compared with the same work loading the file anew in every chunk (``np.load``): in our pool's
worker, and with OctoRun (a process per chunk; its bytes come from getrusage of the children)."""
from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, agents, feed, log, proc_io, wait_workers
from bench.context import Ctx
from bench.peers import octorun

WORKERS = 2


def make_file(path: Path, mb: int) -> int:
    """An uncompressed .npz holding one float64 array 'W' of about ``mb`` MiB, flushed to disk."""
    n = mb * 1024 * 1024 // 8
    w = np.lib.format.open_memmap(path.with_suffix(".npy"), mode="w+", dtype=np.float64, shape=(n,))
    for i in range(0, n, 1 << 22):
        w[i:i + (1 << 22)] = np.arange(i, min(n, i + (1 << 22)), dtype=np.float64) % 7
    w.flush()
    del w
    with open(path, "wb") as f:
        np.savez(f, W=np.load(path.with_suffix(".npy"), mmap_mode="r"))
        f.flush()
        os.fsync(f.fileno())
    path.with_suffix(".npy").unlink()
    return path.stat().st_size


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _pool(ctx: Ctx, base: Path, npz: Path, rep: int, reload: bool) -> dict[str, Any]:
    n = ctx.sizes.shared_chunks
    with agents(base, WORKERS) as ag:
        feed(base, "warm", 2 * WORKERS, task="bench.tasks:noop")  # workers up, numpy imported
        workers = wait_workers(ag)
        evict(npz)
        before = {p: proc_io(p) for p in workers}
        if reload:
            r = feed(base, f"reload-{rep}", n, task="bench.tasks:reload_sum", kwargs={"path": str(npz)})
        else:
            r = feed(base, f"shared-{rep}", n, task="bench.tasks:shared_sum", shared=str(npz))
        after = {p: proc_io(p) for p in workers}
        workers = [p for p in workers if before[p] and after[p]]  # alive throughout (the run's: the spares)
        ctx.check(base, r.run, n)
    return {"wall_s": r.wall_s,
            "read_bytes": [after[p]["read_bytes"] - before[p]["read_bytes"] for p in workers],
            "rchar": [after[p]["rchar"] - before[p]["rchar"] for p in workers]}


def run(ctx: Ctx) -> dict[str, Any]:
    s = ctx.sizes
    npz = ctx.dir("shared-file") / "shared.npz"
    t0 = time.perf_counter()
    size = make_file(npz, s.shared_mb)
    log(f"5. shared: wrote {size / 1e6:.0f} MB in {time.perf_counter() - t0:.1f} s")
    out: dict[str, Any] = {"file_bytes": size, "agents": WORKERS, "chunks": s.shared_chunks,
                           "shared": [], "reload": [], "octorun": []}
    for rep in range(s.repeats):  # fresh agents each time: a worker keeps its map (and pages) alive
        out["shared"].append(_pool(ctx, ctx.dir("shared"), npz, rep, reload=False))
        out["reload"].append(_pool(ctx, ctx.dir("reload"), npz, rep, reload=True))
        if ctx.octorun:
            w = ctx.dir("oct-shared")
            (w / "out").mkdir()
            evict(npz)
            ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            o = octorun(w, REPO / "bench" / "scripts" / "shared_sum.py", s.shared_chunks, WORKERS,
                        {"path": str(npz), "out_dir": str(w / "out")})
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            ctx.peer_check("octorun", "shared", o["ok"])
            out["octorun"].append({"wall_s": o["wall_s"], "read_bytes": [(ru1.ru_inblock - ru0.ru_inblock) * 512]})
    for k in ("shared", "reload", "octorun"):
        for m in out[k]:
            log(f"5. {k}: {m['wall_s']:.2f} s, storage reads {sum(m['read_bytes']) / 1e6:.0f} MB"
                + (f", read() copies {sum(m['rchar']) / 1e6:.0f} MB" if "rchar" in m else ""))
    npz.unlink()
    return out
