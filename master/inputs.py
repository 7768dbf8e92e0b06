"""Files the user names on the command line (``--commands``, ``--sweep``, ``--octorun-config``):
read whole, bounded in size, every problem one message naming the flag, the file and what is wrong."""
from __future__ import annotations

from pathlib import Path

from gpupool.master.errors import UsageError


def read_input(path: Path, where: str, limit: int, error: type[Exception] = UsageError, hint: str = "") -> bytes:
    """The bytes of ``path``, at most ``limit`` of them; ``error`` (``where``: e.g. "--commands
    FILE") for a missing, unreadable or too large file (``hint``: what to do instead of the latter)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise error(f"{where}: no such file") from None
    except IsADirectoryError:
        raise error(f"{where}: a folder, not a file") from None
    except OSError as e:
        raise error(f"{where}: cannot read it ({e.strerror})") from None
    if len(data) > limit:
        size = f"{limit // 2**20} MB" if limit >= 2**20 else f"{limit // 1024} KB"
        raise error(f"{where}: over {size}{hint}")
    return data


def read_text(path: Path, where: str, limit: int, error: type[Exception] = UsageError) -> str:
    """``read_input`` as UTF-8 text."""
    try:
        return read_input(path, where, limit, error).decode()
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text ({e})") from None
