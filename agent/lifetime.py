"""When an agent ends by itself (issue 26): after an idle time (``--idle-exit``), and before the
time it must end by (``--end-at`` / ``--time-left``, or its Slurm job's end, read once at start).

An agent that knows its end does not start a chunk that would not fit: the chunk's expected
length is how long the last chunk of its run took here, or before that the run's ``--chunk-time``
(``Job.chunk_time``; neither: unknown, it starts if the margin is left). When the next chunk would not fit, or ``margin`` seconds
before the end, the agent stops as on ``start_agents.sh stop``: it finishes nothing new, its
heartbeat says ``stopped``, and masters hand its queued jobs to other agents at once. The
end's signal (Slurm's ``--signal``) is then only a safety net for a chunk that ran longer than
its run's last one.

The agent's loop asks ``ending`` before it chooses a job, ``refuses(job, expected)`` before it
starts (or pipelines) one, and ``idle_over`` when it found nothing to run; ``active`` marks work.
"""
from __future__ import annotations

import math
import os
import subprocess
import time
from datetime import datetime
from typing import Callable

from gpupool.jobs.descriptor import Job
from gpupool.jobs.words import plural

END_MARGIN_S = 60.0  # default --end-margin: what a stop and a hand-back need before the end


def parse_end(text: str, now: float | None = None) -> float:
    """``--end-at``: seconds since the epoch, or a local ISO time (``2026-12-07T18:00``, or
    ``18:00`` for today). ValueError naming what it expected otherwise."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        if "T" in text or "-" in text:
            return datetime.fromisoformat(text).timestamp()
        day = datetime.fromtimestamp(time.time() if now is None else now)
        at = datetime.combine(day.date(), datetime.strptime(text, "%H:%M" if text.count(":") == 1 else "%H:%M:%S").time())
        return at.timestamp()
    except ValueError:
        raise ValueError(f"--end-at {text!r}: expected seconds since the epoch, an ISO time "
                         f"(2026-12-07T18:00:00) or a time of today (18:00)") from None


def slurm_end(environ: dict[str, str] | None = None) -> tuple[float, str] | None:
    """The end of the Slurm job this process runs in (``squeue -o %e``, asked once), with a few
    words saying so; None outside Slurm, or where it cannot be read (an unlimited job)."""
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True, text=True, timeout=20)
        return parse_end(out.stdout.strip()), f"Slurm job {job}'s time limit"
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


class Lifetime:
    def __init__(self, agent_id: str, clock: Callable[[], float], idle_exit: float | None = None,
                 end_at: float | None = None, margin: float = END_MARGIN_S, why_end: str = "its --end-at",
                 wall: Callable[[], float] = time.time) -> None:
        self.agent_id, self.clock, self.idle_exit, self.margin, self.why_end = agent_id, clock, idle_exit, margin, why_end
        # the end on the loop's clock (monotonic): a wall clock that jumps does not move it
        self.deadline = None if end_at is None else clock() + (end_at - wall())
        self.last_active = clock()

    def active(self) -> None:
        """A job ran (or was chosen) now: the idle time counts from here."""
        self.last_active = self.clock()

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - self.clock()

    def ending(self) -> str | None:
        """Why the agent must stop now (its end is within the margin), or None."""
        if self.left() > self.margin:
            return None
        return f"{max(0.0, self.left()):.0f} s left before {self.why_end}"

    def refuses(self, job: Job, expected: float | None) -> str | None:
        """Why ``job`` must not start here (it would not end in time), or None. ``expected``: how
        long its run's last chunk took here, or its --chunk-time (None: unknown, it starts)."""
        need = (expected or 0.0) + self.margin
        if self.left() >= need:
            return None
        took = "a chunk of unknown length" if expected is None else f"{job.run}'s chunks take about {expected:.0f} s here"
        return f"{max(0.0, self.left()):.0f} s left before {self.why_end}, and {took} (plus {self.margin:g} s to stop)"

    def idle_over(self) -> str | None:
        """Why the agent stops for having had nothing to run (``--idle-exit``), or None."""
        if self.idle_exit is None or self.clock() - self.last_active < self.idle_exit:
            return None
        return f"no job for {plural(round(self.idle_exit), 'second')} (--idle-exit)"
