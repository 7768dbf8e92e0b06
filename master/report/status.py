"""``python -m master status``: agents and runs of a spool, as a table or JSON.

``gather()`` builds plain data (what ``--json`` prints and the dashboard serves at
``/api/status``); ``render()`` turns it into the terminal table. A ``StatusReader`` keeps
what it has already read between refreshes (``--watch``, the dashboard): committed results
never change, so each result file is read once.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from gpupool.jobs.atomic import server_now
from gpupool.jobs.descriptor import JobState
from gpupool.jobs.errors import BadFile
from gpupool.jobs.heartbeat import AgentState, JobRef
from gpupool.jobs.invoked import spell
from gpupool.jobs.jsonio import is_int, is_num
from gpupool.jobs.owners import agent_owner, me, run_owner
from gpupool.jobs.names import printable
from gpupool.jobs.paths import Spool
from gpupool.jobs.words import plural
from gpupool.jobs.results import attempt_record, chunk_results, final_status, read_hook, scan_run
from gpupool.master.core import allocs
from gpupool.master.core.liveness import DEAD, Liveness
from gpupool.master.spec.placement import combined, gpu_count, gpu_ids, gpus_of
from gpupool.master.spec.runspec import RunSpec
from gpupool.master.core.states import (AtAgents, RunState, chunk_state, holdings, master_feeds, read_marks,
                                   run_state)

RATE_WINDOW_S = 120.0  # chunks/s is measured over the results finished in this last stretch


@dataclass
class _RunCache:
    """What is known of one run's committed results: chunk -> (status, finished_at)."""

    finals: dict[int, tuple[str, float | None]] = field(default_factory=dict)


class StatusReader:
    """Gathers the status of a spool again and again, reading each result file once."""

    def __init__(self, spool: Spool, dead_after: float = 20.0) -> None:
        self.spool, self.dead_after = spool, dead_after
        self.liveness = Liveness(spool, dead_after)
        self._runs: dict[str, _RunCache] = {}
        self._lock = threading.Lock()  # the dashboard serves several requests at once
        self._now = time.time()

    def gather(self) -> dict[str, Any]:
        """Everything ``status`` shows, as plain data (what ``--json`` prints)."""
        with self._lock:
            # now as the file server stamps it: result mtimes are its clock, not this host's
            self._now = server_now(self.spool.results_dir) or time.time()
            agents, at = self._agents()
            runs, progress = [], {}
            for name in self.spool.run_names():
                got = self._run(name, at)
                if got is not None:
                    runs.append(got[0])
                    progress[name] = got[1]
            busy = sum(r["running"] for r in runs)
            for r in runs:  # the run's part of the agents busy now (fair share: see agent/fairshare.py)
                r["busy_pct"] = round(100 * r["running"] / busy, 1) if busy and r["running"] else None
            # Rates and ETAs sit beside the run rows, whose keys scripts already rely on.
            return {"base": str(self.spool.base), "time": time.time(), "agents": agents, "runs": runs,
                    "run_progress": progress,  # and the Slurm allocator's jobs (master.core.allocs), if any
                    "allocations": allocs.shown(allocs.load_all(self.spool), time.time())}

    def _agents(self) -> tuple[list[dict[str, Any]], AtAgents]:
        views = self.liveness.refresh()
        held = holdings(self.spool, views)  # master.core.states: what each agent holds, read once
        # how long a job has run: its agent's own measure plus its heartbeat's age, by the file server's clock
        hb_now = server_now(self.spool.agents_dir) if any(v.status.current for v in views.values()) else None
        agents = []
        for ident, h in held.items():
            agents.append(_agent_row(ident, h.view, h.running, h.running_for(hb_now, self._now), len(h.jobs),
                                     self.spool.drain_flag(ident).exists(),
                                     len(h.running_chunks) if h.running_batch and h.running_chunks else None))
        return agents, AtAgents.of(held)

    def _run(self, name: str, at: AtAgents) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(the run's row, its progress: chunks/s from results' finished_at, ETA, cancelled)."""
        try:
            spec = RunSpec.load(self.spool.run_spec(name))
        except (OSError, BadFile):
            return None
        finals = self._finals(name)
        marks = read_marks(self.spool, name, spec.waits_for)
        n = at.counts(name, spec.chunks, {c: s for c, (s, _) in finals.items()}, marks.cancelled)
        state = run_state(spec.chunks, n, marks, lambda: master_feeds(self.spool, name))
        ok, failed = n[JobState.OK], n[JobState.FAILED]
        rate = chunk_rate([t for _, t in finals.values() if t is not None], self._now)
        left = spec.chunks - ok - failed
        row = {"run": name, "kind": spec.kind.value, "target": spec.target, "chunks": spec.chunks, "ok": ok,
               "failed": failed, "running": n[JobState.RUNNING], "queued": n[JobState.QUEUED],
               "pending": n[JobState.PENDING] + n[JobState.CANCELLED],  # no result, at no agent
               "share": spec.share, "state": state.value}
        owner = run_owner(self.spool, name)  # jobs.owners: who submitted it (None: unknown)
        row.update(owner=owner.user, owner_uid=owner.uid)
        if spec.waits_for:  # --after: the runs it still waits for (master.core.after)
            row["after"] = list(marks.after)
        if spec.on_done is not None:  # master.hooks: claimed (started) and, once it ended, its exit code
            hook = read_hook(self.spool, name)
            row["on_done"] = None if hook is None else {k: hook.get(k) for k in ("status", "exit_code", "started_at",
                                                                               "ended_at")}
        newest = _last_activity(self.spool, name, [t for _, t in finals.values() if t is not None])
        return row, {"cancelled": self.spool.cancel_flag(name).exists(), "done": left == 0,
                     "chunks_per_s": None if rate is None else round(rate, 3),
                     "eta_s": round(left / rate, 1) if rate and left and state is RunState.FEEDING else None,
                     "sealed": marks.seal is not None,
                     "idle_s": None if newest is None else round(max(0.0, self._now - newest), 1)}

    def _finals(self, name: str) -> dict[int, tuple[str, float | None]]:
        """chunk -> (status, commit time) of every committed result, reading only new files that
        may be failures (``jobs.results.final_status``); the commit time is the file's mtime."""
        cache = self._runs.setdefault(name, _RunCache())
        scan = scan_run(self.spool, name)
        for c, (status, _) in list(cache.finals.items()):
            if c not in scan.finals or status != JobState.OK:  # a failed result may be reopened and redone: reread
                del cache.finals[c]
        for c in scan.finals.keys() - cache.finals.keys():
            status = final_status(self.spool, name, c, scan)
            if status is not None:
                cache.finals[c] = (status, scan.finals[c])
        return cache.finals


def _last_activity(spool: Spool, run: str, finished: list[float]) -> float | None:
    """When the run last changed, by the file server's clock: the newest of its results' commit
    times, the mtimes of its folders (a file made, renamed or removed in them: a result, a failed
    attempt, a chunk log) and of the files of ``runs/<run>`` (run.json, cancel, sealed, ...)."""
    stamps = list(finished)
    for folder in (spool.run_dir(run), spool.result_dir(run), spool.run_log_dir(run)):
        with contextlib.suppress(OSError):
            stamps.append(os.lstat(folder).st_mtime)
    with contextlib.suppress(OSError):
        for e in os.scandir(spool.run_dir(run)):
            with contextlib.suppress(OSError):
                stamps.append(e.stat(follow_symlinks=False).st_mtime)
    return max(stamps) if stamps else None


RECENT_S = 24 * 3600.0  # status shows, besides the active runs, those that changed in this last stretch


def shown_runs(spool: Spool, data: dict[str, Any], recent_s: float = RECENT_S) -> dict[str, Any]:
    """``data`` (``gather()``'s) with only the runs ``status`` shows by default: the active ones
    (jobs queued or running at agents, or, for a run neither sealed nor cancelled, a master that
    holds its lock) and the recent ones (changed within ``recent_s``, by the file server's clock:
    ``idle_s``). The others are counted in ``runs_hidden``; ``runs_hidden_unfinished``: how many
    of them have chunks without a result (``python -m master runs`` lists every run)."""
    progress = data.get("run_progress", {})
    keep, hidden, unfinished = [], 0, 0
    for r in data["runs"]:
        p = progress.get(r["run"], {})
        idle = p.get("idle_s")
        if r["queued"] or r["running"] or (idle is not None and idle <= recent_s):
            keep.append(r)
        elif RunState(r["state"]).fed or r["state"] == RunState.AFTER:
            keep.append(r)  # fed by a master that waits (for agents, for a retry's back-off)
        else:
            hidden += 1
            unfinished += not p.get("done")
    names = {r["run"] for r in keep}
    return {**data, "runs": keep, "run_progress": {k: v for k, v in progress.items() if k in names},
            "runs_hidden": hidden, "runs_hidden_unfinished": unfinished}


def _agent_row(ident: str, v: Any, ref: JobRef | None, took: float | None, queued: int, drain_flag: bool,
               batch: int | None = None) -> dict[str, Any]:
    st = v.status  # checked field by field by jobs.heartbeat.read_status
    gpus = gpus_of(st)
    gpu = combined(gpus)
    cur = ref.to_dict() if ref is not None else None
    if cur is not None and batch is not None:  # a batch of chunks chunk_id .. chunk_id + batch - 1 (jobs.batches)
        cur["batch"] = batch
    state = v.seen
    return {
        "id": ident, "host": st.host, "pid": st.pid, "device": st.device,
        "gpu_index": st.gpu_index, "gpu_name": gpu.get("name"), "state": state,
        "alive": v.alive, "drain_flag": drain_flag, "queued": queued, "current": cur,
        "current_for_s": took if cur else None,  # see AgentView.running_for: never two hosts' clocks
        "jobs_done": st.jobs_done, "jobs_failed": st.jobs_failed,
        "heartbeat_age_s": round(v.age, 1), "gpu_util": gpu.get("util"), "gpu_mem_used": gpu.get("mem_used"),
        "gpu_mem_total": gpu.get("mem_total"), "gpu_temp": gpu.get("temp"), "log": st.log,
        "gpu_worker_mem": gpu.get("worker_mem"),  # what the agent's worker and jobs hold (NVML)
        "last_error": st.last_error,
        # docs/multigpu.md: its GPUs (each as the gpu_* fields sum them up), its slot of a shared GPU,
        # the memory its running job declared (--gpu-mem), and why its next job waits
        "gpus": gpu_count(st), "gpu_ids": gpu_ids(st),
        "gpu_list": gpus, "slot": st.slot, "slots": st.slots,
        "gpu_mem_reserved": st.gpu_mem_reserved, "waiting": st.waiting,
        "mps": st.mps,  # the CUDA_MPS_PIPE_DIRECTORY its jobs get, where MPS runs
        # docs/jobs.md, "Warm workers": each run's worker process here, the spare, and the thread
        # count of the math libraries each worker was given
        "workers": st.workers or [], "spare_pid": st.spare_pid, "worker_threads": st.worker_threads,
        **agent_owner(st).to_dict(),  # uid, user: whose agent it is (None: an agent of an earlier release)
    }


def chunk_rate(finished: list[float], now: float, window: float = RATE_WINDOW_S, least: int = 3) -> float | None:
    """Chunks per second: those finished in the last ``window`` seconds up to ``now``, over the
    time from the first of them to ``now`` (a run that has stopped finishing chunks slows down,
    instead of keeping the rate of its last burst). None with fewer than ``least`` of them."""
    recent = [t for t in finished if now - window <= t <= now + 1.0]
    if len(recent) < least:
        return None
    span = max(now, max(recent)) - min(recent)
    return len(recent) / span if span > 0 else None


CHUNK_STATES = tuple(s.value for s in (JobState.OK, JobState.FAILED, JobState.RUNNING, JobState.QUEUED,
                                        JobState.PENDING, JobState.CANCELLED))


def chunk_rows(spool: Spool, run: str, dead_after: float = 20.0, states: set[str] | None = None
               ) -> list[dict[str, Any]]:
    """One row per chunk of ``run`` (``status --run R``, like ``squeue``/``ts -l``): its state
    (``master.core.states.chunk_state``), the agent it is at or ran on, its attempt, how long it has run
    or took, its last error. Only the files a chunk's row needs are read (a failed attempt's
    history, a final result)."""
    spec = RunSpec.load(spool.run_spec(run))
    scan = scan_run(spool, run)
    held = holdings(spool, Liveness(spool, dead_after).refresh())
    at = AtAgents.of(held)
    running, where = at.running.get(run, {}), at.queued.get(run, {})
    cancelled = spool.cancel_flag(run).exists()
    # how long a chunk has run: its agent's own measure plus its heartbeat's age, by the file server's clock
    now, rows = server_now(spool.agents_dir) if running else None, []
    finals = {c: rec for c, rec in chunk_results(spool, run, range(spec.chunks), scan)  # own files and batches' slots
              if not isinstance(rec, Exception)}
    for c in range(spec.chunks):
        rec = finals.get(c)
        state = chunk_state(rec["status"] if rec is not None else None, c in running, c in where, cancelled)
        row: dict[str, Any] = {"chunk": c, "state": state.value, "agent": None,
                               "attempt": scan.last_attempt(c) or None, "seconds": None, "error": None}
        if rec is not None:
            row.update(agent=rec.get("agent"), attempt=rec.get("attempt"), seconds=rec.get("duration_s"),
                       error=_error_line(rec))
        elif state is JobState.RUNNING:
            h = held[running[c]]
            row.update(agent=running[c], attempt=h.running.attempt, seconds=h.running_for(now, now if now is not None else time.time()))
        elif state is JobState.QUEUED:
            row.update(agent=where[c][0], attempt=where[c][1])
        if row["error"] is None and state is not JobState.OK and scan.history.get(c):
            row["error"] = _error_line(attempt_record(spool, run, c, scan.history[c][-1], scan) or {})
        if states is None or row["state"] in states:
            rows.append(row)
    return rows


def _error_line(rec: dict[str, Any]) -> str | None:
    err = rec.get("error")
    if not isinstance(err, dict):
        return None
    return f"{err.get('type')}: {err.get('message')}".split("\n", 1)[0].rstrip("\r")[:200]  # shown by printable


def hook_line(spool: Spool, run: str) -> str | None:
    """What the run's --on-done hook did (``master.hooks``), for ``status --run``; None: no record."""
    hook = read_hook(spool, run)
    if hook is None:
        return None
    code = hook.get("exit_code")
    did = "started, no end recorded (its master stopped while it ran)" if "exit_code" not in hook else \
        f"exited with code {code}" if is_int(code) else f"could not start: {hook.get('error')}"
    return printable(f"on-done ({hook.get('status')}): {did}; its output: {spool.on_done_log(run)}")


def after_line(spool: Spool, run: str) -> str | None:
    """What the run waits for (--after: ``master.core.after``), for ``status --run``; None: nothing."""
    spec = RunSpec.load(spool.run_spec(run))
    marks = read_marks(spool, run, spec.waits_for)
    if not marks.after or marks.cancelled or marks.seal is not None:
        return None
    return f"run {run}: waits for run{'s' if len(marks.after) > 1 else ''} {', '.join(marks.after)} to end before its " \
        "chunks start (--after)"


def render_chunks(run: str, rows: list[dict[str, Any]]) -> str:
    """The chunk table as text."""
    lines = [f"run {run}: {plural(len(rows), 'chunk')}", f"{'CHUNK':>7} {'STATE':<8} {'AGENT':<22} {'ATTEMPT':>7} {'TIME':>9}  ERROR"]
    for r in rows:
        lines.append(f"{r['chunk']:>7} {r['state']:<8} {str(r['agent'] or '-'):<22.22} {str(r['attempt'] or '-'):>7} "
                     f"{duration(r['seconds']) if is_num(r['seconds']) else '-':>9}  {printable(r['error'] or '')}")
    return "\n".join(lines)


def gather(spool: Spool, dead_after: float = 20.0, liveness: Liveness | None = None) -> dict[str, Any]:
    """One-off status of ``spool`` (see ``StatusReader.gather``)."""
    reader = StatusReader(spool, dead_after)
    if liveness is not None:
        reader.liveness = liveness
    return reader.gather()


# rendering ------------------------------------------------------------------------------------
COLORS = {"idle": "32", "busy": "36", "dead": "31;1", "stopped": "33", "stopping": "33", "draining": "35"}


def _gb(n: Any) -> str:
    return "-" if n is None else f"{n / 1024**3:.1f}"


def duration(s: float | None) -> str:
    """The one way a duration is shown: ``0.4`` -> ``0.4s``, ``7.25`` -> ``7.2s`` (a tenth under 10 s,
    so short chunks never read ``0s``), ``42.6`` -> ``43s``, ``95`` -> ``1m35s``; None -> ``-``."""
    if s is None:
        return "-"
    if s < 9.95:
        return f"{max(0.0, s):.1f}s"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _paint(text: str, code: str, color: bool) -> str:
    return f"\033[{code}m{text}\033[0m" if color and code else text


def chunks_of(cur: dict[str, Any]) -> str:
    """The chunk an agent's current job runs (``7``), or the first and count of its batch (``16+2``)."""
    return f"{cur['chunk_id']}+{cur['batch']}" if cur.get("batch") else str(cur["chunk_id"])


def _agent_line(a: dict[str, Any], color: bool) -> str:
    cur = a["current"]
    cur_s = f"{cur['run'][:18]}#{chunks_of(cur)} {duration(a['current_for_s'])}" if cur else "-"
    mem = f"{_gb(a['gpu_mem_used'])}/{_gb(a['gpu_mem_total'])}" if a["gpu_mem_total"] else "-"
    gpu = printable(a["gpu_name"] or "-")[:18] if a["device"] != "cpu" else "cpu"
    label = "DEAD" if a["state"] == DEAD else a["state"]
    state = _paint(f"{label:<9}", COLORS.get(a["state"], ""), color)
    util = "-" if a["gpu_util"] is None else f"{a['gpu_util']}%"
    temp = "-" if a["gpu_temp"] is None else f"{a['gpu_temp']}C"
    worker = "-" if a.get("gpu_worker_mem") is None else _gb(a["gpu_worker_mem"])
    slot = f"{a['slot']}/{a['slots']}" if a.get("slot") is not None else "-"
    job_mem = _gb(a.get("gpu_mem_reserved"))
    hb = _paint(f"{a['heartbeat_age_s']:>5.1f}s", "31" if not a["alive"] else "", color)
    return (f"{a['id']:<22} {printable(a['host'] or '-')[:12]:<12} {state} {cur_s:<30} {a['jobs_done'] or 0:>5} "
            f"{a['jobs_failed'] or 0:>4} {a['queued']:>3} {hb}  {slot:>4} {gpu:<18} {util:>5} {mem:>11} {temp:>5} "
            f"{job_mem:>6} {worker:>6}")


def _run_line(r: dict[str, Any], p: dict[str, Any], color: bool) -> str:
    failed = _paint(f"{r['failed']:>6}", "31", color and r["failed"] > 0)
    rate = "-" if p.get("chunks_per_s") is None else f"{p['chunks_per_s']:.2f}"
    eta = eta_cell(r, p)
    share = f"{r.get('share', 1.0):g}" + (f" {r['busy_pct']:.0f}%" if r.get("busy_pct") is not None else "")
    return (f"{r['run'][:32]:<32} {(r.get('owner') or '-')[:10]:<10} {r['chunks']:>6} {r['ok']:>6} {failed} "
            f"{r['running']:>7} {r['queued']:>6} "
            f"{r['pending']:>7} {share:>9} {rate:>8} {eta:>13}")


def eta_cell(r: dict[str, Any], p: dict[str, Any]) -> str:
    """The ETA column: how long a run a master feeds has left, else its state (done, failed,
    cancelled, stopped early, interrupted, after the runs it waits for): it has no ETA."""
    state = RunState(r["state"])
    if state is RunState.AFTER:
        return f"after {','.join(r.get('after') or ())}"
    return duration(p.get("eta_s")) if state is RunState.FEEDING else state.label


def render(data: dict[str, Any], color: bool = False) -> str:
    """The status table as text (ANSI colours only when ``color``)."""
    lines = [f"spool {data['base']}   {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(data['time']))}", ""]
    lines.append(f"{'AGENT':<22} {'HOST':<12} {'STATE':<9} {'CURRENT':<30} {'DONE':>5} {'FAIL':>4} {'Q':>3} "
                 f"{'HB AGE':>6}  {'SLOT':>4} {'GPU':<18} {'UTIL':>5} {'MEM GB':>11} {'TEMP':>5} {'JOB GB':>6} "
                 f"{'WRK GB':>6}")
    lines += [_agent_line(a, color) for a in data["agents"]]
    if not data["agents"]:
        lines.append(f"(no agents yet: start some with {spell('agents')} N BASE)")
    dead = [a["id"] for a in data["agents"] if a["state"] == DEAD]
    if dead:
        lines.append(_paint(f"DEAD (no heartbeat): {', '.join(dead)}; their queued jobs go to other agents", "31",
                            color))
    for a in data["agents"]:  # why an agent drained itself (a failing GPU) or paused (a full disk)
        if a.get("last_error") and a["state"] != AgentState.STOPPED:
            lines.append(_paint(f"{a['id']} ({a['state']}): {printable(a['last_error'][:300])}", "33", color))
        if a.get("waiting") and a["alive"]:  # --gpu-mem not free: its next job waits
            lines.append(f"{a['id']} ({a['state']}): {printable(a['waiting'][:300])}")
    users = Counter(a.get("user") or "unknown" for a in data["agents"])  # whose agents: said when not only yours
    if any(u not in (me().user, "unknown") for u in users):
        lines.append("agents by user: " + ", ".join(f"{u} {n}" for u, n in sorted(users.items())))
    lines += ["", f"{'RUN':<32} {'OWNER':<10} {'CHUNKS':>6} {'OK':>6} {'FAILED':>6} {'RUNNING':>7} {'QUEUED':>6} "
                  f"{'PENDING':>7} {'SHARE':>9} {'CHUNK/S':>8} {'ETA':>13}"]
    lines += [_run_line(r, data.get("run_progress", {}).get(r["run"], {}), color) for r in data["runs"]]
    if not data["runs"]:
        lines.append("(no active or recent runs)" if data.get("runs_hidden") else "(no runs yet)")
    if data.get("runs_hidden"):  # status without --all: see shown_runs
        n, left = data["runs_hidden"], data.get("runs_hidden_unfinished", 0)
        lines.append(f"({plural(n, 'older run')} hidden{f', {left} of them unfinished' if left else ''}; "
                     "--all shows them)")
    if data.get("allocations"):  # python -m master alloc slurm: its jobs in flight and those ended today
        lines += ["", f"{'SLURM JOB':<12} {'STATE':<11} {'SUBMITTED':<9} AGENTS"]
        lines += [f"{printable(a['job'])[:12]:<12} {printable(a['state'] + (' (given back)' if a['cancelled'] else ''))[:24]:<11} "
                  f"{time.strftime('%H:%M:%S', time.localtime(a['submitted_at'] or 0)):<9} "
                  f"{printable(', '.join(a['agents'])) or '-'}" for a in data["allocations"]]
    return "\n".join(lines)
