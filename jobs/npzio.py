"""Safe ``.npz`` reading and writing: never pickle, memory-map what can be mapped."""
from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import IO, Any, Mapping

import numpy as np

from gpupool.jobs.errors import BadNpz


def load_npz(path: str | Path, mmap: bool = True) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` into a dict, refusing pickled objects.

    Uncompressed members are memory-mapped (read-only) when ``mmap`` is true, so a big
    shared file costs page-cache reads, not a private copy per process.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
        out: dict[str, np.ndarray] = {}
        with open(path, "rb") as raw:
            lazy = None
            for info in infos:
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                arr = _mmap_member(path, raw, info) if mmap else None
                if arr is None:
                    if lazy is None:
                        lazy = np.load(path, allow_pickle=False)
                    arr = lazy[name]
                out[name] = arr
            if lazy is not None:
                lazy.close()
        return out
    except FileNotFoundError as e:
        raise BadNpz("file does not exist", path) from e
    except IsADirectoryError as e:
        raise BadNpz("is a folder, not an .npz file", path) from e
    except zipfile.BadZipFile as e:
        raise BadNpz(f"is not an .npz (zip) file: {e}", path) from e
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise BadNpz("holds object arrays (pickled Python objects), which are never loaded", path) from e
        raise BadNpz(f"is not a valid .npz: {e}", path) from e
    except (OSError, EOFError, struct.error, KeyError) as e:
        raise BadNpz(f"is truncated or unreadable: {e}", path) from e


def _mmap_member(path: Path, raw: IO[bytes], info: zipfile.ZipInfo) -> np.ndarray | None:
    """Memory-map one stored (uncompressed) ``.npy`` member, or None if it cannot be."""
    if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
        return None
    raw.seek(info.header_offset)
    local = raw.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise BadNpz(f"member {info.filename} has a broken zip header", path)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    raw.seek(start)
    version = np.lib.format.read_magic(raw)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(raw)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(raw)
    else:
        return None
    if dtype.hasobject:
        raise ValueError("object arrays cannot be loaded when allow_pickle=False")
    offset = raw.tell()
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offset + size > path.stat().st_size or offset - start + size > info.file_size:
        raise BadNpz(f"member {info.filename} is truncated", path)
    if size == 0:
        return np.empty(shape, dtype=dtype, order="F" if fortran else "C")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def check_arrays(value: Any) -> dict[str, np.ndarray] | None:
    """If ``value`` is a non-empty dict of numpy arrays, return it; else None."""
    if isinstance(value, Mapping) and value and all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in value.items()
    ):
        for k, v in value.items():
            if v.dtype.hasobject:
                raise TypeError(f"returned array {k!r} has dtype object; only plain numeric arrays are saved")
        return dict(value)
    return None


def save_npz(f: IO[bytes], arrays: Mapping[str, np.ndarray]) -> None:
    """Write arrays uncompressed (so readers can memory-map them)."""
    np.savez(f, **arrays)
