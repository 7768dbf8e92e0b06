"""Validation of the names that become file names under BASE (run names, agent ids).

Every name that reaches a path is checked here first, so that nothing a user or a
hostile spool file says can make us write outside BASE.
"""
from __future__ import annotations

import re

from jobs.errors import BadName

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
MAX_CHUNKS = 10**9


def check_name(value: object, what: str) -> str:
    """Return ``value`` if it is a safe single path component, else raise BadName."""
    if not isinstance(value, str) or not _NAME.match(value) or ".." in value:
        raise BadName(
            f"{what} {value!r} is not allowed: use 1-128 letters, digits, '.', '_', '+', '-', "
            "starting with a letter or digit, and no '..'"
        )
    return value


def check_chunk(chunk_id: object, total: object = None) -> int:
    """Return ``chunk_id`` if it is an int in [0, total) (bools are refused)."""
    if isinstance(chunk_id, bool) or not isinstance(chunk_id, int):
        raise BadName(f"chunk id {chunk_id!r} is not an integer")
    limit = MAX_CHUNKS if total is None else total
    if not 0 <= chunk_id < limit:
        raise BadName(f"chunk id {chunk_id} is outside 0..{limit - 1}")
    return chunk_id


def slug(text: str, limit: int = 40) -> str:
    """Turn free text (a task spec, a script path) into a safe name fragment."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "run"
    return out[-limit:].lstrip("-.") or "run"
