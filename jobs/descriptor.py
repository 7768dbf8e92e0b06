"""The chunk job descriptor: a frozen dataclass with a schema version, encoded as JSON."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from gpupool.jobs.errors import BadFile, NewerSchema
from gpupool.jobs.names import MAX_CHUNKS, brief, check_chunk, check_name

SCHEMA = 4  # the highest descriptor schema this version reads (agents say it in their heartbeat)
MAX_ATTEMPTS = 10**6  # attempt numbers become file names (<chunk>.a<N>.json): bounded
MAX_GPUS = 64  # GPUs one job may ask for (--gpus-per-job)


class JobKind(str, Enum):
    CALLABLE = "callable"
    SCRIPT = "script"
    COMMAND = "command"  # a shell command line (``jobs.template``), run with /bin/sh -c


class JobState(str, Enum):
    """Where a chunk is. Derived from the spool, never stored apart from it: ``master.core.states.chunk_state``
    is the one answer (a result's ``status`` on disk is OK or FAILED)."""

    PENDING = "pending"  # known to the run, not in any mailbox
    QUEUED = "queued"  # in an agent's mailbox, not started
    RUNNING = "running"  # the agent's current job
    OK = "ok"  # committed result with status ok
    FAILED = "failed"  # committed result with status failed (retries used up)
    CANCELLED = "cancelled"  # no result, not at an agent, its run cancelled (``runs/<run>/cancel``)

    def __str__(self) -> str:  # the word itself in text and f-strings, as the plain string it replaces
        return self.value


# How descriptors grow (the rule; see jobs/__init__.py, "Descriptors grow"): a field added after schema 1
# has a default and is written only when it differs from it (OPTIONAL: the default of each). If an older
# agent may ignore it (a hint, such as ``share``), that is all. If it may not (ignoring it would run the
# job wrongly), MUST_UNDERSTAND names the schema that introduced it, and a job that uses it is written
# with that schema. An agent refuses a descriptor of a newer schema than it reads and ignores fields it
# does not know in one it reads; masters queue a job only at agents whose heartbeat's ``job_schema``
# (absent: 1) reads the job's schema, so an old agent is passed over, never fed jobs it must refuse.
OPTIONAL: dict[str, Any] = {"alone": False, "epoch": None, "share": 1.0, "params": None, "options": None,
                            "args": [], "encoded": False, "arrays_as_kwargs": False, "visible_gpu_id": False,
                            "env": None, "gpus": None, "gpu_mem": None, "setup": None, "setup_args": None,
                            "chunk_time": None, "batch": None, "batch_params": None}
# params: an agent that ignored them would leave them out of the result (collect's columns); options: it
# would ignore a command job's checks and result file
# also new in schema 2 (issue 15): an Executor call's positional arguments and its arguments encoded by jobs.codec; the
# SGE template's arrays by name and gpu_id as the job sees it: ignored, each would call the job wrongly; env
# (main.py --env): ignored, the job would run without the caller's variables
# (issue 16, docs/multigpu.md) gpus: ignored, a job that needs k GPUs would run on whatever the agent holds;
# gpu_mem: ignored, the job would start whatever memory its GPU has free
# (issue 22) setup, setup_args: ignored, the task would run without the state its --setup (or the Executor's
# initializer) makes
# (issue 27) batch, batch_params: ignored, the agent would run the first chunk of a batch only
MUST_UNDERSTAND: dict[str, int] = {"params": 2, "options": 2,  # field -> the schema that introduced it
                                   "args": 2, "encoded": 2, "arrays_as_kwargs": 2, "visible_gpu_id": 2, "env": 2,
                                   "gpus": 2, "gpu_mem": 2, "setup": 3, "setup_args": 3, "batch": 4, "batch_params": 4}
KIND_SCHEMA: dict[JobKind, int] = {JobKind.COMMAND: 2}  # a kind added later: the schema that introduced it

# Set by the worker to its own pid: code the worker imports can tell it runs inside one (an
# Executor made there would wait on the agent it runs in; see master.executor).
IN_WORKER_ENV = "GPUPOOL_WORKER_PID"
# Printed by the worker into its own log before each callable job (``JOB_MARK <run> chunk <c> attempt
# <a>``): the worker's own lines after it are about that job. A call's output followed it there before
# it got the chunk's log (below); ``master.report.logs.worker_output`` still reads it for such older runs.
JOB_MARK = "=== gpupool job:"
# The line that starts each attempt's output in its chunk's log (``logs/<run>/<chunk>.log``): written
# by the agent before a script or command job, by the worker before a callable job (its stdout and
# stderr go there, not to the worker log). ``attempt_output`` cuts one attempt's part out of the log.
ATTEMPT_HEADER = re.compile(r"^# attempt (\d+) at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d: .*\n?", re.M)


def attempt_header(attempt: int, what: str) -> str:
    """``# attempt <a> at <local time>: <what>``, one line (``ATTEMPT_HEADER`` finds it)."""
    import time

    what = what.replace("\r", " ").replace("\n", " ")
    return f"# attempt {attempt} at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}: {what}\n"


def attempt_output(text: str, attempt: int, whole: bool = True) -> str | None:
    """What attempt ``attempt`` wrote in a chunk log whose text (or end, ``whole`` False) is
    ``text``: after its last header, up to the next header. None where ``text`` has no header of
    that attempt; when ``text`` is only the log's end, all of it is taken as that attempt's where
    it has no header at all (the attempt wrote more than was read)."""
    headers = list(ATTEMPT_HEADER.finditer(text))
    ours = [m for m in headers if int(m.group(1)) == attempt]
    if not ours:
        return text if not whole and not headers else None
    start = ours[-1].end()
    after = [m.start() for m in headers if m.start() >= start]
    return text[start:after[0]] if after else text[start:]


# Keyword names the agent fills in itself; a user kwarg may not reuse them.
BUILTIN_KWARGS = ("chunk_id", "total_chunks", "gpu_id", "device", "shared", "data")
SETUP_BUILTINS = ("gpu_id", "device", "shared", "total_chunks")  # those a run's --setup may ask for
SCRIPT_FLAGS = ("gpu_id", "chunk_id", "total_chunks")  # what a script is given before its kwargs


def kwargs_problem(kind: "JobKind", kwargs: dict[str, Any]) -> str | None:
    """Why ``kwargs`` cannot go to a job of this kind, or None. A callable (or a command's
    template) takes them as names: identifiers, none of the built-ins the agent fills in. A script
    takes them as flags ``--key value``: any flag name (``output-dir``, ``device``), but not the
    three flags the pool gives it itself."""
    keys = list(kwargs)
    if kind is JobKind.SCRIPT:
        if clash := [k for k in keys if k in SCRIPT_FLAGS]:
            return f"key(s) {brief(clash)} are the flags every script is given ({', '.join(SCRIPT_FLAGS)}); rename them"
        if bad := [k for k in keys if not k or k.startswith("-") or any(ch.isspace() or ch in "=\0" for ch in k)]:
            return f"key(s) {brief(bad)} cannot be flags (--key value): no leading '-', spaces or '='"
        return None
    if clash := sorted(set(keys) & set(BUILTIN_KWARGS)):
        return f"key(s) {brief(clash)} reuse built-in argument names {list(BUILTIN_KWARGS)}; rename them"
    if bad := [k for k in keys if not k.isidentifier()]:
        return f"key(s) {brief(bad)} are not valid Python identifiers"
    return None


@dataclass(frozen=True)
class Job:
    """One attempt at one chunk, as written into a mailbox by the master."""

    run: str
    chunk_id: int
    total_chunks: int
    kind: JobKind
    target: str  # "pkg.mod:fn", "/abs/file.py:fn" or "/abs/script.py"
    attempt: int = 1
    max_attempts: int = 1
    kwargs: dict[str, Any] = field(default_factory=dict)
    args: list[Any] = field(default_factory=list)  # positional arguments (an Executor call's)
    encoded: bool = False  # kwargs and args are encoded by jobs.codec (an Executor call's: tuples, bytes, arrays...)
    shared: str | None = None  # absolute path of the run's shared .npz
    data: str | None = None  # absolute path of this chunk's .npz
    timeout: float | None = None
    workdir: str | None = None  # put on sys.path for callables, cwd for scripts
    submitted_at: float = 0.0
    alone: bool = False  # suspected of killing an agent: the agent runs nothing beside it (no pipelining)
    epoch: str | None = None  # the run's runs/<run>/epoch when queued: a result for another epoch is dropped
    share: float = 1.0  # the run's weight when agents choose among the jobs of several runs (fair share)
    params: dict[str, Any] | None = None  # the chunk's sweep parameters (also in kwargs), kept in its result
    options: dict[str, Any] | None = None  # script and command jobs: OPTION_CHECKS (prefix, success codes, ...)
    arrays_as_kwargs: bool = False  # each array of ``data`` and ``shared`` is passed as a keyword argument by name
    visible_gpu_id: bool = False  # ``gpu_id`` is the GPU's index in the worker (0: it sees its own GPU only)
    env: dict[str, str] | None = None  # variables set for the job (main.py --env), over the agent's own
    gpus: int | None = None  # --gpus-per-job: the GPUs the job needs; only an agent holding that many runs it
    gpu_mem: float | None = None  # --gpu-mem: GiB of GPU memory it needs; it starts only once that is free
    setup: str | None = None  # --setup (an Executor's initializer): "mod:fn" or "/abs/file.py:fn", called once per
    #                           worker before its first chunk; its value is the task's ``state``
    setup_args: list[Any] | None = None  # an initializer's initargs (jobs.codec): it is called with them alone
    chunk_time: float | None = None  # --chunk-time: how long a chunk takes, a hint (agent.lifetime; ignored: no harm)
    batch: int | None = None  # a batch (jobs.batches): chunks chunk_id .. chunk_id + batch - 1, run in one request
    batch_params: list[dict[str, Any]] | None = None  # a batch of a sweep: each chunk's parameters, in order
    schema: int = field(default=SCHEMA, compare=False)  # what it was read as; written as needs_schema

    @property
    def key(self) -> tuple[str, int, int]:
        """(run, chunk, attempt): the fencing token of this dispatch."""
        return (self.run, self.chunk_id, self.attempt)

    @property
    def chunks(self) -> range:
        """The chunks this job runs: its own, or those of its batch."""
        return range(self.chunk_id, self.chunk_id + (self.batch or 1))

    def chunk_kwargs(self, i: int) -> dict[str, Any]:
        """The kwargs of the ``i``-th chunk of the job (0: a single chunk's own)."""
        return self.kwargs if self.batch_params is None else {**self.kwargs, **self.batch_params[i]}

    def chunk_params(self, i: int) -> dict[str, Any] | None:
        return self.params if self.batch_params is None else self.batch_params[i]

    @functools.cached_property  # computed once per parsed job: the agent asks for it many times per job
    def uid(self) -> tuple[str, int, int, str | None, float]:
        """One dispatch: the key, the run's epoch (a run started afresh numbers its attempts from
        1 again) and when the master made it (a cancelled run resumed queues the attempt its
        cancel dropped under the same number again)."""
        return (self.run, self.chunk_id, self.attempt, self.epoch, self.submitted_at)

    @functools.cached_property  # asked for every job of a mailbox on every rewrite (to_dict)
    def needs_schema(self) -> int:
        """The schema an agent must read to run this job: that of the newest must-understand field it uses."""
        return max([KIND_SCHEMA.get(self.kind, 1)] +
                   [n for name, n in MUST_UNDERSTAND.items() if getattr(self, name) != OPTIONAL[name]])

    def to_dict(self) -> dict[str, Any]:
        # shallow (kwargs is shared, not copied): dataclasses.asdict deep-copies, and this runs for
        # every job of a mailbox on every rewrite
        d = {name: getattr(self, name) for name in _FIELDS}
        d["kind"] = self.kind.value
        for name, default in OPTIONAL.items():
            if d[name] == default:  # written only where they matter (see "How descriptors grow")
                del d[name]
        d["schema"] = self.needs_schema
        return d

    def encode(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: object, where: object = None) -> "Job":
        """Validate an untrusted mapping; raise BadFile naming ``where`` on any problem."""
        if not isinstance(d, dict):
            raise BadFile(f"job descriptor is a {type(d).__name__}, not an object", where)
        schema = d.get("schema")
        if not isinstance(schema, int) or isinstance(schema, bool):
            raise BadFile("job descriptor has no integer 'schema'", where)
        if schema > SCHEMA:
            raise NewerSchema(f"job schema {schema} is newer than this tool's {SCHEMA}; upgrade", where)
        known = {k: v for k, v in d.items() if k in _FIELDS}  # fields of a newer version that it may ignore
        try:
            job = cls(**{**known, "kind": JobKind(d.get("kind"))})
        except (TypeError, ValueError) as e:
            raise BadFile(f"job descriptor is malformed: {e}", where) from e
        job._check(where)
        return job

    def _check(self, where: object) -> None:
        try:
            check_name(self.run, "run name")
            for name, hi in (("total_chunks", MAX_CHUNKS), ("attempt", MAX_ATTEMPTS), ("max_attempts", MAX_ATTEMPTS)):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
                    raise BadFile(f"'{name}' must be an integer from 1 to {hi}, got {brief(v)}", where)
            check_chunk(self.chunk_id, self.total_chunks)
        except BadFile:
            raise
        except Exception as e:  # BadName
            raise BadFile(str(e), where) from e
        _expect(self.target, str, "target", where)
        for name in ("alone", "encoded", "arrays_as_kwargs", "visible_gpu_id"):
            _expect(getattr(self, name), bool, name, where)
        _expect(self.args, list, "args", where)
        if isinstance(self.submitted_at, bool) or not isinstance(self.submitted_at, (int, float)) \
                or not math.isfinite(self.submitted_at):  # part of Job.uid: it must hash and compare
            raise BadFile(f"'submitted_at' must be a finite number, got {brief(self.submitted_at)}", where)
        if self.epoch is not None:
            _expect(self.epoch, str, "epoch", where)
            if not (0 < len(self.epoch) <= 64 and self.epoch.isalnum()):
                raise BadFile(f"'epoch' must be 1 to 64 letters and digits, got {brief(self.epoch)}", where)
        if isinstance(self.share, bool) or not isinstance(self.share, (int, float)) or not 0 < self.share < math.inf:
            raise BadFile(f"'share' must be a positive number, got {brief(self.share)}", where)
        _expect(self.kwargs, dict, "kwargs", where)
        if why := kwargs_problem(self.kind, self.kwargs):
            raise BadFile(f"kwargs {why}", where)
        if self.gpus is not None and (isinstance(self.gpus, bool) or not isinstance(self.gpus, int)
                                      or not 1 <= self.gpus <= MAX_GPUS):
            raise BadFile(f"'gpus' must be an integer from 1 to {MAX_GPUS}, got {brief(self.gpus)}", where)
        if self.gpu_mem is not None and (isinstance(self.gpu_mem, bool) or not isinstance(self.gpu_mem, (int, float))
                                         or not 0 < self.gpu_mem < math.inf):
            raise BadFile(f"'gpu_mem' must be a positive number of GiB, got {brief(self.gpu_mem)}", where)
        for name in ("params", "options"):
            if getattr(self, name) is not None:
                _expect(getattr(self, name), dict, name, where)
        if (why := options_problem(self.options)) is not None:
            raise BadFile(f"'options': {why}", where)
        if self.env is not None and (why := env_problem(self.env)):
            raise BadFile(f"'env' {why}", where)
        if self.setup_args is not None:
            _expect(self.setup_args, list, "setup_args", where)
        for name in ("shared", "data", "workdir", "setup"):
            v = getattr(self, name)
            if v is not None:
                _expect(v, str, name, where)
                if "\0" in v:
                    raise BadFile(f"'{name}' contains a NUL byte", where)
        if self.batch is not None:
            if isinstance(self.batch, bool) or not isinstance(self.batch, int) or not \
                    2 <= self.batch <= self.total_chunks - self.chunk_id:
                raise BadFile(f"'batch' must be an integer from 2 to the chunks left after chunk {self.chunk_id}, "
                              f"got {brief(self.batch)}", where)
            if self.kind is not JobKind.CALLABLE or self.data is not None or self.params is not None:
                raise BadFile("a batch is of callable chunks without --data or params of their own", where)
        if self.batch_params is not None:
            if not isinstance(self.batch_params, list) or len(self.batch_params) != (self.batch or 0) or \
                    not all(isinstance(p, dict) for p in self.batch_params):
                raise BadFile("'batch_params' must be a list of one object per chunk of the batch", where)
            if bad := next((why for p in self.batch_params if (why := kwargs_problem(self.kind, p))), None):
                raise BadFile(f"batch_params {bad}", where)
        for name in ("timeout", "chunk_time"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf):
                raise BadFile(f"'{name}' must be a positive number, got {brief(v)}", where)


_FIELDS = tuple(f.name for f in dataclasses.fields(Job))
assert set(MUST_UNDERSTAND) <= set(OPTIONAL) <= set(_FIELDS)


def _is_codes(v: object) -> bool:
    return isinstance(v, list) and 0 < len(v) <= 256 and all(
        isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in v)


# The options of a script or command job (``Job.options``, ``RunSpec.options``): name -> check.
OPTION_CHECKS = {
    "prefix": lambda v: isinstance(v, str) and "\0" not in v,  # shell lines run before a command job's own
    "success_codes": _is_codes,  # exit codes that mean success (default [0])
    "fail_on_output": lambda v: isinstance(v, str) and len(v) <= 4096,  # a regex: a matching output line fails
    "result_file": lambda v: isinstance(v, str) and "\0" not in v,  # a template: the file read into the value
}


ENV_LIMIT = 16 * 1024  # bytes of --env names and values: every job descriptor of the run carries them
RESERVED_ENV = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")  # the agent's own (and every GPUPOOL_* variable)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def env_problem(env: object) -> str | None:
    """Why ``env`` is no set of variables for a job (``main.py --env``), or None."""
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        return f"must map variable names to strings, not {brief(env)}"
    if bad := [k for k in env if not _ENV_NAME.fullmatch(k)]:
        return f"names {brief(bad)} are not variable names (letters, digits and _, not first a digit)"
    if mine := [k for k in env if k in RESERVED_ENV or k.startswith("GPUPOOL_")]:
        return f"sets {brief(mine)}, which the agent sets itself (its GPU, its marks on what jobs start)"
    if any("\0" in v for v in env.values()):
        return "holds a NUL byte in a value"
    size = sum(len(k) + len(v.encode()) + 2 for k, v in env.items())
    return f"is {size} bytes, over the {ENV_LIMIT // 1024} KB limit (every job carries it); pass a file's path " \
        "instead of its content" if size > ENV_LIMIT else None


def options_problem(options: dict[str, Any] | None) -> str | None:
    """What is wrong with job options read from the spool, or None."""
    if options is None:
        return None
    for k, v in options.items():
        check = OPTION_CHECKS.get(k)
        if check is None:
            return f"unknown option {brief(k)} (known: {', '.join(OPTION_CHECKS)})"
        if not check(v):
            return f"option {k!r} has a bad value {brief(v)}"
    return None


def _expect(value: object, typ: type, name: str, where: object) -> None:
    if not isinstance(value, typ):
        raise BadFile(f"'{name}' must be a {typ.__name__}, got {type(value).__name__}", where)

