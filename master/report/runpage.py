"""The dashboard's page of one run (``/run/<run>``) and of one chunk (``/run/<run>/chunk/<id>``).

The run page shows the run's timeline (``master.report.timeline``: a bar per attempt, a row per agent)
and its chunk table, the rows of ``python -m master status --run R`` (``master.report.status.chunk_rows``),
each failure's traceback a click away. The chunk page is ``python -m master logs --run R --chunk C``
(``master.report.logs.chunk_report``). Run and chunk names come from the URL: they are checked by
``jobs.names`` and must name an existing run and one of its chunks, or the page is a 404 saying why.
"""
from __future__ import annotations

import html
import time
import urllib.parse
from collections import Counter
from typing import Any

from gpupool.jobs.atomic import server_now
from gpupool.jobs.descriptor import JobState
from gpupool.jobs.errors import BadName
from gpupool.jobs.names import check_chunk, check_name, printable
from gpupool.jobs.paths import Spool
from gpupool.master.core.liveness import Liveness
from gpupool.master.report.logs import chunk_report, format_chunk
from gpupool.master.spec.runspec import RunSpec, UsageError, load_run
from gpupool.master.core.states import RunState, state_of_run
from gpupool.master.report.status import chunk_rows, duration
from gpupool.master.report.timeline import AttemptReader, bars, gantt_svg
from gpupool.jobs.words import plural


class NotFound(Exception):
    """A URL that names no run or chunk of this spool: the 404's text."""


def run_of(spool: Spool, quoted: str) -> tuple[str, RunSpec]:
    """The run a URL path segment names, with its spec; NotFound says what is wrong with it."""
    name = urllib.parse.unquote(quoted)
    try:
        check_name(name, "run name")
        return name, load_run(spool, name)
    except (BadName, UsageError) as e:
        raise NotFound(str(e)) from None


def chunk_of(spec: RunSpec, quoted: str) -> int:
    text = urllib.parse.unquote(quoted)
    try:
        if not (text.isascii() and text.isdigit()) or len(text) > 10:
            raise BadName(f"chunk id {text[:40]!r} is not a chunk number")
        return check_chunk(int(text), spec.chunks)
    except BadName as e:
        raise NotFound(f"run {spec.name}: {e}") from None


def run_data(spool: Spool, reader: AttemptReader, run: str, spec: RunSpec, dead_after: float) -> dict[str, Any]:
    """What the run page shows, as plain data (``/api/run/<run>``)."""
    rows = chunk_rows(spool, run, dead_after)
    now = server_now(spool.results_dir) or time.time()  # the clock of the result files' mtimes (master.report.timeline)
    attempts = reader.attempts(run)
    n = Counter(JobState(r["state"]) for r in rows)  # each row's state is master.core.states.chunk_state's
    shown = (JobState.OK, JobState.FAILED, JobState.RUNNING, JobState.QUEUED, JobState.PENDING)
    counts = {s.value: n[s] for s in shown} | ({JobState.CANCELLED.value: n[JobState.CANCELLED]}
                                               if n[JobState.CANCELLED] else {})
    failures = {}  # chunk -> its newest failed attempt's error (type, message, traceback)
    for a in attempts:
        if a["status"] == JobState.FAILED and a["error"]:
            failures[a["chunk"]] = a["error"]
    done = n[JobState.OK] + n[JobState.FAILED] == spec.chunks
    state = state_of_run(spool, run, spec.chunks, n, spec.waits_for)
    chart = bars(attempts, rows, now)
    drawn = {b["agent"] for b in chart}
    idle = () if done else tuple(sorted(a for a, v in Liveness(spool, dead_after).refresh().items()
                                        if v.accepting and a not in drawn))
    return {"run": run, "kind": spec.kind.value, "target": spec.target, "chunks": spec.chunks, "time": now,
            "state": state.value, "counts": counts, "done": done, "rows": rows, "bars": chart, "idle_agents": idle,
            "failures": failures}


STYLE = """.timeline{background:#fff;box-shadow:0 1px 2px #0002;margin:.4em 0}
.legend i{display:inline-block;width:12px;height:10px;margin:0 4px 0 12px;vertical-align:middle}
td.ok{color:#287d2a}td.failed{color:#c62828;font-weight:bold}td.running{color:#1565c0}td.queued{color:#8e24aa}
td.err{text-align:left;white-space:normal;max-width:40em}details pre{font-size:12px;background:#f4f4f4;
padding:6px;overflow:auto;max-height:30em;white-space:pre}pre.report{background:#fff;padding:10px;
box-shadow:0 1px 2px #0002;white-space:pre-wrap}"""

SCRIPT = """const REFRESH = %(refresh)d;
async function tick(){  // the next one is due only once this one is drawn: a big run's page takes a while
  if (document.body.dataset.done === '1') return;
  try{
    const r = await fetch(location.pathname.replace(/\\/$/, '') + '/fragment', {cache:'no-store'});
    if (!r.ok) throw new Error(await r.text());
    const open = [...document.querySelectorAll('details[open]')].map(d => d.id);
    const box = document.getElementById('live');
    box.innerHTML = await r.text();
    open.forEach(id => { const d = document.getElementById(id); if (d) d.open = true; });
    document.body.dataset.done = box.firstElementChild.dataset.done;
    document.body.dataset.live = '1';
    document.getElementById('err').textContent = '';
  }catch(e){document.getElementById('err').textContent = 'cannot reach the dashboard server: '+e;}
  setTimeout(tick, REFRESH*1000);
}
setTimeout(tick, REFRESH*1000);"""


def _td(value: Any, cls: str = "") -> str:
    return f'<td class="{cls}">{html.escape(printable("-" if value is None else value))}</td>'


def _row(run: str, r: dict[str, Any], failure: dict[str, Any] | None) -> str:
    """A chunk's row; what a job wrote (its error, its traceback) has its control characters escaped
    (``jobs.names.printable``), then HTML-escaped."""
    err = html.escape(printable(r["error"] or ""))
    if failure is not None:
        tb = failure["traceback"] or failure["message"] or "(no traceback)"
        err = (f'<details id="tb{r["chunk"]}"><summary>{err or html.escape(printable(failure["type"]))}</summary>'
               f'<pre>{html.escape(printable(tb, lines=True))}</pre>'
               f'<a href="/run/{run}/chunk/{r["chunk"]}">everything about chunk {r["chunk"]}</a></details>')
    link = f'<td><a href="/run/{run}/chunk/{r["chunk"]}">{r["chunk"]}</a></td>'
    secs = duration(r["seconds"]) if isinstance(r["seconds"], (int, float)) else None
    return (f'<tr class="chunk {r["state"]}">{link}{_td(r["state"], "l " + r["state"])}{_td(r["agent"], "l")}'
            f'{_td(r["attempt"])}{_td(secs)}<td class="err">{err}</td></tr>')


def fragment(d: dict[str, Any]) -> str:
    """The parts of the run page that change: counts, timeline, chunk table."""
    run = d["run"]  # checked by check_name: safe in a URL and in HTML
    c = d["counts"]
    summary = " &middot; ".join(f"{c[s]} {s}" for s in c if c[s]) or "no chunks"
    if d.get("state") not in (None, RunState.FEEDING, RunState.DONE):
        summary += f" &middot; run {RunState(d['state']).label}"  # master.core.states: why nothing more runs
    legend = "".join(f'<i style="background:{col}"></i>{name}'
                     for name, col in (("ok", "#43a047"), ("failed", "#e53935"), ("running", "#1e88e5")))
    head = "".join(f'<th class="{"l" if n in ("state", "agent", "last error") else ""}">{n}</th>'
                   for n in ("chunk", "state", "agent", "attempt", "time", "last error"))
    rows = "".join(_row(run, r, d["failures"].get(r["chunk"]) if r["state"] != JobState.OK else None) for r in d["rows"])
    return (f'<div data-done="{int(d["done"])}"><div class="sub">{plural(d["chunks"], "chunk")}: {summary}</div>'
            f'<h2>Timeline</h2><div class="legend sub">one row per agent, one bar per attempt:{legend}'
            f' (gaps: the agent ran nothing of this run)</div>{gantt_svg(d["bars"], d["time"], idle=d["idle_agents"])}'
            f'<h2>Chunks</h2><table id="chunks">{head}{rows}</table></div>')


def page(d: dict[str, Any], refresh: float, style: str) -> str:
    run = d["run"]
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>gpupool: {run}</title>'
            f'<style>{style}{STYLE}</style></head><body data-done="{int(d["done"])}"><h1>run {run}</h1>'
            f'<div class="sub"><a href="/">all agents and runs</a> &middot; {html.escape(d["kind"])} '
            f'{html.escape(d["target"])} &middot; <a href="/api/run/{run}">JSON</a> '
            f'<span id="err" class="bad"></span></div><div id="live">{fragment(d)}</div>'
            f'<script>{SCRIPT % {"refresh": max(1, round(refresh))}}</script></body></html>')


def chunk_data(spool: Spool, run: str, chunk: int) -> dict[str, Any]:
    """``/api/run/<run>/chunk/<id>``: what ``logs --run R --chunk C --json`` would say."""
    return chunk_report(spool, run, chunk)


def chunk_page(rep: dict[str, Any], style: str, base: str) -> str:
    run, chunk = rep["run"], rep["chunk_id"]
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>gpupool: {run} chunk {chunk}</title>'
            f'<style>{style}{STYLE}</style></head><body><h1>run {run}, chunk {chunk}</h1>'
            f'<div class="sub"><a href="/run/{run}">the run</a> &middot; <a href="/">all agents and runs</a> '
            f'&middot; <a href="/api/run/{run}/chunk/{chunk}">JSON</a> &middot; in a terminal: '
            f'<code>python -m master logs --base {html.escape(base)} --run {run} --chunk {chunk}</code></div>'
            f'<pre class="report">{html.escape(format_chunk(rep))}</pre></body></html>')
