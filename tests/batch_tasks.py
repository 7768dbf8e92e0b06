"""Tasks of tests/test_batch_agent.py, which real agents import by name (``tests.batch_tasks:f``)."""
from __future__ import annotations

import os
import sys
import time


def dies_on(chunk_id: int, bad: int) -> int:
    """Kills its worker on chunk ``bad`` (after a line of output), as a segfault in a library would."""
    if chunk_id == bad:
        print(f"chunk {chunk_id} is about to kill its worker", flush=True)
        os._exit(3)
    return chunk_id


def cuda_fault_on(chunk_id: int, bad: int) -> int:
    """Chunk ``bad`` fails as a kernel's device-side assert does (the worker's context is then unusable)."""
    if chunk_id == bad:
        raise RuntimeError("CUDA error: device-side assert triggered")
    return chunk_id


def exits_on(chunk_id: int, bad: int) -> int:
    """Chunk ``bad`` calls sys.exit, which fails that chunk alone."""
    if chunk_id == bad:
        sys.exit(5)
    return chunk_id


def arrays_on(chunk_id: int, every: int = 3):
    """Every ``every``-th chunk returns a dict of arrays, the one after it a tuple of them, the rest a number."""
    import numpy as np

    if chunk_id % every == 0:
        return {"x": np.arange(chunk_id + 1, dtype=np.int64), "y": np.full(2, float(chunk_id))}
    if chunk_id % every == 1:
        return (np.arange(3) * chunk_id, np.ones(1))
    return chunk_id * 10


def chatty(chunk_id: int) -> int:
    print(f"out of chunk {chunk_id}", flush=True)
    print(f"err of chunk {chunk_id}", file=sys.stderr, flush=True)
    return chunk_id


def echo(chunk_id: int, base: str, lr: float, depth: int) -> dict:
    """Its arguments back."""
    return {"chunk": chunk_id, "base": base, "lr": lr, "depth": depth}


def grows(chunk_id: int, seen: list, opts: dict) -> list:
    """Changes the list and the dict it is given: each chunk must be given its own."""
    seen.append(chunk_id)
    opts[str(chunk_id)] = True
    return [list(seen), sorted(opts)]


def naps(chunk_id: int, seconds: float, forever: int = -1) -> int:
    time.sleep(3600 if chunk_id == forever else seconds)
    return chunk_id


def oom_on(chunk_id: int, bad: int) -> int:
    """Chunk ``bad`` runs out of GPU memory (as a library words it)."""
    if chunk_id == bad:
        raise RuntimeError("CUDA error: out of memory")
    return chunk_id


def forks_on(chunk_id: int, bad: int, marks: str) -> str:
    """Each chunk notes its pid; chunk ``bad`` forks a child that notes its own and returns from
    the task instead of exiting (it must leave quietly, running no chunk after it)."""
    with open(marks, "a") as f:
        f.write(f"{chunk_id} {os.getpid()}\n")
    if chunk_id == bad and os.fork() == 0:
        with open(marks, "a") as f:
            f.write(f"child {os.getpid()}\n")
        return "child"
    return "parent"
