"""What a worker process imported, told apart (runs inside the worker).

- The user's code: every module whose file lies outside the interpreter's library folders (the
  task's folder, ``PYTHONPATH``, a project installed with ``pip install -e``). Each file is
  watched: once one changed (or vanished) since the worker imported it, the worker must not run
  another chunk (issue 22: ``importlib.reload`` cannot update names bound by ``from x import y``
  nor objects already built; a fresh process is the only sound way to pick up edited code).
- Libraries: modules under the interpreter's ``site-packages`` (``sysconfig``'s purelib and
  platlib, ``site``'s folders). Their top-level names are what a spare worker preloads
  (``agent.workers``); the file of each one preloaded is watched as well, so that a library
  reinstalled since the spare imported it is not used stale.
- The standard library and the pool's own modules (``gpupool.*``): neither.

A scan looks only at the modules imported since the last one (``sys.modules`` grew), so a warm
worker pays one ``stat`` per watched file per chunk and nothing else.
"""
from __future__ import annotations

import os
import site
import sys
import sysconfig
from types import ModuleType

POOL = "gpupool"


def _folders(paths: list[str]) -> tuple[str, ...]:
    return tuple(sorted({os.path.join(os.path.realpath(p), "") for p in paths if p}, key=len, reverse=True))


def library_folders() -> tuple[str, ...]:
    """The folders third-party libraries are installed in, for this interpreter."""
    paths = [sysconfig.get_paths().get(k, "") for k in ("purelib", "platlib")]
    paths += list(getattr(site, "getsitepackages", lambda: [])())
    user = getattr(site, "getusersitepackages", lambda: "")()
    paths += [user] if isinstance(user, str) else []
    paths += [p for p in sys.path if os.path.basename(p.rstrip(os.sep)) in ("site-packages", "dist-packages")]
    return _folders(paths)


def stdlib_folders() -> tuple[str, ...]:
    return _folders([sysconfig.get_paths().get(k, "") for k in ("stdlib", "platstdlib")])


def signature(path: str) -> tuple[int, int, int] | None:
    """What tells one version of a file from the next: its modification time, size and inode
    (an editor that saves by rename makes a new one; two writes within one tick of the
    filesystem's clock keep the time, rarely the size too), or None if it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class SourceWatch:
    """The user's source files this process imported, with their signatures then, and the
    top-level libraries it imported."""

    def __init__(self) -> None:
        self.libraries, self.stdlib = library_folders(), stdlib_folders()
        self.files: dict[str, tuple[int, int, int] | None] = {}  # watched file -> its signature when first seen
        self.libs: list[str] = []  # top-level library names imported, in the order first seen
        self._seen: set[str] = set(sys.modules)  # what the worker itself imported is neither
        self._count = len(sys.modules)

    def kind(self, name: str, module: ModuleType) -> tuple[str, str | None]:
        """("user" | "library" | "other", its file)."""
        path = getattr(module, "__file__", None)
        if name == POOL or name.startswith(POOL + ".") or name == "__main__" or not isinstance(path, str):
            return "other", None
        real = os.path.realpath(path)
        if real.startswith(self.libraries):  # checked first: a venv's site-packages may lie inside the stdlib folder
            return "library", real
        if real.startswith(self.stdlib):
            return "other", None
        return "user", real

    def scan(self) -> list[str]:
        """Note the modules imported since the last scan; the top-level library names new among them."""
        if len(sys.modules) == self._count:
            return []
        new: list[str] = []
        for name, module in list(sys.modules.items()):
            if name in self._seen:
                continue
            self._seen.add(name)
            kind, path = self.kind(name, module)
            if kind == "user":
                self.files.setdefault(path, signature(path))
            elif kind == "library" and (top := name.partition(".")[0]) not in self.libs:
                self.libs.append(top)
                new.append(top)
        self._count = len(sys.modules)
        return new

    def watch(self, module: ModuleType) -> None:
        """Watch ``module``'s own file too (a preloaded library's top level)."""
        path = getattr(module, "__file__", None)
        if isinstance(path, str):
            self.files.setdefault(os.path.realpath(path), signature(path))

    def changed(self) -> str | None:
        """A watched file that changed or vanished since it was imported, or None."""
        for path, seen in self.files.items():
            if signature(path) != seen:
                return path
        return None
