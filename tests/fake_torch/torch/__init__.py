"""A stand-in for ``torch``, for tests only: just what the agent's worker calls after a failed job
(``torch.cuda.is_initialized``, ``synchronize``, ``empty_cache``, ``OutOfMemoryError``), plus
what lets a test job misbehave like a real one on a GPU. Put on the worker's PYTHONPATH by
tests (``tests/fake_torch``); never imported by the test process itself."""
from torch import cuda  # noqa: F401

__version__ = "0.0+fake"
