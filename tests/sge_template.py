"""Job code written for the SGE-style template, unchanged: ``expensive_task`` takes the chunk's
arrays by name and returns a tuple; ``on_gpu`` builds its device as ``cuda:{gpu_id}`` (through
the fake torch of tests/fake_torch on the workers' PYTHONPATH). Imported by real agents."""
import numpy as np


def expensive_task(A, B, shared):
    C = A @ B + shared
    return C, C.sum(axis=1)


def on_gpu(A, gpu_id):
    import torch

    torch.cuda.set_device(f"cuda:{gpu_id}")
    return {"A2": np.asarray(A) * 2}
