"""13. Batches for short work (issue 27): no-op chunks on 2 agents (running and warm).

(a) Throughput: 3,000 no-op chunks fed by ``master.api.Pool`` in this process, from submit to the
last result taken in (as scenario 1), with the pool's default (short chunks batched by their
measured duration) and with ``batch=1`` (batching off; skipped with a note where the tree has no
``batch``), interleaved per repeat; against Ray tasks on the same chunks after ``ray.init`` (Ray
phase, before ours, as every Ray measurement).

(b) A million chunks (``--quick``: 100,000 and 1,000, the million taken on the line through
both; ``run.py --batch-chunks N``): the whole ``python main.py`` command, start to exit, run by
``python -m bench.child main`` (``main.py`` in that process, so that its peak memory, VmHWM, is
the master's own); then the files under
``results/<run>`` and their bytes (the exactly-once check lists them), and ``python -m master
status --base B --json`` and ``python -m master collect --base B --run R --out R.jsonl``, each a
fresh process, timed. ``Executor.map`` with ``chunksize`` is scenario 12's."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, agents, feed, log, master_command
from bench.context import Ctx

WORKERS = 2
FULL_SIZE = 1_000_000  # the run


def main_py(base: str, run: str, n: int) -> dict[str, Any]:
    """``python main.py`` over ``n`` no-op chunks, timed from start to exit, and its peak memory."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "bench.child", "main", "--base", base, "--chunks", str(n), "--run", run,
                        "--task", "bench.tasks:noop", "--no-progress"], cwd=REPO, capture_output=True, text=True,
                       timeout=7200)
    wall = time.perf_counter() - t0
    got = json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else {"rc": p.returncode}
    if p.returncode != 0 or got.get("rc") != 0:
        raise RuntimeError(f"main.py over {n} chunks failed ({p.returncode}): {p.stderr[-2000:]}")
    return {"wall_s": wall, "maxrss_mb": got["maxrss_mb"]}


def run(ctx: Ctx) -> dict[str, Any]:
    s = ctx.sizes
    n, big = s.batch_chunks, s.batch_big
    out: dict[str, Any] = {"chunks": n, "workers": WORKERS, "ours": [], "ours_batch1": [], "big": {}}
    sides = [("ours", None), ("ours_batch1", 1)]  # by measured duration, and one chunk a job
    base = ctx.dir("batch")
    with agents(base, WORKERS):
        feed(base, "warm", 2 * WORKERS, task="bench.tasks:noop")  # workers up, task imported
        for rep in range(s.repeats):  # interleaved, so that each repeat's figures share the noise
            for key, batch in sides:
                r = feed(base, f"{key}-{rep}", n, task="bench.tasks:noop", batch=batch)
                ctx.check(base, r.run, n)
                out[key].append(n / r.wall_s)
        log(f"13. {n:,} no-op chunks, {WORKERS} agents: default {[round(x) for x in out['ours']]} chunks/s"
            + (f", batch 1 {[round(x) for x in out['ours_batch1']]}" if out["ours_batch1"] else ""))
        for size in sizes(big):
            out["big"][size] = point = big_run(ctx, base, size)
            log(f"13. {size:,} no-op chunks, python main.py: " + ", ".join(f"{k} {v:.4g}" for k, v in point.items()))
    return out


def sizes(big: int) -> list[int]:
    """The sizes of the whole-command runs: ``big``, and below a million one a hundredth of it
    as well (at least 1,000), so that the report can take the million on the line through both."""
    return [big // 100, big] if FULL_SIZE > big >= 100_000 else [big]


def big_run(ctx: Ctx, base: Path, n: int) -> dict[str, Any]:
    """``python main.py`` over ``n`` no-op chunks, its results checked and counted, then
    ``status`` and ``collect`` on them."""
    name = f"big-{n}"
    m = main_py(str(base), name, n)
    files = ctx.check(base, name, n)
    st_s, st = master_command("status", "--base", str(base), "--json")
    ok = next((r["ok"] for r in json.loads(st.stdout)["runs"] if r["run"] == name), None)
    ctx.peer_check("ours", f"status ok count {n}", ok == n)
    dest = ctx.dir("collect") / f"{name}.jsonl"
    co_s, _ = master_command("collect", "--base", str(base), "--run", name, "--out", str(dest))
    with open(dest, "rb") as f:
        rows = sum(1 for _ in f)
    ctx.peer_check("ours", f"collect rows {n}", rows == n)
    return {"wall_s": m["wall_s"], "chunks_per_s": n / m["wall_s"], "maxrss_mb": m["maxrss_mb"],
            "files": files["files"], "bytes": files["bytes"], "disk_bytes": files["disk_bytes"],
            "slots": files["slots"], "status_s": st_s, "collect_s": co_s}


def ray(ctx: Ctx, rs: Any, out: dict[str, Any]) -> None:
    """Ray tasks on the same chunks (a session with num_cpus=2, after its ray.init)."""
    n = ctx.sizes.batch_chunks
    for _ in range(ctx.sizes.repeats):
        t = rs.tasks("noop", n, check=lambda v: v is None)
        ctx.peer_check("ray", f"{n} no-op tasks", t["ok"])
        out.setdefault("ray_tasks", []).append(n / t["wall_s"])
    log(f"13. {n:,} no-op chunks, Ray tasks: {[round(x) for x in out['ray_tasks']]} chunks/s")
