"""Loading a task callable once and keeping it hot; building its keyword arguments.

Runs inside the worker process (after CUDA_VISIBLE_DEVICES is set).
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable

from gpupool.jobs.descriptor import BUILTIN_KWARGS, SETUP_BUILTINS, Job
from gpupool.jobs.errors import BadNpz


class TaskError(Exception):
    """The task spec cannot be turned into a callable."""


def split_target(target: str) -> tuple[str, str]:
    """``"pkg.mod:fn"`` or ``"path/file.py:fn"`` -> (module or file, function name); the name
    may be qualified (``Class.method``: a method or staticmethod of a module-level class)."""
    mod, sep, fn = target.rpartition(":")
    if not sep or not mod or not all(part.isidentifier() for part in fn.split(".")):
        raise TaskError(f"task {target!r} must look like 'package.module:function' or 'path/file.py:function'")
    return mod, fn


def resolve(module: Any, qualname: str) -> Any:
    """``module``'s attribute ``qualname`` (dotted: ``Class.method``), or None."""
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def is_file_target(mod: str) -> bool:
    return mod.endswith(".py") or os.sep in mod


class TaskCache:
    """Callables by target, each imported once: a worker serves one run, and asks for a fresh
    worker when a source file it imported changes (``agent.sources``), so nothing is reloaded.

    A task file (``path/file.py:fn``) is imported once per file, whatever function of it is asked
    for: a run's --setup (an Executor's initializer) and its task share the file's globals."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str | None], Callable[..., Any]] = {}

    def get(self, target: str, workdir: str | None) -> Callable[..., Any]:
        key = (target, workdir)
        fn = self._cache.get(key)
        if fn is None:
            fn = self._cache[key] = self._load(target, workdir)
        return fn

    def _load(self, target: str, workdir: str | None) -> Callable[..., Any]:
        mod_name, fn_name = split_target(target)
        if workdir and workdir not in sys.path:
            sys.path.insert(0, workdir)
        module = _file_module(mod_name, workdir) if is_file_target(mod_name) else _module(mod_name)
        fn = resolve(module, fn_name)
        if not callable(fn):
            raise TaskError(f"task {target!r}: module has no callable {fn_name!r}")
        return fn


def _file_module(mod: str, workdir: str | None) -> Any:
    """The module of a task file, imported under a name of its own (once per file)."""
    path = Path(workdir or ".", mod) if not os.path.isabs(mod) else Path(mod)
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    name = f"_gpupool_task_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]  # as the import system does: a failed import leaves nothing half made
            raise
    return module


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if not e.name or not (name == e.name or name.startswith(e.name + ".")):
            raise  # one of its own imports is missing
        importlib.invalidate_caches()  # a module file new since a folder listing was cached
        return importlib.import_module(name)


class SharedCache:
    """The shared ``.npz`` of a run, loaded once per worker and reused while the file is unchanged.

    A worker lives for weeks and serves run after run: only the ``size`` shared files used last
    are kept (a compressed member is held in memory, not mapped), enough for a few runs fed at
    the same time."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._cache: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}  # oldest use first

    def get(self, path: str) -> dict[str, Any]:
        hit = self._cache.pop(path, None)
        if hit is not None:
            self._cache[path] = hit  # most recently used: last
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if hit is not None:  # vanished mid-run: the mapped copy stays valid, keep using it
                print(f"warning: shared file {path} vanished; using the copy loaded earlier", file=sys.stderr)
                return hit[1]
            raise BadNpz("file does not exist (the run's shared .npz vanished)", path) from None
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        if hit is None or hit[0] != sig:
            self._cache.pop(path, None)
            while len(self._cache) >= self.size:
                del self._cache[next(iter(self._cache))]  # the one used longest ago
            from gpupool.jobs.npzio import load_npz  # numpy: in the workers of runs with shared data only

            self._cache[path] = (sig, load_npz(path))
        return self._cache[path][1]


@functools.lru_cache(maxsize=64)
def _wanted_builtins(fn: Callable[..., Any]) -> frozenset[str]:
    """The built-in names ``fn`` accepts (all of them if it takes ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return frozenset(BUILTIN_KWARGS)
    return frozenset(BUILTIN_KWARGS) & set(params)


@functools.lru_cache(maxsize=64)
def _positional(fn: Callable[..., Any]) -> tuple[str, ...]:
    """The names of ``fn``'s positional parameters, in order (none without a signature)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return ()
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def wanted_builtins(fn: Callable[..., Any], job: Job) -> frozenset[str]:
    """The built-ins ``fn`` is given in ``job``: those its signature accepts (all with ``**kwargs``),
    less those the job's positional arguments fill."""
    wanted = _wanted_builtins(fn)
    if job.args:  # a built-in's parameter the caller filled positionally (an Executor call) is left alone
        wanted = wanted - set(_positional(fn)[:len(job.args)])
    return wanted


def build_kwargs(fn: Callable[..., Any], job: Job, builtins: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Built-ins the signature accepts (``wanted_builtins``), then every user kwarg.

    ``builtins`` maps each name to a thunk, so shared or chunk data is only loaded when
    the task asks for it."""
    from gpupool.jobs.codec import decode

    wanted = wanted_builtins(fn, job)
    out = {k: make() for k, make in builtins.items() if k in wanted}
    out.update(decode(job.kwargs) if job.encoded else job.kwargs)  # always passed: a misspelt name fails the chunk
    return out


def setup_kwargs(fn: Callable[..., Any], job: Job, builtins: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """The arguments of a run's --setup: the built-ins of ``SETUP_BUILTINS`` it names, and the
    run's own --kwargs it names (all of them with ``**kwargs``); a sweep's per-chunk parameters
    are not the run's, and are never passed."""
    params = _params(fn) if _signature(fn) is not None else frozenset()
    run_kwargs = {k: v for k, v in job.kwargs.items() if k not in (job.params or {})}
    if job.encoded:
        from gpupool.jobs.codec import decode

        run_kwargs = decode(run_kwargs)
    out = {k: builtins[k]() for k in SETUP_BUILTINS if params is None or k in params}
    out.update({k: v for k, v in run_kwargs.items() if params is None or k in params})
    return out


def takes(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` accepts a keyword argument ``name`` (by name, or through ``**kwargs``)."""
    if _signature(fn) is None:
        return False
    params = _params(fn)
    return params is None or name in params


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def array_kwargs(fn: Callable[..., Any], job: Job, kwargs: dict[str, Any],
                 builtins: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """``arrays_as_kwargs`` (the SGE template's ``expensive_task(A, B, shared)``): every array of
    the shared ``.npz``, then of the chunk's, passed by its name, in place of a built-in of that
    name; the built-ins ``data`` and ``shared`` themselves only where no array has their name. An
    array named like one of the run's ``--kwargs`` fails the chunk, naming both."""
    out = {k: v for k, v in kwargs.items() if k not in ("data", "shared")}
    for source in ("shared", "data"):
        arrays = kwargs[source] if source in kwargs else builtins[source]() if getattr(job, source) else None
        for name, value in (arrays or {}).items():
            if name in job.kwargs:
                raise TaskError(f"the {source} .npz has an array {name!r}, which --kwargs also gives; rename one")
            out[name] = value
    for name in ("data", "shared"):
        if name in kwargs and name not in out:
            out[name] = kwargs[name]
    wanted = _params(fn)
    return out if wanted is None else {k: v for k, v in out.items() if k in wanted or k in job.kwargs}


@functools.lru_cache(maxsize=64)
def _params(fn: Callable[..., Any]) -> frozenset[str] | None:
    """The names ``fn`` takes by keyword, or None if it takes any (``**kwargs``, or no signature)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return frozenset(n for n, p in params.items() if p.kind is not inspect.Parameter.POSITIONAL_ONLY)
