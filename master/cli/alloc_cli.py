"""``python -m master alloc slurm``: the allocator's command line (the allocator: ``master.alloc``)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from gpupool.jobs.invoked import prog as typed_as, respell

EXAMPLES = """examples:
  python -m master alloc slurm --base /shared/base --max-jobs 4 --time 12:00:00 --idle-timeout 600 \\
      -- --partition=gpu --nodes=1 --gpus-per-node=8          # sbatch options after --
  python -m master alloc slurm --base /shared/base --max-jobs 2 --time 2:00:00 --idle-timeout 300 --detach
  python main.py --base /shared/base --task my_job.py:process --chunks 1000   # the allocator starts agents for it
  python -m master status --base /shared/base                 # its allocations: job id, state, agents"""


def add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="scheduler", required=True, metavar="SCHEDULER")
    s = sub.add_parser("slurm", help="submit Slurm jobs of agents (examples/slurm/agents.sbatch) while chunks wait",
                       description="Submit Slurm jobs of agents while runs have chunks that no agent will soon take; "
                       "the agents end after --idle-timeout seconds without work, and the allocator stops once no "
                       "work is left and its jobs ended (docs/machines.md, Slurm).", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--base", default=os.environ.get("GPUPOOL_BASE") or None,
                   help="the spool folder (default: $GPUPOOL_BASE); on a filesystem every node mounts")
    s.add_argument("--max-jobs", type=int, required=True, metavar="N", help="at most N jobs pending or running at once")
    s.add_argument("--time", required=True, metavar="HH:MM:SS", help="each job's time limit (sbatch --time); its "
                   "agents start no chunk that would not end before it")
    s.add_argument("--idle-timeout", type=float, required=True, metavar="S", help="its agents end after S seconds "
                   "without work (their --idle-exit), giving the nodes back; the allocator stops after as long "
                   "with no work and no job left")
    s.add_argument("--backlog", type=int, default=1, metavar="K", help="at most K jobs submitted and not yet serving "
                   "(pending in Slurm, or no agent started yet) at once (default 1; HyperQueue's --backlog)")
    s.add_argument("--agent-args", metavar="'OPTS'", help="options for every agent, one string "
                   "after = (e.g. --agent-args='--watch poll --end-margin 120')")
    s.add_argument("--script", help="the sbatch recipe (default: examples/slurm/agents.sbatch of this checkout "
                   "or of $GPUPOOL_HOME)")
    s.add_argument("--poll", type=float, default=5.0, metavar="S", help="look at Slurm and the spool every S "
                   "seconds (default 5)")
    s.add_argument("--max-failures", type=int, default=10, metavar="K", help="stop (exit 1) after K allocations "
                   "failed in a row (sbatch refused it, or it ended with no agent started; default 10)")
    s.add_argument("--forever", action="store_true", help="keep running when no work is left")
    s.add_argument("--detach", action="store_true", help="run in the background (log: BASE/logs/alloc.log)")
    s.add_argument("--dead-after", type=float, default=20.0, help="heartbeat silence (s) that marks an agent dead")
    s.add_argument("sbatch_args", nargs="*", metavar="-- SBATCH_OPTION", help="sbatch options after -- "
                   "(--partition, --nodes, --gpus-per-node, --account, ...)")


def _die(message: str, code: int = 2) -> int:
    print(f"{typed_as('master')} alloc: {respell(message, 'master')}", file=sys.stderr)
    return code


def cmd_alloc(args: argparse.Namespace) -> int:
    from gpupool.jobs.errors import LockHeld
    from gpupool.jobs.paths import Spool
    from gpupool.master.alloc import AllocConfig, Allocator, agent_args, recipe, take_lock

    spool = Spool(args.base)
    if not spool.base.is_dir():
        return _die(f"{spool.base} does not exist: make it (a folder every node mounts), or run "
                    f"python main.py --base {args.base} --new-spool first")
    sbatch = [a for a in args.sbatch_args if a != "--"]
    cfg = AllocConfig(args.max_jobs, args.time, args.idle_timeout, args.backlog, sbatch, agent_args(args.agent_args),
                      recipe(args.script), args.poll, args.forever, args.dead_after, args.max_failures)
    cfg.check()
    try:
        lock = take_lock(spool)
    except LockHeld as e:
        return _die(f"another allocator serves {spool.base} ({_holder(e)}): one per spool; stop it first", 3)
    if args.detach:
        lock.close()
        return _detach(spool, args)
    try:
        return Allocator(spool, cfg).run()
    finally:
        lock.close()


def _holder(e: Exception) -> str:
    text = str(e)
    return text[text.find("(") + 1:text.rfind(")")] if "(" in text else text


def _detach(spool, args: argparse.Namespace) -> int:
    """Start the same allocator in its own session, its output in BASE/logs/alloc.log; wait until it
    holds the lock (or has exited, its last lines then shown)."""
    from gpupool.agent.pychild import python_argv
    from gpupool.jobs.locks import HolderLock

    argv = ["alloc", "slurm", "--base", str(spool.base), "--max-jobs", str(args.max_jobs), "--time", args.time,
            "--idle-timeout", f"{args.idle_timeout!r}", "--backlog", str(args.backlog), "--poll", f"{args.poll!r}",
            "--max-failures", str(args.max_failures), "--dead-after", f"{args.dead_after!r}"]
    argv += [f"--agent-args={args.agent_args}"] if args.agent_args else []
    argv += ["--script", args.script] if args.script else []
    argv += ["--forever"] if args.forever else []
    argv += ["--", *[a for a in args.sbatch_args if a != "--"]] if args.sbatch_args else []
    log = spool.alloc_log()
    with spool.open_log(log) as out:
        child = subprocess.Popen(python_argv("master", *argv), stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if child.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-5:]
            return _die(f"the detached allocator exited with {child.returncode}:\n" + "\n".join(tail), child.returncode or 1)
        if HolderLock(spool.alloc_lock()).holder().get("pid") == child.pid:
            print(f"allocator started in the background (pid {child.pid}); log: {log}")
            return 0
        time.sleep(0.1)
    return _die(f"the detached allocator (pid {child.pid}) did not take its lock within 60 s; see {log}", 1)
