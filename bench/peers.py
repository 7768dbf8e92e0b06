"""What a user would otherwise pick, run on the same workload: OctoRun (a process per chunk),
Ray (tasks and actors), the same processes run back to back by hand, and the plain-loop floor."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from bench.common import REPO

# OctoRun's refill loop sleeps ``monitor_interval`` seconds between passes (default 60). It accepts
# any number, 0 included, but 0 spins a core on a 2-core machine (each pass lists the completion
# folder and prints three status lines) and was slower there than a short sleep; 0.01 s gave
# OctoRun its best wall times here (see bench/README.md), so that is what it gets.
OCTORUN_MONITOR_INTERVAL = 0.01


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _env() -> dict[str, str]:
    """The real interpreter first on PATH (OctoRun runs ``python``; a pyenv shim would add a bash
    start per chunk), and the repo importable (Ray workers import bench.tasks)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# OctoRun -------------------------------------------------------------------------------------
def octorun(work: Path, script: Path, chunks: int, workers: int, kwargs: dict[str, Any] | None = None,
            monitor_interval: float = OCTORUN_MONITOR_INTERVAL) -> dict[str, Any]:
    """``octorun run --config cfg.json`` with ``workers`` slots (its ``gpus`` list); wall time and
    the check that every chunk completed exactly once (one completion marker each)."""
    work.mkdir(parents=True, exist_ok=True)
    cfg = {"gpus": list(range(workers)), "total_chunks": chunks, "kwargs": dict(kwargs or {}),
           "script_path": str(script), "log_dir": str(work / "logs"), "chunk_lock_dir": str(work / "logs" / "locks"),
           "monitor_interval": monitor_interval, "restart_failed": False, "max_retries": 0, "success_codes": [0]}
    (work / "config.json").write_text(json.dumps(cfg))
    cmd = [sys.executable, "-c", "import sys; from octorun.cli import main; sys.exit(main())",
           "run", "--config", str(work / "config.json")]
    t0 = time.perf_counter()
    with open(work / "octorun.out", "wb") as out:
        rc = subprocess.run(cmd, cwd=work, env=_env(), stdout=out, stderr=subprocess.STDOUT, timeout=3600).returncode
    wall = time.perf_counter() - t0
    done = sorted(int(n[len("chunk_"):-len(".completed")]) for n in os.listdir(work / "logs" / "locks" / "completed"))
    ok = rc == 0 and done == list(range(chunks))
    return {"wall_s": wall, "rc": rc, "completed": len(done), "ok": ok}


def by_hand(script: Path, chunks: int, workers: int, kwargs: dict[str, Any] | None = None,
            cwd: Path | None = None) -> dict[str, Any]:
    """The same processes run back to back by hand: ``workers`` loops, each starting the
    script for its share of the chunks as soon as the previous one exits."""
    extra = [x for k, v in (kwargs or {}).items() for x in (f"--{k}", str(v))]
    codes: list[int] = []

    def lane(w: int) -> None:
        for c in range(w, chunks, workers):
            cmd = [sys.executable, str(script), "--gpu_id", str(w), "--chunk_id", str(c),
                   "--total_chunks", str(chunks), *extra]
            codes.append(subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=lane, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "ok": len(codes) == chunks and not any(codes)}


# floor ---------------------------------------------------------------------------------------
def floor(fn: Callable[..., Any], chunks: int, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The work itself in a plain loop in this process: the physical limit."""
    kw = kwargs or {}
    fn(0, **kw)  # warm (imports), as a long-lived worker is
    t0 = time.perf_counter()
    out = [fn(c, **kw) for c in range(chunks)]
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "ok": len(out) == chunks}


# Ray -----------------------------------------------------------------------------------------
class RaySession:
    """``ray.init(num_cpus=workers, num_gpus=gpus)`` for the lifetime of the ``with`` block."""

    def __init__(self, workers: int, gpus: int = 0) -> None:
        self.workers, self.gpus = workers, gpus
        self.ray: Any = None
        self.init_s = 0.0

    def __enter__(self) -> "RaySession":
        os.environ.update({k: v for k, v in _env().items() if k in ("PYTHONPATH",)})
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local only; silences a banner
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=self.workers, num_gpus=self.gpus, include_dashboard=False, log_to_driver=False,
                 object_store_memory=200 * 1024**2, configure_logging=False)
        self.ray = ray
        self._tasks: dict[tuple[str, bool], Any] = {}
        self._actors: list[Any] = []
        self.init_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.ray.shutdown()

    def _remote_task(self, name: str, gpu: bool) -> Any:
        key = (name, gpu)
        if key not in self._tasks:
            from bench import tasks

            fn = getattr(tasks, name)
            self._tasks[key] = self.ray.remote(num_gpus=1 if gpu else 0, num_cpus=0 if gpu else 1)(fn)
        return self._tasks[key]

    def tasks(self, name: str, chunks: int, kwargs: dict[str, Any] | None = None, gpu: bool = False,
              check: Callable[[Any], bool] | None = None) -> dict[str, Any]:
        f = self._remote_task(name, gpu)
        kw = kwargs or {}
        self.ray.get([f.remote(0, **kw) for _ in range(self.workers)])  # workers up and warm
        t0 = time.perf_counter()
        refs = [f.remote(c, **kw) for c in range(chunks)]
        submit = time.perf_counter() - t0
        out = self.ray.get(refs, timeout=900)
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "submit_s": submit, "ok": len(out) == chunks and all(map(check or _true, out))}

    def actors(self, name: str, chunks: int, kwargs: dict[str, Any] | None = None, gpu: bool = False,
               check: Callable[[Any], bool] | None = None) -> dict[str, Any]:
        if not self._actors:
            # Ray's default for an actor: 1 CPU to place it, 0 held while it lives (an explicit
            # num_cpus=1 would hold the session's CPUs and starve the task runs).
            class Runner:
                def call(self, fn: str, c: int, kw: dict[str, Any]) -> Any:
                    from bench import tasks

                    return getattr(tasks, fn)(c, **kw)

            remote = self.ray.remote(num_gpus=1)(Runner) if gpu else self.ray.remote(Runner)
            self._actors = [remote.remote() for _ in range(self.workers)]
        kw = kwargs or {}
        acts = self._actors
        self.ray.get([a.call.remote(name, 0, kw) for a in acts])
        t0 = time.perf_counter()
        out = self.ray.get([acts[c % len(acts)].call.remote(name, c, kw) for c in range(chunks)], timeout=900)
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "ok": len(out) == chunks and all(map(check or _true, out))}


def _true(_: Any) -> bool:
    return True


@contextlib.contextmanager
def maybe_ray(workers: int, gpus: int = 0, enabled: bool = True) -> Iterator[RaySession | None]:
    if not enabled or not have("ray"):
        yield None
        return
    with RaySession(workers, gpus) as rs:
        yield rs
