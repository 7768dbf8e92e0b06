"""10. Across a shared filesystem: 120 chunks of 40 ms, master on one GlusterFS mount and two
agents on another mount of the same volume (default options: about 1 s before one mount sees
the other's changes), against the same run on local disk; whole ``python main.py`` commands.
The queue ahead of each agent must cover the filesystem's delay (issue 11: at most 1.5x the
local wall). Needs root, /dev/fuse and glusterfs-server/-client (skipped with a note otherwise)."""
from __future__ import annotations

import contextlib
import time
from typing import Any

from bench.common import agents, log
from bench.context import Ctx
from bench.scenarios.balance import main_py

SIZES = {"full": (120, 0.04), "quick": (120, 0.04), "smoke": (6, 0.01)}


def run(ctx: Ctx) -> dict[str, Any]:
    chunks, secs = SIZES[ctx.mode]
    try:
        from tests.sharedfs import Gluster

        g = Gluster(ctx.dir("gluster"))
        g.check_prerequisites()
        g.start()
    except BaseException as e:  # pytest's skip, raised where the test bed is missing
        if isinstance(e, KeyboardInterrupt):
            raise
        note = f"10: GlusterFS not measured ({str(e).splitlines()[0][:200]})"
        ctx.notes.append(note)
        log(note)
        return {"skipped": note}
    out: dict[str, Any] = {"chunks": chunks, "chunk_s": secs, "local_s": [], "gluster_s": []}
    try:
        vol = g.volume("bench", fast=False)
        local = ctx.dir("local")
        (vol.a / "base").mkdir()
        deadline = time.monotonic() + 30
        while not (vol.b / "base").is_dir() and time.monotonic() < deadline:  # ~1 s before mount B sees it
            time.sleep(0.1)
        with agents(local, 2):
            main_py(local, "warm", 2, 0.01)
            with agents(vol.b / "base", 2):
                main_py(vol.a / "base", "warm", 2, 0.01)
                for rep in range(ctx.sizes.repeats):
                    for where, base in (("local_s", local), ("gluster_s", vol.a / "base")):
                        wall, _ = main_py(base, f"sfs-{rep}", chunks, secs)
                        ctx.check(base, f"sfs-{rep}", chunks)
                        out[where].append(wall)
    finally:
        with contextlib.suppress(BaseException):
            g.close()
    out["ratio"] = [gl / lo for gl, lo in zip(out["gluster_s"], out["local_s"])]
    log(f"10. {chunks} x {secs * 1000:.0f} ms: local {[round(x, 2) for x in out['local_s']]} s, two gluster mounts "
        f"{[round(x, 2) for x in out['gluster_s']]} s, ratio {[round(x, 2) for x in out['ratio']]}")
    return out
