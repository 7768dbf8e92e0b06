"""Script jobs: an OctoRun-style script run unmodified, one process per chunk.

``python SCRIPT --gpu_id G --chunk_id C --total_chunks N --key value ...`` with the
agent's own interpreter and environment, plus the run's ``--env`` variables (not narrowed:
``--gpu_id`` is the GPU number as CUDA counts it there, exactly as OctoRun passes it). Output
goes to a per-chunk log.

The script runs in a process group of its own; when it ends (exit, timeout, stop) the whole
group is killed, so children it left behind do not pile up chunk after chunk on the GPU. Only
a child it detached on purpose (``setsid``, a daemon) lives on.
"""
from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Callable

from gpupool.agent.worker_control import exit_reason, exited, kill_group, tail
from gpupool.jobs.atomic import open_append
from gpupool.jobs.descriptor import Job, attempt_header
from gpupool.jobs.outcomes import Failure, FailureKind

OpenLog = Callable[[Path], IO[bytes]]  # opens a log to append to, following no link (``Spool.open_log``)

# Kill the script if the agent dies, even by SIGKILL (util-linux setpriv, where present).
_SETPRIV = shutil.which("setpriv")


def command(job: Job, gpu_id: int) -> list[str]:
    cmd = [sys.executable, job.target, "--gpu_id", str(gpu_id), "--chunk_id", str(job.chunk_id),
           "--total_chunks", str(job.total_chunks)]
    for key, value in job.kwargs.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def run_script(job: Job, gpu_id: int, env: dict[str, str], log_path: Path,
               abort: Callable[[], bool], open_log: OpenLog | None = None) -> Failure | None:
    """Run the script; None on exit code 0 (or one of its ``success_codes`` option: OctoRun's
    field), else why it failed (the end of its log as the traceback)."""
    code, err = run_process(command(job, gpu_id), job, env, log_path, abort, open_log=open_log)
    if err is None and code not in (job.options or {}).get("success_codes", [0]):
        err = _error(FailureKind.SCRIPT_FAILED, f"the script {exit_reason(code)}", log_path)
    return err


def run_process(cmd: list[str], job: Job, env: dict[str, str], log_path: Path, abort: Callable[[], bool],
                what: str = "script", shown: str | None = None,
                open_log: OpenLog | None = None) -> tuple[int | None, Failure | None]:
    """Run ``cmd`` for ``job`` in a process group of its own, its output appended to ``log_path``
    (after a header line naming the attempt and ``shown``, default the argv); the whole group is
    killed when it ends. (exit code, None), or (None, the failure) if it was stopped or timed out.
    ``open_log`` opens the log (the agent's: ``Spool.open_log``, which moves a link at the log or
    on its way to ``rejected/``); by default its folder is made and a link there refused (OSError)."""
    env = {**env, **job.env} if job.env else env  # main.py --env: the caller's variables
    with (open_log or _open_plain)(log_path) as log:
        log.write(attempt_header(job.attempt, shown or ' '.join(cmd)).encode())
        log.flush()
        wrapped = [_SETPRIV, "--pdeathsig", "KILL", "--"] + cmd if _SETPRIV else cmd
        proc = subprocess.Popen(wrapped, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=job.workdir or None, start_new_session=True)
    deadline = None if job.timeout is None else time.monotonic() + job.timeout
    waiter = _ExitWaiter(proc)
    try:
        while not waiter.wait(0.25 if deadline is None else min(0.25, deadline - time.monotonic())):
            if abort():
                return None, _error(FailureKind.STOPPED, "the agent was told to stop at once", log_path)
            if deadline is not None and time.monotonic() >= deadline:
                return None, _error(FailureKind.TIMEOUT, f"the {what} ran past its timeout of {job.timeout:g} s and "
                                    "was killed", log_path)
    finally:
        waiter.close()
        kill_group(proc)  # still unreaped (a zombie at worst), so its group id is still its own
        code = proc.wait()
    return code, None


class _ExitWaiter:
    """Wakes the moment the process exits (pidfd), where Popen.wait(timeout) sleeps up to 50 ms."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        try:
            self.fd: int | None = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            self.fd = None

    def wait(self, seconds: float) -> bool:
        """True once the process has exited (it is not reaped: see ``worker_control.exited``)."""
        if self.fd is not None:
            select.select([self.fd], [], [], max(0.0, seconds))
        elif not exited(self.proc):
            time.sleep(max(0.0, min(seconds, 0.05)))
        return exited(self.proc)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _open_plain(path: Path) -> IO[bytes]:
    """A log outside a spool (a caller of its own): its folder made, no link followed at the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return open_append(path)


def _error(kind: FailureKind, message: str, log_path: Path) -> Failure:
    """A failure of a process job: the end of its log as its traceback."""
    return Failure(kind, message, tail(log_path, 3000), log=str(log_path))
