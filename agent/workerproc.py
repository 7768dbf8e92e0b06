"""The agent's side of its worker process: start it, send a job, wait for the reply or kill it."""
from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = str(Path(__file__).resolve().parents[1])


def with_repo_path(env: dict[str, str]) -> dict[str, str]:
    """``env`` with this checkout first on PYTHONPATH, so child processes import this code."""
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))}


class WorkerLost(Exception):
    """The worker died or was killed while running a job; ``reason`` says how."""

    def __init__(self, reason: str, output: str = "") -> None:
        self.reason, self.output = reason, output
        super().__init__(reason)


def tail(path: Path, nbytes: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - nbytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def cap_log(path: Path, limit: int) -> bool:
    """Keep a log that its writers hold open in append mode under ``limit`` bytes: past it, its
    content moves to ``<name>.1`` (replacing the one before) and the log starts empty. The
    writers go on appending to the emptied file; a line written during the copy may be lost.
    True if it was cut."""
    try:
        if limit <= 0 or os.stat(path).st_size <= limit:
            return False
        old = path.with_name(path.name + ".1")
        shutil.copyfile(path, old)
        os.truncate(path, 0)
        return True
    except OSError:
        return False


def exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class Worker:
    def __init__(self, env: dict[str, str], log_path: Path, cwd: str | None = None) -> None:
        self.env = with_repo_path(env)
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self._w: int | None = None
        self._r: int | None = None
        self._buf = b""
        self._owed = 0  # requests sent whose reply has not been read

    def start(self) -> None:
        r_req, w_req = os.pipe()
        r_rep, w_rep = os.pipe()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.worker", str(r_req), str(w_rep), str(os.getpid())],
                pass_fds=(r_req, w_rep), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.cwd, start_new_session=True,
            )
        os.close(r_req)
        os.close(w_rep)
        self._w, self._r, self._buf, self._owed = w_req, r_rep, b"", 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def send(self, request: dict[str, Any]) -> bool:
        """Queue a request in the worker's pipe (it runs requests one after another).

        False if it was not queued: the worker died with replies still owed, and ``receive``
        must first report those (a reply it wrote before dying, or how it died). A fresh worker
        is started only when nothing is owed, so a death is never blamed on the wrong job."""
        if self.proc is None or self.proc.poll() is not None:
            if self._owed:
                return False
            self.start()
        try:
            os.write(self._w, json.dumps(request).encode() + b"\n")
        except BrokenPipeError:
            if self._owed:
                return False
            raise self.lost() from None
        self._owed += 1
        return True

    def receive(self, timeout: float | None, abort: Callable[[], bool]) -> dict[str, Any]:
        """The reply to the oldest request sent."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            if abort():
                self.kill()
                raise WorkerLost("stopped: the agent was told to stop at once")
            wait = 0.25 if deadline is None else min(0.25, deadline - time.monotonic())
            if wait <= 0:
                self.kill()
                raise TimeoutError(f"the job ran past its timeout of {timeout:g} s and was killed")
            ready, _, _ = select.select([self._r], [], [], wait)
            if ready:
                chunk = os.read(self._r, 65536)
                if not chunk:
                    raise self.lost()
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        self._owed -= 1
        return json.loads(line)

    def lost(self) -> WorkerLost:
        code = self.proc.wait() if self.proc else None
        self._close()
        return WorkerLost(f"the worker process {exit_reason(code)}", tail(self.log_path))

    def kill(self) -> None:
        """Kill the worker and everything it started (its process group)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._close()

    def stop(self) -> None:
        """Close its pipe (it exits at end of input), then make sure it is gone."""
        if self.proc is None:
            return
        if self._w is not None:
            with contextlib.suppress(OSError):
                os.close(self._w)
            self._w = None
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def _close(self) -> None:
        for fd in (self._w, self._r):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._w = self._r = None
        self._owed = 0
        self.proc = None if self.proc is None or self.proc.poll() is not None else self.proc
