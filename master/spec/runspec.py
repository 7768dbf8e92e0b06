"""A run: what to execute on how many chunks. Validated here, once, before anything is queued
(its options: ``master.spec.options``; its user code: ``master.spec.usercode``; its arrays: ``master.spec.inputs``),
saved as ``runs/<run>/run.json`` and checked against what is saved when the run is submitted again."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpupool.jobs.atomic import NotAFile, write_replace
from gpupool.jobs.descriptor import MAX_ATTEMPTS, JobKind, env_problem, kwargs_problem, options_problem
from gpupool.jobs.errors import BadFile, SpoolError
from gpupool.jobs.jsonio import load_json, read_json
from gpupool.jobs.names import MAX_CHUNKS, brief, check_name, slug
from gpupool.jobs.paths import Spool
from gpupool.master.errors import UsageError
from gpupool.master.spec.inputs import array_kwargs, check_data_dir, check_npz, chunk_data
from gpupool.master.spec.options import BY_NAME, KEPT, PLACEMENT, SPARSE, first_problem, problem, spec_values
from gpupool.master.spec.placement import Placement
from gpupool.master.spec.usercode import check_script, check_setup, check_task

SPEC_SCHEMA = 1
SPEC_LIMIT = 1024 * 1024


@dataclass(frozen=True)
class RunSpec:
    name: str
    kind: JobKind
    target: str
    chunks: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    shared: str | None = None
    data_dir: str | None = None
    retries: int = 2
    timeout: float | None = None
    workdir: str | None = None
    share: float = 1.0  # weight of the run when several runs share the pool (may change on resume)
    params: list[dict[str, Any]] | None = None  # a sweep's parameter sets: chunk c runs params[c] (master.spec.sweep)
    commands: list[str] | None = None  # --commands: chunk c runs commands[c] (target: the file they came from)
    options: dict[str, Any] | None = None  # command jobs' prefix and checks (jobs.descriptor.OPTION_CHECKS)
    arrays_as_kwargs: bool = False  # --arrays-as-kwargs: each array of --data and --shared passed by its name
    visible_gpu_id: bool = False  # --visible-gpu-id: gpu_id is the GPU's index as its job sees it (0)
    env: dict[str, str] | None = None  # main.py --env: variables set for every job (may change on resume)
    setup: str | None = None  # main.py --setup: called once per worker of the run; its value is each chunk's state
    schema: int = SPEC_SCHEMA
    # placement (master.spec.placement), as given: kept on resume and retry unless given again (may change on resume)
    targets: list[str] | None = None  # --target HOST::GPU[,GPU], repeatable
    hosts: str | None = None  # --hosts H1,H2
    exclude_hosts: str | None = None  # --exclude-hosts H1,H2
    min_free_gb: float | None = None
    gpus_per_job: int | None = None
    gpu_mem: float | None = None
    on_done: str | None = None  # main.py --on-done: a shell command run once when the run ends (master.hooks)
    batch: int | None = None  # main.py --batch: chunks per job (None: by their duration, master.core.batching)
    chunk_time: float | None = None  # main.py --chunk-time: how long a chunk takes (agent.lifetime), a hint
    # main.py --after, --after-any: the runs it starts after, once they end ok / whatever their outcome (master.core.after)
    after: list[str] | None = None
    after_any: list[str] | None = None

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same run (retries and timeout may change on resume)."""
        return {"kind": self.kind.value, "target": self.target, "chunks": self.chunks, "kwargs": self.kwargs,
                "shared": self.shared, "data_dir": self.data_dir, "params": self.params,
                "commands": self.commands, "options": self.options,
                **({"setup": self.setup} if self.setup is not None else {})}  # as before --setup where none

    @property
    def waits_for(self) -> list[str]:
        """The runs it starts after (--after, then --after-any), in order (``master.core.after``)."""
        return [*(self.after or ()), *(self.after_any or ())]

    def chunk_target(self, chunk: int) -> str:
        """What chunk ``chunk`` runs: the run's target, or its line of a --commands file."""
        return self.target if self.commands is None else self.commands[chunk]

    def chunk_kwargs(self, chunk: int) -> dict[str, Any]:
        """The chunk's kwargs: the run's, and its sweep parameters."""
        return self.kwargs if self.params is None else {**self.kwargs, **self.params[chunk]}

    def chunk_params(self, chunk: int) -> dict[str, Any] | None:
        return None if self.params is None else self.params[chunk]

    def to_json(self) -> bytes:
        d = dataclasses.asdict(self)
        d["kind"] = self.kind.value
        for name in ("params", "commands", "options", *SPARSE):  # only where set: older tools refuse unknown fields
            if d[name] is None:
                del d[name]
        return json.dumps({**d, "created_at": time.time()}, indent=1, sort_keys=True).encode()

    @classmethod
    def load(cls, path: Path) -> "RunSpec":
        """Read and check ``runs/<run>/run.json``; raises BadFile naming what is wrong (FileNotFoundError
        if there is none)."""
        try:
            d = read_json(path, "run spec", SPEC_LIMIT)
        except NotAFile as e:
            raise BadFile(f"run spec {e.strerror}", path) from e
        if not isinstance(d, dict):
            raise BadFile(f"run spec must be a JSON object, not a {type(d).__name__}", path)
        d = dict(d)
        d.pop("created_at", None)
        try:
            spec = cls(**{**d, "kind": JobKind(d["kind"])})
        except (ValueError, TypeError, KeyError) as e:
            raise BadFile(f"run spec is not valid: {str(e)[:200]}", path) from e
        why = spec._problem(path.parent.name)
        if why is not None:
            raise BadFile(f"run spec is not valid: {why}", path)
        return spec

    def _problem(self, folder: str) -> str | None:
        """What is wrong with a spec read from the spool (its types and ranges), or None."""
        try:
            check_name(self.name, "run name")
            for name in ("after", "after_any"):
                runs = getattr(self, name)
                if runs is not None and (not isinstance(runs, list) or not all(isinstance(r, str) for r in runs)):
                    return f"'{name}' must be a list of run names, not {brief(runs)}"
                for r in runs or ():
                    check_name(r, f"'{name}' run name")
        except SpoolError as e:
            return str(e)
        if self.name != folder:
            return f"it names run {brief(self.name)}, not {folder!r} (its folder)"
        if not isinstance(self.target, str) or "\0" in self.target:
            return f"'target' must be a string, not {brief(self.target)}"
        if isinstance(self.chunks, bool) or not isinstance(self.chunks, int) or not 1 <= self.chunks <= MAX_CHUNKS:
            return f"'chunks' must be a whole number from 1 to {MAX_CHUNKS}, not {brief(self.chunks)}"
        if not isinstance(self.kwargs, dict):
            return f"'kwargs' must be an object, not {brief(self.kwargs)}"
        for name in ("shared", "data_dir", "workdir", "setup", "on_done"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or "\0" in v):
                return f"'{name}' must be a path, not {brief(v)}"
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or not 0 <= self.retries < MAX_ATTEMPTS:
            return f"'retries' must be a whole number from 0 to {MAX_ATTEMPTS - 1}, not {brief(self.retries)}"
        for name, optional in (("timeout", True), ("share", False), ("chunk_time", True)):
            v = getattr(self, name)
            if v is None and optional:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                return f"'{name}' must be a positive number, not {brief(v)}"
        for name, typ in (("params", dict), ("commands", str)):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, list) or len(v) != self.chunks or
                                  not all(isinstance(x, typ) for x in v)):
                return f"'{name}' must be a list of {self.chunks} {typ.__name__}s, not {brief(v)}"
        if self.options is not None and not isinstance(self.options, dict):
            return f"'options' must be an object, not {brief(self.options)}"
        if (why := options_problem(self.options)) is not None:
            return f"'options': {why}"
        if self.batch is not None and (isinstance(self.batch, bool) or not isinstance(self.batch, int)
                                       or self.batch < 1):
            return f"'batch' must be a whole number of chunks, 1 or more, not {brief(self.batch)}"
        for name in ("arrays_as_kwargs", "visible_gpu_id"):
            if not isinstance(getattr(self, name), bool):
                return f"'{name}' must be true or false, not {brief(getattr(self, name))}"
        if self.env is not None and (why := env_problem(self.env)):
            return f"'env' {why}"
        if self.targets is not None and (not isinstance(self.targets, list) or
                                         not all(isinstance(t, str) for t in self.targets)):
            return f"'targets' must be a list of strings, not {brief(self.targets)}"
        for name in ("hosts", "exclude_hosts"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                return f"'{name}' must be a string, not {brief(getattr(self, name))}"
        for name in ("min_free_gb", "gpus_per_job", "gpu_mem"):
            v = getattr(self, name)
            number = int if name == "gpus_per_job" else (int, float)
            if v is not None and (isinstance(v, bool) or not isinstance(v, number)):
                return f"'{name}' must be a number, not {brief(v)}"
        try:
            self.placement
        except UsageError as e:
            return f"its placement: {e}"
        if isinstance(self.schema, bool) or not isinstance(self.schema, int) or self.schema > SPEC_SCHEMA:
            return f"'schema' {brief(self.schema)} is not one this tool reads ({SPEC_SCHEMA}); upgrade"
        return None

    @property
    def placement(self) -> Placement:
        """Which agents may take the run's jobs (``master.spec.placement``)."""
        return Placement.parse(**self.placement_options())

    def placement_options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in PLACEMENT}

    def data_file(self, chunk: int) -> str | None:
        if self.data_dir is None:
            return None
        return str(chunk_data(Path(self.data_dir), chunk))


def default_name(kind: JobKind, target: str, chunks: int, kwargs: dict[str, Any],
                 shared: str | None, data_dir: str | None, extra: dict[str, Any] | None = None) -> str:
    """Stable name from what is run, so that re-running the same command resumes it. ``extra``:
    what else makes the run (a sweep passes chunks=0, so that a grown grid resumes the same run)."""
    ident = json.dumps([kind.value, target, chunks, kwargs, shared, data_dir] + ([extra] if extra else []),
                       sort_keys=True)
    if kind is JobKind.CALLABLE:
        base = target.rpartition(":")[2]
    elif kind is JobKind.COMMAND and not (extra or {}).get("commands"):  # a command line: its first words
        base = " ".join(Path(w).name for w in target.split()[:2])
    else:
        base = Path(target).stem
    size = "sweep" if (extra or {}).get("sweep") else str(chunks)
    return f"{slug(base, 40)}-{size}-{hashlib.sha1(ident.encode()).hexdigest()[:8]}"


def parse_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:  # the agents read them with the same loader (depth-bounded): refused here, not there
        value = load_json(text, "--kwargs")
    except BadFile as e:
        raise UsageError(f"{e}; example: --kwargs '{{\"scale\": 2}}'") from None
    if not isinstance(value, dict):
        raise UsageError(f"--kwargs must be a JSON object like '{{\"scale\": 2}}', not a {type(value).__name__}")
    return value


def parse_env(items: list[str] | None, environ: dict[str, str] | None = None) -> dict[str, str]:
    """``--env NAME=VALUE`` or ``--env NAME`` (its value in this shell), repeatable, as a dict."""
    environ = os.environ if environ is None else environ
    env: dict[str, str] = {}
    for item in items or ():
        name, eq, value = item.partition("=")
        if not eq:
            if name not in environ:
                raise UsageError(f"--env {name}: {name!r} is not set here; give its value: --env {name}=VALUE")
            value = environ[name]
        env[name] = value
    if env and (why := env_problem(env)):
        raise UsageError(f"--env {why}")
    return env


KWARGS_LIMIT = 64 * 1024  # bytes of JSON: every job descriptor of the run carries its kwargs


def kwargs_size_error(kwargs: dict[str, Any], what: str = "--kwargs",
                      instead: str = "--shared FILE.npz (one file for every chunk) or --data FOLDER (one .npz "
                                     "per chunk), or pass a file's path") -> str | None:
    """Why ``kwargs`` are too large to travel in job descriptors (every job of a run, up to 64 of
    them queued in one mailbox, carries a copy), or None."""
    size = len(json.dumps(kwargs, default=str))
    if size <= KWARGS_LIMIT:
        return None
    return (f"{what}: {size / 1024:.0f} KB as JSON, over the {KWARGS_LIMIT // 1024} KB limit: every job "
            f"descriptor carries a copy. Put large inputs in {instead}")


def build(**values: Any) -> RunSpec:
    """Check every option (``master.spec.options``: task, script, cmd or commands, chunks, kwargs, sweep,
    ...) and return the RunSpec; raises UsageError naming the bad one, TypeError for a keyword that
    is no run option. ``sweep``: a sweep file's path or inline JSON (``master.spec.sweep``), or its parameter sets."""
    a = spec_values(values, "build()")
    task, script, cmd, commands, chunks, kwargs, sweep, shared, data, run, workdir, setup, env = (
        a[k] for k in ("task", "script", "cmd", "commands", "chunks", "kwargs", "sweep", "shared", "data", "run",
                       "workdir", "setup", "env"))
    workdir = str(Path(workdir or os.getcwd()).resolve())
    given = [n for n, v in (("--task", task), ("--script", script), ("--cmd", cmd), ("--commands", commands))
             if v is not None]
    if len(given) != 1:
        raise UsageError("give exactly one of --task MODULE:FUNCTION, --script PATH.py, --cmd 'COMMAND' or "
                         f"--commands FILE{' (not ' + ' and '.join(given) + ')' if given else ''}")
    kwargs = dict(kwargs or {})
    params, lines = None, None
    if sweep is not None or commands is not None or cmd is not None:
        from gpupool.master.spec.cmdspec import check_chunks, read_commands

        if sweep is not None:
            params = _sweep(sweep, workdir, kwargs, data)
            chunks = check_chunks(chunks, len(params), f"--sweep ({len(params)} parameter sets)")
        if commands is not None:
            if params is not None:
                raise UsageError("--sweep with --commands: put the values in the lines, or use --cmd 'TEMPLATE'")
            commands, lines = read_commands(commands, workdir)
            chunks = check_chunks(chunks, len(lines), f"--commands {commands} ({len(lines)} lines)")
    if chunks is None:
        raise UsageError("--chunks is missing (or pass --sweep, whose parameter sets are the chunks)")
    if why := problem("chunks", chunks):
        raise UsageError(why)
    # a script takes its kwargs as flags (any flag name); a callable or command as names (identifiers)
    if why := kwargs_problem(JobKind.SCRIPT if script is not None else JobKind.CALLABLE, kwargs):
        raise UsageError(f"--kwargs {why}")
    if (too_large := kwargs_size_error(kwargs if params is None else
                                       max((dict(kwargs, **p) for p in params), key=lambda d: len(json.dumps(d))))):
        raise UsageError(too_large)
    if why := first_problem(a, ("retries", "timeout", "share", "chunk_time", "batch")):
        raise UsageError(why)
    placement = {k: a[k] for k in PLACEMENT}
    placement["targets"] = list(placement["targets"] or []) or None
    Placement.parse(**placement)  # UsageError naming a bad one
    opts = {k: a[k] for k in ("prefix", "success_codes", "fail_on_output", "result_file")}
    success_codes = opts["success_codes"]
    if task is not None or script is not None:
        if used := [f"--{k.replace('_', '-')}" for k, v in opts.items() if v is not None and
                    (task is not None or k != "success_codes")]:  # a script's exit codes: OctoRun's success_codes
            raise UsageError(f"{', '.join(used)}: only for command jobs (--cmd or --commands), not {given[0]}")
        options = None
        if script is not None and success_codes is not None:
            from gpupool.master.spec.cmdspec import options as checked_options

            options = checked_options(prefix=None, success_codes=success_codes, fail_on_output=None, result_file=None,
                                      known=set(), partial=set())
    shared_path = check_npz(shared, "--shared", workdir) if shared else None
    data_dir = check_data_dir(data, chunks, workdir) if data else None
    named = array_kwargs(task, shared_path, data_dir, kwargs) if a["arrays_as_kwargs"] else set()
    state = {"state"} if setup is not None else set()  # what the setup returns: the task may require it
    if task is not None:
        kind, target = JobKind.CALLABLE, check_task(task, workdir, kwargs, named, state) if params is None else ""
        for keys in dict.fromkeys(tuple(sorted(p)) for p in params or []):  # each kind of set in the sweep
            try:
                target = check_task(task, workdir, {**kwargs, **dict.fromkeys(keys)}, named, state)
            except UsageError as e:
                raise UsageError(f"{e} (kwargs with the sweep's parameters {list(keys)})") from None
    elif script is not None:
        kind, target = JobKind.SCRIPT, check_script(script, workdir)
    else:
        kind, target, options = JobKind.COMMAND, *_command(cmd, commands, lines, kwargs, params, opts)
    if setup is not None:
        setup = check_setup(setup, task, workdir, kwargs, params)
    if env and (why := env_problem(env)):
        raise UsageError(f"--env {why}")
    if a["on_done"] is not None:
        from gpupool.master.spec.cmdspec import HOOK_FIELDS, check_template

        check_template(a["on_done"], "--on-done", set(HOOK_FIELDS))
    after, after_any = run_list(a["after"], "--after"), run_list(a["after_any"], "--after-any")
    if both := sorted(set(after or ()) & set(after_any or ())):
        raise UsageError(f"--after and --after-any both name {', '.join(both)}: give each run once")
    if run:
        name = check_run_name(run)
    elif params is None and lines is None and options is None:  # as before command jobs and sweeps
        name = default_name(kind, target, chunks, kwargs, shared_path, data_dir)
    else:
        name = default_name(kind, target, 0 if params is not None else chunks, kwargs, shared_path, data_dir,
                            {"sweep": params is not None, "commands": lines, "options": options})
    return RunSpec(name, kind, target, chunks, kwargs, shared_path, data_dir, a["retries"], a["timeout"], workdir,
                   float(a["share"]), params=params, commands=lines, options=options,
                   arrays_as_kwargs=bool(a["arrays_as_kwargs"]), visible_gpu_id=bool(a["visible_gpu_id"]),
                   env=dict(env) if env else None, setup=setup, on_done=a["on_done"], chunk_time=a["chunk_time"],
                   batch=a["batch"], after=after, after_any=after_any,
                   **placement)


def _sweep(sweep: str | dict[str, Any] | list[dict[str, Any]], workdir: str, kwargs: dict[str, Any],
           data: str | None) -> list[dict[str, Any]]:
    """The parameter sets of ``--sweep``, checked against ``--kwargs`` and ``--data``."""
    from gpupool.master.spec.sweep import SweepError, load, parse

    try:
        params = load(sweep, workdir) if isinstance(sweep, str) else parse(sweep, "sweep")
    except SweepError as e:
        raise UsageError(str(e)) from None
    if both := sorted(set(kwargs) & {k for p in params for k in p}):
        raise UsageError(f"--kwargs and --sweep both set {both}; give each name in one of them")
    if data:
        raise UsageError("--data with --sweep: --data gives files by chunk position, a sweep's chunks are "
                         "their parameters; name each chunk's file in a parameter instead")
    return params


def _command(cmd: str | None, source: str | None, lines: list[str] | None, kwargs: dict[str, Any],
             params: list[dict[str, Any]] | None, opts: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """(target, options) of a command run, every template's placeholders checked."""
    from gpupool.jobs.template import BUILTIN_PLACEHOLDERS
    from gpupool.master.spec.cmdspec import check_template, options
    from gpupool.master.spec.sweep import common_names

    every, some = common_names(params) if params else (set(), set())
    known = set(BUILTIN_PLACEHOLDERS) | set(kwargs) | every
    if cmd is not None:
        if not cmd.strip():
            raise UsageError("--cmd is empty; give the shell command each chunk runs")
        target = check_template(cmd, "--cmd", known, some)
    else:
        for n, line in enumerate(lines or [], 1):
            check_template(line, f"--commands {source}: command {n}", known)
        target = source
    return target, options(**opts, known=known, partial=some)


def check_run_name(run: str) -> str:
    try:
        return check_name(run, "--run name")
    except SpoolError as e:
        raise UsageError(str(e)) from None




def run_list(given: str | list[str] | None, flag: str) -> list[str] | None:
    """``--after A,B --after C`` (or the API's ``"A,B"``, ``["A", "B"]``) -> ``["A", "B", "C"]``:
    each a valid run name, once; None where none is given."""
    if given is None:
        return None
    items = [given] if isinstance(given, str) else given
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise UsageError(f"{flag} takes run names (RUN[,RUN...]), not {brief(given)}")
    names: dict[str, None] = {}
    for item in items:
        for r in item.split(","):
            if r.strip():
                try:
                    names[check_name(r.strip(), f"{flag} run name")] = None
                except SpoolError as e:
                    raise UsageError(str(e)) from None
    if not names:
        raise UsageError(f"{flag} names no run (RUN[,RUN...])")
    return list(names)


def load_run(spool: Spool, run: str) -> RunSpec:
    """The spec of an existing run, or a UsageError listing the runs there are."""
    try:
        return RunSpec.load(spool.run_spec(run))
    except FileNotFoundError:
        known = ", ".join(spool.run_names()) or "none yet"
        raise UsageError(f"no run {run!r} in {spool.base} (runs there: {known})") from None


def save_or_check(spool: Spool, spec: RunSpec, fresh: bool, may_change: tuple[str, ...] = (),
                  notes: list[str] | None = None) -> RunSpec:
    """Write the run spec, or check that an existing run of this name is the same run; returns
    the spec the run goes on with: a sweep submitted again keeps the run's parameter sets and
    adds its new ones (``master.spec.sweep.merge``), and its placement where none is given again
    (``notes`` gets a line saying what changed where another is). Fields of its identity named in
    ``may_change`` may differ (an OctoRun config's kwargs: OctoRun keys completion on chunk ids alone)."""
    path = spool.run_spec(spec.name)
    spool.mkdir(path.parent)
    if os.path.lexists(path) and not fresh:  # a link (even a dangling one) is refused by load, not replaced
        old = RunSpec.load(path)
        grown = _grown(old, spec) if old.params is not None and spec.params is not None else spec
        same = dataclasses.replace(spec, params=old.params, chunks=old.chunks) if grown is not spec else spec
        diff = [k for k, v in same.identity().items() if old.identity()[k] != v and k not in may_change]
        if diff:
            raise UsageError(f"run {spec.name!r} already exists in {spool.base} with {_differs(diff)}; "
                             "pass --fresh to start it over, or --run NAME for a new run")
        spec = _placed(old, grown, notes)
    write_replace(path, spec.to_json())
    return spec


def _placed(old: RunSpec, new: RunSpec, notes: list[str] | None) -> RunSpec:
    """``new`` with ``old``'s placement options and --on-done (``options.KEPT``) where it gives none;
    a note naming those it changes."""
    saved = {k: getattr(old, k) for k in KEPT}
    kept = {k: v for k, v in saved.items() if v is not None and getattr(new, k) is None}
    changed = [(k, v, getattr(new, k)) for k, v in saved.items()
               if getattr(new, k) is not None and getattr(new, k) != v]
    if changed and notes is not None:
        show = lambda v: "(none)" if v is None else " ".join(map(str, v)) if isinstance(v, list) else f"{v:g}" \
            if isinstance(v, float) else str(v)  # noqa: E731
        what = "placement changed" if all(k in PLACEMENT for k, _, _ in changed) else "changed"
        notes.append(f"run {new.name}: {what}: " + ", ".join(
            f"{BY_NAME[k].option} {show(a)} -> {show(b)}" for k, a, b in changed))
    return dataclasses.replace(new, **kept) if kept else new


def _differs(fields: list[str]) -> str:
    """``["chunks", "kwargs"]`` -> ``another chunk count and another set of --kwargs`` (not a field's name)."""
    nouns = {"kind": "job kind", "target": "target (task, script or command)", "chunks": "chunk count",
             "kwargs": "set of --kwargs", "shared": "--shared file", "data_dir": "--data folder",
             "params": "set of sweep parameters", "commands": "--commands file", "options": "set of options",
             "setup": "--setup"}
    said = [f"another {nouns.get(f, f)}" for f in fields]
    return " and ".join(said) if len(said) <= 2 else ", ".join(said[:-1]) + " and " + said[-1]


def _grown(old: RunSpec, new: RunSpec) -> RunSpec:
    """``new`` with ``old``'s parameter sets first (their chunk ids stay), then its own new ones."""
    from gpupool.master.spec.sweep import PARAMS_LIMIT, merge

    params = merge(old.params or [], new.params or [])
    if len(params) > len(old.params or []) and len(json.dumps(params)) > PARAMS_LIMIT:
        raise UsageError(f"run {new.name!r}: its {len(params)} parameter sets would take over {PARAMS_LIMIT // 1024} "
                         "KB as JSON; start a new run (--run NAME)")
    return dataclasses.replace(new, params=params, chunks=len(params))
