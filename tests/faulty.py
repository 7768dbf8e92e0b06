"""Tasks that misbehave on purpose, for the fault tests (imported by real agent workers)."""
from __future__ import annotations

import ctypes
import os
import resource
import signal
import time
from collections import Counter


def mark(marks: str, event: str, chunk_id: int) -> None:
    """One line per event, appended atomically: the side-effect counter of the tests."""
    line = f"{event} {chunk_id} {os.environ.get('GPUPOOL_AGENT', '?')} {os.getpid()}\n".encode()
    fd = os.open(marks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def counted(chunk_id: int, marks: str, seconds: float = 0.0) -> int:
    mark(marks, "start", chunk_id)
    if seconds:
        time.sleep(seconds)
    mark(marks, "end", chunk_id)
    return chunk_id


def tally(marks: str) -> tuple[Counter, Counter]:
    starts, ends = Counter(), Counter()
    try:
        lines = open(marks).read().splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        event, chunk = line.split()[:2]
        (starts if event == "start" else ends)[int(chunk)] += 1
    return starts, ends


def misbehave(chunk_id: int, modes: list[str], flaky_dir: str | None = None) -> str:
    mode = modes[chunk_id]
    if mode == "raise":
        raise ValueError("chunk refuses")
    if mode == "exit":
        print("about to exit with 3", flush=True)
        os._exit(3)
    if mode == "segv":
        ctypes.string_at(0)
    if mode == "hang":
        time.sleep(3600)
    if mode == "memory":
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (1024**3, hard))
        try:
            bytearray(2 * 1024**3)
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    if mode == "oomkill":  # what the kernel's OOM killer does
        os.kill(os.getpid(), signal.SIGKILL)
    if mode in ("killagent", "killagent_late"):  # takes its whole agent down (as a chunk crashing its node)
        if mode == "killagent_late":
            time.sleep(1.0)  # long enough for the agent's heartbeat to name it
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(60)  # the worker dies with its agent (PR_SET_PDEATHSIG)
    if mode == "flaky":  # fails on its first attempt only
        flag = os.path.join(flaky_dir, f"{chunk_id}.tried")
        if not os.path.exists(flag):
            open(flag, "w").close()
            raise RuntimeError("transient failure")
    return mode


def big_array(chunk_id: int, mb: float = 1.0, seconds: float = 0.0) -> dict:
    import numpy as np
    time.sleep(seconds)
    return {"x": np.full(int(mb * 1024 * 1024 / 8), float(chunk_id))}


def gated_array(chunk_id: int, gate: str, mb: float = 1.0) -> dict:
    """Waits until the file ``gate`` exists, then returns an array of ``mb`` megabytes."""
    while not os.path.exists(gate):
        time.sleep(0.02)
    return big_array(chunk_id, mb)


def held_after(chunk_id: int, gate: str, free: int, seconds: float = 0.1) -> int:
    """Chunks below ``free`` sleep ``seconds``; the others wait until the file ``gate`` exists
    (a run that is surely still going while a test looks at it)."""
    time.sleep(seconds)
    while chunk_id >= free and not os.path.exists(gate):
        time.sleep(0.02)
    return chunk_id


def chatty(chunk_id: int, lines: int) -> int:
    """Prints ``lines`` lines (to the chunk's log)."""
    for i in range(lines):
        print(f"chunk {chunk_id} line {i} " + "x" * 60)
    return chunk_id


def chatty_after(chunk_id: int, lines: int, rounds: int) -> int:
    """Leaves a thread that prints ``rounds`` times ``lines`` lines after the call returned: to the
    worker's own output, its log (the call's own output goes to its chunk's log)."""
    import sys
    import threading

    done = threading.Event()

    def talk() -> None:
        done.wait()
        time.sleep(0.1)  # the call is over: the worker's output is its log again
        for _ in range(rounds):
            for i in range(lines):
                print(f"chunk {chunk_id} line {i} " + "x" * 60)
            sys.stdout.flush()
            time.sleep(0.01)

    threading.Thread(target=talk, daemon=True).start()
    done.set()
    return chunk_id


def tagged(chunk_id: int, tag: str, seconds: float = 0.0) -> str:
    time.sleep(seconds)
    return f"{tag} {chunk_id}"


def _wait_for_file(path: str, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)


def stale(chunk_id: int, fail_on: str, frozen: str, finish: str) -> str:
    """On agent ``fail_on``: fails once the test says that agent is frozen (the failure reaches it
    when it is thawed); anywhere else: ok once the test says so."""
    if os.environ.get("GPUPOOL_AGENT") == fail_on:
        _wait_for_file(frozen)
        raise RuntimeError("the stale attempt fails")
    _wait_for_file(finish)
    return "ok"


def slow_fail(chunk_id: int, seconds: float, bad: list) -> int:
    """Sleeps ``seconds``, then fails if ``chunk_id`` is in ``bad`` (bars wide enough to see)."""
    time.sleep(seconds)
    if chunk_id in bad:
        raise ValueError(f"chunk {chunk_id} is on the bad list")
    return chunk_id
