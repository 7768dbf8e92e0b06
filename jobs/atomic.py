"""Atomic publishing and bounded, no-follow reading of spool files.

Writers create ``.<name>.tmp-<pid>-<random>`` in the target's own folder (mailboxes: in
``agent_pool/.tmp``, see ``Spool.mailbox_temp_dir``), write,
flush, optionally fsync, close, then ``rename`` (replace) or ``link`` (create only if
absent, the NFS-safe form of O_EXCL) it to the final name. Readers skip every name
that starts with ``.``, so nobody ever sees a half-written file.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import time
from pathlib import Path
from typing import IO, Iterable, Iterator

from gpupool.jobs.errors import BadFile

TMP_MARK = ".tmp-"
DEFAULT_READ_LIMIT = 4 * 1024 * 1024
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # a write that fails with these may succeed once space returns


_MODES: dict[str, tuple[int, int]] = {}


def modes(folder: Path) -> tuple[int, int]:
    """(folder mode, file mode) for what the pool makes in ``folder``: they follow that folder's
    own mode, so a whole spool follows its BASE. A group-writable BASE (a group's spool: ``chgrp
    lab BASE; chmod 2770 BASE``) gets group-writable folders (setgid kept: files take BASE's
    group) and files, whatever the umask; a private one (755, 700) gets folders and files no one
    else may write. Never writable by other users (``Spool.check_private``). Read once per folder
    by each process (a chmod of BASE reaches processes started after it)."""
    key = str(folder)
    hit = _MODES.get(key)
    if hit is None:
        try:
            hit = modes_like(os.stat(folder).st_mode)
        except OSError:
            hit = modes_like(0o755)
        if len(_MODES) > 4096:  # a master of many runs: forget, stat again
            _MODES.clear()
        _MODES[key] = hit
    return hit


def modes_like(folder_mode: int) -> tuple[int, int]:
    """(folder mode, file mode) for what is made in a folder of ``folder_mode`` (see ``modes``)."""
    dir_mode = (stat.S_IMODE(folder_mode) & 0o2775) | 0o700
    return dir_mode, (dir_mode & 0o666) | 0o600


def give_mode(fd: int, mode: int) -> None:
    """A file we just created gets ``mode`` whatever the umask, where the mode lets the group
    write (a shared spool's: a umask of 022 would take that away)."""
    if mode & 0o020:
        with contextlib.suppress(OSError):
            os.fchmod(fd, mode)


class NotAFile(OSError):
    """A directory, FIFO, socket or device where a spool file belongs. An OSError (the path
    cannot be read as a file, like EACCES), not a BadFile: a reader that cannot move it aside
    treats it as unreadable (the dispatcher fails a chunk whose result path is a folder)."""


def file_kind(mode: int) -> str:
    """'directory', 'FIFO', ... for a ``st_mode`` (used in messages)."""
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISLNK, "symlink"), (stat.S_ISREG, "regular file")):
        if test(mode):
            return name
    return "special file"


def is_temp_name(name: str) -> bool:
    """True for names readers must skip (hidden or temp files)."""
    return name.startswith(".")


def temp_name(final: Path, folder: Path | None = None) -> Path:
    """A fresh temp name for ``final``, beside it or in ``folder`` (of the same filesystem)."""
    return (folder or final.parent) / f".{final.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


@contextlib.contextmanager
def writing(final: Path, fsync: bool = True, folder: Path | None = None) -> Iterator[tuple[IO[bytes], Path]]:
    """Open a temp file beside ``final`` (or in ``folder``); yields ``(file, temp_path)``.

    The caller publishes the temp path (``publish``/``commit``) after the block; on an
    exception the temp file is removed and the error propagates.
    """
    tmp = temp_name(final, folder)
    mode = modes(final.parent)[1]
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        give_mode(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f, tmp
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_replace(final: Path, data: bytes | Iterable[bytes], fsync: bool = True,
                  folder: Path | None = None) -> tuple[int, int, int]:
    """Publish ``data`` (bytes, or its pieces one by one) at ``final``, replacing what was there,
    atomically (the temp file made in ``folder`` when given). Returns the (inode, mtime_ns, size)
    of the file published, as ``read_if_changed`` compares them (a reader that wrote it need not
    read it again)."""
    with writing(final, fsync, folder) as (f, tmp):
        if isinstance(data, (bytes, bytearray, memoryview)):
            f.write(data)
        else:
            f.writelines(data)
        f.flush()
        st = os.fstat(f.fileno())
    try:
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return st.st_ino, st.st_mtime_ns, st.st_size


def commit_link(tmp: Path, final: Path) -> bool:
    """Move ``tmp`` to ``final`` only if ``final`` does not exist yet.

    Returns False (and removes ``tmp``) when another writer committed first. ``link``
    fails with EEXIST atomically, on local disks and on NFS alike.
    """
    try:
        os.link(tmp, final)
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def move_in(tmp: Path, final: Path) -> None:
    """``os.replace(tmp, final)`` for a file of a watched folder, made a link and an unlink where
    ``final`` is new: the folder's watchers see it created, not renamed (watchdog holds the first
    half of a rename pair up to 0.5 s for its match, and every event behind it waits too; see
    ``Spool.mailbox_temp_dir``). A crash between the two leaves only a temp file (``purge_temp``)."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        os.replace(tmp, final)
        return
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def write_exclusive(final: Path, data: bytes, fsync: bool = True) -> bool:
    """Publish ``data`` at ``final`` unless it exists; True if we created it."""
    with writing(final, fsync) as (f, tmp):
        f.write(data)
    return commit_link(tmp, final)


def read_bounded(path: Path, limit: int = DEFAULT_READ_LIMIT, stale_for: float = 2.0) -> bytes:
    """Read a whole spool file without following a symlink, refusing more than ``limit`` bytes.

    Raises BadFile for a symlink or a file over the limit, NotAFile (an OSError) for a
    directory, FIFO, socket or device (a FIFO is opened without blocking and never read).
    Retries ESTALE for up to ``stale_for`` seconds: a shared filesystem gives it when another
    client has just renamed a new version over the file and our cached handle is gone.
    """
    data, _ = read_if_changed(path, limit, None, stale_for)
    return data


def read_if_changed(path: Path, limit: int, known: tuple[int, int, int] | None, stale_for: float = 2.0
                    ) -> tuple[bytes | None, tuple[int, int, int]]:
    """Like ``read_bounded``, but (None, sig) without reading when the opened file's
    (inode, mtime_ns, size) is ``known``. The open (not a stat) is what revalidates a shared
    filesystem's cache (close-to-open consistency), so this sees what ``read_bounded`` sees."""
    deadline, pause = time.monotonic() + stale_for, 0.01
    while True:
        try:
            return _read_once(path, limit, known)
        except OSError as e:
            if e.errno != errno.ESTALE or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.25)


def _read_once(path: Path, limit: int, known: tuple[int, int, int] | None) -> tuple[bytes | None, tuple[int, int, int]]:
    fd, st = _open_regular(path, os.O_RDONLY)
    try:
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        if sig == known:
            return None, sig
        data = _read_upto(fd, limit + 1, st.st_size + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise BadFile(f"is larger than the {limit} byte limit for this kind of file", path)
    return data, sig


def _read_upto(fd: int, most: int, guess: int) -> bytes:
    """Up to ``most`` bytes of ``fd``, to its end: the first read asks for ``guess`` (the size
    its stat said, plus one to see the end), not for ``most``, whose buffer (8 MB for a result)
    would be allocated and given back on every read of a small file."""
    parts, got = [], 0
    ask = max(1, min(most, guess))
    while got < most:
        part = os.read(fd, min(ask, most - got))
        if not part:
            break
        parts.append(part)
        got += len(part)
        ask = max(ask, 1 << 20)  # it grew since its stat (or the stat was stale): in big steps
    return parts[0] if len(parts) == 1 else b"".join(parts)  # (none: b"")


def _open_regular(path: Path, flags: int, mode: int = 0o666) -> tuple[int, os.stat_result]:
    """``os.open(path, flags)`` without following a symlink and without blocking on a FIFO, for
    a regular file only: BadFile for a symlink, NotAFile (an OSError) for a folder, FIFO, socket
    or device. The descriptor is blocking again when returned, with the file's stat."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BadFile("is a symlink; spool files are never followed out of BASE", path) from e
        if e.errno == errno.ENXIO:  # a socket (or a FIFO nobody could open): not a file
            raise NotAFile(e.errno, "is a socket or special file, not a regular file", str(path)) from e
        if e.errno == errno.EISDIR:  # opened for writing
            raise NotAFile(e.errno, "is a directory, not a regular file", str(path)) from e
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # checked on the opened file: no race with a rename
            kind = file_kind(st.st_mode)
            raise NotAFile(errno.EISDIR if kind == "directory" else errno.EINVAL, f"is a {kind}, not a regular file",
                           str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def open_read(path: Path) -> IO[bytes]:
    """Open a spool file (a log) for reading without following a symlink: BadFile for a link,
    NotAFile (an OSError) for a folder, FIFO, socket or device. Folders on the way are the
    caller's to check (``linked_folder``)."""
    return os.fdopen(_open_regular(path, os.O_RDONLY)[0], "rb")


def read_tail(path: Path, nbytes: int) -> bytes:
    """The last ``nbytes`` of a spool file (a log), read as ``open_read`` opens it."""
    with open_read(path) as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - nbytes))
        return f.read(nbytes)


def open_append(path: Path, mode: int = 0o666) -> IO[bytes]:
    """Open the log ``path`` to append to, created if missing (``mode`` less the umask, as
    ``open(path, "ab")`` makes it), without following a symlink: a link there raises an OSError
    of errno ELOOP, a folder, FIFO, socket or device NotAFile (a FIFO is never waited on). The
    caller decides what becomes of it (``Spool.open_log`` moves it to ``rejected/``); folders on
    the way are the caller's to check (``Spool.real_dir``)."""
    try:
        fd, _ = _open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    except BadFile as e:
        raise OSError(errno.ELOOP, "is a symlink; logs are never written through a link", str(path)) from e
    return os.fdopen(fd, "ab")


def linked_folder(base: Path, folder: Path) -> tuple[Path, str] | None:
    """The first folder on the way from below ``base`` down to ``folder`` (``base`` itself is not
    looked at: it may be a link) that is a symlink or not a folder at all, with what it is
    ("symlink", "regular file", ...); None where each is a real folder, or missing (nothing
    below a missing one exists). One lstat per folder. ValueError if ``folder`` is not below
    ``base``. ``Spool.real_dir`` acts on what it finds."""
    d = Path(base)
    for part in Path(folder).relative_to(base).parts:
        d = d / part
        try:
            mode = os.lstat(d).st_mode
        except FileNotFoundError:
            return None
        if not stat.S_ISDIR(mode):
            return d, file_kind(mode)
    return None


def server_now(folder: Path) -> float | None:
    """The time as the filesystem holding ``folder`` stamps it (the mtime of a file we just
    wrote), so that file ages are judged without trusting this host's clock; None if unwritable."""
    probe = Path(folder) / f".clock-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        os.close(fd)
        return os.stat(probe).st_mtime
    except OSError:
        return None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)


def purge_temp(folders: list[Path], older_than: float = 3600.0) -> int:
    """Remove temp files (``.<name>.tmp-*``, ``.clock-*``) older than ``older_than`` seconds, as
    dirq does: what a killed writer left behind. A live writer's temp file is seconds old. A
    folder that is a link (a hostile spool) is passed over: nothing elsewhere is removed."""
    removed = 0
    for folder in folders:
        if os.path.islink(folder):
            continue
        now = server_now(folder)
        if now is None:
            continue
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            if not (e.name.startswith(".") and (TMP_MARK in e.name or e.name.startswith(".clock-"))):
                continue
            try:
                if e.stat(follow_symlinks=False).st_mtime < now - older_than:
                    os.unlink(e.path)
                    removed += 1
            except OSError:
                pass
    return removed

