"""The one place that knows every path of the spool; nobody else joins names into BASE."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import stat
import time
from pathlib import Path
from typing import IO


from gpupool.jobs.atomic import TMP_MARK, give_mode, is_temp_name, modes, modes_like, write_replace
from gpupool.jobs.atomic import NotAFile, linked_folder, open_append, open_read
from gpupool.jobs.errors import BadFile, BadName, SpoolError
from gpupool.jobs.names import check_chunk, check_name

RESULT_RE = re.compile(r"^(\d{6,})\.json$")
HISTORY_RE = re.compile(r"^(\d{6,})\.a(\d+)\.json$")
BATCH_RE = re.compile(r"^(\d{6,})\+(\d+)\.json$")  # <first>+<count>.json: a batch's results (jobs.batches)
ARRAYS_RE = re.compile(r"^(\d{6,})(?:\.a(\d+))?\.npz$")  # <chunk>.a<attempt>.npz (<chunk>.npz: older versions)


class Spool:
    """Paths under one BASE folder (see the ``jobs`` package docstring for the protocol)."""

    def __init__(self, base: str | os.PathLike) -> None:
        self.base = Path(base).absolute()
        self.pool_dir = self.base / "agent_pool"
        self.agents_dir = self.base / "agents"
        self.runs_dir = self.base / "runs"
        self.results_dir = self.base / "results"
        self.logs_dir = self.base / "logs"
        self.rejected_dir = self.base / "rejected"
        self.alloc_dir = self.base / "alloc"  # the Slurm allocator's records (master.alloc)
        self.pool_tmp_dir = self.pool_dir / ".tmp"  # temp files of mailbox writes (mailbox_temp_dir)
        self._mailbox_temp: Path | None = None  # pool_tmp_dir, once found to be a real folder
        self._result_dirs: dict[str, Path] = {}  # run -> results/<run>, its name checked (a master asks per chunk)

    def ensure(self) -> "Spool":
        """Create the layout (idempotent): BASE as the umask has it, what is in it following
        BASE's mode (``mkdir``)."""
        try:
            self.base.mkdir(mode=0o755, parents=True, exist_ok=True)
            for d in (self.pool_dir, self.agents_dir, self.runs_dir, self.results_dir, self.logs_dir):
                self.mkdir(d)
        except OSError as e:
            raise SpoolError(f"cannot create the spool folder: {e.strerror}", e.filename or self.base) from e
        try:  # a broken rejected/ (a file, a link) costs only the rejections: reject() names it
            fd = self._rejected_fd()
            os.close(fd)
        except OSError as e:
            warn_once(f"{self.rejected_dir}: {e.strerror}; rejected spool files will not be kept")
        return self

    def exists(self) -> bool:
        """BASE is a spool: an agent or a master has made its layout there."""
        return self.pool_dir.is_dir() and self.agents_dir.is_dir()

    def hint_below(self) -> str:
        """For a BASE that is not a spool: the spools one folder down, named (an OctoRun config
        keeps its spool in ``<log_dir>/gpupool``, and ``--base <log_dir>`` is an easy slip), or "".
        It opens with "; " and ends with ")": it goes inside a message's parentheses."""
        try:
            below = sorted(d for d in self.base.iterdir() if d.is_dir() and Spool(d).exists())[:5]
        except OSError:
            return ""
        if not below:
            return ""
        octorun = ", as an OctoRun config keeps its spool in <log_dir>/gpupool" if any(
            d.name == "gpupool" for d in below) else ""
        return f"; but {', '.join(map(str, below))} {'is one' if len(below) == 1 else 'are'}{octorun}: " \
               f"pass --base {below[0]})"

    def mkdir(self, path: Path) -> Path:
        """Make the folder ``path`` of this spool and its missing parents below BASE, each with
        its parent's mode (``jobs.atomic.modes``: a group's spool stays group-writable whatever
        the umask of whoever makes a folder). Raises OSError as ``os.mkdir`` does."""
        path = want = Path(path)
        missing = []
        while not path.is_dir() and path != self.base and path.parent != path:
            missing.append(path)
            path = path.parent
        for d in reversed(missing):
            mode = modes(d.parent)[0]
            try:
                os.mkdir(d, mode)
            except FileExistsError:
                continue
            if mode & 0o020 or mode & stat.S_ISGID:  # the umask may have cut the group's write
                fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                try:
                    give_mode(fd, mode)
                finally:
                    os.close(fd)
        return want

    def check_private(self) -> None:
        """Refuse a spool that every user may write: whoever can write it runs code as us."""
        for d in (self.base, self.pool_dir, self.agents_dir, self.runs_dir, self.results_dir):
            st = os.stat(d) if d == self.base else os.lstat(d)
            if d != self.base and stat.S_ISLNK(st.st_mode):
                raise SpoolError("is a symlink; the spool's own folders must be real folders", d)
            if st.st_mode & stat.S_IWOTH:
                raise SpoolError(f"is writable by every user (mode {stat.S_IMODE(st.st_mode):o}): anyone who can "
                                 f"write the spool can run code as this user. Fix it with: chmod o-w {d}", d)

    def run_dirs(self, run: str) -> Path:
        """Create ``results/<run>`` and ``logs/<run>`` if needed; refuse a ``results/<run>`` that is
        a symlink (a hostile link would make us write outside BASE; a master starting the run says
        so, an agent rejects the job). A link at ``logs/`` or ``logs/<run>`` is moved to
        ``rejected/`` and a real folder made instead (``real_dir``). Returns the results folder."""
        out = self.result_dir(run)
        try:
            self.real_dir(self.run_log_dir(run))
        except OSError as e:
            raise BadFile(f"cannot be made a folder ({e.strerror})", e.filename or self.run_log_dir(run)) from e
        for d in (out, self.run_log_dir(run)):
            try:
                self.mkdir(d)
            except OSError as e:  # a file (or a dangling link) where the folder belongs
                raise BadFile(f"cannot be made a folder ({e.strerror})", d) from e
            if os.path.islink(d):
                raise BadFile("is a symlink; results and logs are never written through a link", d)
        return out

    def real_dir(self, folder: Path, make: bool = True) -> Path:
        """The one check that a write of a log or a result follows no link out of BASE: every
        folder from below BASE down to ``folder`` (``logs/<run>``, ``results/<run>``) must be a real
        folder. A symlink (or a file, FIFO, ...) found on the way is moved to ``rejected/`` with a
        ``.why`` naming it; then, with ``make``, a fresh folder takes its place (missing ones are
        made too) and the write goes on; without, an OSError naming it (errno ELOOP for a link,
        ENOTDIR for anything else) is raised, and the write fails as on a full disk. A missing
        folder is left to the write without ``make``. One lstat per folder, so cheap enough for
        every write (though a link swapped in between the check and the write is not caught).
        Returns ``folder``."""
        for _ in range(len(Path(folder).parts) + 1):  # bounded: a link that will not move is raised
            bad = linked_folder(self.base, folder)
            if bad is None:
                break
            d, kind = bad
            why = f"a {kind}{_link_target(d)} where the spool folder {d.relative_to(self.base)}/ belongs: logs " \
                  f"and results are never written through a link"
            self.reject(b"", d, why + ("; a fresh folder was made in its place" if make else
                                       "; the result that was to be written there was not"), move=True)
            if not make:
                raise OSError(errno.ELOOP if kind == "symlink" else errno.ENOTDIR,
                              f"is a {kind}, not a real folder; moved to {self.rejected_dir.name}/, "
                              f"nothing was written through it", str(d))
        else:
            raise OSError(errno.ELOOP, "is a symlink or not a folder, and cannot be moved out of the way; "
                          "nothing is written through it", str(bad[0]))
        if make:
            self.mkdir(folder)
        return folder

    def open_log(self, path: Path) -> IO[bytes]:
        """Open the log ``path`` (below ``logs/``) to append to, following no link anywhere below
        BASE: its folders are made real (``real_dir``), and a link (or a folder, FIFO, socket)
        where the file belongs is moved to ``rejected/`` with a ``.why`` and a fresh log made
        (``jobs.atomic.open_append``: O_NOFOLLOW). Raises OSError where it still cannot (a full
        disk). Used for chunk logs, the worker's log, the agent's log and ``.out``."""
        self.real_dir(Path(path).parent)
        try:
            return self._append(path)
        except OSError as e:
            if e.errno != errno.ELOOP and not isinstance(e, NotAFile):
                raise
            what = f"is a symlink{_link_target(path)}" if e.errno == errno.ELOOP else e.strerror
            why = f"the log {path.name} {what}: logs are never written through a link; a fresh log was made in its place"
        self.reject(b"", path, why, move=True)
        return self._append(path)

    def keep_output(self, scratch: Path, log: Path, attempt: int, what: str) -> bool:
        """Append what a job wrote to ``scratch`` (``scratch_log``) to its chunk's ``log``, after the
        attempt's header (``jobs.descriptor.attempt_header``), and empty ``scratch``; nothing (no
        log made) where it wrote nothing. True if there was output. The worker calls it after each
        callable job, the agent after a worker died under one."""
        from gpupool.jobs.descriptor import attempt_header

        try:
            src = open_read(scratch)
        except FileNotFoundError:
            return False
        with src:
            if os.fstat(src.fileno()).st_size == 0:
                return False
            with self.open_log(log) as out:
                out.write(attempt_header(attempt, what).encode())
                while chunk := src.read(1 << 20):
                    out.write(chunk)
        with self.open_log(scratch) as f:  # the same file, no link followed: emptied for the next job
            os.ftruncate(f.fileno(), 0)
        return True

    @staticmethod
    def _append(path: Path) -> IO[bytes]:
        """``open_append`` with the mode of its folder's files (a chunk's retry on another member's
        agent appends to the same log, in a group's spool)."""
        mode = modes(Path(path).parent)[1]
        f = open_append(path, mode)
        give_mode(f.fileno(), mode)
        return f

    # agents
    def mailbox(self, agent_id: str) -> Path:
        return self.pool_dir / f"{check_name(agent_id, 'agent id')}.POOL"

    def mailbox_temp_dir(self) -> Path | None:
        """Where mailbox writes make their temp files: ``agent_pool/.tmp``, made here if missing.

        Agents watch ``agent_pool`` with inotify, not this folder, so the rename that publishes a
        mailbox reaches them as one event (IN_MOVED_TO) rather than a pair: watchdog holds the
        first half of a pair (IN_MOVED_FROM) up to 0.5 s for its match, and its reader then sleeps
        that long even once the match came (seen: one agent in ten woke 0.4 s late in a fill of 32).
        None (temp files beside the mailbox, as before) where it is not a real folder of ours."""
        if self._mailbox_temp is not None:
            return self._mailbox_temp
        d = self.pool_tmp_dir
        try:
            self.mkdir(d)
            if not stat.S_ISDIR(os.lstat(d).st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a folder")
        except OSError as e:
            warn_once(f"{d}: {e.strerror or e}; mailbox temp files are made beside the mailboxes instead")
            return None
        self._mailbox_temp = d
        return d

    def forget_mailbox_temp_dir(self) -> None:
        """The temp folder failed a write (removed meanwhile?): looked at afresh next time."""
        self._mailbox_temp = None

    def mailbox_lock(self, agent_id: str) -> Path:
        return self.pool_dir / f"{check_name(agent_id, 'agent id')}.lock"

    def heartbeat(self, agent_id: str) -> Path:
        return self.agents_dir / f"{check_name(agent_id, 'agent id')}.json"

    def agent_lock(self, agent_id: str) -> Path:
        return self.agents_dir / f"{check_name(agent_id, 'agent id')}.lock"

    def drain_flag(self, agent_id: str) -> Path:
        return self.agents_dir / f"{check_name(agent_id, 'agent id')}.drain"

    def agent_log(self, agent_id: str) -> Path:
        return self.logs_dir / f"{check_name(agent_id, 'agent id')}.log"

    def agent_log_files(self) -> list[Path]:
        """Every agent's log (``<agent>.log``, not the worker's), sorted."""
        try:
            names = sorted(n for n in os.listdir(self.logs_dir) if n.endswith(".log")
                           and not n.endswith(".worker.log") and not is_temp_name(n))
        except OSError:
            return []
        return [self.logs_dir / n for n in names if (self.logs_dir / n).is_file()]

    def agent_out(self, agent_id: str) -> Path:
        """What a started agent printed before its own log took over (``start_agents.sh``)."""
        return self.logs_dir / f"{check_name(agent_id, 'agent id')}.out"

    def scratch_log(self, agent_id: str) -> Path:
        """Where the running callable job's output goes first (``agent.worker_process.ChunkOutput``),
        moved to its chunk's log when it wrote any: one file per agent, emptied before each job."""
        return self.logs_dir / f".{check_name(agent_id, 'agent id')}.out.scratch"

    def worker_log(self, agent_id: str) -> Path:
        """The output of the agent's worker process (the job code's prints and warnings)."""
        return self.logs_dir / f"{check_name(agent_id, 'agent id')}.worker.log"

    def agent_ids(self) -> list[str]:
        """Agents that ever wrote a heartbeat in this spool, sorted. A name that is not a valid
        agent id (``bad name.json``) is skipped with one warning: it is no agent of ours."""
        return self._names(self.agents_dir, ".json", "agent id")

    def _names(self, folder: Path, suffix: str, what: str) -> list[str]:
        try:
            entries = os.listdir(folder)
        except OSError:  # missing, or not a folder
            return []
        out = []
        for name in entries:
            if not name.endswith(suffix) or is_temp_name(name):
                continue
            ident = name[: len(name) - len(suffix)]
            try:
                out.append(check_name(ident, what))
            except BadName as e:
                warn_once(f"{folder / name}: skipped: {e}")
        return sorted(out)

    # the Slurm allocator (master.alloc)
    def alloc_lock(self) -> Path:
        """Held by the one allocator of this spool (``python -m master alloc slurm``)."""
        return self.alloc_dir / "alloc.lock"

    def alloc_record(self, job: str) -> Path:
        """One allocation (a Slurm job of agents) the allocator submitted: its state and agents."""
        return self.alloc_dir / f"{check_name(job, 'Slurm job id')}.json"

    def alloc_jobs(self) -> list[str]:
        """The Slurm job ids with a record in ``alloc/``, sorted."""
        return self._names(self.alloc_dir, ".json", "Slurm job id")

    def alloc_log(self) -> Path:
        """The allocator's log when it runs detached (its lines merge with the agents' in ``logs``)."""
        return self.logs_dir / "alloc.log"

    # runs
    def run_dir(self, run: str) -> Path:
        return self.runs_dir / check_name(run, "run name")

    def run_spec(self, run: str) -> Path:
        return self.run_dir(run) / "run.json"

    def cancel_flag(self, run: str) -> Path:
        """Present = the run is cancelled; its JSON says {"stop_running": bool}."""
        return self.run_dir(run) / "cancel"

    def run_epoch(self, run: str) -> Path:
        """A token drawn anew each time the run is started afresh (``--fresh``); its jobs carry it."""
        return self.run_dir(run) / "epoch"

    def sealed_flag(self, run: str) -> Path:
        """Present = the run finished and its results were flushed to disk."""
        return self.run_dir(run) / "sealed"

    def on_done_record(self, run: str) -> Path:
        """The run's --on-done hook, claimed: made (exclusively) by the master that runs it, before it
        starts it, and rewritten with its exit code when it ends (``master.hooks``)."""
        return self.run_dir(run) / "on_done.json"

    def owner_file(self, run: str) -> Path:
        """Who the run belongs to ({"uid", "user"}; ``jobs.owners``)."""
        return self.run_dir(run) / "owner"

    def master_lock(self, run: str) -> Path:
        return self.run_dir(run) / "master.lock"

    def run_names(self) -> list[str]:
        """Runs in this spool, sorted; a name that is not a valid run name is skipped with one warning."""
        return self._names(self.runs_dir, "", "run name")

    # results
    def result_dir(self, run: str) -> Path:
        folder = self._result_dirs.get(run) if isinstance(run, str) else None
        if folder is None:
            folder = self.results_dir / check_name(run, "run name")
            if len(self._result_dirs) < 1024:
                self._result_dirs[run] = folder
        return folder

    def result_json(self, run: str, chunk: int) -> Path:
        return self.result_dir(run) / f"{check_chunk(chunk):06d}.json"

    def result_npz(self, run: str, chunk: int, attempt: int) -> Path:
        """The arrays of one attempt: each attempt writes its own, so commits need no lock."""
        return self.result_dir(run) / f"{check_chunk(chunk):06d}.a{int(attempt)}.npz"

    def arrays_of(self, run: str, rec: dict) -> Path | None:
        """The arrays file a result read by ``jobs.results.read_result`` names, or None."""
        return self.result_dir(run) / rec["arrays"] if rec.get("arrays") else None

    def batch_json(self, run: str, first: int, count: int) -> Path:
        """The results of a batch of chunks ``first`` .. ``first + count - 1`` (``jobs.batches``)."""
        return self.result_dir(run) / f"{check_chunk(first):06d}+{int(count)}.json"

    def history_json(self, run: str, chunk: int, attempt: int) -> Path:
        return self.result_dir(run) / f"{check_chunk(chunk):06d}.a{int(attempt)}.json"

    def run_log_dir(self, run: str) -> Path:
        """``logs/<run>``: the output of the run's script jobs, one file per chunk."""
        return self.logs_dir / check_name(run, "run name")

    def on_done_log(self, run: str) -> Path:
        """What the run's --on-done hook printed (``master.hooks``)."""
        return self.run_log_dir(run) / "on_done.log"

    def master_log(self, run: str) -> Path:
        """What the run's detached master printed (``main.py --detach``)."""
        return self.run_log_dir(run) / "master.log"

    def chunk_log(self, run: str, chunk: int) -> Path:
        """The output of one chunk's script or command job: written only through ``open_log``,
        read only without following a link (``jobs.atomic.open_read``)."""
        return self.run_log_dir(run) / f"{check_chunk(chunk):06d}.log"

    def batch_log(self, run: str, first: int, count: int) -> Path:
        """What a batch's chunks printed, one file for all of them (``jobs.batches``)."""
        return self.run_log_dir(run) / f"{check_chunk(first):06d}+{int(count)}.log"

    def demo_input_dir(self) -> Path:
        """``demo-input``: the files the demo (``python main.py`` without ``--task``) prepares as its
        user's input, kept beside the spool it runs on."""
        return self.base / "demo-input"

    def write_over(self, path: Path, data: bytes, what: str) -> None:
        """Publish ``data`` at ``path`` (``write_replace``, no fsync); a folder where the file
        belongs (nothing can be renamed over one) is moved to ``rejected/`` first. ``what``
        names the file for the note ("heartbeat", "flag")."""
        try:
            write_replace(path, data, fsync=False)
        except OSError as e:
            if not os.path.isdir(path) or os.path.islink(path):
                raise
            self.reject(b"", path, f"{what} is a directory ({e.strerror}); moved aside", move=True)
            write_replace(path, data, fsync=False)

    # rejected files
    def reject(self, data: bytes, origin: Path | str, why: str, move: bool = False) -> Path | None:
        """Keep a refused file (or descriptor) in ``rejected/`` with a ``.why`` note beside it.

        ``data`` is kept as the rejected file; with ``move`` the ``origin`` path itself is renamed
        in instead (a directory or FIFO where a file belongs, which nothing could replace), and
        ``data`` is written only if that rename fails; if ``rejected/`` cannot take it, ``origin`` is
        still moved out of the way, to a hidden name beside it. Nothing is written through a symlink:
        ``rejected/`` is opened with O_NOFOLLOW and written relative to that handle, so a
        ``rejected`` that is a link (or not a folder) drops the rejection with a warning naming
        it. Never raises: a rejection that cannot be kept (disk full) is logged instead.
        Returns the rejected file's path, or None when nothing was kept."""
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.monotonic_ns() % 10**9}-{Path(origin).name}"
        name = stem[:200]
        note = json.dumps({"origin": str(origin), "why": why, "at": time.time()}, indent=1).encode()
        try:
            fd = self._rejected_fd()
        except OSError as e:
            _log().warning("{}: {}; the rejection of {} ({}) is not kept", self.rejected_dir, e.strerror, origin, why)
            if move:
                _hide(Path(origin))
            return None
        try:
            moved = False
            if move:
                try:
                    os.rename(origin, name, dst_dir_fd=fd)  # renames a link itself, never its target
                    moved = True
                except OSError as e:
                    _log().warning("{}: could not be moved into {} ({}); a copy of what it held is kept",
                                   origin, self.rejected_dir, e.strerror)
                    _hide(Path(origin))
            if not moved:
                _write_at(fd, name, data)
            _write_at(fd, name + ".why", note)
        except OSError as e:
            _log().warning("{}: could not keep the rejection of {} ({}): {}", self.rejected_dir, origin, why,
                           e.strerror)
            return None
        finally:
            os.close(fd)
        return self.rejected_dir / name

    def _rejected_fd(self) -> int:
        """A handle on ``rejected/`` (created if missing), refusing a symlink or a non-folder."""
        for _ in range(2):
            try:
                return os.open(self.rejected_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    self.mkdir(self.rejected_dir)  # mkdir never follows a link in its last component
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise OSError(e.errno, "is a symlink or not a folder; nothing is written through it",
                                  str(self.rejected_dir)) from e
                raise
        return os.open(self.rejected_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)


def _link_target(path: Path) -> str:
    """For a rejection's note: ' (to <target>)' for a symlink, '' for anything else."""
    try:
        return f" (to {os.readlink(path)})"
    except OSError:
        return ""


def _hide(path: Path) -> None:
    """Move a broken spool entry that nothing can replace (a folder, a FIFO) out of the way, to a
    hidden name beside it that every reader skips."""
    aside = path.with_name(f".{path.name}.rejected-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(path, aside)
        _log().warning("{}: moved aside to {}", path, aside.name)
    except FileNotFoundError:
        pass
    except OSError as e:
        _log().warning("{}: cannot be moved aside ({}); remove it by hand", path, e.strerror)


def _write_at(dir_fd: int, name: str, data: bytes) -> None:
    """Publish ``data`` as ``name`` in the folder ``dir_fd`` (temp file + rename, no link followed)."""
    tmp = f".{name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    mode = modes_like(os.fstat(dir_fd).st_mode)[1]
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=dir_fd)
    try:
        give_mode(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Log ``message`` as a warning the first time this process sees it (a spool is reread
    every few seconds: a bad file left there is named once, not on every pass)."""
    if message in _warned:
        return
    if len(_warned) > 10_000:  # a long-lived master facing a flood of bad names: forget, warn again
        _warned.clear()
    _warned.add(message)
    _log().warning(message)


def _log():  # noqa: ANN202 (loguru's logger)
    """The pool's logger, imported only where this module warns: a worker imports this module and
    never logs (see ``jobs.logsetup``)."""
    from gpupool.jobs.logsetup import logger

    return logger
