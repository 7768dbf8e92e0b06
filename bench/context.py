"""How big each scenario is in each mode, and what every scenario is handed."""
from __future__ import annotations

import itertools
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import check_exactly_once, log
from bench.peers import RaySession, have


@dataclass(frozen=True)
class Sizes:
    repeats: int
    tiny_chunks: int  # 1: no-op chunks per run
    tiny_agents: tuple[int, ...]
    tiny_octorun_chunks: int
    ray_workers: tuple[int, ...]  # 1: worker counts Ray is measured with
    small_chunks: int  # 2: callable-mode chunks (the 200)
    small_script_chunks: int  # 2: script-mode chunks (our agents, OctoRun, by hand)
    latency_samples: int  # 3: single-chunk runs per watch mode
    poll_interval: float
    shared_mb: int  # 5
    shared_chunks: int
    scale: tuple[int, ...]  # 6
    idle_window: float  # 7: seconds per measuring window
    gpu_chunks: int  # 8
    gpu_stream_chunks: int
    batch_chunks: int = 3000  # 13: no-op chunks per run, ours (batched and not) against Ray tasks
    batch_big: int = 1_000_000  # 13: no-op chunks of the whole main.py command (run.py --batch-chunks)


FULL = Sizes(repeats=3, tiny_chunks=2000, tiny_agents=(1, 2, 4), tiny_octorun_chunks=100, ray_workers=(1, 2, 4),
             small_chunks=200, small_script_chunks=200, latency_samples=60, poll_interval=0.5, shared_mb=1024,
             shared_chunks=16, scale=(1000, 10000, 100000), idle_window=20.0, gpu_chunks=200, gpu_stream_chunks=100)
QUICK = Sizes(repeats=2, tiny_chunks=300, tiny_agents=(1, 2, 4), tiny_octorun_chunks=12, ray_workers=(2,),
              small_chunks=200, small_script_chunks=16, latency_samples=10, poll_interval=0.5, shared_mb=128,
              shared_chunks=6, scale=(500, 2000), idle_window=4.0, gpu_chunks=50, gpu_stream_chunks=30,
              batch_big=100_000)
SMOKE = Sizes(repeats=1, tiny_chunks=20, tiny_agents=(1, 2), tiny_octorun_chunks=4, ray_workers=(),
              small_chunks=20, small_script_chunks=3, latency_samples=3, poll_interval=0.2, shared_mb=8,
              shared_chunks=2, scale=(20, 60), idle_window=0.5, gpu_chunks=4, gpu_stream_chunks=4,
              batch_chunks=60, batch_big=300)
MODES = {"full": FULL, "quick": QUICK, "smoke": SMOKE}


@dataclass
class Ctx:
    mode: str
    sizes: Sizes
    peers: bool  # run OctoRun and Ray (if installed)
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gpupool-bench-")))
    checks: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _ray: RaySession | None = None
    _seq: Any = field(default_factory=itertools.count)

    def dir(self, name: str) -> Path:
        d = self.tmp / f"{name}-{next(self._seq)}"
        d.mkdir(parents=True)
        return d

    def check(self, base: Path, run: str, chunks: int) -> dict[str, Any]:
        """The exactly-once check, recorded for the report (a failure makes the exit code 1);
        its record (``ok``, and the files and bytes the run left)."""
        res = check_exactly_once(base, run, chunks)
        self.checks.append(res)
        if not res["ok"]:
            log(f"EXACTLY-ONCE CHECK FAILED: {res}")
        return res

    def peer_check(self, peer: str, what: str, ok: bool) -> None:
        self.checks.append({"run": f"{peer}:{what}", "ok": bool(ok)})
        if not ok:
            log(f"CHECK FAILED: {peer} did not complete every chunk exactly once in {what}")

    @property
    def octorun(self) -> bool:
        return self.peers and have("octorun")

    @property
    def ray_available(self) -> bool:
        return self.peers and have("ray")

    def ray(self, workers: int) -> RaySession | None:
        """One Ray session at a time, kept while the worker count stays the same."""
        if not self.ray_available:
            return None
        if self._ray is not None and self._ray.workers != workers:
            self.close_ray()
        if self._ray is None:
            log(f"ray.init(num_cpus={workers})")
            self._ray = RaySession(workers).__enter__()
        return self._ray

    def close_ray(self) -> None:
        if self._ray is not None:
            self._ray.__exit__(None, None, None)
            self._ray = None

    def cleanup(self, keep: bool = False) -> None:
        self.close_ray()
        if not keep:
            shutil.rmtree(self.tmp, ignore_errors=True)
