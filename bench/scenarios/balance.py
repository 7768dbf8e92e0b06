"""9. The scheduler (issue 11), timed as the user feels it: whole ``python main.py`` commands from
start to exit, agents already running (CPU agents, sleep chunks, so the figures are the
scheduler's and not the CPU's).

* few long chunks: N chunks of L seconds on N idle agents (N = 2, 8, 32); ideal L + start-up,
  and every agent should run one;
* many agents: 48 agents x 10 chunks of 400 ms (ideal 4 s);
* two runs sharing 4 agents: A (240 x 100 ms), then B (40 x 100 ms) started 1 s later, with
  weights 1:1 and 3:1. Figures: B's wall; how long after B started it first ran on its share
  of the agents; each run's share of the agent-seconds while both had work;
* Executor: k calls of 1 s on k idle agents (wall of the ``with`` block).

No peer is run here: none of them shares a pool between runs or moves queued work."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any

from bench.common import REPO, agents, log, main_command, results
from bench.context import Ctx

SIZES = {"full": {"long_s": 3.0, "long_n": (2, 8, 32), "many": (48, 10, 0.4), "a": 240, "b": 40, "calls": 8},
         "quick": {"long_s": 2.0, "long_n": (2, 8), "many": (16, 10, 0.4), "a": 120, "b": 20, "calls": 4},
         "smoke": {"long_s": 0.5, "long_n": (2,), "many": (2, 3, 0.1), "a": 12, "b": 4, "calls": 2}}


def main_py(base: Any, run: str, chunks: int, seconds: float, *extra: str) -> tuple[float, Any]:
    """``python main.py`` of sleep chunks, from start to exit."""
    return main_command(base, run, chunks, "--task", "examples.noop:sleepy", "--kwargs", f'{{"seconds": {seconds}}}',
                        *extra)


def startup(base: Any) -> float:
    """What a run costs beyond its chunks on this pool: ``main.py`` of one empty chunk, start to exit."""
    return min(main_py(base, f"startup-{i}", 1, 0.0)[0] for i in range(3))


def few_long(ctx: Ctx, n: int, seconds: float) -> dict[str, Any]:
    base = ctx.dir(f"long-{n}")
    with agents(base, n):
        main_py(base, "warm", n, 0.01)  # every worker warm, as agents that have served a while are
        start = startup(base)
        walls, used = [], []
        for rep in range(ctx.sizes.repeats):
            wall, _ = main_py(base, f"long-{rep}", n, seconds)
            ctx.check(base, f"long-{rep}", n)
            walls.append(wall)
            used.append(len({r["agent"] for r in results(base, f"long-{rep}")}))
    out = {"agents": n, "chunk_s": seconds, "wall_s": walls, "agents_used": used, "startup_s": start,
           "wall_over_chunk": [w / seconds for w in walls]}
    log(f"9. {n} chunks of {seconds} s on {n} agents: walls {[round(w, 2) for w in walls]} s, agents used {used}")
    return out


def overlap_shares(base: Any, a: str, b: str) -> dict[str, Any]:
    """Agent-seconds each run used while both had work, and when B first ran on half the agents."""
    ra, rb = results(base, a), results(base, b)
    b_start = min(r["submitted_at"] for r in rb)
    end = min(max(r["finished_at"] for r in ra), max(r["finished_at"] for r in rb))
    start = min(r["started_at"] for r in rb)

    def busy(recs: list) -> float:
        return sum(max(0.0, min(r["finished_at"], end) - max(r["started_at"], start)) for r in recs)

    ua, ub = busy(ra), busy(rb)
    return {"b_share": ub / (ua + ub) if ua + ub else None, "overlap_s": end - start, "b_first_start_s": start - b_start}


def b_reaches(base: Any, b: str, k: int) -> float | None:
    """Seconds from B's first submit until k of B's chunks ran at the same time."""
    rb = sorted(results(base, b), key=lambda r: r["started_at"])
    t0 = min(r["submitted_at"] for r in rb)
    for r in rb:
        t = r["started_at"]
        if sum(1 for x in rb if x["started_at"] <= t < x["finished_at"]) >= k:
            return t - t0
    return None


def two_runs(ctx: Ctx, weights: tuple[float, float], a_n: int, b_n: int) -> dict[str, Any]:
    base = ctx.dir(f"share-{weights[0]:g}-{weights[1]:g}")
    out: dict[str, Any] = {"weights": list(weights), "b_wall_s": [], "b_share": [], "b_half_s": []}
    with agents(base, 4):
        main_py(base, "warm", 4, 0.01)
        for rep in range(ctx.sizes.repeats):
            a, b = f"a{rep}", f"b{rep}"
            t = threading.Thread(target=main_py, args=(base, a, a_n, 0.1, "--share", str(weights[0])))
            t.start()
            time.sleep(1.0)
            wall, _ = main_py(base, b, b_n, 0.1, "--share", str(weights[1]))
            t.join()
            ctx.check(base, a, a_n)
            ctx.check(base, b, b_n)
            sh = overlap_shares(base, a, b)
            out["b_wall_s"].append(wall)
            out["b_share"].append(sh["b_share"])
            out["b_half_s"].append(b_reaches(base, b, round(4 * weights[1] / sum(weights))))
    out["b_target_share"] = weights[1] / sum(weights)
    log(f"9. two runs {weights}: B wall {[round(w, 2) for w in out['b_wall_s']]} s, B's share "
        f"{[round(s, 3) if s is not None else None for s in out['b_share']]} (target {out['b_target_share']:.2f}), "
        f"B on its share after {out['b_half_s']} s")
    return out


def executor(ctx: Ctx, k: int) -> dict[str, Any]:
    base = ctx.dir("executor")
    code = ("import sys, time\nfrom gpupool.master.executor import Executor\nfrom examples.noop import pause\n"
            "t0 = time.perf_counter()\nwith Executor(sys.argv[1]) as ex:\n"
            f"    list(ex.map(pause, [1.0] * {k}))\nprint(time.perf_counter() - t0)\n")
    walls = []
    with agents(base, k):
        subprocess.run([sys.executable, "-c", code.replace("1.0", "0.01"), str(base)], cwd=REPO, check=True,
                       capture_output=True, timeout=300)
        for _ in range(ctx.sizes.repeats):
            r = subprocess.run([sys.executable, "-c", code, str(base)], cwd=REPO, capture_output=True, text=True,
                               timeout=300, check=True)
            walls.append(float(r.stdout.strip().splitlines()[-1]))
    log(f"9. executor: {k} calls of 1 s on {k} agents: {[round(w, 2) for w in walls]} s")
    return {"calls": k, "wall_s": walls}


def run(ctx: Ctx) -> dict[str, Any]:
    sz = SIZES[ctx.mode]
    out: dict[str, Any] = {"few_long": [few_long(ctx, n, sz["long_s"]) for n in sz["long_n"]]}
    n, per, secs = sz["many"]
    base = ctx.dir("many")
    with agents(base, n):
        main_py(base, "warm", n, 0.01)
        start = startup(base)
        walls = []
        for rep in range(ctx.sizes.repeats):
            wall, _ = main_py(base, f"many-{rep}", n * per, secs)
            ctx.check(base, f"many-{rep}", n * per)
            walls.append(wall)
    out["many"] = {"agents": n, "chunks": n * per, "chunk_s": secs, "wall_s": walls, "ideal_s": per * secs,
                   "startup_s": start}
    log(f"9. {n} agents x {per} chunks of {secs} s: walls {[round(w, 2) for w in walls]} s (ideal {per * secs} s)")
    out["two_runs"] = [two_runs(ctx, w, sz["a"], sz["b"]) for w in ((1.0, 1.0), (1.0, 3.0))]
    out["executor"] = executor(ctx, sz["calls"])
    return out
