"""An Executor call as a job: the function by name, its arguments encoded (``jobs.codec``).

The agents import the function again by module and qualified name (``module:qualname``):

* a function of a module (``pkg.mod:score``); of the ``__main__`` script, imported from its file
  (``/abs/script.py:score``), as multiprocessing's spawn does;
* a builtin or C function, with or without a source file (``builtins:pow``, ``_operator:truediv``,
  ``time:sleep``, ``math:factorial``, ``numpy:sqrt``);
* a method, staticmethod or classmethod of a module-level class (``pkg.mod:Model.score``);
* a ``functools.partial`` of any of these: its function travels by name, its arguments with the
  call's.

Arguments travel by parameter name where the function has one, positionally where it must
(positional-only parameters, ``*args``, a function without a signature); both encoded by
``jobs.codec`` (JSON values, tuples, sets, bytes, dicts with any keys, numpy arrays, datetimes,
complex numbers), 64 KB at most. Parameters named like the agent's built-ins (``device``,
``gpu_id``, ...) are filled in by the agent and cannot be passed; but ``shared`` and ``data``,
which no Executor call has, are the caller's where it gives them (``expensive_task(A, B,
shared)``): they travel positionally, and the agent leaves them alone.

``Executor.map`` sends consecutive calls as one job (its groups of ``chunksize`` calls, several
groups where they are short, ``master.executor``): the agent runs ``run_group`` (``GROUP``), which
imports ``fn`` by name once and calls it on each call's arguments in order (``columns``: the
arguments of the job's calls, one list per iterable given to map), as ProcessPoolExecutor's
``_process_chunk`` does for each group, and returns their values and errors in one result.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
import sys
import types
from pathlib import Path
from typing import Any, Callable

from gpupool.jobs.codec import CodecError, encode
from gpupool.jobs.descriptor import BUILTIN_KWARGS


# Built-ins an Executor call never has (it has no run's --shared or --data .npz): a parameter of
# that name is the caller's to give. The others (device, gpu_id, chunk_id, total_chunks) are the agent's.
CALLERS = ("shared", "data")


def unwrap(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> tuple[Callable[..., Any], tuple, dict]:
    """A ``functools.partial`` (nested ones are flattened by functools) as its function and the
    arguments of the whole call."""
    if isinstance(fn, functools.partial):
        return fn.func, (*fn.args, *args), {**fn.keywords, **kwargs}
    return fn, args, kwargs


def target_of(fn: Callable[..., Any]) -> tuple[str, str | None]:
    """(``module:qualname`` or ``/file.py:qualname``, the folder to put on the agent's sys.path,
    None for a module every Python has)."""
    mod_name = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", "")
    owner = getattr(fn, "__self__", None)  # a builtin function's is its module, a classmethod's its class
    if owner is not None and not isinstance(owner, (type, types.ModuleType)):
        raise TypeError(f"{qual} is a method bound to an instance ({type(owner).__name__}), which cannot travel to "
                        f"an agent; submit a module-level function that makes what it needs from its arguments")
    if not mod_name or not isinstance(qual, str) or not all(p.isidentifier() for p in qual.split(".")):
        raise TypeError(f"{fn!r} is not a module-level function; the agents import it by name "
                        "(module:function), so define it at the top level of a module")
    module = sys.modules.get(mod_name)
    found = _resolve(module, qual)
    if module is None or not (found is fn or (inspect.ismethod(fn) and found == fn)):
        raise TypeError(f"{mod_name}.{qual} cannot be found again by name in its module")
    path = getattr(module, "__file__", None)
    if mod_name == "__main__":
        if not path:
            raise TypeError(f"{qual} is defined in an interactive session; put it in a .py module")
        path = str(Path(path).resolve())
        return f"{path}:{qual}", str(Path(path).parent)
    if not path or mod_name.split(".")[0] in sys.stdlib_module_names:
        return f"{mod_name}:{qual}", None  # builtins, C modules, the standard library: every agent has them
    if importlib.util.find_spec(mod_name) is None:
        raise TypeError(f"module {mod_name} of {qual} cannot be imported by name")
    root = Path(path).resolve().parent
    for _ in range(mod_name.count(".") + (Path(path).name == "__init__.py")):
        root = root.parent
    return f"{mod_name}:{qual}", str(root)


def _resolve(module: Any, qual: str) -> Any:
    obj = module
    for part in qual.split("."):
        obj = getattr(obj, part, None)
    return obj


def bind(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """The call's (positional, keyword) arguments, encoded; TypeError naming what cannot travel."""
    name = getattr(fn, "__qualname__", repr(fn))
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a C function without a signature: as given
        sig = None
    pos, named = (list(args), dict(kwargs)) if sig is None else _split(sig, name, args, kwargs)
    clash = sorted(set(named) & set(BUILTIN_KWARGS) | (set(_given_positionally(sig, pos)) - set(CALLERS)))
    if clash:
        raise TypeError(f"{name}: {clash} are filled in by the agent ({', '.join(BUILTIN_KWARGS)}); do not pass them")
    try:
        pos, named = encode(pos, "positional argument"), encode(named, "argument")
    except CodecError as e:
        raise TypeError(f"{name}: {e}") from None
    from gpupool.master.spec.runspec import kwargs_size_error  # here: a worker running run_group never needs it

    if (too_large := kwargs_size_error({"args": pos, "kwargs": named}, f"{name}(...) arguments",
                                       "a file and pass its path")):
        raise ValueError(too_large)
    return pos, named


def _split(sig: inspect.Signature, name: str, args: tuple, kwargs: dict[str, Any]) -> tuple[list, dict]:
    """By name where a parameter has one, positionally where it must be (see the module)."""
    bound = sig.bind_partial(*args, **kwargs)
    kinds = {n: p.kind for n, p in sig.parameters.items()}
    star = any(kinds[n] is inspect.Parameter.VAR_POSITIONAL and v for n, v in bound.arguments.items())
    # a parameter named like a built-in (expensive_task(A, B, shared)) given by the caller travels
    # positionally, and the agent then leaves it alone (agent.task.build_kwargs)
    own = any(n in CALLERS and kinds[n] is inspect.Parameter.POSITIONAL_OR_KEYWORD for n in bound.arguments)
    if star or own:
        pos, named = list(bound.args), dict(bound.kwargs)
    else:
        pos, named = [], {}
        for n, value in bound.arguments.items():
            if kinds[n] is inspect.Parameter.POSITIONAL_ONLY:
                pos.append(value)
            elif kinds[n] is inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            else:
                named[n] = value
    missing = [n for n, p in sig.parameters.items() if p.default is p.empty and n not in bound.arguments
               and n not in BUILTIN_KWARGS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing:
        raise TypeError(f"{name}() missing required argument(s): {', '.join(missing)}")
    return pos, named


def _given_positionally(sig: inspect.Signature | None, pos: list[Any]) -> list[str]:
    """The built-in parameter names the positional arguments ``pos`` fill."""
    if sig is None:
        return []
    names = [n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return [n for n in names[:len(pos)] if n in BUILTIN_KWARGS]


def describe(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> tuple[str, str | None, list, dict]:
    """(target, workdir, positional, keyword arguments) of the call ``fn(*args, **kwargs)``."""
    fn, args, kwargs = unwrap(fn, args, kwargs)
    target, workdir = target_of(fn)
    pos, named = bind(fn, args, kwargs)
    return target, workdir, pos, named



GROUP = "gpupool.master.calls:run_group"  # the target of a job of several Executor.map calls
GROUP_BUILTINS = ("device", "gpu_id")  # the built-ins a group's calls are given, where fn takes them


def run_group(target: str, workdir: str | None, columns: list[Any], fixed: list[Any], named: dict[str, Any],
              every: int, first: int, device: Any = None, gpu_id: Any = None) -> dict[str, Any]:
    """On the agent: ``fn(*fixed, *args, **named)`` for each call of one job of ``Executor.map``, in
    order, ``fn`` being ``target`` imported once (as the worker imports a call's function), ``args``
    the i-th item of every column (a list; ``{"range": [start, stop, step]}``, a range's items;
    ``{"repeat": value, "times": n}``, one value n times), ``fixed`` and ``named`` a
    ``functools.partial``'s own arguments; ``device`` and ``gpu_id`` (the agent's built-ins)
    passed by name where ``fn`` takes them.

    The job's calls are map's groups of ``every`` calls (its ``chunksize``), the first call being
    call ``first`` of its group: a call that raises ends its group, as ProcessPoolExecutor's
    ``_process_chunk`` stops at the first, and the next group goes on (with ``every`` 1, every call
    runs). Returns ``{"values": [...]}``, one value per call (None for a call that raised or was
    not run), and ``"errors": [[i, failure record], ...]`` where calls raised. A GPU failure is
    raised as it is: the worker then handles it as a call's own (a poisoned CUDA context ends the
    worker), and the whole job fails."""
    from gpupool.agent.task import TaskCache

    global _tasks
    if _tasks is None:
        _tasks = TaskCache()  # per worker process: a file's module is shared with the worker's own cache
    fn = _tasks.get(target, workdir)
    given = {"device": device, "gpu_id": gpu_id}
    extra = {**{k: given[k] for k in _builtins_of(fn)}, **named}
    values: list[Any] = []
    errors: list[list[Any]] = []
    keep, calls = values.append, zip(*map(_column, columns))
    while True:
        try:  # one try around the loop, entered again after a call raised: a call's cost is fn's own (pow: 0.1 us)
            if fixed or extra:
                for args in calls:
                    keep(fn(*fixed, *args, **extra))
            else:
                for args in calls:
                    keep(fn(*args))
            break
        except Exception as e:  # call len(values) raised
            from gpupool.agent.worker_process import failure_of, gpu_fault

            if gpu_fault(e) is not None:
                raise
            errors.append([len(values), failure_of(e).to_dict()])
            keep(None)
            for _ in itertools.islice(calls, -(first + len(values)) % every):  # the rest of its group
                keep(None)
    return {"values": values, "errors": errors} if errors else {"values": values}


_tasks: Any = None  # run_group's TaskCache, made in the worker that first runs a group


def _column(column: Any) -> Any:
    """A column of ``run_group``'s arguments as its items (see there)."""
    if isinstance(column, dict):
        if "range" in column:
            return range(*column["range"])
        return itertools.repeat(column["repeat"], column["times"])
    return column


@functools.lru_cache(maxsize=64)
def _builtins_of(fn: Callable[..., Any]) -> tuple[str, ...]:
    """The ``GROUP_BUILTINS`` that ``fn`` takes (its signature read once: a builtin's is parsed from text)."""
    from gpupool.agent.task import takes

    return tuple(k for k in GROUP_BUILTINS if takes(fn, k))
