"""``python main.py ...``: feed a run to the agents of a spool (or, with no arguments, the demo)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Callable

from gpupool.jobs.invoked import prefix, prog, respell, respell_parser
from gpupool.master.spec.options import OPTIONS, Scope, add_arguments, command_values, first_problem

if TYPE_CHECKING:
    from gpupool.jobs.paths import Spool

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
    add_arguments(p)  # every run option, declared once in master.spec.options
    progress_args(p)
    p.add_argument("--octorun-config", metavar="CONFIG.json", help="run an OctoRun config.json on the pool "
                   "(script_path, total_chunks, kwargs, gpus, max_retries, log_dir, ...); see docs/octorun.md")
    p.add_argument("--demo-dir", default="spool-demo", help="where the demo keeps its spool (default ./spool-demo)")
    # the master --detach starts: the same arguments; the command that started it recorded the run (and --fresh)
    p.add_argument("--detached-master", action="store_true", help=argparse.SUPPRESS)
    respell_parser(p, "run")  # named as typed: gpupool-run installed, python main.py in a checkout (issue 25)
    return p.parse_args(argv)


def _me() -> str:
    """The prefix of this command's errors: ``main.py`` or ``gpupool-run``, as typed."""
    return prefix("run")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.detached_master:  # started by --detach, which recorded the run (and started it over, --fresh)
        args.detach = args.fresh = False
    from gpupool.jobs.logsetup import command_logs

    command_logs("WARNING")
    if args.octorun_config and (used := [o for o, v in (("--detach", args.detach), ("--after", args.after),
                                                         ("--after-any", args.after_any)) if v]):
        print(f"{_me()}: {', '.join(used)}: for a run given by its options, not --octorun-config", file=sys.stderr)
        return 2
    if args.octorun_config:  # the drop-in for OctoRun users
        from gpupool.master.cli.octorun import main as run_octorun

        return guarded(lambda: run_octorun(args))
    if not (args.task or args.script or args.cmd or args.commands or args.chunks or args.base):
        from gpupool.master.cli.demo import run_demo

        return run_demo(args.demo_dir, progress=show_progress(args))
    args.base = args.base or os.environ.get("GPUPOOL_BASE") or None
    return feed(args, argv)


def feed(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from gpupool.master.api import Pool
    from gpupool.master.core.feeder import FeedConfig
    from gpupool.master.report.progress import format_summary
    from gpupool.master.spec.runspec import parse_env, parse_kwargs

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
        pool = Pool(args.base, allow_local_locks=args.allow_local_locks, create=args.new_spool)
        given = {**command_values(args), "kwargs": parse_kwargs(args.kwargs), "env": parse_env(args.env)}
        run = pool.submit(**given, fresh=args.fresh, force=args.force)  # placement: saved with the run
        if args.detach:
            run.record()  # in the spool now: status shows it, and a run given --after it finds it
            return detach(pool.spool, run.name, sys.argv[1:] if argv is None else argv)
        cfg = FeedConfig(depth=args.depth, max_depth=max(args.depth, args.max_depth), dead_after=args.dead_after,
                         retry_delay=args.retry_delay, max_failures=args.max_failures, wait_agents=args.wait_agents)
        summary = run.wait(progress=show_progress(args), cfg=cfg, wait_for_lock=args.wait)
        print(respell(format_summary(summary, pool.spool.base)))  # its hints as this user types them
        return 0 if summary.all_ok else 1

    return guarded(go)


def detach(spool: "Spool", run: str, argv: list[str], timeout: float = 60.0) -> int:
    """--detach: start the run's master as a process of its own (its own session: it outlives this
    command and the terminal), running this command's arguments, its output appended to
    ``logs/<run>/master.log``; return once it holds the run's lock (or ended first)."""
    import shlex
    import subprocess
    import time

    from gpupool.agent.pychild import python_argv
    from gpupool.jobs.atomic import open_read
    from gpupool.jobs.errors import BadFile
    from gpupool.jobs.names import printable
    from gpupool.jobs.invoked import spell
    from gpupool.master.core.states import master_feeds

    log = spool.master_log(run)
    cmd = python_argv("master.cli.run_cli", *argv, "--detached-master")  # gpupool, from where this code is
    with spool.open_log(log) as out:  # no link followed (one there is moved to rejected/)
        out.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}: {prog('run')} {shlex.join(argv)} (detached)\n".encode())
        out.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not master_feeds(spool, run) and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is not None:  # it ended already: an error, or a run that had nothing left to do
        try:
            with open_read(log) as f:
                tail = f.read()[-4096:].decode(errors="replace").splitlines()[-6:]
        except (OSError, BadFile):
            tail = []
        print(f"{_me()}: the detached master of run {run} ended with code {proc.returncode}; its log {log} ends:\n"
              + "\n".join(f"  {printable(line)}" for line in tail), file=sys.stderr if proc.returncode else sys.stdout)
        return proc.returncode
    print(f"run {run}: recorded; its master runs detached (pid {proc.pid}), its output in {log}\n"
          f"  follow it: {spell('master')} status --base {spool.base} --run {run}   (or tail -f {log})\n"
          f"  should that master end early (a reboot), the same command resumes it (or: {spell('master')} retry "
          f"--base {spool.base} --run {run})")
    return 0


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
    return first_problem(vars(args), [o.name for o in OPTIONS if o.scope is Scope.COMMAND])


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


if __name__ == "__main__":  # the master --detach starts (agent.pychild.python_argv)
    sys.exit(main())
