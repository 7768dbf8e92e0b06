"""Watching a spool folder with inotify (watchdog): one place for the agent's mailbox watch
(``agent.watcher``) and a master's results watch (``master.core.dispatcher``).

Which events mean new content is part of the protocol: mailboxes are published by a rename from
``agent_pool/.tmp`` (``Spool.mailbox_temp_dir``) and results by ``link()``, so that a watcher sees
each as one event. watchdog pairs the two halves of a rename within a watched folder by holding
the first (IN_MOVED_FROM) up to 0.5 s, and its reader sleeps that long even once the match came:
every event behind it waits too.

A master's results watch (``watch_names``) does not go through watchdog: a run commits a result
per chunk, and each commit is three events (its temp file created, the result linked, the temp file
removed); watchdog carried each through three threads and two queues, a quarter of a master's CPU on
tiny chunks (20,000 no-op chunks: 5 s of the master's 12). ``watch_names`` reads the inotify
descriptor itself in one thread, a whole buffer of events per read, and hands the caller the names
of a read at once.

inotify is a per-user resource (128 instances and a number of watches by default, shared with
editors, IDE servers and every other tool of the user): where none is to be had, the caller polls
instead, with one warning, and never fails for it.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable

from gpupool.jobs.logsetup import logger
from watchdog.events import FileCreatedEvent, FileDeletedEvent, FileMovedEvent, FileSystemEventHandler
from watchdog.observers import Observer

# Mailboxes are only ever published by rename from ``agent_pool/.tmp`` (which inotify reports here
# as IN_MOVED_TO, a "created" event: see ``Spool.mailbox_temp_dir``; older writers rename within the
# folder, a "moved" one) and taken away by rename or unlink: asking inotify for nothing else keeps
# the watchdog threads of every agent of the folder quiet: no open/close/modify events from every
# read and lock, and none from every temp file (with 32 agents on 2 cores, one mailbox write woke 32
# threads twice; filling 32 mailboxes took 0.37 s). Results are committed by link() (a create).
MAILBOX_EVENTS = [FileCreatedEvent, FileMovedEvent, FileDeletedEvent]
RESULT_EVENTS = [FileCreatedEvent, FileMovedEvent, FileDeletedEvent]


def watch_folder(folder: Path, handler: FileSystemEventHandler, what: str, events: list[type] = RESULT_EVENTS
                 ) -> tuple[Any, Any] | None:
    """(a started watchdog observer, its watch) with ``handler`` on ``folder`` for ``events``, or
    None, with one warning that ``what`` polls instead, when the user has no inotify instance or
    watch left."""
    observer = None
    try:
        observer = Observer()  # watchdog 7 opens its inotify instance here
        observer.daemon = True
        watch = observer.schedule(handler, str(folder), recursive=False, event_filter=events)
        observer.start()
    except OSError as e:
        _polling_instead(what, folder, e)
        if observer is not None:
            with contextlib.suppress(Exception):
                observer.stop()
        return None
    return observer, watch


def _polling_instead(what: str, folder: Path, e: OSError) -> None:
    logger.warning("{}: cannot watch {} with inotify ({}); polling instead. Raise the limit with: sysctl "
                   "fs.inotify.max_user_instances=1024 fs.inotify.max_user_watches=524288", what, folder,
                   e.strerror or e)


# <sys/inotify.h>: new names in the folder (created, linked or moved in), and the queue's overflow
IN_CREATE, IN_MOVED_TO, IN_Q_OVERFLOW = 0x100, 0x80, 0x4000
IN_ONLYDIR, IN_DONTFOLLOW = 0x01000000, 0x02000000
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name
GATHER_S = 0.002  # events within this long of a read wait for the next (see NameWatch._run)
OVERFLOW = ""  # handed to ``on_names`` when events were lost: the caller looks at everything again


class NameWatch:
    """One thread reading one inotify descriptor that watches one folder for new names (see the
    module); ``on_names(names)`` gets the names of one read that do not start with "." (temp files),
    and ``OVERFLOW`` when the kernel dropped events. ``stop()`` ends the thread and closes it."""

    def __init__(self, fd: int, on_names: Callable[[list[str]], None]) -> None:
        self._fd, self._on_names = fd, on_names
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="results-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._stop_r in ready:
                return
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                return
            names = parse_events(data)
            if names:
                self._on_names(names)
            # Events coming within a moment of this read wait for the next one (those of a quiet
            # moment are read at once): a busy run's commits are read many to a read, not one
            # wake of this thread (and a turn of the GIL) each.
            time.sleep(GATHER_S)

    def stop(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        self._thread.join(timeout)
        if not self._thread.is_alive():
            for fd in (self._fd, self._stop_r, self._stop_w):
                with contextlib.suppress(OSError):
                    os.close(fd)


def parse_events(data: bytes) -> list[str]:
    """The names in a buffer of inotify events, those starting with "." left out; ``OVERFLOW`` for
    an overflow of the kernel's queue."""
    names, at, size = [], 0, _EVENT.size
    while at + size <= len(data):
        _, mask, _, length = _EVENT.unpack_from(data, at)
        raw = data[at + size:at + size + length]
        at += size + length
        if mask & IN_Q_OVERFLOW:
            names.append(OVERFLOW)
            continue
        name = os.fsdecode(raw.rstrip(b"\0"))
        if name and not name.startswith("."):
            names.append(name)
    return names


def watch_names(folder: Path, on_names: Callable[[list[str]], None], what: str) -> NameWatch | None:
    """A started ``NameWatch`` of ``folder`` (names created, linked or moved in), or None, with one
    warning that ``what`` polls instead, when inotify cannot be had (no instance or watch left, or
    no inotify at all)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        init, add = libc.inotify_init1, libc.inotify_add_watch
    except (OSError, AttributeError) as e:
        _polling_instead(what, folder, OSError(errno.ENOSYS, f"no inotify here: {e}"))
        return None
    add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    fd = init(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        _polling_instead(what, folder, OSError(err, os.strerror(err)))
        return None
    if add(fd, os.fsencode(folder), IN_CREATE | IN_MOVED_TO | IN_ONLYDIR | IN_DONTFOLLOW) < 0:
        err = ctypes.get_errno()
        os.close(fd)
        _polling_instead(what, folder, OSError(err, os.strerror(err)))
        return None
    return NameWatch(fd, on_names)
