"""3. Dispatch latency on an idle pool: one-chunk runs, one after another, to one idle agent.

Every run has worker processes of its own (issue 22, ``agent.workers``): a run's first chunk goes
to the agent's spare worker, made ready while the agent idled. The pool idles 0.5-0.8 s between
two runs (the target's figure); ``back_to_back`` (inotify, no target) has the runs 20-80 ms apart,
where the spare started as the last run ended may still be starting.

submit-to-start: the job descriptor's ``submitted_at`` (stamped by the master as it writes the
mailbox) to the result's ``started_at`` (stamped by the agent's worker as the task is called).
finish-to-collected: the result's ``finished_at`` to the moment the master's loop took it in.
Both clocks are this host's ``time.time()``. Peer: Ray, from ``f.remote()`` to the task's start."""
from __future__ import annotations

import random
import time
from typing import Any

from bench.common import agents, feed, log, percentile, results
from bench.context import Ctx


def _pcts(xs: list[float]) -> dict[str, Any]:
    return {"n": len(xs), **{f"p{q}_ms": None if not xs else round(percentile(xs, q) * 1000, 3) for q in (50, 90, 99)},
            "max_ms": round(max(xs) * 1000, 3) if xs else None}


def run(ctx: Ctx) -> dict[str, Any]:
    s = ctx.sizes
    rnd = random.Random(5)
    modes = {"inotify": ["--watch", "inotify"],
             "poll": ["--watch", "poll", "--poll-interval", str(s.poll_interval),
                      "--max-poll-interval", str(s.poll_interval)]}
    out: dict[str, Any] = {"poll_interval_s": s.poll_interval, "samples": s.latency_samples}
    for mode, args, gap in (("inotify", modes["inotify"], (0.5, 0.8)), ("poll", modes["poll"], (0.5, 0.8)),
                            ("back_to_back", modes["inotify"], (0.02, 0.08))):
        base = ctx.dir(f"lat-{mode}")
        start, collect = [], []
        with agents(base, 1, args):
            feed(base, "warm", 1, task="bench.tasks:noop")
            for i in range(s.latency_samples):
                time.sleep(rnd.uniform(*gap))  # idle, and out of phase with any poll
                r = feed(base, f"lat-{i}", 1, task="bench.tasks:noop", probe=True)
                ctx.check(base, r.run, 1)
                rec = results(base, r.run)[0]
                start.append(rec["started_at"] - r.submitted[0])
                collect.append(r.collected[0] - rec["finished_at"])
        out[mode] = {"submit_to_start": _pcts(start), "finish_to_collected": _pcts(collect)}
        log(f"3. latency {mode}: submit-to-start {out[mode]['submit_to_start']}, "
            f"finish-to-collected {out[mode]['finish_to_collected']}")
    return out


def ray(ctx: Ctx, rs: Any, out: dict[str, Any]) -> None:
    """Ray: ``f.remote()`` to the task's first line, on an idle session."""
    rnd = random.Random(6)
    rs.tasks("noop", 4)
    f = rs._remote_task("started_at", False)
    lat = []
    for i in range(ctx.sizes.latency_samples):
        time.sleep(rnd.uniform(0.02, 0.08))
        t0 = time.time()
        lat.append(rs.ray.get(f.remote(i)) - t0)
    out["ray_tasks"] = {"submit_to_start": _pcts(lat)}
