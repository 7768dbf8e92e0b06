"""Validation of the names that become file names under BASE (run names, agent ids).

Every name that reaches a path is checked here first, so that nothing a user or a
hostile spool file says can make us write outside BASE.
"""
from __future__ import annotations

import re

from gpupool.jobs.errors import BadName

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
MAX_CHUNKS = 10**9


def check_name(value: object, what: str) -> str:
    """Return ``value`` if it is a safe single path component, else raise BadName."""
    if not isinstance(value, str) or not _NAME.match(value) or ".." in value:
        raise BadName(
            f"{what} {brief(value)} is not allowed: use 1-128 letters, digits, '.', '_', '+', '-', "
            "starting with a letter or digit, and no '..'"
        )
    return value


def check_chunk(chunk_id: object, total: object = None) -> int:
    """Return ``chunk_id`` if it is an int in [0, total) (bools are refused)."""
    if isinstance(chunk_id, bool) or not isinstance(chunk_id, int):
        raise BadName(f"chunk id {brief(chunk_id)} is not an integer")
    limit = MAX_CHUNKS if total is None else total
    if not 0 <= chunk_id < limit:
        raise BadName(f"chunk id {brief(chunk_id)} is outside 0..{limit - 1}")
    return chunk_id


def slug(text: str, limit: int = 40) -> str:
    """Turn free text (a task spec, a script path) into a safe name fragment."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "run"
    return out[-limit:].lstrip("-.") or "run"


def brief(value: object, limit: int = 80) -> str:
    """``repr`` of an untrusted value, cut short for a message (a hostile file may hold megabytes)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**60:
        return f"(an integer of {len(str(abs(value)))} digits)"
    text = repr(value) if not isinstance(value, (list, dict)) or len(value) < 100 else f"(a {type(value).__name__} of {len(value)} items)"
    return text if len(text) <= limit else text[:limit] + "..."
