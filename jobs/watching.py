"""Watching a spool folder with inotify (watchdog): one place for the agent's mailbox watch
(``agent.watcher``) and a master's results watch (``master.core.dispatcher``).

Which events mean new content is part of the protocol: mailboxes are published by a rename from
``agent_pool/.tmp`` (``Spool.mailbox_temp_dir``) and results by ``link()``, so that a watcher sees
each as one event. watchdog pairs the two halves of a rename within a watched folder by holding
the first (IN_MOVED_FROM) up to 0.5 s, and its reader sleeps that long even once the match came:
every event behind it waits too.

inotify is a per-user resource (128 instances and a number of watches by default, shared with
editors, IDE servers and every other tool of the user): where none is to be had, the caller polls
instead, with one warning, and never fails for it.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

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
        logger.warning("{}: cannot watch {} with inotify ({}); polling instead. Raise the limit with: sysctl "
                       "fs.inotify.max_user_instances=1024 fs.inotify.max_user_watches=524288", what, folder,
                       e.strerror or e)
        if observer is not None:
            with contextlib.suppress(Exception):
                observer.stop()
        return None
    return observer, watch
