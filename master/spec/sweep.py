"""``--sweep``: the parameter sets of a run, one chunk each.

A sweep is a YAML or JSON file (``.yaml``/``.yml``/``.json``), or inline JSON, holding

* ``grid``: an object of lists; every combination is one parameter set (a value that is not a
  list is the same in every set). ``grid`` may also be a list of such objects (their union);
* ``list``: a list of parameter sets, each an object;
* or both (the grid's sets, then the list's, duplicates dropped).

A plain object of lists is a grid, a plain list is a list. Parameter names are Python
identifiers (they become ``--task`` kwargs, ``--script`` flags, ``--cmd`` placeholders).

A chunk is its parameters: the run keeps its parameter sets (``RunSpec.params``; chunk ``c``
runs ``params[c]``) and a sweep submitted again to the same run (``merge``) appends only the
sets it does not have yet, so every finished chunk keeps its id and its result. ``key`` is the
one canonical form two parameter sets are compared by.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from gpupool.jobs.descriptor import BUILTIN_KWARGS
from gpupool.jobs.errors import BadFile
from gpupool.jobs.jsonio import load_json
from gpupool.jobs.names import MAX_CHUNKS, brief
from gpupool.jobs.template import BUILTIN_PLACEHOLDERS
from gpupool.master.spec.inputs import read_input

SWEEP_FILE_LIMIT = 4 * 1024 * 1024  # bytes of a sweep file
PARAMS_LIMIT = 512 * 1024  # bytes of JSON of all the parameter sets (they live in run.json, read at every resume)
RESERVED = tuple(dict.fromkeys(BUILTIN_KWARGS + BUILTIN_PLACEHOLDERS))


class SweepError(ValueError):
    """A sweep that cannot be used; the message names the file (or inline JSON) and the problem."""


def key(params: dict[str, Any]) -> str:
    """The canonical JSON of a parameter set: equal sets, equal keys (1 and 1.0 differ)."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def load(text: str, workdir: str) -> list[dict[str, Any]]:
    """The parameter sets of ``--sweep text`` (a file's path or inline JSON), in order."""
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        where = "--sweep (inline JSON)"
        try:
            doc = load_json(text, "the sweep")
        except BadFile as e:
            raise SweepError(f"{where}: {e}") from None
    else:
        path = Path(workdir, text).resolve()
        where = f"--sweep {path}"
        doc = _read_file(path, where)
    return parse(doc, where)


def _read_file(path: Path, where: str) -> Any:
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise SweepError(f"{where}: the name must end in .yaml, .yml or .json (or pass inline JSON)")
    data = read_input(path, where, SWEEP_FILE_LIMIT, SweepError, "; a sweep is a description, not data")
    if path.suffix.lower() == ".json":
        try:
            return load_json(data, "the sweep")
        except BadFile as e:
            raise SweepError(f"{where}: {e}") from None
    try:
        import yaml
    except ImportError:
        raise SweepError(f"{where}: reading YAML needs PyYAML (pip install pyyaml), or write it as .json") from None
    try:
        return yaml.safe_load(data)
    except yaml.YAMLError as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise SweepError(f"{where}: not valid YAML{at}: {problem or ' '.join(str(e).split())}") from None


def parse(doc: Any, where: str) -> list[dict[str, Any]]:
    """The parameter sets a loaded sweep document describes; raises SweepError."""
    if isinstance(doc, list):
        doc = {"list": doc}
    if not isinstance(doc, dict):
        raise SweepError(f"{where}: a sweep is an object with 'grid' and/or 'list', not {brief(doc)}")
    if not ({"grid", "list"} & set(doc)):  # a plain object of lists: a grid
        if objects := [k for k, v in doc.items() if isinstance(v, dict)]:  # 'grd': {...} is a typo, not a value
            raise SweepError(f"{where}: {objects[0]!r} holds an object; a sweep is 'grid' and/or 'list' (or a plain "
                             "object of parameter: [values])")
        doc = {"grid": doc}
    if extra := sorted(set(doc) - {"grid", "list"}):
        raise SweepError(f"{where}: unknown key(s) {extra} beside 'grid'/'list' (put parameters inside 'grid')")
    sets: list[dict[str, Any]] = []
    grids = doc.get("grid", [])
    for i, grid in enumerate(grids if isinstance(grids, list) else [grids]):
        sets += _combinations(grid, f"{where}: grid" + (f"[{i}]" if isinstance(grids, list) else ""))
    listed = doc.get("list", [])
    if not isinstance(listed, list):
        raise SweepError(f"{where}: 'list' must be a list of parameter sets, not {brief(listed)}")
    for i, p in enumerate(listed):
        if not isinstance(p, dict):
            raise SweepError(f"{where}: list[{i}] must be an object of parameters, not {brief(p)}")
        sets.append(_checked(p, f"{where}: list[{i}]"))
    return _unique(sets, where)


def _combinations(grid: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(grid, dict) or not grid:
        raise SweepError(f"{where} must be a non-empty object of parameter: [values], not {brief(grid)}")
    _checked(grid, where)
    axes = {k: (v if isinstance(v, list) else [v]) for k, v in grid.items()}
    if empty := [k for k, v in axes.items() if not v]:
        raise SweepError(f"{where}: parameter(s) {empty} have an empty list of values (no combination)")
    total = 1
    for v in axes.values():
        total *= len(v)
        if total > MAX_CHUNKS:
            raise SweepError(f"{where}: more than {MAX_CHUNKS} combinations")
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def _checked(params: dict[str, Any], where: str) -> dict[str, Any]:
    bad = [k for k in params if not isinstance(k, str) or not k.isidentifier()]
    if bad:
        raise SweepError(f"{where}: parameter name(s) {bad} are not identifiers (letters, digits, _)")
    if clash := sorted(set(params) & set(RESERVED)):
        raise SweepError(f"{where}: parameter name(s) {clash} are the pool's own ({', '.join(RESERVED)}); rename them")
    try:
        json.dumps(params, allow_nan=False)
    except (TypeError, ValueError) as e:  # YAML dates, NaN
        raise SweepError(f"{where}: a value is not plain JSON ({e}); quote it as a string") from None
    return params


def _unique(sets: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    if not sets:
        raise SweepError(f"{where}: it describes no parameter set")
    seen: dict[str, dict[str, Any]] = {}
    for p in sets:
        seen.setdefault(key(p), p)
    out = list(seen.values())
    if len(out) > MAX_CHUNKS:
        raise SweepError(f"{where}: {len(out)} parameter sets, over the {MAX_CHUNKS} chunks a run may have")
    size = len(json.dumps(out))
    if size > PARAMS_LIMIT:
        raise SweepError(f"{where}: its {len(out)} parameter sets take {size // 1024} KB as JSON, over the "
                         f"{PARAMS_LIMIT // 1024} KB a run keeps; pass large inputs as files named by a parameter")
    return out


def merge(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run's parameter sets after submitting ``new`` to a run that has ``old``: every old set
    keeps its position (its chunk id), the new ones are appended."""
    have = {key(p) for p in old}
    return list(old) + [p for p in new if key(p) not in have]


def common_names(sets: list[dict[str, Any]]) -> tuple[set[str], set[str]]:
    """(names every set has, names only some have)."""
    every = set.intersection(*(set(p) for p in sets))
    return every, set().union(*(set(p) for p in sets)) - every
