"""8. GPU (only where torch sees a CUDA device; skipped with a note otherwise).

200 chunks of a small torch matmul per GPU worker count: our GPU agents (CUDA context kept),
OctoRun (fresh process + ``import torch`` + CUDA init per chunk) and Ray GPU tasks
(``num_gpus=1`` each). Then GPU utilisation, sampled with pynvml every 20 ms while our agents
run a stream of medium chunks (a 4096x4096 matmul chain per chunk)."""
from __future__ import annotations

import threading
import time
from typing import Any

from bench.common import REPO, agents, feed, log
from bench.context import Ctx
from bench.peers import RaySession, octorun

SCRIPT = REPO / "bench" / "scripts" / "torch_matmul.py"


def available() -> tuple[int, str]:
    """(number of CUDA devices torch sees, why not when 0)."""
    try:
        import torch
    except ImportError:
        return 0, "torch is not installed"
    try:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as e:  # a broken driver
        return 0, f"CUDA unusable: {e}"
    return n, "" if n else "no CUDA device on this machine"


class Sampler:
    """GPU utilisation of the given NVML indices every ``every`` seconds, in a thread."""

    def __init__(self, indices: list[int], every: float = 0.02) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append([self.nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles])

    def __enter__(self) -> "Sampler":
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def run(ctx: Ctx) -> dict[str, Any]:
    n_gpu, why = available()
    if not n_gpu:
        ctx.notes.append(f"8. GPU skipped: {why}")
        return {"skipped": why}
    s, n = ctx.sizes, ctx.sizes.gpu_chunks
    out: dict[str, Any] = {"gpus": n_gpu, "chunks": n, "ours": [], "octorun": [], "ray_tasks": []}
    base = ctx.dir("gpu")
    with agents(base, n_gpu, gpu=True):
        feed(base, "warm", 2 * n_gpu, task="bench.tasks:torch_matmul")  # torch imported, CUDA context made
        for rep in range(s.repeats):
            r = feed(base, f"gpu-{rep}", n, task="bench.tasks:torch_matmul")
            ctx.check(base, r.run, n)
            out["ours"].append(r.wall_s / n)
            if ctx.octorun:
                w = ctx.dir("oct-gpu")
                (w / "out").mkdir()
                o = octorun(w, SCRIPT, n, n_gpu, {"out_dir": str(w / "out")})
                ctx.peer_check("octorun", "gpu", o["ok"])
                out["octorun"].append(o["wall_s"] / n)
        from agent.gpu import make_probe, visible_gpus

        idx = [g.index for g in visible_gpus(make_probe())][:n_gpu]
        with Sampler(idx) as smp:
            r = feed(base, "gpu-stream", s.gpu_stream_chunks, task="bench.tasks:torch_matmul",
                     kwargs={"size": 4096, "repeat": 8})
        ctx.check(base, r.run, s.gpu_stream_chunks)
        # steady state: drop the first and last 10% of the samples (ramp-up, tail)
        cut = len(smp.samples) // 10
        steady = [sum(x) / len(x) for x in smp.samples[cut:len(smp.samples) - cut]]
        out["util_pct"] = {"mean": sum(steady) / len(steady) if steady else None, "samples": len(steady)}
    if ctx.ray_available:
        ctx.close_ray()
        with RaySession(n_gpu, gpus=n_gpu) as rs:
            for rep in range(s.repeats):
                t = rs.tasks("torch_matmul", n, kwargs={"device": "cuda:0"}, gpu=True)
                ctx.peer_check("ray", "gpu tasks", t["ok"])
                out["ray_tasks"].append(t["wall_s"] / n)
    log(f"8. GPU: {out}")
    return out
