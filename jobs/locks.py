"""Exclusive locks on permanent lock files (portalocker / flock).

A lock file is created once and never renamed or unlinked, so every waiter locks the
same inode (portalocker issue 115). Long-held locks (an agent's GPU, a run's master)
record their holder inside the lock file so that a refused process can name it.
"""
from __future__ import annotations

import json
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

import portalocker

from gpupool.jobs.atomic import modes, read_bounded
from gpupool.jobs.errors import BadFile, LockHeld
from gpupool.jobs.jsonio import load_json


def _open_or_create(path: Path, tries: int = 50, mode: int | None = None) -> int:
    """Open ``path`` read-write, creating it if missing; with ``mode``, a file of ours is given
    that mode whatever the umask (a lock every user of the host must be able to take: 0o666);
    without, the mode of the files of its folder (``jobs.atomic.modes``).

    Two GlusterFS clients creating one name at the same moment can see EEXIST for a plain
    O_CREAT (the create reaches the bricks as its own operation), though the file is there to
    open; open it then without O_CREAT, and create again should it have gone meanwhile."""
    if mode is None:  # a spool's lock: its folder's file mode (group-writable in a group's spool)
        want = modes(path.parent)[1]
        mode = want if want & 0o020 else None
    else:
        want = mode
    for _ in range(tries):
        try:
            return _with_mode(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, want), mode)
        except FileExistsError:
            pass
        try:
            return _with_mode(os.open(path, os.O_RDWR | os.O_NOFOLLOW), mode)
        except FileNotFoundError:
            continue
    raise FileExistsError(f"{path}: neither created nor opened in {tries} tries")


def _with_mode(fd: int, mode: int | None) -> int:
    """``fd``, its file given ``mode`` if it is ours and has another (the umask cut it)."""
    if mode is not None:
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != mode:
            try:
                os.fchmod(fd, mode)
            except OSError:
                pass
    return fd


class FileLock:
    """An exclusive lock on ``path`` (with ``shared``: a shared one, which excludes only exclusive
    holders, as agents sharing one GPU as slots hold its lock); usable as a context manager (blocking)."""

    def __init__(self, path: Path, mode: int | None = None, shared: bool = False) -> None:
        self.path = Path(path)
        self.mode = mode  # see _open_or_create
        self.kind = portalocker.LockFlags.SHARED if shared else portalocker.LockFlags.EXCLUSIVE
        self._f = None

    def _open(self):
        if self._f is None:
            self._f = os.fdopen(_open_or_create(self.path, mode=self.mode), "r+b", buffering=0)
        return self._f

    def acquire(self, blocking: bool = True, timeout: float | None = None, poll: float = 0.05) -> bool:
        """Take the lock; with ``blocking=False`` return False at once if it is held.

        A lock is on an open file, not on its name: a lock file replaced or removed since it was
        opened (a hostile or careless process, a broken lock moved into ``rejected/``) would let
        two holders in, each locking its own file. So once had, the lock is checked to be on the
        file the name now gives, and taken again on that one if not."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not self._lock_once(blocking, deadline, poll):
                return False
            if self._still_the_file():
                return True
            self.close()  # ours guards nothing any more: lock the file now under that name

    def _lock_once(self, blocking: bool, deadline: float | None, poll: float) -> bool:
        f = self._open()
        if blocking and deadline is None:
            portalocker.lock(f, self.kind)
            return True
        while True:
            try:
                portalocker.lock(f, self.kind | portalocker.LockFlags.NON_BLOCKING)
                return True
            except portalocker.exceptions.LockException:
                if not blocking or (deadline is not None and time.monotonic() >= deadline):
                    return False
                time.sleep(poll)

    def _still_the_file(self) -> bool:
        try:
            now = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        mine = os.fstat(self._f.fileno())
        return (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev)

    def write_note(self, data: bytes) -> None:
        """Replace the lock file's content in place (only while holding the lock)."""
        f = self._open()
        f.seek(0)
        f.write(data)
        f.truncate()

    def read_note(self, limit: int = 4096) -> bytes:
        """The lock file's content, through a fresh open (a long-open handle may serve a
        shared filesystem's cached pages)."""
        try:  # no symlink followed, never blocks on a FIFO, b"" for anything but a regular file
            return read_bounded(self.path, limit)
        except (OSError, BadFile):
            return b""

    def release(self) -> None:
        if self._f is not None:
            portalocker.unlock(self._f)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()  # closing drops the lock too
            self._f = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class HolderLock(FileLock):
    """A lock held for a process's life that says who holds it."""

    def take(self, what: str, **info: Any) -> None:
        """Acquire without waiting or raise LockHeld naming the current holder."""
        if not self.acquire(blocking=False):
            holder = self.holder()
            who = ", ".join(f"{k}={v}" for k, v in holder.items()) if holder else "unknown holder"
            self.close()
            raise LockHeld(f"{what} is already held by another process ({who})", self.path)
        note = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), **info}
        self.write_note(json.dumps(note).encode())
        os.fsync(self._f.fileno())

    def holder(self) -> dict[str, Any]:
        """The holder note, or {} when unreadable (it is only used for messages)."""
        try:
            note = load_json(self.read_note() or b"{}", "lock holder note", self.path)
            return note if isinstance(note, dict) else {}
        except BadFile:
            return {}
