"""User code, read without running it: a run's ``--task``, ``--setup`` and ``--script`` found and
their signatures checked with ``ast`` against the kwargs they will get (no user code runs in the master)."""
from __future__ import annotations

import ast
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from gpupool.jobs.descriptor import BUILTIN_KWARGS, SETUP_BUILTINS
from gpupool.master.errors import UsageError


def check_task(task: str, workdir: str, kwargs: dict[str, Any] | None = None, named: set[str] = frozenset(),
               state: set[str] = frozenset()) -> str:
    """Find the task's module or file and check it defines the function, and that ``kwargs`` fit
    its signature, without importing it (no user code runs here). ``named``: the arrays passed by
    name (--arrays-as-kwargs); ``state``: {"state"} with --setup."""
    target, source, found = _find(task, workdir, "--task")
    if isinstance(found, ast.FunctionDef):
        _check_signature(found, kwargs or {}, task, source, named, state)
    return target


def check_setup(setup: str, task: str | None, workdir: str, kwargs: dict[str, Any],
                params: list[dict[str, Any]] | None) -> str:
    """``--setup``: for a --task only, found as the task is, and able to be called with the
    built-ins and --kwargs it may ask for (``agent.task.setup_kwargs``); ``state`` is then its
    value, and no --kwargs or sweep parameter may take that name."""
    if task is None:
        raise UsageError("--setup is for --task: a script or a command is a process of its own for each chunk, "
                         "which sets itself up")
    if "state" in kwargs or any("state" in p for p in params or []):
        raise UsageError("--kwargs or --sweep give 'state', which with --setup is what the setup returned; rename it")
    target, source, found = _find(setup, workdir, "--setup")
    if isinstance(found, ast.FunctionDef):
        a = found.args
        positional = a.posonlyargs + a.args
        required = [x.arg for x in positional[:len(positional) - len(a.defaults)]]
        required += [x.arg for x, d in zip(a.kwonlyargs, a.kw_defaults) if d is None]
        if missing := [r for r in required if r not in SETUP_BUILTINS and r not in kwargs]:
            raise UsageError(f"--setup {setup!r}: {found.name}() needs {missing}, which neither --kwargs nor the agent "
                             f"(it gives a setup {', '.join(SETUP_BUILTINS)}) gives (a sweep's parameters are each "
                             "chunk's, not the run's); every worker would fail")
    return target


def _find(task: str, workdir: str, option: str) -> tuple[str, Path | None, ast.AST | bool | None]:
    """The target of a ``module:function`` or ``file.py:function`` (a file's made absolute), its
    source file (None for a compiled module) and the definition found there (``_definition``),
    without importing it (no user code runs here); UsageError naming ``option`` if not found."""
    mod, sep, fn = task.rpartition(":")
    if not sep or not mod or not fn.isidentifier():
        raise UsageError(f"{option} {task!r} must look like 'package.module:function' or 'path/file.py:function'")
    if mod.endswith(".py") or os.sep in mod:
        path = Path(workdir, mod).resolve()
        if not path.is_file():
            raise UsageError(f"{option} {task!r}: the file {path} does not exist")
        target, source = f"{path}:{fn}", path
    else:
        if workdir not in sys.path:
            sys.path.insert(0, workdir)
        try:
            spec = importlib.util.find_spec(mod)
        except (ImportError, ValueError) as e:
            raise UsageError(f"{option} {task!r}: cannot import {mod!r} ({e})") from None
        if spec is None:
            raise UsageError(f"{option} {task!r}: no module named {mod!r} (searched from {workdir} and sys.path)")
        target, source = task, Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
    found = _definition(source, fn, option) if source is not None else True
    if found is None:
        raise UsageError(f"{option} {task!r}: {source} defines no top-level function or name {fn!r}")
    return target, source, found


def _check_signature(fn: ast.FunctionDef, kwargs: dict[str, Any], task: str, source: Path,
                     named: set[str] = frozenset(), state: set[str] = frozenset()) -> None:
    """Fail fast: every chunk would raise TypeError if ``kwargs`` do not fit ``fn``'s parameters
    (the agent passes the built-ins it asks for, and every kwarg by name)."""
    a = fn.args
    params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    if a.kwarg is None and (unknown := sorted(k for k in kwargs if k not in params)):
        raise UsageError(f"--kwargs key(s) {unknown}: {fn.name}() in {source} takes no such argument (it takes "
                         f"{', '.join(params) or 'none'}); every chunk would fail")
    positional = a.posonlyargs + a.args
    required = [x.arg for x in positional[:len(positional) - len(a.defaults)]]
    required += [x.arg for x, d in zip(a.kwonlyargs, a.kw_defaults) if d is None]
    if missing := [r for r in required if r not in kwargs and r not in BUILTIN_KWARGS and r not in named | state]:
        arrays = f", nor an array of --data/--shared ({', '.join(sorted(named))})" if named else ""
        fills = ", ".join(BUILTIN_KWARGS) + (", and state from --setup" if state else "")
        raise UsageError(f"--task {task!r}: {fn.name}() needs {missing}, which neither --kwargs nor the agent "
                         f"(it fills in {fills}){arrays} gives; every chunk would fail")


def _definition(source: Path, name: str, option: str = "--task") -> ast.AST | bool | None:
    """The top-level definition of ``name`` in ``source`` (a FunctionDef, whose signature can be
    checked), True for one that cannot be judged (a class, an assignment, an import), or None."""
    try:
        tree = ast.parse(source.read_bytes(), str(source))
    except (SyntaxError, ValueError) as e:
        raise UsageError(f"{option}: {source} does not parse: {e}") from None
    found: ast.AST | bool | None = None
    for node in tree.body:  # the last definition wins, as at import
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            found = node if isinstance(node, ast.FunctionDef) and not node.decorator_list else True
            continue
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                found = True
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((a.asname or a.name.split(".")[0]) == name or a.name == "*" for a in node.names):
                found = True
    return found


def check_script(script: str, workdir: str) -> str:
    path = Path(workdir, script).resolve()
    if not path.is_file():
        raise UsageError(f"--script {script!r}: the file {path} does not exist")
    return str(path)
