"""Tiny tasks for tests and benchmarks."""
from __future__ import annotations

import os
import time


def noop(chunk_id: int) -> None:
    return None


def square(chunk_id: int, **kwargs) -> dict:
    """Returns a JSON value; records which built-ins it was given."""
    return {"square": chunk_id * chunk_id, "builtins": sorted(kwargs)}


def sleepy(chunk_id: int, seconds: float = 0.1) -> int:
    time.sleep(seconds)
    return chunk_id


def env_probe(chunk_id: int, gpu_id: int, device: str) -> dict:
    """What the job code sees of its GPU."""
    return {"gpu_id": gpu_id, "device": device, "pid": os.getpid(),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "CUDA_DEVICE_ORDER": os.environ.get("CUDA_DEVICE_ORDER")}


def fail_on(chunk_id: int, bad: list | None = None) -> int:
    if chunk_id in (bad or []):
        raise ValueError(f"chunk {chunk_id} is on the bad list")
    return chunk_id


def sleep_for(chunk_id: int, seconds: list | None = None) -> int:
    """Chunk ``c`` sleeps ``seconds[c]`` (the last value for the chunks past the list): uneven chunks."""
    seconds = seconds or [0.1]
    time.sleep(float(seconds[min(chunk_id, len(seconds) - 1)]))
    return chunk_id


def pause(seconds: float) -> float:
    """Sleeps; no built-in arguments (for the Executor)."""
    time.sleep(seconds)
    return seconds
