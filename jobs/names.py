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


# C0 controls but tab, DEL, C1 controls, lone surrogates (a JSON string may hold one: printing it raises)
_ONE_LINE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff]")
_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r"}


def printable(text: object, lines: bool = False) -> str:
    """Text that came from a job or a spool file (an error message, a traceback, a log), made safe
    to print on a terminal or put in a page: every control character but tab is shown as a visible
    escape (``\\x1b``, ``\\r``, ``\\x07``), so no escape sequence retitles, clears or recolours the
    terminal, and no ``\\r`` overwrites a line with a fake one. ``lines``: multi-line text (a
    traceback, a log tail) keeps its line breaks; a lone ``\\r`` (a progress bar's) is shown and
    breaks the line, and ``\\r\\n`` is a plain line end. Pages ``html.escape`` the result too."""
    s = text if isinstance(text, str) else str(text)
    if lines:
        return _LINES.sub(_lines_escape, s.replace("\r\n", "\n") if "\r\n" in s else s)
    return _ONE_LINE.sub(_escape, s)


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def _lines_escape(m: re.Match[str]) -> str:
    return "\\r\n" if m.group() == "\r" else _escape(m)
