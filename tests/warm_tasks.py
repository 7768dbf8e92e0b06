"""Tasks of tests/test_warm_workers.py that real agents import by name (an Executor's calls and
initializers must be module-level functions of an importable module)."""
from __future__ import annotations

import os

TAG = None  # set by init in each worker, as ProcessPoolExecutor's initializer pattern does


def init(tag: str, marks: str) -> None:
    global TAG
    TAG = tag
    with open(marks, "a") as out:
        out.write(f"{os.getpid()}\n")


def init_fails(where: int) -> None:
    raise FileNotFoundError(f"no weights at {where}")


def tagged(x: int) -> tuple:
    return (TAG, os.getpid(), x)
