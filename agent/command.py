"""Command jobs: a shell command line per chunk, run like a script job (``agent.script``).

The job's target is a template (``jobs.template``) filled in with the chunk's placeholders
(``chunk_id``, ``total_chunks``, ``gpu_id``, ``device``, and every kwarg and sweep parameter);
its options' ``prefix`` runs first in the same shell (``cd repo``; if it fails, the command does
not run). ``/bin/sh -c`` runs it in a process group of its own with the agent's worker
environment (``CUDA_VISIBLE_DEVICES`` names the agent's GPU only, so ``device`` is ``cuda:0``)
plus ``GPUPOOL_RUN``, ``GPUPOOL_CHUNK_ID`` and ``GPUPOOL_TOTAL_CHUNKS``, its output in the chunk's log; timeout, stop and kill are the script job's (``run_process``).

After it exits, in this order: its exit code must be one of ``success_codes`` (default 0); no
line it wrote may match ``fail_on_output``; and ``result_file`` (a template too, relative to the
job's working folder) is read into the value: ``.json`` parsed, ``.csv``/``.tsv`` as a list of
row objects (numbers as numbers), anything else as text.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import IO, Any, Callable

from gpupool.agent.script import OpenLog, _error, _open_plain, run_process
from gpupool.agent.worker_control import exit_reason
from gpupool.jobs.atomic import open_read
from gpupool.jobs.descriptor import Job
from gpupool.jobs.errors import BadFile
from gpupool.jobs.jsonio import load_json
from gpupool.jobs.outcomes import Failure, FailureKind
from gpupool.jobs.template import TemplateError, expand

RESULT_FILE_LIMIT = 4 * 1024 * 1024  # bytes of a --result-file (a result record holds at most 8 MB)


def placeholders(job: Job, gpu_id: int, device: str) -> dict[str, Any]:
    return {**job.kwargs, "chunk_id": job.chunk_id, "total_chunks": job.total_chunks, "gpu_id": gpu_id,
            "device": device}


def shell_line(job: Job, values: dict[str, Any]) -> str:
    """The chunk's command line, its prefix first (the command runs only if the prefix succeeds)."""
    line = expand(job.target, values)
    prefix = (job.options or {}).get("prefix")
    return f"{{ {expand(prefix, values)}\n}} || exit $?\n{line}" if prefix else line


def run_command(job: Job, gpu_id: int, device: str, env: dict[str, str], log_path: Path,
                abort: Callable[[], bool], open_log: OpenLog | None = None) -> dict[str, Any]:
    """Run the command job; its result fields: ``log``, ``exit_code``, ``value`` or ``error``.
    ``open_log`` opens its log (see ``agent.script.run_process``)."""
    values = placeholders(job, gpu_id, device)
    fields: dict[str, Any] = {"log": str(log_path)}
    try:
        line = shell_line(job, values)
    except TemplateError as e:
        return {**fields, "error": Failure(FailureKind.BAD_TEMPLATE, str(e)).to_dict()}
    env = {**env, "GPUPOOL_RUN": job.run, "GPUPOOL_CHUNK_ID": str(job.chunk_id),  # as $SLURM_ARRAY_TASK_ID
           "GPUPOOL_TOTAL_CHUNKS": str(job.total_chunks)}
    start = 0  # where this attempt's output starts in its log: the size of the log it opened

    def opened(path: Path) -> IO[bytes]:
        nonlocal start
        log = (open_log or _open_plain)(path)
        start = os.fstat(log.fileno()).st_size
        return log

    code, err = run_process(["/bin/sh", "-c", line], job, env, log_path, abort, what="command",
                            shown=line.replace("\n", "; "), open_log=opened)
    if err is not None:
        return {**fields, "error": err.to_dict()}
    fields["exit_code"] = code
    opts = job.options or {}
    if code not in opts.get("success_codes", [0]):
        failed = _error(FailureKind.COMMAND_FAILED, f"the command {exit_reason(code)}", log_path)
        return {**fields, "error": failed.to_dict()}
    if opts.get("fail_on_output") and (hit := _matching_line(log_path, start, opts["fail_on_output"])):
        return {**fields, "error": _error(FailureKind.OUTPUT_CHECK, hit, log_path).to_dict()}
    if opts.get("result_file"):
        return {**fields, **_pick_up(job, opts["result_file"], values, log_path)}
    return {**fields, "value": None}


def _matching_line(log_path: Path, start: int, pattern: str) -> str | None:
    """The first line this attempt wrote (after its header) that matches ``pattern``, described."""
    rx = re.compile(pattern)
    try:
        f = open_read(log_path)  # no link followed
    except (OSError, BadFile) as e:
        return f"its output could not be read for --fail-on-output ({e})"
    with f:
        f.seek(start)
        f.readline()  # the attempt's header: the command line itself
        for n, raw in enumerate(f, 1):
            line = raw.decode(errors="replace").rstrip("\n")
            if rx.search(line):
                return f"output line {n} matches --fail-on-output {pattern!r}: {line[:300]}"
    return None


def _pick_up(job: Job, pattern: str, values: dict[str, Any], log_path: Path) -> dict[str, Any]:
    """``{"result_file": path, "value": ...}``, or ``{"error": ...}`` naming the file and the problem."""
    try:
        name = expand(pattern, values)
    except TemplateError as e:
        return {"error": Failure(FailureKind.BAD_TEMPLATE, f"--result-file: {e}").to_dict()}
    path = Path(job.workdir or os.getcwd(), name)
    try:
        with open(path, "rb") as f:
            data = f.read(RESULT_FILE_LIMIT + 1)
        if len(data) > RESULT_FILE_LIMIT:
            raise ValueError(f"it is over {RESULT_FILE_LIMIT // 2**20} MB (write large outputs elsewhere and "
                             "a small summary here)")
        value = read_value(path, data)
    except FileNotFoundError:
        return {"error": _error(FailureKind.RESULT_FILE_MISSING,
                                f"the command succeeded but wrote no result file {path}", log_path).to_dict()}
    except (OSError, ValueError, BadFile) as e:
        return {"error": _error(FailureKind.BAD_RESULT_FILE, f"result file {path}: {e}", log_path).to_dict()}
    return {"result_file": str(path), "value": value}


def read_value(path: Path, data: bytes) -> Any:
    """A result file's content as a value; raises ValueError or BadFile saying what is wrong."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return load_json(data, "result file", path)
    text = data.decode()  # UnicodeDecodeError is a ValueError
    if suffix in (".csv", ".tsv"):
        rows = list(csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ","))
        if not rows:
            raise ValueError("it has no rows under its header line")
        return [{k: _number(v) for k, v in r.items() if k is not None} for r in rows]
    return text.rstrip("\n")


def _number(cell: str | None) -> Any:
    """A CSV cell as an int or float where it is one (so that collect's tables keep numbers)."""
    if cell is None:
        return None
    for kind in (int, float):
        try:
            v = kind(cell)
        except ValueError:
            continue
        return v if json.dumps(v) not in ("NaN", "Infinity", "-Infinity") else cell
    return cell
