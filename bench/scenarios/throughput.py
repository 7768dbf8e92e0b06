"""1. Tiny chunks: no-op throughput (chunks/s) with 1, 2 and 4 agents, vs Ray tasks and actors,
OctoRun and a plain loop.  4. Idle gap: from the same runs' results (every agent has a backlog)."""
from __future__ import annotations

from typing import Any

from bench import tasks
from bench.common import REPO, agents, feed, idle_gaps, log, percentile, results
from bench.context import Ctx
from bench.peers import floor, octorun


def run(ctx: Ctx) -> dict[str, Any]:
    s = ctx.sizes
    out: dict[str, Any] = {"chunks": s.tiny_chunks, "ours": {}, "gaps": {}}
    for k in s.tiny_agents:
        base = ctx.dir(f"tiny{k}")
        rates, gaps = [], []
        with agents(base, k) as ag:
            feed(base, f"warm{k}", 2 * k, task="bench.tasks:noop")  # workers up, task imported
            for rep in range(s.repeats):
                r = feed(base, f"tiny{k}-{rep}", s.tiny_chunks, task="bench.tasks:noop")
                ctx.check(base, r.run, r.chunks)
                rates.append(r.chunks / r.wall_s)
                gaps += idle_gaps(results(base, r.run))
        out["ours"][k] = rates
        out["gaps"][k] = {"n": len(gaps), "p50_ms": _ms(percentile(gaps, 50)), "p90_ms": _ms(percentile(gaps, 90)),
                          "p99_ms": _ms(percentile(gaps, 99)), "max_ms": _ms(max(gaps) if gaps else None)}
        log(f"1. tiny, {k} agent(s): {[round(x) for x in rates]} chunks/s; idle gap p50 "
            f"{out['gaps'][k]['p50_ms']} ms p99 {out['gaps'][k]['p99_ms']} ms")
    out["floor"] = [s.tiny_chunks * 20 / floor(tasks.noop, s.tiny_chunks * 20)["wall_s"] for _ in range(s.repeats)]
    if ctx.octorun:
        out["octorun"] = {}
        for rep in range(s.repeats):
            w = ctx.dir("oct-tiny")
            r = octorun(w, REPO / "bench" / "scripts" / "noop.py", s.tiny_octorun_chunks, 2)
            ctx.peer_check("octorun", "tiny", r["ok"])
            out["octorun"].setdefault(2, []).append(s.tiny_octorun_chunks / r["wall_s"])
        log(f"1. tiny, OctoRun 2 workers: {[round(x, 1) for x in out['octorun'][2]]} chunks/s")
    return out


def ray(ctx: Ctx, rs: Any, out: dict[str, Any]) -> None:
    """Ray tasks and actors with ``num_cpus`` = the session's worker count."""
    s, k = ctx.sizes, rs.workers
    for rep in range(s.repeats):
        t = rs.tasks("noop", s.tiny_chunks, check=lambda v: v is None)
        a = rs.actors("noop", s.tiny_chunks, check=lambda v: v is None)
        ctx.peer_check("ray", f"tiny tasks {k}", t["ok"])
        ctx.peer_check("ray", f"tiny actors {k}", a["ok"])
        out.setdefault("ray_tasks", {}).setdefault(k, []).append(s.tiny_chunks / t["wall_s"])
        out.setdefault("ray_actors", {}).setdefault(k, []).append(s.tiny_chunks / a["wall_s"])
    log(f"1. tiny, Ray {k}: tasks {[round(x) for x in out['ray_tasks'][k]]}, "
        f"actors {[round(x) for x in out['ray_actors'][k]]} chunks/s")


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 3)
