"""2. Small chunks: a 64x64 numpy matmul per chunk, with 2 workers. Our pool in callable mode
and in script mode, OctoRun running the equivalent script, the same processes by hand, Ray
tasks and actors, and the plain loop. Figures are wall time per chunk; ``ours_main_py`` is the
whole ``python main.py`` command (start-up to exit) divided by its chunks, as OctoRun's is."""
from __future__ import annotations

from typing import Any

from bench import tasks
from bench.common import REPO, agents, feed, log, main_command
from bench.context import Ctx
from bench.peers import by_hand, floor, octorun

SCRIPT = REPO / "bench" / "scripts" / "matmul64.py"
WORKERS = 2


def _is_product(v: Any) -> bool:
    return isinstance(v, dict) and v["Y"].shape == (64, 64)


def run(ctx: Ctx) -> dict[str, Any]:
    s = ctx.sizes
    n, ns = s.small_chunks, s.small_script_chunks
    out: dict[str, Any] = {"chunks": n, "script_chunks": ns, "workers": WORKERS}
    per = lambda key, wall, chunks: out.setdefault(key, []).append(wall / chunks)  # noqa: E731
    base = ctx.dir("small")
    with agents(base, WORKERS):
        feed(base, "warm", 2 * WORKERS, task="bench.tasks:matmul64")
        for rep in range(s.repeats):  # interleaved, so that each repeat's figures share the noise
            r = feed(base, f"call-{rep}", n, task="bench.tasks:matmul64")
            ctx.check(base, r.run, n)
            per("ours_callable", r.wall_s, n)
            wall, _ = main_command(base, f"cmd-{rep}", n, "--task", "bench.tasks:matmul64")  # the whole command
            ctx.check(base, f"cmd-{rep}", n)
            per("ours_main_py", wall, n)
            d = ctx.dir("script-out")
            r = feed(base, f"script-{rep}", ns, script=str(SCRIPT), kwargs={"out_dir": str(d)})
            ctx.check(base, r.run, ns)
            ctx.peer_check("ours", "script outputs", len(list(d.iterdir())) == ns)
            per("ours_script", r.wall_s, ns)
            d = ctx.dir("hand-out")
            h = by_hand(SCRIPT, ns, WORKERS, {"out_dir": str(d)})
            ctx.peer_check("by hand", "small", h["ok"] and len(list(d.iterdir())) == ns)
            per("by_hand", h["wall_s"], ns)
            if ctx.octorun:
                w = ctx.dir("oct-small")
                (w / "out").mkdir()
                o = octorun(w, SCRIPT, ns, WORKERS, {"out_dir": str(w / "out")})
                ctx.peer_check("octorun", "small", o["ok"] and len(list((w / "out").iterdir())) == ns)
                per("octorun", o["wall_s"], ns)
            per("floor", floor(tasks.matmul64, n)["wall_s"], n)
    log("2. small, ms per chunk: " + ", ".join(
        f"{k} {[round(x * 1000, 2) for x in v]}" for k, v in out.items() if isinstance(v, list)))
    return out


def ray(ctx: Ctx, rs: Any, out: dict[str, Any]) -> None:
    """Ray tasks and actors on the same 200 chunks (a session with num_cpus=2)."""
    n = ctx.sizes.small_chunks
    for rep in range(ctx.sizes.repeats):
        t = rs.tasks("matmul64", n, check=_is_product)
        a = rs.actors("matmul64", n, check=_is_product)
        ctx.peer_check("ray", "small tasks", t["ok"])
        ctx.peer_check("ray", "small actors", a["ok"])
        out.setdefault("ray_tasks", []).append(t["wall_s"] / n)
        out.setdefault("ray_actors", []).append(a["wall_s"] / n)
