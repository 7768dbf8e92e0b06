"""The demo workload, modelled on the SGE-style template: each chunk multiplies its own
matrices with one shared matrix. torch on the GPU when the agent has one, numpy otherwise.

    python main.py --base BASE --task gpupool.master.matmul:multiply --chunks 100
    python main.py --base BASE --task gpupool.master.matmul:multiply --chunks 16 --shared W.npz --data chunks/
"""
from __future__ import annotations

import numpy as np

SIZE = 128


def chunk_input(chunk_id: int, rows: int = 64, size: int = SIZE) -> np.ndarray:
    """The deterministic input of a chunk when no --data folder is given."""
    return np.random.default_rng(chunk_id).standard_normal((rows, size)).astype(np.float32)


def shared_matrix(size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(12345).standard_normal((size, size)).astype(np.float32) / np.sqrt(size)


def multiply(chunk_id: int, device: str = "cpu", shared=None, data=None, scale: float = 1.0) -> dict:
    """Y = scale * X @ W, with W from the shared .npz (key 'W') and X from the chunk's .npz (key 'X')."""
    w = np.asarray(shared["W"]) if shared else shared_matrix()
    x = np.asarray(data["X"]) if data else chunk_input(chunk_id, size=w.shape[0])
    y = _matmul_torch(x, w, device) if device.startswith("cuda") else x @ w
    return {"Y": (scale * y).astype(np.float32), "checksum": np.array([float(np.sum(y))])}


_cuda_why: dict[str, str | None] = {}  # device -> why CUDA is unusable in this worker (None: usable), judged once


def cuda_unusable(device: str) -> str | None:
    """Why torch cannot compute on ``device`` in this process, or None: no torch, a CPU-only build
    or no driver (``torch.cuda.is_available()`` is False), or CUDA fails to initialise (a driver
    too old, a GPU in exclusive mode held by another process). Judged once per worker and said
    once in its log; errors of the computation itself are never hidden."""
    if device not in _cuda_why:
        why = None
        try:
            import torch

            if not torch.cuda.is_available():
                why = f"torch {getattr(torch, '__version__', '?')} sees no usable CUDA device (a CPU-only build, or no driver)"
            else:
                torch.cuda.init()
        except ImportError:
            why = "torch is not installed"
        except Exception as e:  # CUDA initialisation failed
            why = f"CUDA does not initialise ({type(e).__name__}: {e})"
        if why is not None:
            print(f"gpupool.master.matmul: {why}; computing on the CPU with numpy", flush=True)
        _cuda_why[device] = why
    return _cuda_why[device]


def _matmul_torch(x: np.ndarray, w: np.ndarray, device: str) -> np.ndarray:
    if cuda_unusable(device):  # the demo still works, on numpy
        return x @ w
    import torch

    with torch.no_grad():
        return (torch.from_numpy(x).to(device) @ torch.from_numpy(w).to(device)).cpu().numpy()
