"""``python -m master status``: agents and runs of a spool, as a table or JSON."""
from __future__ import annotations

import os
import time
from typing import Any

from jobs.errors import BadFile
from jobs.mailbox import Mailbox
from jobs.paths import HISTORY_RE, RESULT_RE, Spool
from jobs.results import read_result
from master.liveness import Liveness
from master.runspec import RunSpec


def gather(spool: Spool, dead_after: float = 20.0, liveness: Liveness | None = None) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (what ``--json`` prints)."""
    live = liveness or Liveness(spool, dead_after)
    views = live.refresh()
    agents, queued, running = [], {}, {}
    for ident, v in sorted(views.items()):
        st = v.status
        try:
            jobs = Mailbox(spool, ident).read().jobs
        except (OSError, BadFile):
            jobs = []
        cur = st.get("current") if v.alive else None
        for j in jobs:
            is_running = cur is not None and (cur.get("run"), cur.get("chunk_id")) == (j.run, j.chunk_id)
            bucket = running if is_running else queued
            bucket[j.run] = bucket.get(j.run, 0) + 1
        gpu = st.get("gpu") or {}
        agents.append({
            "id": ident, "host": st.get("host"), "pid": st.get("pid"), "device": st.get("device"),
            "gpu_index": st.get("gpu_index"), "gpu_name": gpu.get("name"),
            "state": st.get("state") if v.alive else ("stopped" if st.get("state") == "stopped" else "dead"),
            "alive": v.alive, "queued": len(jobs),
            "current": cur, "current_for_s": round(time.time() - cur["since"], 1) if cur and cur.get("since") else None,
            "jobs_done": st.get("jobs_done"), "jobs_failed": st.get("jobs_failed"),
            "heartbeat_age_s": round(v.age, 1),
            "gpu_util": gpu.get("util"), "gpu_mem_used": gpu.get("mem_used"), "gpu_mem_total": gpu.get("mem_total"),
            "gpu_temp": gpu.get("temp"),
        })
    runs = [run_counts(spool, name, queued.get(name, 0), running.get(name, 0)) for name in spool.run_names()]
    return {"base": str(spool.base), "time": time.time(), "agents": agents, "runs": [r for r in runs if r]}


def run_counts(spool: Spool, name: str, queued: int, running: int) -> dict[str, Any] | None:
    try:
        spec = RunSpec.load(spool.run_spec(name))
    except (OSError, BadFile):
        return None
    ok = failed = 0
    rdir = spool.result_dir(name)
    finals, with_history = [], set()
    for entry in os.listdir(rdir) if rdir.is_dir() else ():
        if m := RESULT_RE.match(entry):
            finals.append(int(m.group(1)))
        elif m := HISTORY_RE.match(entry):
            with_history.add(int(m.group(1)))
    for c in finals:
        if c not in with_history:  # never failed once: its final result can only be ok
            ok += 1
            continue
        try:
            ok += read_result(spool.result_json(name, c))["status"] == "ok"
            failed += read_result(spool.result_json(name, c))["status"] != "ok"
        except (OSError, BadFile):
            pass
    pending = max(0, spec.chunks - ok - failed - queued - running)
    return {"run": name, "kind": spec.kind.value, "target": spec.target, "chunks": spec.chunks, "ok": ok,
            "failed": failed, "running": running, "queued": queued, "pending": pending}


def _gb(n: Any) -> str:
    return "-" if n is None else f"{n / 1024**3:.1f}"


def render(data: dict[str, Any], color: bool = False) -> str:
    def paint(text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if color else text

    colors = {"idle": "32", "busy": "36", "dead": "31;1", "stopped": "33", "stopping": "33"}
    lines = [f"spool {data['base']}   {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(data['time']))}", ""]
    head = f"{'AGENT':<22} {'STATE':<9} {'CURRENT':<28} {'DONE':>6} {'FAIL':>5} {'Q':>3} {'HB':>6}  {'GPU':<18} {'UTIL':>5} {'MEM GB':>11} {'TEMP':>5}"
    lines.append(head)
    for a in data["agents"]:
        cur = a["current"]
        cur_s = f"{cur['run'][:16]}#{cur['chunk_id']} {a['current_for_s'] or 0:.0f}s" if cur else "-"
        mem = f"{_gb(a['gpu_mem_used'])}/{_gb(a['gpu_mem_total'])}" if a["gpu_mem_total"] else "-"
        gpu = (a["gpu_name"] or "-")[:18] if a["device"] != "cpu" else "cpu"
        state = f"{a['state']:<9}"
        lines.append(f"{a['id']:<22} {paint(state, colors.get(a['state'], '0'))} {cur_s:<28} {a['jobs_done'] or 0:>6} "
                     f"{a['jobs_failed'] or 0:>5} {a['queued']:>3} {a['heartbeat_age_s']:>5.1f}s  {gpu:<18} "
                     f"{'-' if a['gpu_util'] is None else str(a['gpu_util']) + '%':>5} {mem:>11} "
                     f"{'-' if a['gpu_temp'] is None else str(a['gpu_temp']) + 'C':>5}")
    if not data["agents"]:
        lines.append("(no agents yet: start some with ./start_agents.sh N BASE)")
    lines += ["", f"{'RUN':<32} {'CHUNKS':>7} {'OK':>7} {'FAILED':>7} {'RUNNING':>8} {'QUEUED':>7} {'PENDING':>8}"]
    for r in data["runs"]:
        failed = f"{r['failed']:>7}"
        lines.append(f"{r['run'][:32]:<32} {r['chunks']:>7} {r['ok']:>7} {paint(failed, '31') if r['failed'] else failed} "
                     f"{r['running']:>8} {r['queued']:>7} {r['pending']:>8}")
    if not data["runs"]:
        lines.append("(no runs yet)")
    return "\n".join(lines)
