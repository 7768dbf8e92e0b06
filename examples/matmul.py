"""The demo workload, modelled on the SGE-style template: each chunk multiplies its own
matrices with one shared matrix. torch on the GPU when the agent has one, numpy otherwise.

    python main.py --base BASE --task examples.matmul:multiply --chunks 100
    python main.py --base BASE --task examples.matmul:multiply --chunks 16 --shared W.npz --data chunks/
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


def _matmul_torch(x: np.ndarray, w: np.ndarray, device: str) -> np.ndarray:
    try:
        import torch
    except ImportError:  # no torch on this machine: the GPU agent still works, on numpy
        return x @ w
    with torch.no_grad():
        return (torch.from_numpy(x).to(device) @ torch.from_numpy(w).to(device)).cpu().numpy()
