#!/usr/bin/env python3
"""The benchmark suite of issue 5: our pool against OctoRun, Ray and the plain-loop floor.

    pip install -r bench/requirements.txt      # the peers and matplotlib (not needed for --smoke)
    python bench/run.py                        # full suite (tens of minutes on 2 cores)
    python bench/run.py --quick                # every scenario, smaller (under 2 minutes on 2 cores)
    python bench/run.py --smoke --out DIR      # seconds, our pool and the floor only (CI)
    python bench/run.py --only 13 --batch-chunks N   # issue 27's batches, a whole main.py run of N chunks

Writes ``bench/results/<date>-<host>[-quick][-only-13].json``, ``.md`` (tables) and ``.png`` (chart), and
prints PASS/FAIL per target. Exit code 1 if any run broke the exactly-once check (or, with
``--strict``, if a target failed)."""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import log, machine  # noqa: E402
from bench.context import MODES, Ctx  # noqa: E402

SCENARIOS = {"1": "1_tiny", "2": "2_small", "3": "3_latency", "5": "5_shared", "6": "6_scale", "7": "7_idle",
             "8": "8_gpu", "9": "9_balance",
             "10": "10_sharedfs", "11": "11_boundary", "12": "12_map", "13": "13_batch"}  # 4 is measured inside 1


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes: under 2 minutes on 2 cores")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, no peers: seconds (the CI form)")
    p.add_argument("--only", help="comma-separated scenario numbers to run (1-13; 4 comes with 1)")
    p.add_argument("--batch-chunks", type=int, metavar="N",
                   help="13: no-op chunks of the whole main.py run (default 1,000,000; --quick 100,000)")
    p.add_argument("--no-peers", action="store_true", help="skip OctoRun and Ray")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="output folder")
    p.add_argument("--keep", action="store_true", help="keep the temporary spools")
    p.add_argument("--strict", action="store_true", help="exit 1 if any target fails")
    return p.parse_args(argv)


def scenario_modules() -> dict[str, Any]:
    from bench.scenarios import (balance, batching, boundary, gpu, idle, latency, mapping, scale, shared, sharedfs,
                                 small, throughput)

    return {"1_tiny": throughput, "2_small": small, "3_latency": latency, "5_shared": shared, "6_scale": scale,
            "7_idle": idle, "8_gpu": gpu, "9_balance": balance,
            "10_sharedfs": sharedfs, "11_boundary": boundary, "12_map": mapping, "13_batch": batching}


def ray_phase(ctx: Ctx, raw: dict[str, dict[str, Any]], chosen: list[str]) -> None:
    """All Ray measurements first, then Ray is shut down: its daemons must not run beside ours."""
    mods = scenario_modules()
    for k in ctx.sizes.ray_workers:
        rs = ctx.ray(k)
        if rs is None:
            return
        if "1_tiny" in chosen:
            mods["1_tiny"].ray(ctx, rs, raw["1_tiny"])
        if k == 2:
            for key in ("2_small", "3_latency", "6_scale", "7_idle", "13_batch"):
                if key in chosen:
                    mods[key].ray(ctx, rs, raw[key])
    ctx.close_ray()


def timed(name: str, fn: Callable[[], Any], walls: dict[str, float]) -> Any:
    t0 = time.perf_counter()
    try:
        return fn()
    finally:
        walls[name] = round(time.perf_counter() - t0, 2)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    sizes = MODES[mode] if args.batch_chunks is None else replace(MODES[mode], batch_big=args.batch_chunks)
    ctx = Ctx(mode, sizes, peers=not (args.smoke or args.no_peers))
    chosen = [SCENARIOS[s.strip()] for s in args.only.split(",") if s.strip() in SCENARIOS] if args.only else \
        list(SCENARIOS.values())
    if mode == "smoke":
        chosen = [c for c in chosen if c not in ("8_gpu", "10_sharedfs")]  # no GPU; a GlusterFS set-up takes long
    os.environ.setdefault("GPUPOOL_LOCK_DIR", str(ctx.tmp / "gpulocks"))
    t0 = time.perf_counter()
    raw: dict[str, dict[str, Any]] = {k: {} for k in chosen}
    walls: dict[str, float] = {}
    log(f"mode {mode}, scenarios {', '.join(chosen)}, peers: "
        f"{'OctoRun ' if ctx.octorun else ''}{'Ray' if ctx.ray_available else ''}{'' if ctx.peers else 'none'}")
    if not ctx.peers and mode != "smoke":
        ctx.notes.append("peers not measured (--no-peers)")
    elif mode != "smoke":
        for mod in ("octorun", "ray"):
            if not getattr(ctx, "octorun" if mod == "octorun" else "ray_available"):
                ctx.notes.append(f"{mod} is not installed: pip install -r bench/requirements.txt")
    try:
        if ctx.ray_available:
            timed("ray", lambda: ray_phase(ctx, raw, chosen), walls)
        mods = scenario_modules()
        for key in chosen:
            raw[key].update(timed(key, lambda: mods[key].run(ctx), walls))
    finally:
        ctx.cleanup(keep=args.keep)
    meta = {"date": time.strftime("%Y-%m-%d"), "time": time.strftime("%H:%M:%S"), "mode": mode,
            "repeats": ctx.sizes.repeats, "sizes": ctx.sizes.__dict__, "wall_s": time.perf_counter() - t0,
            "scenario_wall_s": walls, "machine": machine(), "notes": ctx.notes, "checks": ctx.checks,
            "exactly_once_ok": all(c["ok"] for c in ctx.checks)}
    from bench import report

    stem = f"{meta['date']}-{socket.gethostname().split('.')[0]}" + ("" if mode == "full" else f"-{mode}") + \
        (f"-only-{'-'.join(k.split('_')[0] for k in chosen)}" if args.only else "")  # never over a whole suite's
    paths = report.write(args.out, stem, meta, raw)
    print(f"\nbenchmark ({mode}) in {meta['wall_s']:.0f} s; {len(ctx.checks)} runs checked, every chunk committed "
          f"exactly once: {'yes' if meta['exactly_once_ok'] else 'NO'}")
    tg = report.targets(raw, mode)
    for t in tg:
        res = {True: "PASS", False: "FAIL", None: "n/a "}[t["pass"]]
        print(f"  {res}  {t['target']}: {t['measured']}" + (f"  ({t['note']})" if t["note"] else ""))
    for n in ctx.notes:
        print(f"  note: {n}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if not meta["exactly_once_ok"]:
        return 1
    return 1 if args.strict and any(t["pass"] is False for t in tg) else 0


if __name__ == "__main__":
    sys.exit(main())
