"""The fake ``torch.cuda``: one CUDA context per process, which a job can poison.

- ``init()`` starts the context; with ``$FAKE_TORCH_DRIVER_ERROR`` set it fails as torch does
  on a host whose driver does not work (and ``is_available()`` is False); with
  ``$FAKE_TORCH_INIT_ERROR`` it fails so though ``is_available()`` is True (a GPU in exclusive
  mode that another process holds).
- ``_poison(message)``: what a device-side assert does to a real context: from then on every
  CUDA call in this process (``synchronize``, ``init``...) raises ``RuntimeError(message)``.
- ``empty_cache()`` appends ``empty_cache <pid>`` to ``$FAKE_TORCH_LOG`` (if set), so a test can
  count the calls.
- ``set_device("cuda:N")`` fails as torch does for a GPU this process does not see (no GPU at
  all: ``CUDA_VISIBLE_DEVICES`` empty, as on a CPU agent).
"""
from __future__ import annotations

import os

_initialized = False
_poisoned: str | None = None


class OutOfMemoryError(RuntimeError):
    pass


def _check() -> None:
    if _poisoned is not None:
        raise RuntimeError(_poisoned)


def init() -> None:
    global _initialized
    if os.environ.get("FAKE_TORCH_DRIVER_ERROR"):
        raise RuntimeError("CUDA driver initialization failed, you might not have a CUDA gpu.")
    if os.environ.get("FAKE_TORCH_INIT_ERROR"):
        raise RuntimeError("CUDA error: CUDA-capable device(s) is/are busy or unavailable")
    _check()
    _initialized = True


def is_available() -> bool:
    return not os.environ.get("FAKE_TORCH_DRIVER_ERROR")


def is_initialized() -> bool:
    return _initialized


def synchronize(device: object = None) -> None:
    init()  # as torch: lazily initialises CUDA, and fails in a poisoned context


def empty_cache() -> None:
    _check()
    log = os.environ.get("FAKE_TORCH_LOG")
    if log:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"empty_cache {os.getpid()}\n".encode())
        finally:
            os.close(fd)


def _poison(message: str) -> None:
    global _poisoned
    _poisoned = message


def set_device(device: object) -> None:
    """As torch: ``cuda:N`` must be one of the GPUs this process sees (``CUDA_VISIBLE_DEVICES``,
    which the agent narrows to its own GPU, so only ``cuda:0``)."""
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible:
        raise RuntimeError("No CUDA GPUs are available")
    index = int(str(device).rpartition(":")[2] or 0)
    if not 0 <= index < len(visible):
        raise RuntimeError("CUDA error: invalid device ordinal\nCUDA kernel errors might be asynchronously "
                           "reported at some other API call, so the stacktrace below might be incorrect.")
    init()
