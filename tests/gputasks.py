"""Tasks that fail as GPU jobs do, against the fake torch of tests/fake_torch (imported by real
agent workers, never by the test process)."""
from __future__ import annotations

import os

from tests.faulty import mark

ASSERT = "CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously reported at some " \
         "other API call, so the stacktrace below might be incorrect."


def step(chunk_id: int, modes: list[str], marks: str | None = None) -> dict:
    """Chunk ``c`` does ``modes[c]`` (the last mode for chunks past the list) after a CUDA call,
    which fails in a poisoned context or on a broken driver."""
    import torch

    mode = modes[min(chunk_id, len(modes) - 1)]
    if marks:
        mark(marks, "start", chunk_id)
    torch.cuda.init()
    torch.cuda.synchronize()
    if mode == "assert":  # a kernel's assert: the job's own error, and the context is lost
        torch.cuda._poison(ASSERT)
        raise RuntimeError(ASSERT)
    if mode == "poison_quietly":  # the job fails otherwise; only the worker's check finds the context lost
        torch.cuda._poison("CUDA error: an illegal memory access was encountered")
        raise ValueError("the job's own error")
    if mode == "oom":
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 15.78 GiB total)")
    if mode == "oom_text":  # a library's own wording, no torch type
        raise RuntimeError("CUDA error: out of memory")
    return {"pid": os.getpid(), "mode": mode}
