"""``python -m master logs``: agents' logs merged in time order, or everything about one chunk.

Agent logs are ``BASE/logs/<agent>.log`` in the agents' format
``YYYY-MM-DD HH:mm:ss.SSS | LEVEL | agent | message``; lines without a time stamp (a
traceback's) belong to the entry above them. Entries sort by their time stamp text, which
is each agent host's local clock: across hosts the order is as good as their clocks.
"""
from __future__ import annotations

import heapq
import io
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

from gpupool.jobs.atomic import NotAFile, linked_folder, open_read, read_tail
from gpupool.jobs.codec import plain
from gpupool.jobs.descriptor import JOB_MARK, JobState, attempt_output
from gpupool.jobs.errors import BadFile, SpoolError
from gpupool.jobs.names import printable
from gpupool.jobs.paths import Spool
from gpupool.jobs.words import plural
from gpupool.jobs.results import RunScan, chunk_records, scan_run
from gpupool.master.core.states import batch_in_flight

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \| ")


@dataclass(order=True)
class Entry:
    stamp: str  # "YYYY-MM-DD HH:mm:ss.SSS": sorts as time
    order: int  # tie-break: the file's position in the list, then the line's
    text: str  # the entry, continuation lines included


def entries(lines: Iterable[str], order: int = 0) -> Iterator[Entry]:
    """Group log lines into entries (a stamped line plus the unstamped lines after it)."""
    cur: Entry | None = None
    for line in lines:
        line = line.rstrip("\n")
        if STAMP.match(line):
            if cur is not None:
                yield cur
            cur = Entry(line[:23], order, line)
        elif cur is not None:
            cur.text += "\n" + line
        elif line:
            cur = Entry("", order, line)  # a file that starts mid-entry
    if cur is not None:
        yield cur


def agent_logs(spool: Spool, agent: str | None = None) -> list[Path]:
    """The agent log files to read: one agent's, or every agent's that has one."""
    if agent is not None:
        return [spool.agent_log(agent)]
    return spool.agent_log_files()


def merged(paths: list[Path], match: Callable[[str], bool] = lambda t: True) -> list[Entry]:
    """Every entry of ``paths`` in time order, keeping those ``match`` accepts. A file that is a
    link (or not a file) is passed over: logs are read without following one."""
    streams = []
    for i, p in enumerate(paths):
        try:
            with io.TextIOWrapper(open_read(p), errors="replace") as f:
                streams.append([e for e in entries(f, i) if match(e.text)])
        except (FileNotFoundError, BadFile, NotAFile):
            continue
    return list(heapq.merge(*streams))


def run_filter(run: str | None, chunk: int | None = None) -> Callable[[str], bool]:
    """Keep entries about ``run`` (and ``chunk``): the agent logs every job as '<run> chunk <c>'."""
    if run is None:
        return lambda text: True
    num = str(chunk) if chunk is not None else r"\d+"
    pat = re.compile(r"\| " + re.escape(run) + r" chunk " + num + r"\b")
    return lambda text: bool(pat.search(text))


def follow(paths_of: Callable[[], list[Path]], out: TextIO, match: Callable[[str], bool],
           start_at_end: bool = True, poll: float = 0.5, stop: Callable[[], bool] = lambda: False) -> None:
    """Print entries as they are appended to the files (new files too), until ``stop`` or Ctrl-C.
    A file that is a link (or not a file) is passed over: logs are read without following one."""
    pos: dict[Path, int] = {}
    partial: dict[Path, str] = {}
    first = True
    while not stop():
        batch: list[Entry] = []
        for i, p in enumerate(paths_of()):
            try:
                f = open_read(p)
            except (OSError, BadFile):
                continue
            with f:
                size = os.fstat(f.fileno()).st_size
                if p not in pos:
                    pos[p] = size if (start_at_end and first) else 0
                if size < pos[p]:  # truncated or replaced: start over
                    pos[p] = 0
                if size == pos[p]:
                    continue
                f.seek(pos[p])
                data = partial.pop(p, "") + f.read(size - pos[p]).decode(errors="replace")
            pos[p] = size
            complete, _, rest = data.rpartition("\n")
            if rest:
                partial[p] = rest
            batch += [e for e in entries(complete.splitlines(), i) if match(e.text)] if complete else []
        for e in sorted(batch):
            print(printable(e.text, lines=True), file=out, flush=True)
        first = False
        time.sleep(poll)


# one chunk ------------------------------------------------------------------------------------
def chunk_report(spool: Spool, run: str, chunk: int) -> dict[str, Any]:
    """Everything recorded about one chunk: result, failed attempts, its output, agent lines.
    ``script_output`` is the chunk's log (``logs/<run>/<chunk>.log``: every attempt's output after
    its header line, a callable's as a script's or a command's); ``worker_output``, only where the
    chunk has no log (a callable run by an older version), what its latest attempt printed in its
    agent's worker log. ``batch``: the batch it was sent in, if one (``batch_of``), with ``output``,
    what the batch's chunks printed (their one log)."""
    scan = scan_run(spool, run)
    result, attempts = chunk_records(spool, run, chunk, scan)
    log = spool.chunk_log(run, chunk)
    lines = [e.text for e in merged(agent_logs(spool), run_filter(run, chunk))]
    output = _text(log) if real_log_dir(spool, log) else None
    batch = batch_of(spool, run, chunk, scan)
    if batch is not None:
        blog = spool.batch_log(run, batch["first"], batch["count"])
        batch["output"] = _text(blog) if real_log_dir(spool, blog) else None
    older = _last_output(spool, run, chunk, result or (attempts[-1] if attempts else None)) \
        if output is None and batch is None else None
    return {"run": run, "chunk_id": chunk, "status": result["status"] if result else None, "result": result,
            "attempts": attempts, "script_log": str(log) if output is not None else None,
            "script_output": output, "worker_output": older, "agent_lines": lines, "batch": batch}


def batch_of(spool: Spool, run: str, chunk: int, scan: RunScan) -> dict[str, Any] | None:
    """The batch (``jobs.batches``) ``chunk`` was sent in, if it was: ``first``, ``count``, ``state``
    (``committed``, ``fenced`` (``why``: its chunks went on as single ones) or ``in flight``, at
    ``agent``) and ``log``, the one log of the whole batch (``Spool.batch_log``)."""
    slot, why, agent = scan.sent_in(chunk), None, None
    if slot is not None:
        first, count, state, why = slot.first, slot.count, "fenced" if slot.fenced else "committed", slot.fenced
    elif (held := batch_in_flight(spool, run, chunk)) is not None:
        agent, job = held
        first, count, state = job.chunk_id, job.batch or 1, "in flight"
    else:
        return None
    return {"first": first, "count": count, "state": state, "why": why, "agent": agent,
            "slot": str(spool.batch_json(run, first, count)), "log": str(spool.batch_log(run, first, count))}


def printed(spool: Spool, run: str, chunk: int, attempt: int) -> str | None:
    """What attempt ``attempt`` of a chunk printed (stdout and stderr): its part of the chunk's log
    (``jobs.descriptor.attempt_output``; only the log's last ``OUTPUT_READ`` bytes are read), or
    None where the log has none (not started yet, or run by an older version: ``worker_output``)."""
    log = spool.chunk_log(run, chunk)
    if not real_log_dir(spool, log):
        return None
    try:
        data = read_tail(log, OUTPUT_READ)  # no link followed
    except (OSError, BadFile):
        return None
    return attempt_output(data.decode(errors="replace"), attempt, whole=len(data) < OUTPUT_READ)


def _last_output(spool: Spool, run: str, chunk: int, rec: dict[str, Any] | None) -> str | None:
    """What a callable chunk's latest attempt on record printed (``worker_output``)."""
    agent, attempt = (rec or {}).get("agent"), (rec or {}).get("attempt")
    if not isinstance(agent, str) or not isinstance(attempt, int):
        return None
    try:
        return worker_output(spool, agent, run, chunk, attempt)
    except SpoolError:  # not an agent id
        return None


OUTPUT_READ = 16 * 2**20  # the end of a chunk's (or worker) log read for a call's output


def worker_output(spool: Spool, agent: str, run: str, chunk: int, attempt: int) -> str | None:
    """What a callable job printed, where an older version ran it (its output now goes to the
    chunk's log, ``printed``): the lines of its agent's worker log after the job's mark, up to the
    next mark (the worker runs one job at a time); None if the log (or the one it was cut to,
    ``<name>.1``) no longer has it. Only the last ``OUTPUT_READ`` bytes of each are read."""
    mark = f"{JOB_MARK} {run} chunk {chunk} attempt {attempt}\n"
    log = spool.worker_log(agent)
    for path in (log, log.with_name(log.name + ".1")):
        text = _tail(path, OUTPUT_READ)
        at = text.rfind(mark) if text else -1
        if at < 0:
            continue
        body = text[at + len(mark):]
        end = body.find(JOB_MARK)
        return body if end < 0 else body[:end]
    return None


def real_log_dir(spool: Spool, log: Path) -> bool:
    """No folder on the way from BASE to ``log`` is a link (or not a folder): a chunk log is read
    only then (``jobs.atomic.linked_folder``; the agent that writes one moves such a link away)."""
    return linked_folder(spool.base, log.parent) is None


def _tail(path: Path, limit: int) -> str | None:
    try:
        return read_tail(path, limit).decode(errors="replace")
    except (OSError, BadFile):
        return None


def _text(path: Path, limit: int = 2_000_000) -> str | None:
    try:
        with open_read(path) as f:  # no link followed
            return f.read(limit).decode(errors="replace")
    except (OSError, BadFile):
        return None


def format_chunk(rep: dict[str, Any]) -> str:
    """The chunk report as text: the newest failure's traceback first where it matters. What a job
    or an agent wrote is shown with its control characters escaped (``jobs.names.printable``)."""
    res = rep["result"]
    head = f"run {rep['run']} chunk {rep['chunk_id']}: "
    if res is None:
        head += "no committed result yet" + (f" ({plural(len(rep['attempts']), 'failed attempt')} so far)"
                                              if rep["attempts"] else "")
    else:
        head += (f"{res['status'].upper()} on attempt {res.get('attempt')}/{res.get('max_attempts', '?')}, "
                 f"agent {res.get('agent')} ({res.get('host')}, {res.get('device')}), "
                 f"{res.get('duration_s', 0) or 0:.3f} s, finished {_when(res.get('finished_at'))}")
    out = [printable(head)]
    if (b := rep.get("batch")) is not None:  # one job ran it with other chunks: their one log says what they printed
        how = {"committed": f"its results: {b['slot']}", "in flight": f"at agent {b['agent']}",
               "fenced": f"taken back ({b['why']}): its chunks went on as single ones"}[b["state"]]
        last = b["first"] + b["count"] - 1
        out.append(printable(f"sent in the batch of chunks {b['first']} .. {last} ({b['state']}; {how}); "
                             f"its output: {b['log']}"))
    if res is not None and isinstance(res.get("params"), dict):  # a sweep's chunk: which point it is
        out.append(f"params: {json.dumps(res['params'], sort_keys=True)[:500]}")
    if res is not None and res["status"] == JobState.OK:
        value = json.dumps(plain(res.get("value")))
        out.append(f"value: {value[:500]}{' ...' if len(value) > 500 else ''}"
                   + (f"   arrays: {res['arrays']}" if res.get("arrays") else ""))
    for a in rep["attempts"]:  # a script's traceback is the tail of its log, shown whole below: not twice
        out += _attempt_lines(a, rep["script_log"] if rep["script_output"] is not None else None)
    if b is not None and b.get("output"):
        out += ["", f"--- output of the batch of chunks {b['first']} .. {b['first'] + b['count'] - 1} ({b['log']}) ---",
                printable(b["output"].rstrip(), lines=True)]
    if rep["script_output"] is not None:
        out += ["", f"--- output of every attempt ({rep['script_log']}) ---", printable(rep["script_output"].rstrip(), lines=True)]
    elif rep.get("worker_output"):
        out += ["", f"--- output of attempt {(res or rep['attempts'][-1]).get('attempt')} (its agent's worker log) ---",
                printable(rep["worker_output"].rstrip(), lines=True)]
    if rep["agent_lines"]:
        out += ["", "--- agent log lines ---", *(printable(line, lines=True) for line in rep["agent_lines"])]
    return "\n".join(out)


def _attempt_lines(a: dict[str, Any], shown_log: str | None = None) -> list[str]:
    """An attempt's failure and its traceback; ``shown_log``: the chunk log printed whole after the
    attempts, so a traceback that is its tail (``err["log"]``) is pointed to, not printed again."""
    err = a.get("error") or {}
    lines = ["", printable(f"--- attempt {a.get('attempt')} failed on {a.get('agent')} at {_when(a.get('finished_at'))}: "
                           f"{err.get('type')}: {err.get('message')}")]
    tb = (err.get("traceback") or "").rstrip()
    if tb and shown_log is not None and err.get("log") == shown_log:
        lines.append(f"(its output ends with this error: see '# attempt {a.get('attempt')}' in the output below)")
    elif tb:
        lines.append(printable(tb, lines=True))
    return lines


def _when(t: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if isinstance(t, (int, float)) else "?"
