"""A run's timeline: every attempt of every chunk, with its agent, start and finish, drawn as
a Gantt chart (one row per agent, one bar per attempt) in inline SVG, rendered on the server.

The attempts come from the run's result files (``jobs.results.scan_run`` lists them; a failed
attempt's history ``<chunk>.a<N>.json``, a chunk's final ``<chunk>.json``, or a batch's slot with
several chunks' outcomes, each chunk ending the time the chunks after it ran before the slot's
mtime); the chunks running
now come from ``master.report.status.chunk_rows`` (what the agents' heartbeats name). Every bar is on one
clock, the file server's, whatever the agents' clocks say: an attempt ends at its result file's
mtime and starts its ``duration_s`` (measured by its agent) before that; a running chunk ends at
now, by the file server's clock (``jobs.atomic.server_now``), and started its agent-measured
running time before that. The agents' own ``started_at``/``finished_at`` are never compared
across agents. An attempt a master took back (``Superseded``, ``AgentLost``) has no duration and
no agent, and is not drawn.
"""
from __future__ import annotations

import html
import os
import threading
from collections import OrderedDict
from typing import Any

from gpupool.jobs.descriptor import JobState
from gpupool.jobs.jsonio import is_num
from gpupool.jobs.names import printable
from gpupool.jobs.outcomes import failure_of
from gpupool.jobs.paths import Spool
from gpupool.jobs.errors import BadFile
from gpupool.jobs.results import RunScan, attempt_record, chunk_results, read_slot_record, scan_run
from gpupool.master.report.status import duration

COLORS = {JobState.OK: "#43a047", JobState.FAILED: "#e53935", JobState.RUNNING: "#1e88e5"}
TRACEBACK_LIMIT = 20_000  # characters of a traceback kept for display


def _attempt(rec: dict[str, Any], chunk: int, end: float | None) -> dict[str, Any]:
    """An attempt's record as the run page uses it; ``end``: its file's mtime (the server's clock)."""
    failure = failure_of(rec)
    took = rec.get("duration_s")
    if not is_num(took) and is_num(rec.get("started_at")) and is_num(rec.get("finished_at")):
        took = rec["finished_at"] - rec["started_at"]  # an older record: still one host's clock
    start = max(0.0, end - max(0.0, took)) if is_num(took) and is_num(end) else None
    return {"chunk": chunk, "attempt": rec.get("attempt"), "status": rec.get("status"), "agent": rec.get("agent"),
            "start": start, "end": end if start is not None else None,
            "error": None if failure is None else failure.shown(2000, TRACEBACK_LIMIT)}


class AttemptReader:
    """Reads a run's attempts, each result file once (a committed record never changes; a failed
    final may be removed by ``retry``, and is read again when its mtime changes). Keeps the
    records of the ``keep`` runs read last."""

    def __init__(self, spool: Spool, keep: int = 8) -> None:
        self.spool, self.keep = spool, keep
        self._runs: OrderedDict[str, dict[tuple, dict[str, Any] | None]] = OrderedDict()
        self._lock = threading.Lock()  # the dashboard serves several requests at once

    def attempts(self, run: str) -> list[dict[str, Any]]:
        """Every attempt on record, sorted by chunk and attempt (the final wins over its history)."""
        with self._lock:
            return self._attempts(run)

    def _attempts(self, run: str) -> list[dict[str, Any]]:
        cache = self._runs.pop(run, {})
        self._runs[run] = cache
        while len(self._runs) > self.keep:
            self._runs.popitem(last=False)
        scan = scan_run(self.spool, run)
        keys = {("h", c, a) for c, attempts in scan.history.items() for a in attempts}
        keys |= {("f", c, mtime) for c, mtime in scan.finals.items()}
        for k in list(cache):
            if k not in keys:
                del cache[k]
        new = sorted(k[1] for k in keys if k[0] == "f" and k not in cache)  # read together: a batch's slot once
        finals = {c: rec for c, rec in chunk_results(self.spool, run, new, scan) if not isinstance(rec, Exception)}
        out: dict[tuple[int, Any], dict[str, Any]] = {}
        for k in sorted(keys, key=lambda k: (k[1], k[0] == "f")):  # history first, then the final over it
            if k not in cache:
                if k[0] == "f":  # its file's mtime: the listing's
                    rec, end = finals.get(k[1]), k[2]
                else:
                    rec = attempt_record(self.spool, run, k[1], k[2], scan)
                    end = None if rec is None or "batch" in rec else _mtime(self.spool.history_json(run, k[1], k[2]))
                cache[k] = None if rec is None else _attempt(rec, k[1], self._ended(run, scan, rec, end))
            if cache[k] is not None:
                out[(k[1], cache[k]["attempt"])] = cache[k]
        return [out[k] for k in sorted(out, key=lambda k: (k[0], k[1] if isinstance(k[1], int) else -1))]

    def _ended(self, run: str, scan: RunScan, rec: dict[str, Any], end: float | None) -> float | None:
        """When an attempt ended by the file server's clock: its file's mtime (``end``); for a chunk
        of a batch (``jobs.batches``), its slot's, less how long the chunks after it in the batch
        ran (by its agent's clock: its ``finished_at`` against the batch's)."""
        batch = rec.get("batch")
        slot = scan.slots.get(batch[0]) if isinstance(batch, list) and batch and isinstance(batch[0], int) else None
        if slot is None:
            return end
        if end is None:
            end = _mtime(self.spool.batch_json(run, slot.first, slot.count))
        try:
            whole = read_slot_record(self.spool, run, slot).rec or {}
        except (OSError, BadFile):
            return end
        last, mine = whole.get("finished_at"), rec.get("finished_at")
        if end is None or not is_num(last) or not is_num(mine):
            return end
        return end - max(0.0, last - mine)


def _mtime(path: Any) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def bars(attempts: list[dict[str, Any]], rows: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    """What the chart draws: the attempts with a place on the file server's clock (see the module),
    and the chunks running now (from ``chunk_rows``), drawn up to ``now``, the file server's time."""
    out = [{"chunk": a["chunk"], "attempt": a["attempt"], "agent": a["agent"], "status": a["status"],
            "start": a["start"], "end": a["end"]}
           for a in attempts if a["agent"] and is_num(a["start"]) and is_num(a["end"])]
    done = {(b["chunk"], b["attempt"]) for b in out}
    for r in rows:
        if r["state"] == JobState.RUNNING and r["agent"] and (r["chunk"], r["attempt"]) not in done:
            since = now - r["seconds"] if is_num(r["seconds"]) else now
            out.append({"chunk": r["chunk"], "attempt": r["attempt"], "agent": r["agent"], "status": JobState.RUNNING,
                        "start": since, "end": now})
    return out


STEPS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200,
         86400, 172800, 604800)


def _tick(span: float, most: int = 8) -> float:
    return next((s for s in STEPS if span / s <= most), STEPS[-1] * (1 + int(span / (STEPS[-1] * most))))


def _label(s: float, step: float) -> str:
    return f"{s:.1f}s" if step < 1 else f"{s:g}s" if s < 60 else duration(s)


def gantt_svg(chart: list[dict[str, Any]], now: float | None = None, width: int = 1000,
              idle: tuple[str, ...] = ()) -> str:
    """The chart as one ``<svg>``: a row per agent (its busy share beside its name), a bar per
    attempt (green ok, red failed, blue running), gaps where the agent ran nothing of this run,
    a dashed line at ``now`` for a run still going; an empty row for each agent of ``idle``
    (live agents that ran nothing of a run still going)."""
    if not chart:
        return '<svg id="timeline" class="timeline" width="400" height="30"><text x="4" y="20" fill="#666">' \
               'no attempt has started yet</text></svg>'
    agents = sorted({b["agent"] for b in chart} | set(idle))
    t0 = min(b["start"] for b in chart)
    t1 = max(max(b["end"] for b in chart), t0 + 1e-3)
    left, top, row, bar = 200, 22, 20, 14
    plot = width - left - 12
    height = top + row * len(agents) + 6
    x = lambda t: left + (t - t0) / (t1 - t0) * plot  # noqa: E731
    parts = [f'<svg id="timeline" class="timeline" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" font-size="11" font-family="system-ui,sans-serif">']
    step = _tick(t1 - t0)
    k = 0
    while k * step <= t1 - t0 + 1e-9:
        xx = x(t0 + k * step)
        parts.append(f'<line x1="{xx:.1f}" y1="{top - 4}" x2="{xx:.1f}" y2="{height - 4}" stroke="#e4e4e4"/>'
                     f'<text x="{xx + 2:.1f}" y="{top - 8}" fill="#777">+{_label(k * step, step)}</text>')
        k += 1
    for i, agent in enumerate(agents):
        y = top + i * row
        name = printable(agent)  # an agent id from a result file: shown, never acted on
        mine = [b for b in chart if b["agent"] == agent]
        busy = sum(b["end"] - b["start"] for b in mine) / (t1 - t0)
        parts.append(f'<rect x="0" y="{y}" width="{width}" height="{row}" fill="{"#f7f7f7" if i % 2 else "#fff"}"/>'
                     f'<text x="4" y="{y + 14}" fill="#222">{html.escape(name[:24])}'
                     f'<tspan fill="#777"> {100 * min(busy, 1):.0f}% busy</tspan></text>')
        for b in mine:
            x0 = x(b["start"])
            w = max(1.0, x(b["end"]) - x0 - 0.5)  # a half-pixel gap keeps back-to-back chunks apart
            tip = (f"chunk {b['chunk']} attempt {b['attempt']}: {b['status']}, {b['end'] - b['start']:.2f} s "
                   f"on {name}")
            parts.append(f'<rect class="attempt {b["status"]}" data-chunk="{b["chunk"]}" x="{x0:.1f}" '
                         f'y="{y + (row - bar) / 2:.0f}" width="{w:.1f}" height="{bar}" '
                         f'fill="{COLORS.get(b["status"], "#9e9e9e")}"><title>{html.escape(tip)}</title></rect>')
    if now is not None and any(b["status"] == JobState.RUNNING for b in chart):
        parts.append(f'<line x1="{x(now):.1f}" y1="{top - 4}" x2="{x(now):.1f}" y2="{height}" stroke="#1e88e5" '
                     f'stroke-dasharray="3 3"/>')
    parts.append("</svg>")
    return "".join(parts)
