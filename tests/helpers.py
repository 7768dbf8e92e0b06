"""Shared test helpers: real agent processes on a tmp spool, deadlines instead of sleeps."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
HOST = "testhost"
FAST = ["--heartbeat", "0.2", "--rescan", "0.5", "--poll-interval", "0.05", "--max-poll-interval", "0.2"]


def wait_for(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def base_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "GPUPOOL_HOST_ID": HOST,
           "GPUPOOL_LOCK_DIR": str(tmp / "gpulocks"), "GPUPOOL_LOG_LEVEL": "DEBUG"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update(extra)
    return env


class AgentProc:
    """One real ``python -m agent`` process."""

    def __init__(self, base: Path, number: int, env: dict[str, str], args: list[str] | None = None,
                 cpu: bool = True, out_dir: Path | None = None, **popen: Any) -> None:
        self.base, self.number = base, number
        self.id = f"{env.get('GPUPOOL_HOST_ID', HOST)}-{'cpu' if cpu else 'gpu'}{number}"
        cmd = [sys.executable, "-m", "agent", "--base", str(base), "--gpu", str(number)] + (["--cpu"] if cpu else [])
        self.out = open((out_dir or base.parent) / f"agent-{self.id}-{time.monotonic_ns()}.out", "wb")
        self.proc = subprocess.Popen(cmd + FAST + list(args or []), cwd=REPO, env=env, stdout=self.out,
                                     stderr=subprocess.STDOUT, start_new_session=True, **popen)

    def heartbeat(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.base / "agents" / f"{self.id}.json").read_text())
        except (OSError, ValueError):
            return None

    def wait_ready(self, timeout: float = 30.0) -> "AgentProc":
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent {self.id} exited with {self.proc.returncode}: {self.output()}")
            hb = self.heartbeat()
            return bool(hb and hb.get("pid") == self.proc.pid and hb["state"] in ("idle", "busy"))
        wait_for(ready, timeout, f"agent {self.id} ready")
        return self

    def output(self) -> str:
        self.out.flush()
        return Path(self.out.name).read_text(errors="replace")

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)


def run_main(args: list[str], env: dict[str, str], timeout: float = 120, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "main.py" if cwd == REPO else str(REPO / "main.py"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def results(base: Path, run: str) -> dict[int, dict[str, Any]]:
    """Every committed result of the run, by chunk: its own file's or its batch's (``jobs.batches``),
    read through the one results reader."""
    from gpupool.jobs.paths import Spool
    from gpupool.jobs.results import chunk_result, scan_run

    spool = Spool(base)
    scan = scan_run(spool, run)
    return {c: chunk_result(spool, run, c, scan) for c in sorted(scan.finals)}


def claims(base: Path, run: str) -> Counter:
    """How many final results each chunk has on disk, counted raw (its own file, and every batch
    slot that says it is final there): exactly once means 1 for every chunk."""
    from gpupool.jobs import batches
    from gpupool.jobs.paths import BATCH_RE, RESULT_RE

    out: Counter = Counter()
    for p in (base / "results" / run).iterdir():
        if m := RESULT_RE.match(p.name):
            out[int(m.group(1))] += 1
        elif BATCH_RE.match(p.name):
            slot = batches.read_slot(p)
            out.update(c for c in slot.chunks if slot.code(c) in batches.CLAIMED)
    return out


def run_names(base: Path) -> list[str]:
    return sorted(p.name for p in (base / "runs").iterdir())


def frozen_holder(lock: Path) -> subprocess.Popen:
    """A process that takes ``lock`` and freezes (SIGSTOP) while holding it, as an agent or a
    master can be frozen by Ctrl-Z, Slurm's suspend or a paused VM at any moment."""
    code = ("import os, signal, sys, portalocker\n"
            "f = open(sys.argv[1], 'a+b')\n"
            "portalocker.lock(f, portalocker.LockFlags.EXCLUSIVE)\n"
            "print('held', flush=True)\n"
            "os.kill(os.getpid(), signal.SIGSTOP)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


class InProcessWorker:
    """The worker protocol without a process: the worker's own ``handle``, in this process, same
    replies, in order. ``make`` is an agent's ``make_worker`` whose every worker is this one (each
    start is a fresh one: a new ``Session``, its pipe emptied, and the user modules the last one
    imported forgotten, as a new process would not have them)."""

    pid = None
    preload: tuple[str, ...] = ()

    def __init__(self) -> None:
        from gpupool.agent.worker_process import Session

        self.queue: list[dict[str, Any]] = []
        self.starts = self.sent = 0
        self.session, self._before = Session(), set(sys.modules)

    def make(self, env: dict[str, str], preload: tuple[str, ...]) -> "InProcessWorker":
        return self

    def start(self) -> None:
        from gpupool.agent.worker_process import Session

        self.starts += 1
        for name in set(sys.modules) - self._before:
            if self.session.watch.kind(name, sys.modules[name])[0] == "user":
                del sys.modules[name]
        self.session, self.sent, self._before = Session(), 0, set(sys.modules)
        self.queue.clear()

    def stop(self) -> None:
        self.queue.clear()  # a stopped process takes what waits in its pipe with it

    kill = close = stop

    def alive(self) -> bool:
        return True

    def done(self) -> bool:
        return True

    def idle_priority(self, idle: bool) -> bool:
        return True

    def send(self, request: dict[str, Any]) -> bool:
        self.queue.append(json.loads(json.dumps(request)))
        self.sent += 1
        return True

    def receive(self, timeout: float | None, abort: Any, note: Any = None, each: float | None = None) -> dict[str, Any]:
        from gpupool.agent.worker_process import handle

        return handle(self.queue.pop(0), self.session)
