"""8. GPU (only where torch sees a CUDA device; skipped with a note otherwise).

200 chunks of a small torch matmul per GPU worker count: our GPU agents (CUDA context kept),
OctoRun (fresh process + ``import torch`` + CUDA init per chunk), Ray GPU tasks (``num_gpus=1``
each; a fresh worker per task, Ray's default ``max_calls=1``) and Ray GPU actors (one per GPU). Then GPU utilisation, as the driver samples it (``Sampler``), while our
agents run a stream of medium chunks (a 4096x4096 matmul chain per chunk, its data made on the GPU)."""
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
    """GPU utilisation of the given devices (UUIDs) as the driver records it: every ``every`` s, the
    samples it took since the last read (``nvmlDeviceGetSamples``, at the driver's own rate, 1/6 to
    1 s by product; polling ``nvmlDeviceGetUtilizationRates`` faster only repeats one value). NVML
    has no utilisation for a MIG device: sampling then stops with ``error`` saying why."""

    def __init__(self, uuids: list[str], every: float = 0.5, nv: Any = None) -> None:
        if nv is None:
            import pynvml as nv
        nv.nvmlInit()
        self.nv = nv
        self.handles = [nv.nvmlDeviceGetHandleByUUID(u) for u in uuids]
        self.samples: list[list[int]] = [[] for _ in uuids]  # per device, in time order
        self._last = [0] * len(uuids)  # per device, the newest sample's time stamp (us)
        self.every, self.error = every, None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def read(self) -> None:
        """Add every device's samples newer than the last read."""
        for i, h in enumerate(self.handles):
            try:
                _, got = self.nv.nvmlDeviceGetSamples(h, self.nv.NVML_GPU_UTILIZATION_SAMPLES, self._last[i])
            except self.nv.NVMLError as e:
                if e.value == self.nv.NVML_ERROR_NOT_FOUND:  # no sample since the last read
                    continue
                self.error = f"{type(e).__name__}: {e}"  # NotSupported: a MIG device
                self._stop.set()
                return
            new = [x for x in got if x.timeStamp > self._last[i]]
            self.samples[i] += [int(x.sampleValue.uiVal) for x in new]
            self._last[i] = max([self._last[i]] + [x.timeStamp for x in new])

    def steady_mean(self) -> float | None:
        """Mean utilisation in the steady state: each device's samples less their first and last 10%
        (ramp-up, tail), then the mean over the devices."""
        means = []
        for s in self.samples:
            cut = len(s) // 10
            if s[cut:len(s) - cut]:
                means.append(sum(s[cut:len(s) - cut]) / (len(s) - 2 * cut))
        return sum(means) / len(means) if means else None

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.read()

    def __enter__(self) -> "Sampler":
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        if self.error is None:
            self.read()


def run(ctx: Ctx) -> dict[str, Any]:
    n_gpu, why = available()
    if not n_gpu:
        ctx.notes.append(f"8. GPU skipped: {why}")
        return {"skipped": why}
    s, n = ctx.sizes, ctx.sizes.gpu_chunks
    out: dict[str, Any] = {"gpus": n_gpu, "chunks": n, "ours": [], "octorun": [], "ray_tasks": [],
                           "ray_actors": []}
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
        from gpupool.agent.gpu import make_probe, visible_gpus

        uuids = [g.uuid for g in visible_gpus(make_probe())][:n_gpu]  # MIG devices too
        with Sampler(uuids) as smp:
            r = feed(base, "gpu-stream", s.gpu_stream_chunks, task="bench.tasks:torch_matmul",
                     kwargs={"size": 4096, "repeat": 8})
        ctx.check(base, r.run, s.gpu_stream_chunks)
        out["util_pct"] = {"mean": smp.steady_mean(), "samples": sum(len(x) for x in smp.samples),
                           "error": smp.error}
    if ctx.ray_available:
        ctx.close_ray()
        with RaySession(n_gpu, gpus=n_gpu) as rs:
            for rep in range(s.repeats):
                t = rs.tasks("torch_matmul", n, kwargs={"device": "cuda:0"}, gpu=True)
                ctx.peer_check("ray", "gpu tasks", t["ok"])
                out["ray_tasks"].append(t["wall_s"] / n)
            # Ray runs each GPU task in a fresh worker (max_calls=1), so the tasks' warm-up warms
            # nothing; its long-lived form is an actor per GPU, as our agents are. After the tasks:
            # the actors hold their GPUs for the session's life
            for rep in range(s.repeats):
                a = rs.actors("torch_matmul", n, kwargs={"device": "cuda:0"}, gpu=True)
                ctx.peer_check("ray", "gpu actors", a["ok"])
                out["ray_actors"].append(a["wall_s"] / n)
    log(f"8. GPU: {out}")
    return out
