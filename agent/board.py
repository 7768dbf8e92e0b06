"""Fair share between runs, decided by each agent when its mailbox holds jobs of several runs.

Several masters (one per run, perhaps different users on different machines) feed one pool
with no server between them; each puts its jobs into the mailboxes breadth first. An agent
that finishes a job and holds jobs of more than one run takes the next job of the run that is
furthest below its share: the fewest agents running it now for its weight (``Job.share``, the
run's ``--share``), ties going to the job queued first. Nothing running is ever stopped, so a
run that starts late reaches its share as agents finish their current chunks (within about
one chunk duration), as Slurm's and HTCondor's fair share change what starts next.

"Agents running it now" is read from the other agents' heartbeats (``current``), at most once
a second and only while a mailbox holds several runs. A heartbeat counts while it is fresh:
its mtime is within a few heartbeat periods of our own heartbeat's mtime (both stamped by
the file server, so no two machines' clocks are compared).
"""
from __future__ import annotations

import os
import time
from collections import Counter
from typing import Callable

from jobs.descriptor import Job
from jobs.errors import BadFile
from jobs.heartbeat import read_status
from jobs.paths import Spool

REFRESH_S = 1.0


class Board:
    """Who runs what in the pool, as the heartbeats say."""

    def __init__(self, spool: Spool, self_id: str, heartbeat_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.spool, self.self_id, self.clock = spool, self_id, clock
        self.fresh_s = max(10.0, 4 * heartbeat_s)
        self._counts: Counter[str] = Counter()
        self._when = -1e18

    def running(self) -> Counter[str]:
        """Run -> how many other live agents run one of its jobs now."""
        now = self.clock()
        if now - self._when >= REFRESH_S:
            self._counts, self._when = self._read(), now
        return self._counts

    def _read(self) -> Counter[str]:
        try:
            mine = os.stat(self.spool.heartbeat(self.self_id)).st_mtime
        except OSError:
            mine = None
        counts: Counter[str] = Counter()
        for ident in self.spool.agent_ids():
            if ident == self.self_id:
                continue
            path = self.spool.heartbeat(ident)
            try:
                st = read_status(path)
                if mine is not None and mine - os.stat(path).st_mtime > self.fresh_s:
                    continue  # an agent that stopped beating runs nothing
            except (OSError, BadFile, ValueError):
                continue
            cur = st.get("current")
            if isinstance(cur, dict) and isinstance(cur.get("run"), str):
                counts[cur["run"]] += 1
        return counts


def choose(jobs: list[Job], board: Board | None, mine: str | None = None) -> Job | None:
    """The job to run next of ``jobs`` (open ones, in mailbox order): the first one of the run
    furthest below its share. ``mine``: the run this agent itself is running now (if any)."""
    if not jobs:
        return None
    runs: dict[str, float] = {}
    for j in jobs:
        runs.setdefault(j.run, j.share)
    if len(runs) == 1 or board is None:
        return jobs[0]
    counts = board.running()
    order = list(runs)
    best = min(order, key=lambda r: ((counts[r] + (r == mine)) / runs[r], order.index(r)))
    return next(j for j in jobs if j.run == best)
