"""A stand-in for the ``setproctitle`` package, for tests only (the real one rewrites the process's
command line, which no test machine of this project may have installed): ``setproctitle(title)``
appends ``<pid> <title>`` to ``$FAKE_SETPROCTITLE_LOG``, so a test sees which titles a worker set."""
from __future__ import annotations

import os


def setproctitle(title: str) -> None:
    log = os.environ.get("FAKE_SETPROCTITLE_LOG")
    if log:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{os.getpid()} {title}\n".encode())
        finally:
            os.close(fd)
