"""The one JSON loader for spool files: bounded in size and in nesting depth.

Every spool file is untrusted (see ``jobs``): ``[`` repeated 100,000 times is valid-looking
input that makes ``json.loads`` raise RecursionError, and a document nested a few hundred
levels deep parses but makes later code (comparisons, ``json.dumps``) recurse past the
interpreter's limit. So every reader of spool JSON goes through ``load_json`` (bytes already
read) or ``read_json`` (a path, read with ``jobs.atomic.read_bounded``), which raise BadFile
naming the file and what is wrong: too big, nested too deep, not UTF-8, not JSON.

The depth check is a byte scan at C speed: everything but brackets and quotes is dropped, the
strings cut out, and innermost ``[]``/``{}`` pairs removed once per level; a document needs as
many passes as it is deep. A small file skips it (fewer brackets than the limit); a mailbox of
10,000 jobs costs about 15 ms on top of the parse's 22 ms.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from gpupool.jobs.atomic import DEFAULT_READ_LIMIT, read_bounded
from gpupool.jobs.errors import BadFile

MAX_DEPTH = 64  # nesting levels a spool file may have (a mailbox uses 4 plus the user's kwargs)
_KEEP = bytes(b for b in range(256) if b not in b'[]{}"')  # translate() deletes all but brackets and quotes


def too_deep(data: bytes, limit: int = MAX_DEPTH) -> bool:
    """True if the JSON text ``data`` nests arrays/objects more than ``limit`` levels deep
    (brackets inside strings do not count). Text that is not JSON is left to the parser."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    # escaped backslashes, then escaped quotes, go first: every '"' left opens or closes a string
    marks = data.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _KEEP)
    rest = b"".join(marks.split(b'"')[::2])  # what lies outside the strings
    for _ in range(limit):
        if not rest:
            return False
        inner = rest.replace(b"[]", b"").replace(b"{}", b"")
        if inner == rest:  # unbalanced or mismatched: deep only if it opens too many at once
            return len(rest) - len(rest.lstrip(b"[{")) > limit
        rest = inner
    return bool(rest)


def load_json(data: bytes | str, what: str, where: object = None, max_depth: int = MAX_DEPTH) -> Any:
    """Parse untrusted JSON ``data`` (``what``: "mailbox", "heartbeat", ... for the message);
    raise BadFile naming ``where`` if it is not UTF-8 JSON nested at most ``max_depth`` deep."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if too_deep(raw, max_depth):
        raise BadFile(f"{what} is nested deeper than {max_depth} levels", where)
    try:
        return json.loads(data)
    except RecursionError as e:  # belt and braces: the scan above should have caught it
        raise BadFile(f"{what} is nested too deeply to parse", where) from e
    except (ValueError, UnicodeDecodeError) as e:  # ValueError covers integers past 4300 digits too
        raise BadFile(f"{what} is not valid JSON ({_short(e)})", where) from e


def read_json(path: Path, what: str, limit: int = DEFAULT_READ_LIMIT) -> Any:
    """Read (``read_bounded``: no symlink followed, at most ``limit`` bytes, regular files only)
    and parse a spool JSON file. Raises BadFile, or OSError if it cannot be read."""
    return load_json(read_bounded(path, limit), what, path)


# Field checks for records read from the spool (heartbeats, results): ``clean`` drops what fails.
def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: object) -> bool:
    """A finite number (NaN and infinity are refused: they break arithmetic and strict JSON)."""
    return is_int(v) or (isinstance(v, float) and math.isfinite(v))


def is_time(v: object) -> bool:
    """A Unix time that ``time.localtime`` can show (0 to the year 2242)."""
    return is_num(v) and 0 <= v < 2**33


def is_str(v: object) -> bool:
    return isinstance(v, str)


def clean(d: dict[str, Any], fields: dict[str, Any], prefix: str = "") -> list[str]:
    """Set each field of ``d`` that fails its check in ``fields`` (a check, or a dict of checks
    for an object's fields) to None; None itself always passes. Returns the dropped fields' names."""
    bad = []
    for name, check in fields.items():
        v = d.get(name)
        if v is None:
            continue
        if isinstance(check, dict):
            if not isinstance(v, dict):
                d[name] = None
                bad.append(prefix + name)
            else:
                bad += clean(v, check, f"{prefix}{name}.")
        elif not check(v):
            d[name] = None
            bad.append(prefix + name)
    return bad


def _short(e: Exception, limit: int = 200) -> str:
    text = str(e)
    return text if len(text) <= limit else text[:limit] + "..."
