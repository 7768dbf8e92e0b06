"""6. Scale: runs of 1k, 10k, 100k no-op chunks on 2 agents, the master in a child process.

Per size: submit time (``Pool.submit`` plus the run's setup up to the first job handed out; our
master creates job descriptors lazily, a few per agent, so nothing grows with the chunk count
here but the recovery scan), the master's peak memory over the whole run, the wall time, then
over the finished results: ``python -m master status --base B --json`` and a re-run of the same
command (resume: it rereads every result and finds nothing to do), each as a fresh process.
Peer: Ray's time to submit the same number of tasks (``f.remote`` calls) and to finish them."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from typing import Any

from bench.common import REPO, agents, log, master_command
from bench.context import Ctx

WORKERS = 2


def _child(base: str, run: str, n: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "bench.child", "--base", base, "--run", run, "--chunks", str(n)],
                       cwd=REPO, capture_output=True, text=True, timeout=7200)
    if p.returncode != 0:
        raise RuntimeError(f"master child failed: {p.stderr[-2000:]}")
    return {**json.loads(p.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - t0}


def _status(base: str) -> tuple[float, dict[str, Any]]:
    wall, p = master_command("status", "--base", base, "--json")
    return wall, json.loads(p.stdout)


def run(ctx: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {"sizes": list(ctx.sizes.scale), "ours": {}}
    for n in ctx.sizes.scale:
        base = ctx.dir(f"scale{n}")
        with agents(base, WORKERS):
            first = _child(str(base), "scale", n)
            ctx.check(base, "scale", n)
            st_s, st = _status(str(base))
            ok = next(r["ok"] for r in st["runs"] if r["run"] == "scale")
            ctx.peer_check("ours", f"status ok count {n}", ok == n)
            again = _child(str(base), "scale", n)
            ctx.peer_check("ours", f"resume {n}", again["ok"] == n)
        out["ours"][n] = {"submit_s": first["submit_s"], "setup_s": first["setup_s"], "wall_s": first["wall_s"],
                          "chunks_per_s": n / first["wall_s"], "maxrss_mb": first["maxrss_mb"],
                          "status_s": st_s, "resume_s": again["wall_s"], "resume_process_s": again["process_s"],
                          "resume_maxrss_mb": again["maxrss_mb"]}
        log(f"6. scale {n}: " + ", ".join(f"{k} {v:.3g}" for k, v in out["ours"][n].items()))
    out["growth"] = growth(out["ours"])
    return out


def growth(points: dict[int, dict[str, float]]) -> dict[str, float | None]:
    """Log-log slope between the smallest and largest size (1 = linear): per measure."""
    ns = sorted(points)
    if len(ns) < 2:
        return {}
    a, b = ns[0], ns[-1]
    out = {}
    for k in ("setup_s", "wall_s", "maxrss_mb", "status_s", "resume_s"):
        va, vb = points[a][k], points[b][k]
        out[k] = round(math.log(vb / va) / math.log(b / a), 3) if va and vb and va > 0 and vb > 0 else None
    return out


def ray(ctx: Ctx, rs: Any, out: dict[str, Any]) -> None:
    for n in ctx.sizes.scale:
        if n > 20000 and ctx.mode != "full":
            continue
        t = rs.tasks("noop", n, check=lambda v: v is None)
        ctx.peer_check("ray", f"scale {n}", t["ok"])
        out.setdefault("ray_tasks", {})[n] = {"submit_s": t["submit_s"], "wall_s": t["wall_s"]}
        log(f"6. scale {n}, Ray tasks: submit {t['submit_s']:.2f} s, wall {t['wall_s']:.2f} s")
