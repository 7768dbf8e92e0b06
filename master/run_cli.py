"""``python main.py ...``: feed a run to the agents of a spool (or, with no arguments, the demo)."""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable

from gpupool.jobs.invoked import prefix, prog, respell, respell_parser

EPILOG = """examples:
  python main.py                                   # self-contained demo (starts its own agents)
  ./start_agents.sh 2 /tmp/b
  python main.py --base /tmp/b --task gpupool.master.matmul:multiply --chunks 100
  python main.py --base /tmp/b --task my_job.py:process --chunks 64 --kwargs '{"scale": 2}' \\
                 --shared shared.npz --data chunks/
  python main.py --base /tmp/b --script my_script.py --chunks 8 --kwargs '{"out_dir": "/tmp/out"}'
  python main.py --base /tmp/b --cmd 'python train.py --lr {lr} --out out/{chunk_id}.json' --sweep grid.yaml \\
                 --result-file 'out/{chunk_id}.json'        # a shell command per parameter set
  python main.py --base /tmp/b --commands jobs.txt --prefix 'cd repo'   # one chunk per line
  python main.py --octorun-config config.json      # an OctoRun config, unchanged (agents started for its gpus)
Re-running the same command resumes the run: chunks with an ok result are not run again."""


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog("run"), description="Feed chunk jobs to the pool's agents and "
                                "collect their results.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="spool folder the agents serve (default: $GPUPOOL_BASE; required unless "
                   "running the demo)")
    p.add_argument("--new-spool", action="store_true", help="make BASE a new spool if it is not one yet (otherwise "
                   "a folder where no agent was ever started is refused: a typo would be waited on for ever)")
    p.add_argument("--wait-agents", type=float, metavar="S", help="give up (exit 2) when no agent is alive for S "
                   "seconds (default: wait, saying so every minute)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--task", help="callable run in the agents: package.module:function or path/file.py:function")
    what.add_argument("--script", help="OctoRun-style script run per chunk with --gpu_id --chunk_id --total_chunks")
    what.add_argument("--cmd", metavar="'TEMPLATE'", help="shell command run per chunk, with placeholders {chunk_id} "
                      "{total_chunks} {gpu_id} {device} and each sweep parameter or kwarg ({{ }}: literal braces; "
                      "see docs/sweeps.md)")
    what.add_argument("--commands", metavar="FILE", help="one shell command per line, each line a chunk (blank lines "
                      "and # comments skipped; the same placeholders)")
    p.add_argument("--chunks", type=int, help="number of chunks (chunk ids 0..N-1; with --sweep or --commands: "
                   "theirs)")
    p.add_argument("--sweep", metavar="FILE.yaml|FILE.json|JSON", help="parameter sets, one chunk each: a 'grid' "
                   "(every combination) and/or a 'list'; passed as kwargs (--task), flags (--script) or placeholders "
                   "(--cmd). Submitting a grown sweep again runs only its new sets")
    p.add_argument("--prefix", metavar="CMD", help="command jobs: run first, in the same shell (e.g. 'cd repo')")
    p.add_argument("--success-codes", metavar="0,2", help="command jobs: exit codes that mean success (default 0)")
    p.add_argument("--fail-on-output", metavar="REGEX", help="command jobs: an output line matching it fails the "
                   "chunk, even at a successful exit")
    p.add_argument("--result-file", metavar="PATTERN", help="command jobs: file the command writes (placeholders "
                   "as in --cmd, relative to this folder), read into the chunk's result: .json, .csv/.tsv, or text")
    p.add_argument("--kwargs", help="JSON object of keyword arguments (flags for --script)")
    p.add_argument("--shared", help=".npz loaded once per agent and passed as `shared`")
    p.add_argument("--data", help="folder with one <chunk_id>.npz per chunk, passed as `data`")
    p.add_argument("--arrays-as-kwargs", action="store_true", help="pass each array of --data's chunk .npz and of "
                   "--shared as a keyword argument by its name (the SGE template's expensive_task(A, B, shared))")
    p.add_argument("--visible-gpu-id", action="store_true", help="gpu_id (and a script's --gpu_id) is the GPU's "
                   "index as the job sees it, 0, so that code building its device as cuda:{gpu_id} runs unchanged "
                   "(each agent's job sees its own GPU only)")
    p.add_argument("--setup", metavar="FILE.py:FN|MODULE:FN",
                   help="with --task: call FN once in each worker process of the run, before its first chunk, with "
                   "the built-ins it names (device, gpu_id, shared, total_chunks) and the --kwargs it names; what it "
                   "returns is passed to every chunk as state= (load a model once per GPU: docs/jobs.md)")
    p.add_argument("--env", action="append", metavar="NAME[=VALUE]",
                   help="set this variable for every job of the run, to VALUE or to its value here (agents run "
                   "jobs in their own environment, which may not be this shell's); repeatable")
    p.add_argument("--run", help="run name (default: derived from the task, chunk count and kwargs)")
    p.add_argument("--retries", type=int, default=2, help="retries per failed chunk (default 2)")
    p.add_argument("--max-failures", type=int, default=3, metavar="K",
                   help="stop the run once K failed attempts in a row (of at least two chunks) ended with the same "
                        "error type and message, numbers and addresses aside (/data/chunk_17.npy and chunk_18.npy "
                        "alike), and no chunk is ok; the pool's own errors (Timeout, WorkerDied, AgentLost, ...) never "
                        "count (default 3; 0: never stop early; docs/failures.md)")
    p.add_argument("--timeout", type=float, help="seconds a chunk may run before it is killed")
    p.add_argument("--share", "--priority", type=float, default=1.0, metavar="W",
                   help="the run's weight when several runs use the pool at once: agents are split between the "
                   "active runs in proportion to their weights (default 1)")
    p.add_argument("--target", action="append", metavar="HOST::GPU[,GPU]",
                   help="run only on these agents: a host and its GPU numbers (node1::0,2), or a whole host "
                   "(node1); repeatable")
    p.add_argument("--hosts", metavar="H1,H2", help="run only on agents of these hosts")
    p.add_argument("--exclude-hosts", metavar="H1,H2", help="never run on agents of these hosts")
    p.add_argument("--min-free-gb", type=float, metavar="GB",
                   help="run only on agents whose GPU has at least this much free memory")
    p.add_argument("--gpus-per-job", type=int, metavar="K", help="each job needs K GPUs: it runs only on agents "
                   "holding K (./start_agents.sh N BASE --gpus-per-agent K) and sees them as cuda:0..K-1 (default: "
                   "agents with one GPU, or CPU agents)")
    p.add_argument("--gpu-mem", type=float, metavar="GB", help="GPU memory one job needs: an agent starts it only "
                   "while that much is free (NVML), so slots sharing a GPU (--slots) never overcommit it")
    p.add_argument("--fresh", action="store_true", help="start the run over: drop its earlier results")
    p.add_argument("--wait", action="store_true", help="if another master feeds this run, wait for it")
    p.add_argument("--force", action="store_true", help="resume (or with --fresh start over) a run of this name "
                   "that another user submitted (refused without it; docs/failures.md, Trust model)")
    p.add_argument("--depth", type=int, default=4, help="jobs per agent until chunk durations are known (default 4; "
                   "then as many as hide the measured round trip, up to --max-depth, never more than a fair share)")
    p.add_argument("--max-depth", type=int, default=64, help="most jobs queued per agent (default 64)")
    p.add_argument("--dead-after", type=float, default=20.0, help="seconds without heartbeat before an agent "
                   "is declared dead and its jobs handed back (default 20)")
    p.add_argument("--retry-delay", type=float, default=1.0, help="first retry back-off, seconds (doubles)")
    p.add_argument("--allow-local-locks", action="store_true",
                   help="use BASE even on a filesystem whose locks are client-local (sshfs, NFS nolock/local_lock); "
                   "safe only if every agent and master of BASE runs on this machine (or $GPUPOOL_ALLOW_LOCAL_LOCKS=1)")
    progress_args(p)
    p.add_argument("--octorun-config", metavar="CONFIG.json", help="run an OctoRun config.json on the pool "
                   "(script_path, total_chunks, kwargs, gpus, max_retries, log_dir, ...); see docs/octorun.md")
    p.add_argument("--demo-dir", default="spool-demo", help="where the demo keeps its spool (default ./spool-demo)")
    respell_parser(p, "run")  # named as typed: gpupool-run installed, python main.py in a checkout (issue 25)
    return p.parse_args(argv)


def _me() -> str:
    """The prefix of this command's errors: ``main.py`` or ``gpupool-run``, as typed."""
    return prefix("run")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    from gpupool.jobs.logsetup import command_logs

    command_logs("WARNING")
    if args.octorun_config:  # the drop-in for OctoRun users
        from gpupool.master.octorun import main as run_octorun

        return guarded(lambda: run_octorun(args))
    if not (args.task or args.script or args.cmd or args.commands or args.chunks or args.base):
        from gpupool.master.demo import run_demo

        return run_demo(args.demo_dir, progress=show_progress(args))
    args.base = args.base or os.environ.get("GPUPOOL_BASE") or None
    return feed(args)


def feed(args: argparse.Namespace) -> int:
    from gpupool.master.api import Pool
    from gpupool.master.feeder import FeedConfig
    from gpupool.master.progress import format_summary
    from gpupool.master.runspec import parse_env, parse_kwargs

    what = args.task or args.script or args.cmd or args.commands
    chunks = args.sweep or args.commands if args.chunks is None else args.chunks  # a sweep or a file says how many
    missing = [f for f, v in (("--base (or $GPUPOOL_BASE)", args.base), ("--task, --script, --cmd or --commands", what),
                              ("--chunks", chunks)) if v is None]
    if missing:
        print(f"{_me()}: missing {', '.join(missing)} (see {prog('run')} --help; no arguments runs the demo)",
              file=sys.stderr)
        return 2
    if why := option_problem(args):
        print(f"{_me()}: {why}", file=sys.stderr)
        return 2

    def go() -> int:
        from gpupool.master.placement import Placement

        placement = Placement.parse(args.target, args.hosts, args.exclude_hosts, args.min_free_gb, args.gpus_per_job,
                                    args.gpu_mem)
        pool = Pool(args.base, allow_local_locks=args.allow_local_locks, create=args.new_spool)
        run = pool.submit(task=args.task, script=args.script, cmd=args.cmd, commands=args.commands,
                          chunks=args.chunks, kwargs=parse_kwargs(args.kwargs), sweep=args.sweep,
                          shared=args.shared, data=args.data, run=args.run, retries=args.retries,
                          timeout=args.timeout, fresh=args.fresh, share=args.share, prefix=args.prefix,
                          success_codes=args.success_codes, fail_on_output=args.fail_on_output,
                          result_file=args.result_file, arrays_as_kwargs=args.arrays_as_kwargs,
                          visible_gpu_id=args.visible_gpu_id, env=parse_env(args.env), setup=args.setup,
                          force=args.force)
        cfg = FeedConfig(depth=args.depth, max_depth=max(args.depth, args.max_depth), dead_after=args.dead_after,
                         retry_delay=args.retry_delay, max_failures=args.max_failures, wait_agents=args.wait_agents)
        summary = run.wait(progress=show_progress(args), cfg=cfg, wait_for_lock=args.wait, placement=placement)
        print(respell(format_summary(summary, pool.spool.base)))  # its hints as this user types them
        return 0 if summary.all_ok else 1

    return guarded(go)


def progress_args(p: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--no-progress``: the bar; by default only when stderr is a terminal."""
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="show the progress bar even when stderr is not a terminal (default: only on a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (failures and other events are still printed, one line each)")


def show_progress(args: argparse.Namespace) -> bool:
    """The progress bar: as ``--progress``/``--no-progress`` say, else only when stderr is a
    terminal (a log redirected to a file gets one line per event, no bar redrawn into it)."""
    if args.progress is not None:
        return args.progress
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stderr
        return False


def option_problem(args: argparse.Namespace) -> str | None:
    """The first feeding option out of its range, named (checked before anything is made)."""
    for bad, why in ((args.depth < 1, "--depth must be 1 or more"),
                     (not 0 < args.dead_after < math.inf, "--dead-after must be a positive number of seconds"),
                     (not 0 <= args.retry_delay < math.inf, "--retry-delay must be 0 or a positive number of seconds"),
                     (args.max_failures < 0, "--max-failures must be 0 (never stop early) or more"),
                     (args.wait_agents is not None and not 0 <= args.wait_agents < math.inf,
                      "--wait-agents must be 0 or a positive number of seconds")):
        if bad:
            return why
    return None


def guarded(call: Callable[[], int]) -> int:
    """Run a feeding command; the errors a user can act on become one line and an exit code."""
    from gpupool.jobs.errors import LockHeld, SpoolError

    try:
        return call()
    except LockHeld as e:
        print(f"{_me()}: {e}; wait for it to finish, or pass --wait", file=sys.stderr)
        return 3
    except SpoolError as e:
        print(f"{_me()}: {respell(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{_me()}: interrupted. Jobs already queued keep running on the agents; "
              "run the same command again to resume.", file=sys.stderr)
        return 130
