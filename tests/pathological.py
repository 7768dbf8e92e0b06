"""Job code that is legal but awkward, for tests/test_job_pathologies.py (imported by real workers)."""
from __future__ import annotations

import os
import time

from tests.faulty import mark


def oversized(chunk_id: int, modes: list[str], marks: str, mb: float = 9.0):
    """``value``: returns a JSON string of ``mb`` MB; ``error``: raises with a message that long;
    ``deep``: returns lists nested 200 deep."""
    mark(marks, "start", chunk_id)
    mode = modes[chunk_id]
    if mode == "value":
        return "x" * int(mb * 1024 * 1024)
    if mode == "error":
        raise ValueError("y" * int(mb * 1024 * 1024))
    if mode == "deep":  # small, but nested deeper than any spool JSON may be
        value: list = []
        for _ in range(200):
            value = [value]
        return value
    return {"small": chunk_id}


def _write_pid(pidfile: str, pid: int) -> None:
    tmp = f"{pidfile}.tmp"
    with open(tmp, "w") as f:
        f.write(str(pid))
    os.replace(tmp, pidfile)


def _fork_sleeper(pidfile: str) -> None:
    """Fork a child that sleeps an hour (unless killed); its pid goes to ``pidfile``."""
    child = os.fork()
    if child == 0:
        time.sleep(3600)
        os._exit(0)
    _write_pid(pidfile, child)


def fork_then_die(chunk_id: int, pidfile: str) -> None:
    """Forks a child that outlives it (it sleeps an hour), then the job's process exits with code 3."""
    _fork_sleeper(pidfile)
    os._exit(3)


def fork_and_return(chunk_id: int, pidfile: str, gate: str) -> str:
    """Forks a child that waits for ``gate`` and then *returns* from this function too (a careless
    fork: the child goes back into the worker's loop); the parent returns at once."""
    child = os.fork()
    if child == 0:
        while not os.path.exists(gate):
            time.sleep(0.02)
        return "from the forked child"
    _write_pid(pidfile, child)
    return f"parent {chunk_id}"


def tagged(chunk_id: int, tag: str) -> str:
    return f"{tag} {chunk_id}"


def array_marked(chunk_id: int, marks: str, mb: float = 1.0, gate: str | None = None, free: int = 0) -> dict:
    """Records each execution, then returns ``mb`` MB of arrays (saved as the chunk's .npz); with
    ``gate``, chunks from ``free`` on first wait until that file exists (the run surely still goes)."""
    import numpy as np
    mark(marks, "start", chunk_id)
    while gate is not None and chunk_id >= free and not os.path.exists(gate):
        time.sleep(0.02)
    return {"x": np.full(int(mb * 1024 * 1024 / 8), float(chunk_id))}


def own_file_marked(chunk_id: int, marks: str, out_dir: str, mb: float = 1.0) -> str:
    """Records each execution, then writes its own ``mb`` MB output file (the job's own I/O)."""
    mark(marks, "start", chunk_id)
    path = os.path.join(out_dir, f"{chunk_id}.bin")
    with open(path, "wb") as f:
        f.write(b"\1" * int(mb * 1024 * 1024))
    return path


def fork_and_hang(chunk_id: int, pidfile: str) -> None:
    """Forks a child that would run an hour, then runs on itself (until its agent is killed)."""
    _fork_sleeper(pidfile)
    time.sleep(3600)
