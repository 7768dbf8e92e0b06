"""``python -m master dashboard``: a small status page that refreshes itself.

``/`` is one self-contained HTML page (no build step, no external CDN): the tables are
rendered on the server, so the page shows the status even without JavaScript, and a few
lines of script re-fetch ``/api/status`` (the same JSON as ``status --json``) every
``refresh`` seconds and redraw them. Bound to 127.0.0.1 unless told otherwise.

``/run/<run>`` is one run's page (timeline and chunk table, ``master.report.runpage``), linked from the
runs table; ``/run/<run>/chunk/<id>`` one chunk's report. The agents' GPU utilisation and memory
over the last hour are sampled from their heartbeats by this process (``master.report.gpuhistory``) and
drawn as sparklines under the agents table.

| URL | what |
| --- | --- |
| ``/``, ``/api/status``, ``/api/tables`` | the page, its JSON (``status --json``), its tables |
| ``/api/gpus`` | the sampled GPU figures, per agent |
| ``/run/<run>``, ``/api/run/<run>``, ``/run/<run>/fragment`` | a run's page, its JSON, its changing part |
| ``/run/<run>/chunk/<id>``, ``/api/run/<run>/chunk/<id>`` | a chunk's report (``logs --chunk``) |
"""
from __future__ import annotations

import html
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gpupool.jobs.invoked import spell
from gpupool.jobs.logsetup import logger

from gpupool.jobs.names import printable
from gpupool.jobs.paths import Spool
from gpupool.master.report import runpage
from gpupool.master.report.gpuhistory import SAMPLE_S, GpuHistory, Sampler, sparkline
from gpupool.master.core.liveness import DEAD
from gpupool.master.core.states import RunState
from gpupool.master.report.status import StatusReader, chunks_of, duration, eta_cell
from gpupool.master.report.timeline import AttemptReader

STYLE = """body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 .2em}h2{font-size:16px;margin:1.4em 0 .4em}.sub{color:#666}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0002}
th,td{padding:4px 10px;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
th{background:#f0f0f0}td.l,th.l{text-align:left}
.idle{color:#287d2a}.busy{color:#1565c0}.dead{color:#c62828;font-weight:bold}.draining{color:#8e24aa}
.stopped,.stopping{color:#b26a00}.bad{color:#c62828;font-weight:bold}
.bar{display:inline-block;width:120px;height:10px;background:#e0e0e0;vertical-align:middle}
.bar i{display:block;height:10px;background:#43a047}td.run a{color:inherit}
svg.spark{vertical-align:middle;margin-right:6px}"""

SCRIPT = """const REFRESH = %(refresh)d;
function esc(s){return String(s==null?'-':s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]))}
async function tick(){
  try{
    const r = await fetch('api/status', {cache:'no-store'});
    const d = await r.json();
    const h = await (await fetch('api/tables', {cache:'no-store'})).text();
    document.getElementById('tables').innerHTML = h;
    document.getElementById('when').textContent = new Date(d.time*1000).toLocaleString();
    document.body.dataset.live = '1';
    document.body.dataset.agents = d.agents.length;
    document.getElementById('err').textContent = '';
  }catch(e){document.getElementById('err').textContent = 'cannot reach the dashboard server: '+e;}
}
setInterval(tick, REFRESH*1000); tick();"""


def _gb(n: Any) -> str:
    return "-" if n is None else f"{n / 1024**3:.1f}"


def _td(value: Any, cls: str = "") -> str:
    """A cell: what a heartbeat or a result says (a host, a GPU name) with its control characters
    escaped (``jobs.names.printable``), then HTML-escaped."""
    return f'<td class="{cls}">{html.escape(printable("-" if value is None else value))}</td>'


def _agent_row(a: dict[str, Any]) -> str:
    cur = a["current"]
    cur_s = f"{cur['run']} #{chunks_of(cur)} for {duration(a['current_for_s'])}" if cur else "-"
    mem = f"{_gb(a['gpu_mem_used'])} / {_gb(a['gpu_mem_total'])} GB" if a["gpu_mem_total"] else "-"
    gpu = "cpu" if a["device"] == "cpu" else a["gpu_name"]
    state = "DEAD" if a["state"] == DEAD else a["state"]
    cells = [_td(a["id"], "l agent"), _td(a["host"], "l"), _td(state, f"l {a['state']}"), _td(cur_s, "l"),
             _td(a["jobs_done"]), _td(a["jobs_failed"]), _td(a["queued"]), _td(f"{a['heartbeat_age_s']:.1f} s"),
             _td(gpu, "l"), _td(None if a["gpu_util"] is None else f"{a['gpu_util']}%"), _td(mem),
             _td(None if a["gpu_temp"] is None else f"{a['gpu_temp']} C")]
    return "<tr>" + "".join(cells) + "</tr>"


def _run_row(r: dict[str, Any], p: dict[str, Any]) -> str:
    pct = 100.0 * (r["ok"] + r["failed"]) / r["chunks"] if r["chunks"] else 0.0
    state = RunState(r["state"])  # master.core.states: a run nothing feeds says why, and has no ETA
    said = "" if state.fed or state is RunState.DONE else f" {html.escape(state.label)}"
    bar = f'<td class="l"><span class="bar"><i style="width:{pct:.0f}%"></i></span> {pct:.0f}%{said}</td>'
    eta = eta_cell(r, p)
    link = f'<td class="l run"><a href="/run/{r["run"]}">{r["run"]}</a></td>'  # a run name is URL- and HTML-safe
    cells = [link, _td(r["kind"], "l"), bar, _td(r["chunks"]), _td(r["ok"]), _td(r["failed"], "bad" if r["failed"] else ""),
             _td(r["running"]), _td(r["queued"]), _td(r["pending"]), _td(p.get("chunks_per_s")), _td(eta)]
    return "<tr>" + "".join(cells) + "</tr>"


def gpu_table(history: GpuHistory | None, now: float) -> str:
    """Each agent's GPU utilisation and memory since the oldest sample kept (at most the last hour)."""
    series = history.series(now) if history is not None else {}
    if not series:
        return ""
    t0 = min(s[0][0] for s in series.values())
    gap = max(3 * history.every, 10.0)  # a line breaks where an agent was dead (it is sampled only alive)
    rows = []
    for agent, s in sorted(series.items()):
        _, util, used, total = s[-1]
        top = max((p[3] for p in s if p[3]), default=0)
        util_line = sparkline([(p[0], p[1]) for p in s], t0, now, 100, "#1565c0", gap)
        mem_line = sparkline([(p[0], p[2]) for p in s], t0, now, top, "#8e24aa", gap)
        rows.append(f'<tr class="gpu">{_td(agent, "l agent")}<td class="l">{util_line}'
                    f'{"-" if util is None else f"{util:.0f}%"}</td><td class="l">{mem_line}'
                    f'{_gb(used)} / {_gb(total)} GB</td></tr>')
    return (f'<h2>GPUs (last {duration(now - t0)}, a sample every {history.every:g} s)</h2><table id="gpus">'
            f'<tr><th class="l">agent</th><th class="l">utilisation</th><th class="l">memory</th></tr>'
            f'{"".join(rows)}</table>')


def tables(data: dict[str, Any], history: GpuHistory | None = None) -> str:
    """The agents, GPUs and runs tables as an HTML fragment."""
    ah = ["agent", "host", "state", "current chunk", "done", "failed", "queued", "heartbeat", "GPU", "util",
          "memory", "temp"]
    rh = ["run", "kind", "progress", "chunks", "ok", "failed", "running", "queued", "pending", "chunks/s", "ETA"]

    def head(names: list[str], left: int) -> str:
        return "<tr>" + "".join(f'<th class="{"l" if i < left else ""}">{n}</th>' for i, n in enumerate(names)) + "</tr>"

    agents = "".join(_agent_row(a) for a in data["agents"]) or \
        f'<tr><td class="l" colspan="{len(ah)}">no agents yet: start some with {html.escape(spell("agents"))} N BASE</td></tr>'
    prog = data.get("run_progress", {})
    runs = "".join(_run_row(r, prog.get(r["run"], {})) for r in data["runs"]) or \
        f'<tr><td class="l" colspan="{len(rh)}">no runs yet</td></tr>'
    return (f'<h2>Agents ({len(data["agents"])})</h2><table id="agents">{head(ah, 4)}{agents}</table>'
            f'{gpu_table(history, data["time"])}'
            f'<h2>Runs ({len(data["runs"])})</h2><table id="runs">{head(rh, 3)}{runs}</table>')


def page(data: dict[str, Any], refresh: float, history: GpuHistory | None = None) -> str:
    """The whole page, with the current tables already in it."""
    base = html.escape(data["base"])
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>gpupool: {base}</title>'
            f'<style>{STYLE}</style></head><body><h1>gpupool</h1>'
            f'<div class="sub">spool {base} &middot; updated <span id="when">now</span> &middot; '
            f'every {refresh:g} s &middot; <a href="api/status">JSON</a> <span id="err" class="bad"></span></div>'
            f'<div id="tables">{tables(data, history)}</div>'
            f'<script>{SCRIPT % {"refresh": max(1, round(refresh))}}</script></body></html>')


class _Handler(BaseHTTPRequestHandler):
    reader: StatusReader
    attempts: AttemptReader
    history: GpuHistory
    refresh: float

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        try:
            self._get()
        except (BrokenPipeError, ConnectionResetError):
            pass
        except runpage.NotFound as e:
            self._send(404, "text/plain; charset=utf-8", f"not found: {e}\n")
        except Exception as e:  # the spool is untrusted: answer with what went wrong, serve on
            logger.exception("dashboard: {} failed", self.path)
            self._send(500, "text/plain", f"error reading the spool: {type(e).__name__}: {e}\n")

    def _get(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/api/status":
            self._send(200, "application/json", json.dumps(self.reader.gather(), allow_nan=False))
        elif path == "/api/tables":
            self._send(200, "text/html; charset=utf-8", tables(self.reader.gather(), self.history))
        elif path == "/api/gpus":
            self._send(200, "application/json", json.dumps(self.history.to_json(time.time()), allow_nan=False))
        elif path in ("/", "/index.html"):
            self._send(200, "text/html; charset=utf-8", page(self.reader.gather(), self.refresh, self.history))
        elif path.startswith(("/run/", "/api/run/")):
            self._run(path)
        else:
            self._send(404, "text/plain", "not found: try /, /run/<run> or /api/status\n")

    def _run(self, path: str) -> None:
        """``/run/<run>[/fragment|/chunk/<id>]`` and their ``/api/`` JSON."""
        api = path.startswith("/api/")
        parts = path.split("/")[3 if api else 2:]
        spool = self.reader.spool
        if not parts or not parts[0] or len(parts) > 3 or (len(parts) == 2 and parts[1] not in ("", "fragment")) \
                or (len(parts) == 3 and parts[1] != "chunk"):
            raise runpage.NotFound(f"{path}: a run's pages are /run/<run>, /run/<run>/chunk/<id> (JSON under /api)")
        run, spec = runpage.run_of(spool, parts[0])
        if len(parts) == 3:
            rep = runpage.chunk_data(spool, run, runpage.chunk_of(spec, parts[2]))
            self._send(200, *(("application/json", json.dumps(rep, allow_nan=False, default=str)) if api else
                              ("text/html; charset=utf-8", runpage.chunk_page(rep, STYLE, str(spool.base)))))
            return
        data = runpage.run_data(spool, self.attempts, run, spec, self.reader.dead_after)
        if api:
            self._send(200, "application/json", json.dumps(data, allow_nan=False))
        elif parts[1:] == ["fragment"]:
            self._send(200, "text/html; charset=utf-8", runpage.fragment(data))
        else:
            self._send(200, "text/html; charset=utf-8", runpage.page(data, self.refresh, STYLE))

    def _send(self, code: int, ctype: str, body: str) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt: str, *args: Any) -> None:
        pass  # one line per request every few seconds would drown the terminal


def make_server(spool: Spool, host: str = "127.0.0.1", port: int = 8473, refresh: float = 2.0,
                dead_after: float = 20.0, sample: float = SAMPLE_S) -> ThreadingHTTPServer:
    """A dashboard server for ``spool`` (not yet serving: call ``serve_forever``), and the thread
    that samples the agents' GPU figures every ``sample`` seconds (already running)."""
    history = GpuHistory(every=sample)
    handler = type("Handler", (_Handler,), {"reader": StatusReader(spool, dead_after), "refresh": refresh,
                                            "attempts": AttemptReader(spool), "history": history})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    server.sampler = Sampler(spool, history, sample, dead_after).start()  # type: ignore[attr-defined]
    return server


def serve(spool: Spool, host: str, port: int, refresh: float = 2.0, dead_after: float = 20.0,
          sample: float = SAMPLE_S) -> None:
    """Serve until Ctrl-C, printing the address first."""
    server = make_server(spool, host, port, refresh, dead_after, sample)
    h, p = server.server_address[:2]
    print(f"dashboard of {spool.base} at http://{h}:{p}/  (JSON at /api/status; Ctrl-C stops)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print("warning: bound to a network address; anyone who can reach it sees your runs", file=sys.stderr)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.sampler.stop()  # type: ignore[attr-defined]
        server.server_close()
