"""How many short chunks go in one job (``jobs.batches``): the dispatcher's batch size rule.

A job costs a round trip whatever it holds: the result's way to the master, the refill's way
back to the agent, a mailbox rewrite, a file. For chunks much shorter than that round trip the
pool spends its time on the trips; a batch of chunks pays one for all of them. The rule:

* nothing is batched before a chunk's duration is known (the first jobs of a run go one chunk
  each): a run of hour-long chunks is never batched, and never waits for a batch to fill;
* chunks that take half a round trip or more are never batched (their trip is already hidden
  behind the queue at their agent: the depth rule of ``master.core.dispatcher``);
* a shorter chunk goes in batches that last about one round trip, and at least so many chunks
  that the run leaves at most ``FILES`` result files (a million chunks: a few thousand files),
  as long as a batch lasts at most ``MAX_BATCH_S``;
* never more than a fair share of what is left (pending chunks / agents), so the run's last
  batches end together, and never more than ``MAX_BATCH`` chunks or ``MAX_BATCH_BYTES`` of a
  sweep's parameters (a batch's job and results stay small files, a mailbox of them too);
* ``--batch K`` fixes the size (``1``: never batch), within the chunks left.
"""
from __future__ import annotations

import math

FILES = 4000  # result files a run of short chunks leaves at most, where its batches may be that large
MAX_BATCH = 10_000  # chunks in one job at most
MAX_BATCH_S = 1.0  # seconds of work one batch holds at most (when the file count asks for more)
SHORT = 0.5  # a chunk shorter than this fraction of the round trip is a short one
MAX_BATCH_BYTES = 64 * 1024  # of a sweep's parameters in one batch's descriptor: a mailbox holding
#                              --max-depth (64) such batches stays well within its 16 MB (jobs.mailbox)
RTT_FLOOR = 0.002  # seconds a round trip takes at least (two file writes, two wake-ups), measured or not


def batch_size(mean_s: float | None, rtt: float, chunks: int, pending: int, agents: int,
               given: int | None = None) -> int:
    """Chunks per job: ``mean_s`` the mean chunk duration seen (None: none finished yet),
    ``rtt`` the round trip (seconds), ``chunks`` the run's chunk count, ``pending`` the chunks
    waiting and ``agents`` the agents that may take them; ``given``: ``--batch``."""
    fair = max(1, math.ceil(pending / max(1, agents)))
    if given is not None:
        return max(1, min(given, fair, MAX_BATCH))
    rtt = max(rtt, RTT_FLOOR)
    if mean_s is None or mean_s >= SHORT * rtt:
        return 1
    mean = max(mean_s, 1e-6)
    size = max(rtt / mean, min(chunks / FILES, MAX_BATCH_S / mean))
    return max(1, min(int(size), fair, MAX_BATCH))
