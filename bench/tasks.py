"""The workloads, as callables for our pool, Ray and the plain-loop floor.

Imported by the agents' workers as ``bench.tasks:<name>``; keep imports inside the functions so
that importing this module costs nothing."""
from __future__ import annotations

from typing import Any


def noop(chunk_id: int) -> None:
    return None


def matmul64(chunk_id: int) -> dict:
    """A 64x64 float64 matmul of the chunk's own deterministic input; returns the product."""
    import numpy as np

    rng = np.random.default_rng(chunk_id)
    x = rng.standard_normal((64, 64))
    return {"Y": x @ x.T}


def shared_sum(chunk_id: int, shared: Any) -> float:
    """Touches every byte of the shared array (as a model's weights would be): one full pass."""
    import numpy as np

    return float(np.asarray(shared["W"]).sum(dtype=np.float64))


def reload_sum(chunk_id: int, path: str) -> float:
    """The same work, loading the file anew per chunk (what a fresh process per chunk does)."""
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        return float(z["W"].sum(dtype=np.float64))


def torch_matmul(chunk_id: int, device: str = "cpu", size: int = 256, repeat: int = 1) -> float:
    """A small (or, with ``repeat``, medium) torch matmul on the agent's device."""
    import torch

    # made on the device: a 4096x4096 matrix drawn on the CPU took 0.4 s, the matmuls on a GPU 16 ms
    g = torch.Generator(device=device).manual_seed(chunk_id)
    x = torch.randn(size, size, generator=g, device=device)
    y = x
    for _ in range(repeat):
        y = torch.tanh(y @ x)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return float(y.sum().item())


def started_at(chunk_id: int) -> float:
    """When the call began (Ray's submit-to-start latency)."""
    import time

    return time.time()
