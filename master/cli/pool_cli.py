"""``python -m master COMMAND``: the day-to-day commands, each a parser and a small function.

Exit codes: 0 done, 1 the thing asked about failed (failed chunks, an agent that did not
answer), 2 a usage or spool error (the message says what to do), 3 a lock held elsewhere.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

from gpupool.jobs.heartbeat import AgentState
from gpupool.jobs.invoked import prog as typed_as, respell, respell_parser
from gpupool.jobs.names import printable
from gpupool.jobs.paths import Spool
from gpupool.jobs.words import plural
from gpupool.master.cli import alloc_cli
from gpupool.master.core.liveness import GONE
from gpupool.master.cli.run_cli import progress_args, show_progress

PROG = "python -m master"
EXAMPLES = {
    "status": """examples:
  python -m master status --base /shared/base
  python -m master status --base /shared/base --watch      # refresh every 2 s, like watch nvidia-smi
  python -m master status --base /shared/base --json | jq '.runs'
  python -m master status --base /shared/base --run multiply-100-1a2b3c4d --state failed,running""",
    "logs": """examples:
  python -m master logs --base /shared/base                       # every agent's log, merged in time order
  python -m master logs --base /shared/base --agent myhost-gpu0 -f
  python -m master logs --base /shared/base --run multiply-100-1a2b3c4d --chunk 7   # one chunk's error""",
    "collect": """examples:
  python -m master collect --base /shared/base --run multiply-100-1a2b3c4d --out results.npz
  python -m master collect --base /shared/base --run R --out all.npz --concat     # join along axis 0
  python -m master collect --base /shared/base --run R --out table.csv            # JSON values, one row per chunk""",
    "retry": """examples:
  python -m master retry --base /shared/base --run multiply-100-1a2b3c4d
  python -m master retry --base /shared/base --run R --retries 0 --no-progress""",
    "gpus": """examples:
  python -m master gpus                     # on a GPU machine: which GPU is free, which agent holds which
  python -m master gpus --json""",
    "runs": """examples:
  python -m master runs --base /shared/base
  python -m master runs --base /shared/base --json | jq '.[] | select(.state == "done") | .run'""",
    "rm": """examples:
  python -m master rm --base /shared/base --run multiply-100-1a2b3c4d
  python -m master rm --base /shared/base --run old-run --force   # even while a master feeds it, or another user's""",
    "cancel": """examples:
  python -m master cancel --base /shared/base --run multiply-100-1a2b3c4d                  # queued work only
  python -m master cancel --base /shared/base --run R --stop-running                        # kill running chunks too
Undo: python -m master retry --base /shared/base --run R (or re-run the same main.py command).""",
    "drain": """examples:
  python -m master drain --base /shared/base myhost-gpu3              # finish the current chunk, take no more
  python -m master drain --base /shared/base myhost-gpu3 --wait-idle  # ... and wait until it is done
  python -m master undrain --base /shared/base myhost-gpu3""",
    "undrain": """examples:
  python -m master undrain --base /shared/base myhost-gpu3""",
    "save-config": """examples:
  python -m master save-config --script ./worker.py          # OctoRun's default config.json, as octorun save_config
  python main.py --octorun-config config.json                 # then run it""",
    "dashboard": """examples:
  python -m master dashboard --base /shared/base                 # http://127.0.0.1:8473/
  python -m master dashboard --base /shared/base --port 9000 --refresh 5
  ssh -L 8473:127.0.0.1:8473 gpuhost   # to look from your laptop; --host 0.0.0.0 exposes it to the network""",
}
TOP_EPILOG = """examples (one per command; python -m master COMMAND --help shows more):
  python -m master status    --base /tmp/b --watch
  python -m master logs      --base /tmp/b --run RUN --chunk 7
  python -m master collect   --base /tmp/b --run RUN --out results.npz
  python -m master retry     --base /tmp/b --run RUN
  python -m master cancel    --base /tmp/b --run RUN --stop-running
  python -m master runs      --base /tmp/b
  python -m master gpus
  python -m master rm        --base /tmp/b --run RUN
  python -m master drain     --base /tmp/b myhost-gpu3     (undrain to undo)
  python -m master dashboard --base /tmp/b --port 8473
  python -m master save-config --script worker.py   (OctoRun's default config.json)
  python -m master alloc slurm --base /tmp/b --max-jobs 2 --time 1:00:00 --idle-timeout 300"""


def _die(cmd: str, message: str, code: int = 2) -> int:
    print(f"{typed_as('master')} {cmd}: {respell(message, 'master')}", file=sys.stderr)
    return code


_LIMITS = {  # option: (smallest, whether the smallest is allowed, what it is)
    "dead_after": (0, False, "a positive number of seconds"), "watch": (0, False, "a positive number of seconds"),
    "refresh": (0, False, "a positive number of seconds"), "sample": (0, False, "a positive number of seconds"),
    "timeout": (0, True, "0 or a positive number of seconds"),
    "lines": (0, True, "0 (all) or a positive number"), "retries": (0, True, "0 or more"),
    "port": (0, True, "a TCP port, 0 to 65535")}


def _bad_number(args: argparse.Namespace) -> str | None:
    """The first numeric option out of its range (NaN and infinity included), named."""
    for name, (low, closed, what) in _LIMITS.items():
        v = getattr(args, name, None)
        if v is None:
            continue
        ok = (low <= v if closed else low < v) and v < (65536 if name == "port" else math.inf)
        if not ok:
            return f"--{name.replace('_', '-')} must be {what}, not {v:g}"
    return None


def _spool(args: argparse.Namespace) -> Spool:
    spool = Spool(args.base)
    if not spool.base.is_dir():
        raise FileNotFoundError(f"{spool.base} does not exist (no spool there yet: start agents with "
                                f"./start_agents.sh N {args.base})")
    if not spool.exists():
        raise FileNotFoundError(f"{spool.base} is not a spool (no agent or master has ever used it" + (
            spool.hint_below() or f"; a typo? agents make one: ./start_agents.sh N {args.base})"))
    return spool


# status ---------------------------------------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:

    from gpupool.master.control import ControlError
    from gpupool.master.spec.runspec import load_run
    from gpupool.master.report.status import (CHUNK_STATES, StatusReader, after_line, chunk_rows, hook_line, render,
                                                 render_chunks, shown_runs)

    spool = _spool(args)
    states = set(args.state.split(",")) if args.state else None
    if states and (bad := sorted(states - set(CHUNK_STATES))):
        raise ControlError(f"--state {','.join(bad)}: not one of {','.join(CHUNK_STATES)}")
    if states and not args.run:
        raise ControlError("--state lists chunks of one run: give --run R too")
    if args.run:
        load_run(spool, args.run)  # names a run that is not there
    reader = StatusReader(spool, args.dead_after)
    tty = sys.stdout.isatty()
    color = tty and not os.environ.get("NO_COLOR")
    while True:
        if args.run:  # one run's chunks, like squeue
            rows = chunk_rows(spool, args.run, args.dead_after, states)
            text = json.dumps(rows, indent=1) if args.json else render_chunks(args.run, rows)
            if not args.json and (hook := hook_line(spool, args.run)) is not None:
                text += "\n" + hook
            if not args.json and (after := after_line(spool, args.run)) is not None:  # --after: master.core.after
                text += "\n" + after
        else:
            data = reader.gather()
            if not args.all:  # active and recent runs only (master.report.status.shown_runs)
                data = shown_runs(spool, data)
            text = json.dumps(data, indent=1) if args.json else render(data, color)
        if args.watch and tty:  # redraw in place: home, each line cleared, the rest erased
            text = "\033[H" + text.replace("\n", "\033[K\n") + "\033[K\033[J"
        elif args.watch:
            text += "\n"
        print(text, flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


# logs -----------------------------------------------------------------------------------------
def cmd_logs(args: argparse.Namespace) -> int:
    from gpupool.master.report import logs

    spool = _spool(args)
    if args.chunk is not None:
        if args.run is None:
            return _die("logs", "--chunk needs --run RUN (see python -m master status for run names)")
        return _chunk_logs(spool, args)
    if args.agent is not None and args.agent not in spool.agent_ids():
        return _die("logs", f"no agent {args.agent!r} in {spool.base} (agents: {', '.join(spool.agent_ids()) or '-'})")
    match = logs.run_filter(args.run)
    if args.worker:
        if args.agent is None:
            return _die("logs", "--worker needs --agent ID (each agent has its own worker log)")
        paths_of: Callable[[], list[Path]] = lambda: [spool.worker_log(args.agent)]
        text = printable(_tail_text(spool.worker_log(args.agent), args.lines), lines=True)  # the job code's output
        print(text, end="" if text.endswith("\n") or not text else "\n", flush=True)
        return _follow(args, paths_of, lambda t: True)
    paths_of = lambda: logs.agent_logs(spool, args.agent)
    found = logs.merged(paths_of(), match)
    for e in found[-args.lines:] if args.lines else found:
        print(printable(e.text, lines=True))  # job errors in the agents' lines: no escape sequence reaches the terminal
    sys.stdout.flush()
    if not found and not args.follow:
        print(f"(no agent log lines{' about run ' + args.run if args.run else ''} in {spool.logs_dir})",
              file=sys.stderr)
    return _follow(args, paths_of, match)


def _tail_text(path: Path, lines: int) -> str:
    from gpupool.jobs.atomic import NotAFile, open_read
    from gpupool.jobs.errors import BadFile

    try:
        with open_read(path) as f:  # no link followed
            text = f.read().decode(errors="replace")
    except (FileNotFoundError, BadFile, NotAFile):
        return ""
    return "".join(text.splitlines(keepends=True)[-lines:]) if lines else text


def _follow(args: argparse.Namespace, paths_of: Callable[[], list[Path]], match: Callable[[str], bool]) -> int:
    from gpupool.master.report.logs import follow

    if args.follow:
        follow(paths_of, sys.stdout, match)
    return 0


def _chunk_logs(spool: Spool, args: argparse.Namespace) -> int:
    from gpupool.master.report.logs import chunk_report, follow, format_chunk, real_log_dir

    if not spool.run_spec(args.run).exists():
        return _die("logs", f"no run {args.run!r} in {spool.base} (runs: {', '.join(spool.run_names()) or '-'})")
    rep = chunk_report(spool, args.run, args.chunk)
    print(json.dumps(rep, indent=1) if args.json else format_chunk(rep), flush=True)
    if args.follow and rep["result"] is None:  # follow the script's output until the chunk has a result
        logs = [spool.chunk_log(args.run, args.chunk)]
        done = [spool.result_json(args.run, args.chunk)]
        if (b := rep["batch"]) is not None and b["state"] == "in flight":  # or until its batch is over
            logs.append(Path(b["log"]))
            done.append(Path(b["slot"]))
        follow(lambda: [p for p in logs if real_log_dir(spool, p)], sys.stdout, lambda t: True,
               stop=lambda: any(os.path.lexists(p) for p in done))
    return 0


# collect --------------------------------------------------------------------------------------
def cmd_collect(args: argparse.Namespace) -> int:
    from gpupool.master.report.collect import collect

    got = collect(_spool(args), args.run, args.out, concat=args.concat, partial=args.partial)  # out None: ./RUN.npz|.csv
    what = f"arrays {', '.join(got.keys)}" if got.out.suffix == ".npz" else f"{len(got.keys)} value column(s)"
    print(f"wrote {got.out}: {plural(got.rows, 'chunk')}, {what}"
          + (f"; left out {plural(len(got.skipped), 'chunk')} without an ok result: {got.skipped[:20]}" if got.skipped else ""))
    return 0


# retry / cancel / drain -----------------------------------------------------------------------
def cmd_retry(args: argparse.Namespace) -> int:
    from gpupool.master.control import retry_run
    from gpupool.master.core.feeder import FeedConfig
    from gpupool.master.report.progress import format_summary

    spool = _spool(args)
    run, failed, missing = retry_run(spool, args.run, args.retries, args.force)
    if not failed and not missing:
        print(f"run {args.run}: {'the one chunk is' if run.spec.chunks == 1 else f'all {run.spec.chunks} chunks are'} ok; "
              "nothing to retry")
        return 0
    print(f"run {args.run}: re-queuing {plural(len(failed), 'failed chunk')} {failed[:20]}"
          + (f" and {plural(missing, 'chunk')} without a result" if missing else ""), flush=True)
    cfg = FeedConfig(dead_after=args.dead_after)
    summary = run.wait(progress=show_progress(args), cfg=cfg, wait_for_lock=args.wait)
    print(respell(format_summary(summary, spool.base), "master"))
    return 0 if summary.all_ok else 1


def cmd_cancel(args: argparse.Namespace) -> int:
    from gpupool.master.control import cancel_run

    spool = _spool(args)
    got = cancel_run(spool, args.run, args.stop_running, args.timeout, args.force)
    print(f"cancelled run {args.run}: took {plural(got.dropped, 'queued job')} out of the mailboxes")
    print("  its master has stopped" if got.master_stopped else
          f"  a master still holds the run after {args.timeout:g} s; it stops at its next look at the run")
    for agent, chunk in got.running:
        print(f"  still running: chunk {chunk} on {agent}"
              + ("" if args.stop_running else " (it finishes; --stop-running kills it)"))
    print(respell(f"  undo / resume: python -m master retry --base {args.base} --run {args.run}", "master"))
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from gpupool.master.control import list_runs

    runs = list_runs(_spool(args))
    if args.json:
        print(json.dumps([asdict(r) for r in runs], indent=1))
        return 0
    print(f"{'RUN':<40} {'OWNER':<12} {'STATE':<10} {'CHUNKS':>7} {'OK':>7} {'FAILED':>7} {'SIZE':>9}  LAST ACTIVITY")
    for r in runs:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.last_activity)) if r.last_activity else "-"
        print(f"{r.run:<40} {(r.owner or '-')[:12]:<12} {r.state:<10} {r.chunks if r.chunks is not None else '-':>7} "
              f"{r.ok:>7} {r.failed:>7} {_size(r.bytes):>9}  {when}")
    if not runs:
        print("(no runs yet)")
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def cmd_rm(args: argparse.Namespace) -> int:
    from gpupool.master.control import ControlError, remove_run

    def confirm(results: int, size: int) -> bool:
        """A run's results are lost for good: asked on a terminal, --yes elsewhere."""
        what = f"run {args.run} ({plural(results, 'result')}, {_size(size)})"
        if args.yes:
            return True
        if not sys.stdin.isatty():
            raise ControlError(f"not removing {what}: stdin is not a terminal, so nobody can be asked; "
                               "pass --yes (-y) to remove it")
        try:
            answer = input(f"remove {what}? [y/N] ")
        except EOFError:
            answer = ""
        return answer.strip().lower() in ("y", "yes")

    freed = remove_run(_spool(args), args.run, args.force, confirm)
    if freed is None:
        print(f"run {args.run} kept")
        return 1
    print(f"removed run {args.run}: its results, logs and queued jobs ({_size(freed)})")
    return 0


def cmd_save_config(args: argparse.Namespace) -> int:
    from gpupool.master.cli.octorun import save_config

    out = save_config(args.out, args.script, args.force)
    print(respell(f"wrote {out} (OctoRun's default config); run it with: python main.py --octorun-config {out}"))
    return 0


def _save_config_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--script", help="the script_path to write (default ./your_script.py)")
    s.add_argument("--out", default="config.json", help="where to write it (default ./config.json)")
    s.add_argument("--force", action="store_true", help="replace an existing file")


def cmd_gpus(args: argparse.Namespace) -> int:
    """This host's GPUs (NVML, as CUDA_VISIBLE_DEVICES lets this process see them) and which
    agent holds each, like OctoRun's list_gpus and KohakuRiver's node list."""
    from gpupool.agent.gpu import make_probe, visible_gpus
    from gpupool.agent.slot import gpu_holder

    probe = make_probe()
    gpus = visible_gpus(probe)
    rows = []
    for n, gpu in enumerate(gpus):
        try:
            m = {} if gpu.error else probe.metrics(gpu)
        except Exception as e:  # lost since: said in the row
            m = {"error": f"{type(e).__name__}: {e}"}
        holder = gpu_holder(gpu) or {}
        rows.append({"gpu": n, "nvml_index": gpu.index, "uuid": gpu.uuid, "name": gpu.name, "util": m.get("util"),
                     "mem_used": m.get("mem_used"), "mem_total": m.get("mem_total"), "temp": m.get("temp"),
                     "agent": holder.get("agent"), "base": holder.get("base"), "agent_pid": holder.get("pid"),
                     "error": gpu.error or m.get("error")})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(respell(f"no GPU visible here: {getattr(probe, 'why', 'none')} (agents run as CPU ranks: ./start_agents.sh N "
                      "BASE --cpu)"))
        return 0
    print(f"{'GPU':>3} {'NVML':>4} {'NAME':<24} {'UTIL':>5} {'MEM GB':>13} {'TEMP':>5}  {'AGENT':<22} {'UUID'}")
    for r in rows:
        mem = f"{(r['mem_used'] or 0) / 2**30:.1f}/{r['mem_total'] / 2**30:.1f}" if r["mem_total"] else "-"
        util = f"{r['util']}%" if r["util"] is not None else "-"
        temp = f"{r['temp']}C" if r["temp"] is not None else "-"
        who = f"{r['agent']} ({r['base']})" if r["agent"] else f"UNUSABLE: {r['error']}" if r["error"] else "free"
        print(f"{r['gpu']:>3} {r['nvml_index']:>4} {r['name'][:24]:<24} {util:>5} {mem:>13} {temp:>5}  {who:<22} {r['uuid']}")
    return 0


def _agent_line(rep) -> str:
    cur = rep.current
    took = f", for {rep.current_for_s:.0f} s" if rep.current_for_s is not None else ""  # the agent's own clock
    running = (f"still running {cur.run} chunk {cur.chunk_id} (attempt {cur.attempt}{took})" if cur is not None
               else "running nothing")
    queued = (f"; {plural(rep.queued, 'queued job')} {'goes' if rep.queued == 1 else 'go'} back to other agents"
              if rep.queued else "")
    after = "; it takes no new job after this one" if rep.state == AgentState.BUSY else ""
    return f"agent {rep.agent} is {rep.state}: {running}{after}{queued}"


def cmd_drain(args: argparse.Namespace) -> int:
    from gpupool.master.control import drain, wait_idle

    spool = _spool(args)
    rep = drain(spool, args.agent, args.timeout, args.dead_after, args.force)
    if rep.state in GONE:
        print(f"agent {args.agent} is {rep.state}; the drain flag stays, so it starts drained "
              + respell(f"(python -m master undrain --base {args.base} {args.agent} lifts it)", "master"))
        return 0
    if not rep.reached:
        return _die("drain", f"agent {args.agent} did not report 'draining' within {args.timeout:g} s "
                    f"(state {rep.state}); the flag is set, check its log: python -m master logs --base "
                    f"{args.base} --agent {args.agent}", 1)
    print(_agent_line(rep), flush=True)
    if args.wait_idle and rep.state != AgentState.DRAINING:
        rep = wait_idle(spool, args.agent, args.timeout, args.dead_after)
        print(_agent_line(rep))
        if rep.current is not None:
            return _die("drain", f"agent {args.agent} is still running after {args.timeout:g} s; "
                        "wait longer with --timeout S", 1)
    return 0


def cmd_undrain(args: argparse.Namespace) -> int:
    from gpupool.master.control import undrain

    rep = undrain(_spool(args), args.agent, args.timeout, args.dead_after, args.force)
    if rep.state in GONE:
        print(f"drain flag of {args.agent} removed; the agent is {rep.state}")
        return 0
    cur = rep.current
    doing = f"it runs {cur.run} chunk {cur.chunk_id} now" if cur is not None else f"it is {rep.state} now"
    print(f"agent {args.agent} is taking jobs again ({doing})" if rep.reached else
          f"drain flag removed, but agent {args.agent} still reports {rep.state}")
    return 0 if rep.reached else 1


def cmd_dashboard(args: argparse.Namespace) -> int:
    from gpupool.master.report.dashboard import serve

    serve(_spool(args), args.host, args.port, args.refresh, args.dead_after, args.sample)
    return 0


# parsers --------------------------------------------------------------------------------------
def _sub(sub: argparse._SubParsersAction, name: str, help_: str, fn: Callable) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES.get(name),  # alloc: its subcommand's
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    base = os.environ.get("GPUPOOL_BASE") or None
    if name not in ("gpus", "save-config", "alloc"):  # about this host or a file, not a spool (alloc: its subcommand's)
        p.add_argument("--base", default=base,  # missing: one line naming $GPUPOOL_BASE (main)
                       help="the spool folder the agents serve (default: $GPUPOOL_BASE)")
    p.set_defaults(fn=fn)
    return p


def _dead_after(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dead-after", type=float, default=20.0, help="heartbeat silence (s) that marks an agent dead")


RUN_HELP = "run name (see python -m master status)"


def _status_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--run", help="list this run's chunks: state, agent, attempt, time, last error")
    s.add_argument("--state", metavar="S1,S2", help="with --run: only chunks in these states "
                   "(ok, failed, running, queued, pending)")
    s.add_argument("--all", action="store_true", help="every run (default: the active ones and those that changed "
                   "in the last 24 hours)")
    s.add_argument("--json", action="store_true", help="print JSON for scripts")
    s.add_argument("--watch", nargs="?", const=2.0, type=float, metavar="S", help="refresh every S seconds (default 2)")
    _dead_after(s)


def _logs_args(lg: argparse.ArgumentParser) -> None:
    lg.add_argument("--agent", help="only this agent's log")
    lg.add_argument("--run", help="only lines about this run (with --chunk: that chunk's full report)")
    lg.add_argument("--chunk", type=int, help="one chunk: result, every failed attempt's traceback, "
                    "what each attempt printed (its log)")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new lines (Ctrl-C to stop)")
    lg.add_argument("-n", "--lines", type=int, default=0, help="only the last N entries (default: all)")
    lg.add_argument("--worker", action="store_true", help="with --agent: its worker log (the worker processes' own lines; "
                    "a job's output is in its chunk's log: --run R --chunk C)")
    lg.add_argument("--json", action="store_true", help="with --chunk: print the report as JSON")


def _collect_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("--run", required=True, help=RUN_HELP)
    c.add_argument("--out", help="FILE.npz (arrays), FILE.csv, FILE.jsonl or FILE.parquet (JSON values; parquet "
                   "needs pyarrow); default: RUN.npz (arrays) or RUN.csv (values) in the current folder")
    c.add_argument("--concat", action="store_true", help="join arrays along the first axis instead of stacking")
    c.add_argument("--partial", action="store_true", help="collect the ok chunks even if some failed or are missing")


def _retry_args(r: argparse.ArgumentParser) -> None:
    r.add_argument("--run", required=True, help=RUN_HELP)
    r.add_argument("--retries", type=int, help="retries per chunk this time (default: the run's own)")
    r.add_argument("--wait", action="store_true", help="if another master feeds this run, wait for it")
    progress_args(r)
    _force(r, "retry")
    _dead_after(r)


def _cancel_args(k: argparse.ArgumentParser) -> None:
    k.add_argument("--run", required=True, help=RUN_HELP)
    k.add_argument("--stop-running", action="store_true", help="also kill the run's chunks that are running")
    k.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the master/agents to stop")
    _force(k, "cancel")


def _force(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", action="store_true", help=f"{what} a run another user submitted (refused without it; "
                   "a guard against mistakes, not a security boundary: docs/failures.md)")


def _gpus_args(g: argparse.ArgumentParser) -> None:
    g.add_argument("--json", action="store_true", help="print JSON for scripts")


def _runs_args(r: argparse.ArgumentParser) -> None:
    r.add_argument("--json", action="store_true", help="print JSON for scripts")


def _rm_args(r: argparse.ArgumentParser) -> None:
    r.add_argument("--run", required=True, help=RUN_HELP)
    r.add_argument("-y", "--yes", action="store_true", help="remove it without asking (required where stdin is not "
                   "a terminal: a script, a pipe, cron)")
    r.add_argument("--force", action="store_true", help="also while a master feeds it (it is cancelled first), "
                   "and a run another user submitted")


def _agent_args(d: argparse.ArgumentParser) -> None:
    d.add_argument("agent", metavar="AGENT", help="agent id, e.g. myhost-gpu3 (see python -m master status)")
    d.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the agent to answer")
    d.add_argument("--force", action="store_true", help="also an agent another user runs (refused without it)")
    _dead_after(d)


def _drain_args(d: argparse.ArgumentParser) -> None:
    _agent_args(d)
    d.add_argument("--wait-idle", action="store_true", help="then wait until its current chunk is done")


def _dashboard_args(db: argparse.ArgumentParser) -> None:
    db.add_argument("--port", type=int, default=8473, help="TCP port (default 8473, which no common tool uses; "
                    "Ray's dashboard has 8265; 0 picks a free one)")
    db.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    db.add_argument("--refresh", type=float, default=2.0, help="page refresh interval, seconds (default 2)")
    db.add_argument("--sample", type=float, default=10.0, metavar="S", help="read the agents' GPU utilisation and "
                    "memory every S seconds for the last hour's sparklines (default 10)")
    _dead_after(db)


COMMANDS: list[tuple[str, str, Callable, Callable]] = [  # name, help, implementation, its options
    ("status", "agents (GPU, current chunk, load) and runs (progress, chunks/s, ETA)", cmd_status, _status_args),
    ("logs", "agents' logs merged in time order, or one chunk's output and traceback", cmd_logs, _logs_args),
    ("collect", "gather a run's results into one .npz, .csv or .jsonl file", cmd_collect, _collect_args),
    ("retry", "re-queue a run's failed chunks (and resume a cancelled run) and feed them", cmd_retry, _retry_args),
    ("cancel", "drop a run's queued work; optionally kill its running chunks", cmd_cancel, _cancel_args),
    ("gpus", "this host's GPUs (index, UUID, name, memory, utilisation) and the agent holding each", cmd_gpus,
     _gpus_args),
    ("runs", "every run: state, chunks ok/failed, size on disk, last activity", cmd_runs, _runs_args),
    ("rm", "remove a run: its results, logs and queued jobs", cmd_rm, _rm_args),
    ("drain", "an agent finishes its current chunk and takes no more (maintenance)", cmd_drain, _drain_args),
    ("undrain", "a drained agent takes jobs again", cmd_undrain, _agent_args),
    ("dashboard", "serve a self-refreshing status page (and /api/status JSON)", cmd_dashboard, _dashboard_args),
    ("save-config", "write OctoRun's default config.json (octorun save_config) for main.py --octorun-config",
     cmd_save_config, _save_config_args),
    ("alloc", "submit Slurm jobs of agents while runs wait for agents (alloc slurm); they end when idle",
     alloc_cli.cmd_alloc, alloc_cli.add_args),
]


def parser() -> argparse.ArgumentParser:
    """The ``python -m master`` parser with every command."""
    top = argparse.ArgumentParser(prog=typed_as("master"), description="Look at and steer a GPU agent pool.", epilog=TOP_EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, help_, fn, add_args in COMMANDS:
        add_args(_sub(sub, name, help_, fn))
    respell_parser(top, "master")  # examples and hints as this user types them (issue 25)
    return top


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; errors become one actionable line on stderr."""
    from gpupool.jobs.errors import LockHeld, SpoolError

    args = parser().parse_args(argv)
    if "base" in args and args.base is None:
        return _die(args.cmd, "missing --base BASE, the spool folder (or set $GPUPOOL_BASE)")
    bad = _bad_number(args)
    if bad:
        return _die(args.cmd, bad)
    try:
        return args.fn(args)
    except LockHeld as e:
        return _die(args.cmd, f"{e}; wait for it to finish, or pass --wait", 3)
    except (SpoolError, FileNotFoundError) as e:
        return _die(args.cmd, str(e).strip("'\""))
    except KeyboardInterrupt:
        return 130 if args.cmd == "retry" else 0
    except BrokenPipeError:  # | head
        return 0
