"""A run's options, each declared once: its name, type, default, help, range check and scope.

``main.py``'s command line (``master.cli.run_cli.parse``), the keywords ``Pool.submit`` and
``runspec.build`` take, the checks of their ranges, which ``RunSpec`` fields ``run.json`` holds
only where set, and what ``Feeder._job`` copies from the spec into each ``Job`` are read from
``OPTIONS``. Adding an option: one entry here, plus the code where it acts.

Scope (submitit's ``_valid_parameters`` is the model):

* ``IDENTITY``: what makes the run the same run (``RunSpec.identity``); given again with
  another value, the run is refused (``--fresh`` or ``--run NAME``).
* ``SAVED``: saved in ``runs/<run>/run.json``; may change on resume. Placement is kept when
  a resume or ``retry`` does not give it again (``runspec.save_or_check``).
* ``COMMAND``: this command only (where the spool is, how it feeds, its output).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Iterable

from gpupool.jobs.descriptor import MAX_GPUS


class Scope(str, Enum):
    IDENTITY = "identity"
    SAVED = "saved"
    COMMAND = "command"


@dataclass(frozen=True)
class Option:
    name: str  # the keyword of Pool.submit / build and the argparse dest
    type: Callable[[str], Any] | None  # argparse's type (None: a string, or a flag when default is False)
    default: Any
    help: str
    scope: Scope
    check: Callable[[Any], bool] | None = None  # True for a good value (None: not given, never checked)
    bad: str = ""  # the message for a value ``check`` refuses; {v}: the value
    flag: str = ""  # default: --name-with-dashes
    aliases: tuple[str, ...] = ()
    metavar: str | None = None
    append: bool = False  # repeatable: a list
    group: str | None = None  # a mutually exclusive group of the command line
    cli: bool = True  # on main.py's command line
    sparse: bool = False  # its RunSpec field is written in run.json only where set: older tools refuse unknown fields
    job: str | None = None  # the Job field Feeder._job copies the spec's field of this name into (placement:
    # from the run's Placement, which a caller of Run.wait may give instead)

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def problem(self, v: Any) -> str | None:
        """The message for ``v`` if ``check`` refuses it (None is not given: never refused)."""
        if v is None or self.check is None:
            return None
        try:
            good = self.check(v)
        except TypeError:  # a value of another type from the API (a string for a number)
            good = False
        return None if good else self.bad.format(v=v)


def _num(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float))


def _whole(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int)


_POSITIVE = lambda v: 0 < v < math.inf  # noqa: E731 (nan and inf refused)
_AT_LEAST_0 = lambda v: 0 <= v < math.inf  # noqa: E731
I, S, C = Scope.IDENTITY, Scope.SAVED, Scope.COMMAND

OPTIONS: tuple[Option, ...] = (
    Option("base", None, None, "spool folder the agents serve (default: $GPUPOOL_BASE; required unless running the "
           "demo)", C),
    Option("new_spool", None, False, "make BASE a new spool if it is not one yet (otherwise a folder where no agent "
           "was ever started is refused: a typo would be waited on for ever)", C),
    Option("wait_agents", float, None, "give up (exit 2) when no agent is alive for S seconds (default: wait, saying "
           "so every minute)", C, _AT_LEAST_0, "--wait-agents must be 0 or a positive number of seconds", metavar="S"),
    Option("task", None, None, "callable run in the agents: package.module:function or path/file.py:function", I,
           group="what"),
    Option("script", None, None, "OctoRun-style script run per chunk with --gpu_id --chunk_id --total_chunks", I,
           group="what"),
    Option("cmd", None, None, "shell command run per chunk, with placeholders {chunk_id} {total_chunks} {gpu_id} "
           "{device} and each sweep parameter or kwarg ({{ }}: literal braces; see docs/sweeps.md)", I,
           metavar="'TEMPLATE'", group="what"),
    Option("commands", None, None, "one shell command per line, each line a chunk (blank lines and # comments "
           "skipped; the same placeholders)", I, metavar="FILE", group="what"),
    Option("chunks", int, None, "number of chunks (chunk ids 0..N-1; with --sweep or --commands: theirs)", I,
           lambda v: _whole(v) and v >= 1, "--chunks must be a whole number of at least 1, not {v!r}"),
    Option("sweep", None, None, "parameter sets, one chunk each: a 'grid' (every combination) and/or a 'list'; passed "
           "as kwargs (--task), flags (--script) or placeholders (--cmd). Submitting a grown sweep again runs only its "
           "new sets", I, metavar="FILE.yaml|FILE.json|JSON"),
    Option("prefix", None, None, "command jobs: run first, in the same shell (e.g. 'cd repo')", I, metavar="CMD"),
    Option("success_codes", None, None, "command jobs: exit codes that mean success (default 0)", I, metavar="0,2"),
    Option("fail_on_output", None, None, "command jobs: an output line matching it fails the chunk, even at a "
           "successful exit", I, metavar="REGEX"),
    Option("result_file", None, None, "command jobs: file the command writes (placeholders as in --cmd, relative to "
           "this folder), read into the chunk's result: .json, .csv/.tsv, or text", I, metavar="PATTERN"),
    Option("kwargs", None, None, "JSON object of keyword arguments (flags for --script)", I),
    Option("shared", None, None, ".npz loaded once per agent and passed as `shared`", I, job="shared"),
    Option("data", None, None, "folder with one <chunk_id>.npz per chunk, passed as `data`", I),
    Option("arrays_as_kwargs", None, False, "pass each array of --data's chunk .npz and of --shared as a keyword "
           "argument by its name (the SGE template's expensive_task(A, B, shared))", S, job="arrays_as_kwargs"),
    Option("visible_gpu_id", None, False, "gpu_id (and a script's --gpu_id) is the GPU's index as the job sees it, "
           "0, so that code building its device as cuda:{gpu_id} runs unchanged (each agent's job sees its own GPU "
           "only)", S, job="visible_gpu_id"),
    Option("setup", None, None, "with --task: call FN once in each worker process of the run, before its first chunk, "
           "with the built-ins it names (device, gpu_id, shared, total_chunks) and the --kwargs it names; what it "
           "returns is passed to every chunk as state= (load a model once per GPU: docs/jobs.md)", I,
           metavar="FILE.py:FN|MODULE:FN", sparse=True, job="setup"),
    Option("env", None, None, "set this variable for every job of the run, to VALUE or to its value here (agents run "
           "jobs in their own environment, which may not be this shell's); repeatable", S, metavar="NAME[=VALUE]",
           append=True, sparse=True, job="env"),
    Option("on_done", None, None, "a shell command run once when the run ends (done, failed, or cancelled while fed), "
           "by its master, with {run} {status} {ok} {failed} {results} ({results!q}: shell-quoted); its output goes "
           "to logs/<run>/on_done.log; kept with the run (docs/cli.md)", S, metavar="'CMD'", sparse=True),
    Option("after", None, None, "start this run's chunks only once each run named has ended with every chunk ok "
           "(Slurm's afterok); one that failed or was cancelled fails this run at once. The run is recorded now, and "
           "status shows it as 'after RUN' meanwhile; repeatable; kept with the run (docs/jobs.md, Pipelines)", S,
           metavar="RUN[,RUN]", append=True, sparse=True),
    Option("after_any", None, None, "as --after, whatever the outcome of the runs named: done, failed or cancelled "
           "(Slurm's afterany); repeatable", S, metavar="RUN[,RUN]", append=True, sparse=True),
    Option("detach", None, False, "record the run, start its master as a process of its own in the background (its "
           "output: logs/<run>/master.log) and return at once; the same command resumes it should that process "
           "end early (docs/jobs.md, Pipelines)", C, aliases=("--no-wait",)),
    Option("run", None, None, "run name (default: derived from the task, chunk count and kwargs)", I),
    Option("retries", int, 2, "retries per failed chunk (default 2)", S, lambda v: v >= 0,
           "--retries must be 0 or more, not {v}"),
    Option("max_failures", int, 3, "stop the run once K failed attempts in a row (of at least two chunks) ended with "
           "the same error type and message, numbers and addresses aside (/data/chunk_17.npy and chunk_18.npy alike), "
           "and no chunk is ok; the pool's own errors (Timeout, WorkerDied, AgentLost, ...) never count (default 3; "
           "0: never stop early; docs/failures.md)", C, lambda v: v >= 0,
           "--max-failures must be 0 (never stop early) or more", metavar="K"),
    Option("timeout", float, None, "seconds a chunk may run before it is killed", S, _POSITIVE,
           "--timeout must be a positive number of seconds, not {v}", job="timeout"),
    Option("chunk_time", float, None, "how long one chunk takes, in seconds: an agent that must end by a time "
           "(its Slurm job's end, --end-at) starts no chunk of this run that would not end before it, even its first "
           "one (later ones: the run's last chunk there says)", S, _POSITIVE,
           "--chunk-time must be a positive number of seconds, not {v}", metavar="S", sparse=True, job="chunk_time"),
    Option("batch", int, None, "chunks per job: short chunks go to agents K at a time, run in one request and "
           "committed in one file (default: by their measured duration, so that a batch lasts about one round trip; "
           "chunks as long as a round trip never; 1: never; docs/jobs.md, Batches)", S, lambda v: v >= 1,
           "--batch must be a whole number of chunks per job, 1 (never batch) or more, not {v}", metavar="K",
           sparse=True),
    Option("share", float, 1.0, "the run's weight when several runs use the pool at once: agents are split between "
           "the active runs in proportion to their weights (default 1)", S, lambda v: _num(v) and _POSITIVE(v),
           "--share must be a positive number (the run's weight; default 1), not {v!r}", aliases=("--priority",),
           metavar="W", job="share"),
    Option("targets", None, None, "run only on these agents: a host and its GPU numbers (node1::0,2), or a whole host "
           "(node1); repeatable", S, flag="--target", metavar="HOST::GPU[,GPU]", append=True, sparse=True),
    Option("hosts", None, None, "run only on agents of these hosts", S, metavar="H1,H2", sparse=True),
    Option("exclude_hosts", None, None, "never run on agents of these hosts", S, metavar="H1,H2", sparse=True),
    Option("min_free_gb", float, None, "run only on agents whose GPU has at least this much free memory", S,
           _AT_LEAST_0, "--min-free-gb must be 0 or a positive number of GiB, not {v}", metavar="GB", sparse=True),
    Option("gpus_per_job", int, None, "each job needs K GPUs: it runs only on agents holding K (./start_agents.sh N "
           "BASE --gpus-per-agent K) and sees them as cuda:0..K-1 (default: agents with one GPU, or CPU agents)", S,
           lambda v: 1 <= v <= MAX_GPUS, f"--gpus-per-job must be a whole number from 1 to {MAX_GPUS}, not {{v}}",
           metavar="K", sparse=True),
    Option("gpu_mem", float, None, "GPU memory one job needs: an agent starts it only while that much is free (NVML), "
           "so slots sharing a GPU (--slots) never overcommit it", S, _POSITIVE,
           "--gpu-mem must be a positive number of GiB (what one job needs), not {v}", metavar="GB", sparse=True),
    Option("fresh", None, False, "start the run over: drop its earlier results", C),
    Option("wait", None, False, "if another master feeds this run, wait for it", C),
    Option("force", None, False, "resume (or with --fresh start over) a run of this name that another user submitted "
           "(refused without it; docs/failures.md, Trust model)", C),
    Option("depth", int, 4, "jobs per agent until chunk durations are known (default 4; then as many as hide the "
           "measured round trip, up to --max-depth, never more than a fair share)", C, lambda v: v >= 1,
           "--depth must be 1 or more"),
    Option("max_depth", int, 64, "most jobs queued per agent (default 64)", C),
    Option("dead_after", float, 20.0, "seconds without heartbeat before an agent is declared dead and its jobs handed "
           "back (default 20)", C, _POSITIVE, "--dead-after must be a positive number of seconds"),
    Option("retry_delay", float, 1.0, "first retry back-off, seconds (doubles)", C, _AT_LEAST_0,
           "--retry-delay must be 0 or a positive number of seconds"),
    Option("allow_local_locks", None, False, "use BASE even on a filesystem whose locks are client-local (sshfs, NFS "
           "nolock/local_lock); safe only if every agent and master of BASE runs on this machine (or "
           "$GPUPOOL_ALLOW_LOCAL_LOCKS=1)", C),
    Option("workdir", None, None, "folder the run's paths are relative to, and its jobs' working folder (default: "
           "the current one)", S, cli=False, job="workdir"),
)
BY_NAME = {o.name: o for o in OPTIONS}
PLACEMENT = ("targets", "hosts", "exclude_hosts", "min_free_gb", "gpus_per_job", "gpu_mem")  # master.spec.placement
# kept with the run when a resume or retry does not give them again; one given again replaces it, said in a note
KEPT = (*PLACEMENT, "on_done", "after", "after_any", "batch")
SPARSE = tuple(o.name for o in OPTIONS if o.sparse)
JOB_FIELDS = {o.name: o.job for o in OPTIONS if o.job}  # RunSpec field -> Job field


def add_arguments(p: argparse.ArgumentParser, names: Iterable[str] | None = None) -> None:
    """The table's command-line options (``names``: these only, in table order) added to ``p``."""
    groups: dict[str, Any] = {}
    for o in OPTIONS:
        if not o.cli or (names is not None and o.name not in names):
            continue
        if o.group is not None and o.group not in groups:
            groups[o.group] = p.add_mutually_exclusive_group()
        into = p if o.group is None else groups[o.group]
        kw: dict[str, Any] = {"dest": o.name, "help": o.help}
        if o.default is False:
            kw["action"] = "store_true"
        else:
            kw.update(type=o.type, default=o.default, metavar=o.metavar)
            if o.append:
                kw["action"] = "append"
        into.add_argument(o.option, *o.aliases, **kw)


def first_problem(values: dict[str, Any], names: Iterable[str] | None = None) -> str | None:
    """The message of the first option in ``values`` (``names``: these only) out of its range, or None."""
    for name in names if names is not None else values:
        if name in values and (why := BY_NAME[name].problem(values[name])):
            return why
    return None


def problem(name: str, value: Any) -> str | None:
    """Why ``value`` is out of option ``name``'s range, or None."""
    return BY_NAME[name].problem(value)


def spec_values(given: dict[str, Any], where: str) -> dict[str, Any]:
    """Every run option ``build`` takes (IDENTITY and SAVED): ``given``, and the defaults of the
    rest; TypeError naming a keyword that is none of them, as a function's signature would."""
    known = {o.name: o.default for o in OPTIONS if o.scope is not Scope.COMMAND}
    for name in given:
        if name not in known:
            raise TypeError(f"{where} got an unexpected keyword argument {name!r}")
    return {**known, **given}


def command_values(args: argparse.Namespace) -> dict[str, Any]:
    """The run options of parsed command-line ``args``, as ``Pool.submit`` takes them (their text as typed)."""
    return {o.name: getattr(args, o.name) for o in OPTIONS if o.cli and o.scope is not Scope.COMMAND}
