"""Exceptions of the spool. Each one names the file or value it concerns."""
from __future__ import annotations


class SpoolError(Exception):
    """Base class: something in the spool is wrong. ``path`` names the file, if any."""

    def __init__(self, message: str, path: object = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{path}: {message}" if path is not None else message)


class BadName(SpoolError):
    """A run name, agent id or chunk id that could escape BASE or is not allowed."""


class BadFile(SpoolError):
    """A spool file that is empty, truncated, garbage, of the wrong shape or too big."""


class NewerSchema(BadFile):
    """A descriptor written by a newer version of this tool."""


class BadNpz(BadFile):
    """An ``.npz`` that is missing, not a zip, truncated, or holds pickled objects."""


class LockHeld(SpoolError):
    """An exclusive lock (GPU, agent id, run) is held by another live process."""


class NoAgents(SpoolError):
    """No live agent came within the time a master was told to wait for one (``--wait-agents``)."""
