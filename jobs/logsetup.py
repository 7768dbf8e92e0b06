"""The pool's logs: silent when the pool is a library, configured by its own commands.

The pool logs through loguru's one global logger. Imported as a library (``gpupool.master.api``,
``gpupool.master.executor``), its packages are disabled (loguru's advice for libraries), so an
application sees nothing it did not ask for; one call routes them anywhere::

    from gpupool.master.api import pool_logs
    pool_logs("INFO")                      # the pool's INFO and up to stderr
    pool_logs("DEBUG", sink="pool.log")    # or to a file (any loguru sink)
    pool_logs(None)                        # silent again

Its own commands (``main.py``, ``python -m master``, ``python -m agent``) call ``command_logs``.

Every module of the pool that logs takes ``logger`` from here (``from gpupool.jobs.logsetup
import logger``), so the pool is quiet from the moment anything of it can log, and a process
that never logs (a worker) never imports loguru (a third of a worker's start-up, issue 22).
"""
from __future__ import annotations

import logging
import sys
from typing import Any

from loguru import logger

PACKAGES = ("gpupool",)  # the one import name of every module of the pool (issue 22)
COMMAND_FORMAT = "{time:HH:mm:ss} {level}: {message}"
_chosen = False  # pool_logs or command_logs said what to do: a package imported later keeps to it


def _ours(record: dict[str, Any]) -> bool:
    return (record["name"] or "").split(".")[0] in PACKAGES


def pool_logs(level: str | None = "WARNING", sink: Any = sys.stderr, fmt: str | None = None) -> int | None:
    """Send the pool's log lines of ``level`` and up to ``sink`` (only the pool's: the
    application's own loguru lines are left to its own sinks); ``None`` silences them. Returns
    the sink's id (for ``logger.remove``)."""
    global _chosen
    _chosen = True
    for name in PACKAGES:
        (logger.enable if level is not None else logger.disable)(name)
    if level is None:
        return None
    return logger.add(sink, level=level, filter=_ours, **({"format": fmt} if fmt else {}))


def command_logs(level: str = "WARNING", fmt: str = COMMAND_FORMAT) -> None:
    """For the pool's own commands: the process's only sink is stderr at ``level`` (everything
    such a process logs is the pool's, its ``__main__`` module's lines too)."""
    global _chosen
    _chosen = True
    logging.getLogger("watchdog").setLevel(logging.CRITICAL)  # a benign error when an observer stops mid-event
    logger.remove()
    for name in PACKAGES:
        logger.enable(name)
    logger.add(sys.stderr, level=level, format=fmt)


def quiet_by_default() -> None:
    """A library logs nothing until asked (see module): done once, as this module is imported."""
    if not _chosen:
        for name in PACKAGES:
            logger.disable(name)


quiet_by_default()
