"""Fair share between runs, decided by each agent when its mailbox holds jobs of several runs.

Several masters (one per run, perhaps different users on different machines) feed one pool
with no server between them; each puts its jobs into the mailboxes breadth first, so every
agent holds jobs of every run that has work left. Each agent then splits its own time between
the runs it holds in proportion to their weights (``Job.share``, the run's ``--share``), by
start-time fair queueing: every run has a virtual time, the seconds this agent spent on it
divided by its weight; the next job is the first queued one of the run with the least. A run
that is new here (or had no job here for a while) starts at the least virtual time of the
others: it gets its share from now on, and no credit for the time it was absent. Nothing
running is ever stopped, so a run that starts late reaches its share as agents finish their
current chunks (within about one chunk duration), as Slurm's and HTCondor's fair share change
what starts next, not what runs.

Each agent decides alone, from its own mailbox and clock: no heartbeat of another agent is
read, and the pool's split is the sum of the agents' splits.
"""
from __future__ import annotations

from gpupool.jobs.descriptor import Job


class FairShare:
    def __init__(self) -> None:
        self.vt: dict[str, float] = {}  # run -> seconds served here / weight, while it has jobs here
        self.last: str | None = None  # the run served last (ties go to another one)

    def choose(self, mailbox: list[Job], skip: set | frozenset = frozenset(), running: Job | None = None,
               expected: float = 0.0) -> Job | None:
        """The job to run next of ``mailbox`` (in mailbox order), leaving out those whose ``uid``
        is in ``skip``. ``running``: a job still running here (pipelining), counted as served for
        ``expected`` seconds. One pass, stopping early while a single run has jobs open (the
        common case, once per job)."""
        running_uid = running.uid if running is not None else None
        first = None
        for j in mailbox:
            if j.uid in skip or j.uid == running_uid:
                continue
            if first is None:
                first = j
            elif j.run != first.run:
                break
        else:
            if first is not None and len(self.vt) > 1:  # one run left: the others' virtual times go
                self.vt = {r: v for r, v in self.vt.items() if r == first.run or (running and r == running.run)}
            return first
        jobs = [j for j in mailbox if j.uid not in skip and j.uid != running_uid]
        weights: dict[str, float] = {}
        for j in jobs:
            weights.setdefault(j.run, j.share)
        self.vt = {r: v for r, v in self.vt.items() if r in weights or (running and r == running.run)}
        floor = min(self.vt.values(), default=0.0)
        for r in weights:
            self.vt.setdefault(r, floor)
        order = list(weights)

        def key(r: str) -> tuple[float, bool, int]:
            ahead = expected / weights[r] if running and running.run == r else 0.0
            return (self.vt[r] + ahead, r == (running.run if running else self.last), order.index(r))

        best = min(order, key=key)
        return next(j for j in jobs if j.run == best)

    def served(self, job: Job, seconds: float) -> None:
        """``job`` ran here for ``seconds``."""
        floor = min(self.vt.values(), default=0.0)
        self.vt[job.run] = self.vt.get(job.run, floor) + max(seconds, 1e-3) / job.share
        self.last = job.run
