"""Waiting for a mailbox to change: inotify (watchdog) on local disks, a cheap stat poll elsewhere.

inotify sees nothing written by another client of a network filesystem and drops
events on queue overflow (watchdog issue 654), so the inotify waiter also times out
after ``rescan`` seconds and the caller rereads the mailbox anyway. The poll waiter
stats the mailbox file and backs off while idle (after a minute without work: until then it
looks at the fastest rate); on a network filesystem, for that minute, it lists the folder first (``jobs.fsinfo.NameRefresh``: else the client
shows a replaced mailbox as the old one for its cache time, 1 s on GlusterFS), while the folder
is small. An agent that runs dry lists it once too (``Agent.step``).

An agent that works does not need to be woken: it rereads its mailbox after every job. So the
inotify watch is dropped when a job starts (``busy()``) and armed again only when the agent
waits (``wait``, which then returns at once for a reread, so nothing written meanwhile is missed):
an agent running an hour-long chunk is not woken by every mailbox change of a busy pool (each
woke the watchdog threads of every watching agent). A drop and a re-arm cost about 0.3 ms. (On 2
cores with no-op chunks, agents that poll showed an idle-gap p99 of 2-3 ms against 3.4-5 ms with
inotify.)

What made agents late was elsewhere: a mailbox published by a rename within the watched folder
reached watchdog as a pair of events, whose first half watchdog holds up to 0.5 s for its match
and then sleeps through even once the match came. In a fill of 32 idle agents, one in ten started
its job 0.4 s after it was written. Mailbox temp files are therefore made in ``agent_pool/.tmp``
(``Spool.mailbox_temp_dir``): a mailbox arrives as one event, and all 32 started within 0.06 s.

inotify is a per-user resource: where none is to be had, the agent polls instead, with one
warning, and never fails for it (``jobs.watching.watch_folder``; a master's results watch,
``jobs.watching.watch_names``, does the same).
"""
from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path

from gpupool.jobs.logsetup import logger

from watchdog.events import FileSystemEvent, FileSystemEventHandler

from gpupool.jobs.fsinfo import NameRefresh, is_network_fs
from gpupool.jobs.watching import MAILBOX_EVENTS, watch_folder

_NEW_CONTENT = {"moved", "created", "deleted"}
# For this long after the agent last started a job, the poll waiter looks at the fastest rate and
# lists a network filesystem's folder before each look (NameRefresh): runs that come one after
# another start within a poll interval, and an agent idle for longer costs the file server what it
# did before (through GlusterFS, listing at every poll doubled an idle agent's calls, to 20 a second).
LIST_AFTER_WORK_S = 60.0


class _Handler(FileSystemEventHandler):
    def __init__(self, target: str, wake: threading.Event) -> None:
        self.target, self.wake = target, wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        # watchdog 7 also reports opened/closed: our own reads must not wake us.
        if event.event_type not in _NEW_CONTENT:
            return
        if os.fsdecode(event.src_path) == self.target or os.fsdecode(getattr(event, "dest_path", "")) == self.target:
            self.wake.set()


class MailboxWatcher:
    """``wait(timeout)`` returns when the mailbox may have changed, or on ``kick()``, or at timeout."""

    def __init__(self, path: Path, mode: str = "auto", poll_interval: float = 0.5,
                 max_poll_interval: float = 5.0) -> None:
        self.path = Path(path)
        if mode == "auto":
            mode = "poll" if is_network_fs(self.path.parent) else "inotify"
        if mode not in ("inotify", "poll"):
            raise ValueError(f"--watch must be auto, inotify or poll, not {mode!r}")
        self.mode = mode
        self.poll_interval = poll_interval
        self.max_poll_interval = max(max_poll_interval, poll_interval)
        self._interval = poll_interval
        self._refresh = NameRefresh(self.path.parent)
        self._busy_at = -math.inf  # when a job last started here (busy)
        self._wake = threading.Event()
        self._observer = None
        self._watch = None  # the inotify watch, while armed
        self._last = self._signature()

    def start(self) -> None:
        if self.mode == "inotify":
            watching = watch_folder(self.path.parent, self._handler(), f"agent mailbox {self.path.name}",
                                    MAILBOX_EVENTS)
            if watching is None:
                self.mode = "poll"
            else:
                self._observer, self._watch = watching

    def _handler(self) -> _Handler:
        return _Handler(str(self.path), self._wake)

    def _arm(self) -> None:
        try:
            self._watch = self._observer.schedule(self._handler(), str(self.path.parent), recursive=False,
                                                  event_filter=MAILBOX_EVENTS)
        except OSError as e:  # the user's inotify watches ran out since: poll from now on
            logger.warning("cannot watch {} with inotify any more ({}); polling instead", self.path.parent,
                           e.strerror or e)
            self.stop()
            self.mode = "poll"

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = self._watch = None

    def kick(self) -> None:
        """Wake a waiter now (used to stop, and safe to call from a signal handler)."""
        self._wake.set()

    def busy(self) -> None:
        """A job starts: poll at the fastest rate again, and stop watching until the next ``wait``."""
        self._interval = self.poll_interval
        self._busy_at = time.monotonic()
        if self._watch is not None:
            self._observer.unschedule(self._watch)
            self._watch = None

    def wait(self, timeout: float) -> bool:
        """Block until a change (True) or ``timeout`` seconds pass (False)."""
        if self.mode == "inotify":
            if self._watch is None and self._observer is not None:
                self._arm()
                return True  # unwatched until now: the caller rereads the mailbox before waiting
            woke = self._wake.wait(timeout)
            self._wake.clear()
            return woke
        return self._poll(timeout)

    def _poll(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._wake.wait(min(self._interval, left)):
                self._wake.clear()
                return True
            sig = self._signature()
            if sig != self._last:
                self._last = sig
                self._interval = self.poll_interval
                return True
            if time.monotonic() - self._busy_at >= LIST_AFTER_WORK_S:  # idle a while: back off
                self._interval = min(self._interval * 1.5, self.max_poll_interval)

    def _signature(self) -> tuple[int, int, int] | None:
        if time.monotonic() - self._busy_at < LIST_AFTER_WORK_S:  # else its cache shows a replaced mailbox late
            self._refresh()
        try:
            st = os.stat(self.path)
            return (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            return None
