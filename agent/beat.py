"""The agent's heartbeat ``agents/<agent>.json``: written at once when something worth telling
happens (a job that may kill the agent starts, the agent runs dry, drains, stops), and every
``--heartbeat`` seconds by a thread of its own, which also cuts the agent's logs past
``--log-limit-mb`` (an agent runs for weeks; the job code may be chatty).

What it says is the agent's to build (``payload``, from its state); here is only when and how it
is written: one at a time, ``seq`` one higher each time (masters judge liveness by it changing).
``Notes`` holds the two lines of prose that several parts of the agent write into it.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

from gpupool.jobs.logsetup import logger

from gpupool.agent.worker_control import cap_log
from gpupool.jobs.heartbeat import Heartbeat, write_status
from gpupool.jobs.paths import Spool


class Notes:
    """What went wrong last (``last_error``, stamped with the time of day) and why the next job
    waits (``waiting``): the heartbeat says both; the agent's loop and its parts (``agent.gpufaults``,
    ``agent.diskpause``) write them."""

    def __init__(self) -> None:
        self.last_error: str | None = None
        self.waiting: str | None = None

    def error(self, why: str) -> str:
        """``why`` as the last error, stamped; returns what was noted."""
        self.last_error = f"{time.strftime('%H:%M:%S')} {why}"
        return self.last_error


class Beat:
    def __init__(self, spool: Spool, agent_id: str, payload: Callable[[int], Heartbeat], interval: float,
                 logs: tuple[Path, ...], log_limit: int) -> None:
        self.spool, self.agent_id, self.payload, self.interval = spool, agent_id, payload, interval
        self.logs, self.log_limit = logs, log_limit
        self._seq = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def write(self) -> None:
        """One heartbeat now; raises OSError where it cannot be written."""
        with self._lock:
            self._seq += 1
            write_status(self.spool, self.agent_id, self.payload(self._seq))

    def quietly(self) -> None:
        """One heartbeat now; a full disk costs a warning (the thread tries again)."""
        try:
            self.write()
        except OSError as e:
            logger.warning("agent {}: heartbeat write failed: {}", self.agent_id, e)

    def start(self) -> None:
        threading.Thread(target=self._loop, name="heartbeat", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.write()
            except Exception:
                logger.exception("agent {}: heartbeat write failed", self.agent_id)
            for log in self.logs:
                if cap_log(log, self.log_limit, self.spool):
                    logger.info("agent {}: {} grew past --log-limit-mb; its older lines are in {}.1", self.agent_id,
                                log.name, log.name)
