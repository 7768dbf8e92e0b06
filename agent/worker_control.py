"""The agent's side of its worker process: start it, send a job, wait for the reply or kill it."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable

from gpupool.agent.pychild import python_argv
from gpupool.agent.worker_process import PROGRESS_EVERY
from gpupool.jobs.atomic import open_append, read_tail, writing
from gpupool.jobs.errors import BadFile

if TYPE_CHECKING:
    from gpupool.jobs.paths import Spool

# Bytes the request pipe holds (a pipe holds 64 KB by default): a request (a job of 64 KB of
# arguments, and its other fields) sent ahead while the worker computes must never wait for the
# worker to read it, for the worker may be waiting meanwhile for the agent to read its reply.
REQUEST_PIPE = 256 * 1024

class WorkerLost(Exception):
    """The worker died or was killed while running a job; ``reason`` says how."""

    def __init__(self, reason: str, output: str = "") -> None:
        self.reason, self.output = reason, output
        super().__init__(reason)


def tail(path: Path, nbytes: int = 4000) -> str:
    """The end of a log, read without following a link ("" where it cannot be read)."""
    try:
        return read_tail(path, nbytes).decode(errors="replace")
    except (OSError, BadFile):
        return ""


def cap_log(path: Path, limit: int, spool: "Spool | None" = None) -> bool:
    """Keep a log that its writers hold open in append mode under ``limit`` bytes: past it, its
    content moves to ``<name>.1`` (replacing the one before) and the log starts empty. The
    writers go on appending to the emptied file; a line written during the copy may be lost.
    True if it was cut. No link is followed: a link at the log is neither read nor cut (with
    ``spool``, it is moved to ``rejected/``), and ``<name>.1`` is written beside it and renamed
    over the old one, never written through."""
    if limit <= 0:
        return False
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP and spool is not None:
            spool.reject(b"", path, f"{path.name} is a symlink; logs are never written through a link", move=True)
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size <= limit:
            return False
        old = path.with_name(path.name + ".1")
        with open(fd, "rb", closefd=False) as src, writing(old, fsync=False) as (dst, tmp):
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, old)
        os.ftruncate(fd, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def exited(proc: subprocess.Popen) -> bool:
    """True once ``proc`` has exited, without reaping it: while it is a zombie its pid (and so
    its process group's id) cannot be reused, and the group can still be killed safely."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped already
        return True


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group ``proc`` leads (it was started with ``start_new_session``):
    everything it started that did not leave the group on purpose (``setsid``) dies with it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (a SIGKILLed child nobody reaped still answers kill(pid, 0))."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def agent_marks(agent_id: str, base: str) -> dict[str, str]:
    """The environment variables that mark every process an agent starts (its worker, script jobs
    and what they fork): ``kill_leftovers`` finds them by these."""
    return {"GPUPOOL_AGENT": agent_id, "GPUPOOL_SPOOL": base}


def has_marks(pid: int, marks: dict[str, str]) -> bool:
    """True if process ``pid``'s environment carries all of ``marks`` (False if gone or another user's)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return False
    return all(f"{k}={v}".encode() in env for k, v in marks.items())


def kill_leftovers(marks: dict[str, str]) -> list[int]:
    """SIGKILL every process of this user whose environment carries all of ``marks`` (the agent's
    id and spool, which its worker and script jobs inherit), and return their pids. Run by an
    agent as it starts, before it has a worker: what a job forked outlives a SIGKILL of the agent
    (the kernel kills the worker with it, ``PR_SET_PDEATHSIG``, but that is not inherited across
    fork), and may still hold the GPU's memory. Matching on the environment, not on a pid saved
    before the kill, never hits a process that merely reuses a pid. Linux (``/proc``) only."""
    me, killed = os.getpid(), []
    try:
        pids = [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return killed
    for pid in pids:
        if pid != me and has_marks(pid, marks):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


class Worker:
    """The worker process and its two pipes.

    Its death is watched directly (a pidfd where the kernel has them), not only through its
    reply pipe: a child the job forked holds that pipe open and would hide the death. When it
    dies or is killed, its whole process group is killed, so nothing the job started lingers;
    children a job leaves behind when it returns normally live on with the worker (a pool the
    task keeps between chunks, say)."""

    def __init__(self, env: dict[str, str], log_path: Path, cwd: str | None = None,
                 preload: tuple[str, ...] = (), open_log: Callable[[Path], IO[bytes]] = open_append) -> None:
        self.env = env
        self.log_path = log_path
        self.open_log = open_log  # no link followed (the agent's: Spool.open_log, which rejects one)
        self.cwd = cwd
        self.preload = preload  # libraries it imports before its first job (a spare: see agent.workers)
        self.proc: subprocess.Popen | None = None
        self._w: int | None = None
        self._r: int | None = None
        self._pidfd: int | None = None
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already searched for a newline
        self._owed = 0  # requests sent whose reply has not been read
        self.sent = 0  # requests sent to the current process

    def start(self) -> None:
        r_req, w_req = os.pipe()
        with contextlib.suppress(OSError):  # Linux: see REQUEST_PIPE
            fcntl.fcntl(w_req, fcntl.F_SETPIPE_SZ, REQUEST_PIPE)
        r_rep, w_rep = os.pipe()
        with self.open_log(self.log_path) as log:
            self.proc = subprocess.Popen(
                # the agent's id last: ps and nvidia-smi tell the workers apart (see worker.set_title)
                python_argv("agent.worker_process", str(r_req), str(w_rep), str(os.getpid()),
                            self.env.get("GPUPOOL_AGENT", "-"), ",".join(self.preload)),
                pass_fds=(r_req, w_rep), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.cwd, start_new_session=True,
            )
        os.close(r_req)
        os.close(w_rep)
        try:
            self._pidfd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):  # not Linux 5.3+: its exit is polled instead
            self._pidfd = None
        self._w, self._r, self._buf, self._scanned, self._owed, self.sent = w_req, r_rep, bytearray(), 0, 0, 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and not exited(self.proc)

    def idle_priority(self, idle: bool) -> bool:
        """Run at idle CPU priority (SCHED_IDLE: on cores nothing else wants) or at the normal one
        again, every thread of it (threads started meanwhile inherit the idle policy), and with its
        session's autogroup at nice 19 or 0 (where the kernel groups processes by session,
        ``sched_autogroup_enabled``, a session's group gets its fair share of the CPU whatever the
        policy of the tasks in it; the worker leads a session of its own). False where the system
        refuses (an unprivileged user may not raise a priority again: RLIMIT_NICE)."""
        if self.proc is None:
            return False
        pid = self.proc.pid
        policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except (OSError, ValueError):
            tids = [pid]
        try:
            for tid in tids:
                with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                    os.sched_setscheduler(tid, policy, os.sched_param(0))
            with open(f"/proc/{pid}/autogroup", "w") as f:
                f.write("19" if idle else "0")
        except FileNotFoundError:  # no autogroups here (or it has just exited)
            return True
        except (OSError, AttributeError):
            return False
        return True

    def send(self, request: dict[str, Any]) -> bool:
        """Queue a request in the worker's pipe (it runs requests one after another).

        False if it was not queued: the worker died with replies still owed, and ``receive``
        must first report those (a reply it wrote before dying, or how it died). A fresh worker
        is started only when nothing is owed, so a death is never blamed on the wrong job."""
        if self.proc is None or exited(self.proc):
            if self._owed:
                return False
            self.kill()  # what the dead one left running, and its pipes
            self.start()
        try:
            os.write(self._w, json.dumps(request).encode() + b"\n")
        except BrokenPipeError:
            if self._owed:
                return False
            raise self.lost() from None
        self._owed += 1
        self.sent += 1
        return True

    def receive(self, timeout: float | None, abort: Callable[[], bool],
                note: Callable[[dict[str, Any]], None] | None = None, each: float | None = None) -> dict[str, Any]:
        """The reply to the oldest request sent. A note the job sends before it (its value waits
        for disk space: ``agent.worker_process.save_arrays``) goes to ``note``, and ends the
        time-out: the job computed in time. A batch's progress note (``{"progress": i}``, at a
        chunk's start: ``run_batch``) gives it ``each`` seconds from then, a chunk's time-out: a
        chunk that hangs is found after its own time-out, not after the whole batch's."""
        deadline = None if timeout is None else time.monotonic() + timeout
        late = f"the job ran past its timeout of {timeout:g} s" if timeout is not None else ""
        while True:
            reply = self._line(deadline, late, abort)
            if not isinstance(reply, dict) or "note" not in reply:
                return reply
            said = reply["note"]
            if isinstance(said, dict) and "progress" in said:
                if deadline is not None and each is not None:
                    deadline = time.monotonic() + each + PROGRESS_EVERY  # a note may come that late
                    late = f"a chunk of the batch from chunk {said['progress']} on ran past its timeout of {each:g} s"
                continue
            deadline = None
            if note is not None and isinstance(said, dict):
                note(said)

    def _line(self, deadline: float | None, late: str, abort: Callable[[], bool]) -> Any:
        """The worker's next line, waited for until ``deadline``."""
        while (end := self._buf.find(b"\n", self._scanned)) < 0:
            self._scanned = len(self._buf)
            if abort():
                self.kill()
                raise WorkerLost("stopped: the agent was told to stop at once")
            wait = 0.25 if deadline is None else min(0.25, deadline - time.monotonic())
            if wait <= 0:
                self.kill()
                raise TimeoutError(f"{late} and was killed")
            watch = [self._r] if self._pidfd is None else [self._r, self._pidfd]
            ready, _, _ = select.select(watch, [], [], wait)
            if self._r in ready:
                if not self._read():
                    raise self.lost()
            elif ready or exited(self.proc):
                # Dead, its pipe perhaps held open by a child it forked: what it wrote before it
                # died is still read (a reply, then the death of the job queued behind it).
                while select.select([self._r], [], [], 0)[0] and self._read():
                    pass
                if self._buf.find(b"\n", self._scanned) < 0:
                    raise self.lost()
        line = bytes(self._buf[:end])
        del self._buf[:end + 1]
        self._scanned = 0
        reply = json.loads(line)
        if not (isinstance(reply, dict) and "note" in reply):
            self._owed -= 1
        return reply

    def _read(self) -> bool:
        """Read what the reply pipe holds; False at its end (every writer closed it)."""
        chunk = os.read(self._r, 65536)  # not more: os.read allocates the whole size first (1 MB: +80 us a job)
        self._buf += chunk
        return bool(chunk)

    def lost(self) -> WorkerLost:
        code = None
        if self.proc is not None:
            if self.proc.returncode is None:  # before it is reaped: what it forked dies with it
                kill_group(self.proc)
            code = self.proc.wait()
        self._close()
        return WorkerLost(f"the worker process {exit_reason(code)}", tail(self.log_path))

    def kill(self) -> None:
        """Kill the worker and everything it started (its process group), dead or alive."""
        if self.proc is not None and self.proc.returncode is None:  # not reaped: its group id is ours
            kill_group(self.proc)
            self.proc.wait()
        self._close()

    def close(self) -> None:
        """Close its pipe: it exits at the end of its input (``stop`` also waits for that)."""
        if self._w is not None:
            with contextlib.suppress(OSError):
                os.close(self._w)
            self._w = None

    def done(self) -> bool:
        """True once it has exited (or was never started)."""
        return self.proc is None or exited(self.proc)

    def stop(self) -> None:
        """Close its pipe (it exits at end of input), then make sure it is gone."""
        if self.proc is None:
            return
        self.close()
        deadline = time.monotonic() + 5
        while not exited(self.proc) and time.monotonic() < deadline:  # not reaped: see kill
            if self._pidfd is not None:
                select.select([self._pidfd], [], [], max(0.0, deadline - time.monotonic()))
            else:
                time.sleep(0.05)
        self.kill()

    def _close(self) -> None:
        for fd in (self._w, self._r, self._pidfd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._w = self._r = self._pidfd = None
        self._owed = 0
        self.proc = None if self.proc is None or self.proc.poll() is not None else self.proc
