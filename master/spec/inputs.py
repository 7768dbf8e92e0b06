"""Files the user names on the command line (``--commands``, ``--sweep``, ``--octorun-config``):
read whole, bounded in size, every problem one message naming the flag, the file and what is wrong;
and a run's arrays (``--shared`` FILE.npz, ``--data`` FOLDER of one .npz per chunk), probed before
anything is queued."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from gpupool.jobs.errors import BadNpz
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


def check_npz(path: str, what: str, workdir: str) -> str:
    from gpupool.jobs.npzio import load_npz  # numpy only where arrays are read: main.py starts sooner

    p = Path(workdir, path).resolve()
    try:
        load_npz(p)
    except BadNpz as e:
        raise UsageError(f"{what}: {e}") from None
    return str(p)


def chunk_data(d: Path, chunk: int) -> Path:
    plain = d / f"{chunk}.npz"
    return plain if plain.exists() else d / f"{chunk:06d}.npz"


def check_data_dir(data: str, chunks: int, workdir: str) -> str:
    d = Path(workdir, data).resolve()
    if not d.is_dir():
        raise UsageError(f"--data {data!r}: {d} is not a folder (it must hold one <chunk_id>.npz per chunk)")
    missing = [c for c in range(chunks) if not chunk_data(d, c).is_file()]
    if missing:
        shown = ", ".join(f"{c}.npz" for c in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise UsageError(f"--data {d}: {len(missing)} of {chunks} chunk files are missing ({shown})")
    from gpupool.jobs.npzio import load_npz

    for c in sorted({0, chunks - 1}):
        try:
            load_npz(chunk_data(d, c))
        except BadNpz as e:
            raise UsageError(f"--data: {e}") from None
    return str(d)


def array_kwargs(task: str | None, shared: str | None, data_dir: str | None, kwargs: dict[str, Any]) -> set[str]:
    """--arrays-as-kwargs: the names the arrays of --shared and of the first chunk's --data .npz
    give the task (each one a keyword argument); UsageError where the option cannot work."""
    if task is None:
        raise UsageError("--arrays-as-kwargs is for --task: scripts and commands get their arguments as flags, "
                         "not arrays")
    if shared is None and data_dir is None:
        raise UsageError("--arrays-as-kwargs passes the arrays of --data and --shared by name; give at least one")
    from gpupool.jobs.npzio import load_npz

    names: set[str] = set()
    for what, path in (("--shared", shared), ("--data", data_dir and str(chunk_data(Path(data_dir), 0)))):
        if path is None:
            continue
        arrays = set(load_npz(path))
        if clash := sorted(arrays & set(kwargs)):
            raise UsageError(f"--arrays-as-kwargs: {what} {path} has array(s) {clash}, which --kwargs also gives; "
                             "rename one")
        names |= arrays
    return names
