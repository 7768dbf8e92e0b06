"""12. ``Executor.map`` against ``ProcessPoolExecutor(2).map`` (issue 27): ``pow(i, 2)`` over N
calls, with ``chunksize`` K (each group of K calls one chunk of ours, one work item of theirs) and
with ``chunksize=1`` (a chunk per call), side by side in one child process per repeat, interleaved.

Each side is timed from its executor's constructor to the last result taken from map's iterator
(ProcessPoolExecutor starts its processes there; ours finds its agents running and warm, as a pool
is); the close (``shutdown(wait=True)``: ours removes its run) is timed apart. Our side first maps
a few calls on a throwaway executor, so that the agents have run an Executor before.

    python -m bench.scenarios.mapping BASE N K REPEATS    # the child: one JSON line
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

SIZES = {"full": ((100_000, 1000), (10_000, 1)), "quick": ((20_000, 1000), (2_000, 1)),
         "smoke": ((2_000, 100), (200, 1))}


def _timed(make: Any, n: int, k: int) -> tuple[float, float]:
    """(seconds from the constructor to the last result, seconds of the close)."""
    t0 = time.perf_counter()
    ex = make()
    values = list(ex.map(pow, range(n), [2] * n, chunksize=k))
    t1 = time.perf_counter()
    ex.shutdown(wait=True)
    if values != [i * i for i in range(n)]:
        raise AssertionError(f"{type(ex).__name__}.map gave wrong values")
    return t1 - t0, time.perf_counter() - t1


def child(base: str, n: int, k: int, repeats: int) -> dict[str, Any]:
    from concurrent.futures import ProcessPoolExecutor

    from gpupool.master.executor import Executor

    with Executor(base) as ex:  # the agents have served an Executor before
        list(ex.map(pow, range(100), [2] * 100, chunksize=k))
    out: dict[str, Any] = {"calls": n, "chunksize": k, "ours_s": [], "ppe_s": [], "ours_close_s": [], "ppe_close_s": []}
    for _ in range(repeats):
        for side, make in (("ppe", lambda: ProcessPoolExecutor(2)), ("ours", lambda: Executor(base))):
            wall, close = _timed(make, n, k)
            out[f"{side}_s"].append(wall)
            out[f"{side}_close_s"].append(close)
    return out


def run(ctx: Any) -> dict[str, Any]:
    from bench.common import REPO, agents, log

    out: dict[str, Any] = {"cases": []}
    base = ctx.dir("map")
    with agents(base, 2):
        for n, k in SIZES[ctx.mode]:
            r = subprocess.run([sys.executable, "-m", "bench.scenarios.mapping", str(base), str(n), str(k),
                                str(ctx.sizes.repeats)], cwd=REPO, capture_output=True, text=True, timeout=900)
            if r.returncode != 0:
                raise RuntimeError(f"the map benchmark's child failed: {r.stderr[-2000:]}")
            case = json.loads(r.stdout.strip().splitlines()[-1])
            case["ratio"] = [a / b for a, b in zip(case["ours_s"], case["ppe_s"])]
            out["cases"].append(case)
            log(f"12. map of {n:,} calls of pow, chunksize {k}: ours {[round(x, 3) for x in case['ours_s']]} s, "
                f"ProcessPoolExecutor(2) {[round(x, 3) for x in case['ppe_s']]} s, ratio "
                f"{[round(x, 2) for x in case['ratio']]}")
    return out


if __name__ == "__main__":
    base, n, k, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(child(base, n, k, repeats)))
