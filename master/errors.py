"""The master's own error: a bad argument or input file, named in one message (exit code 2)."""
from __future__ import annotations

from gpupool.jobs.errors import SpoolError


class UsageError(SpoolError):
    """A bad argument: the message names it and says what is wrong."""
