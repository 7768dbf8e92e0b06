"""``python -m agent --base BASE --gpu N``: run one agent in the foreground."""
from __future__ import annotations

import argparse
import io
import math
import os
import sys

EPILOG = """examples:
  python -m agent --base /shared/base --gpu 0       # serve GPU 0 of this host
  python -m agent --base /shared/base --gpu auto    # a free GPU with enough memory
  python -m agent --base ./spool --cpu --gpu 1      # CPU rank 1 (no GPU used)
  python -m agent --base /shared/base --gpu 2,3     # one agent holding GPUs 2 and 3 (cuda:0 and cuda:1 in jobs)
  python -m agent --base /shared/base --gpu 0 --slots 4   # one of 4 agents sharing GPU 0 (run it 4 times)
Most people start agents with ./start_agents.sh N BASE instead."""


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    from gpupool.jobs.invoked import prog, respell_parser

    p = argparse.ArgumentParser(prog=prog("agent"), description="Run one pool agent in the foreground.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=os.environ.get("GPUPOOL_BASE") or None,
                   help="spool folder shared with the master (default: $GPUPOOL_BASE)")
    p.add_argument("--gpu", default="auto", help="GPU number (index into the visible GPUs), several (2,3: one "
                   "agent holding them all), or 'auto'; with no GPU or --cpu, a local rank (default: auto)")
    p.add_argument("--gpus-per-agent", type=int, metavar="K", help="hold K GPUs, all locked or none; its jobs see "
                   "them as cuda:0..K-1 (default: as many as --gpu names, 1 with --gpu auto)")
    p.add_argument("--slots", type=int, default=1, metavar="K", help="share the GPU with K-1 other agents (K "
                   "slots, one job each at a time; each job still sees only this GPU; see --gpu-mem of main.py)")
    p.add_argument("--slot", type=int, metavar="J", help="with --slots K: take slot J (0..K-1; default: the first "
                   "free one)")
    p.add_argument("--cpu", action="store_true", help="run jobs on the CPU even if GPUs are present")
    p.add_argument("--min-free-gb", type=float, default=1.0, help="with --gpu auto: free memory a GPU needs")
    p.add_argument("--allow-shared-gpu", action="store_true",
                   help="take the GPU even if processes that are not this pool's already compute on it (NVML sees "
                   "them in every container of the host); by default such a GPU is refused (skipped by --gpu auto)")
    p.add_argument("--host-id", help="host part of the agent id (default: $GPUPOOL_HOST_ID or the hostname)")
    p.add_argument("--watch", choices=("auto", "inotify", "poll"), default="auto",
                   help="how to notice new jobs (default: poll on network filesystems, inotify elsewhere)")
    p.add_argument("--poll-interval", type=float, default=0.5, help="fastest poll, seconds (default 0.5)")
    p.add_argument("--max-poll-interval", type=float, default=1.0, help="idle poll back-off limit, seconds (default 1)")
    p.add_argument("--rescan", type=float, default=2.0, help="reread the mailbox at least every S seconds")
    p.add_argument("--heartbeat", type=float, default=2.0, help="heartbeat interval, seconds (default 2)")
    p.add_argument("--burst", action="store_true", help="exit when the mailbox is empty")
    p.add_argument("--prune-quiet", type=float, default=30.0,
                   help="remove finished jobs from the mailbox only once it has looked the same this many seconds "
                   "(default 30; through a shared filesystem a fresher refill may not show yet)")
    p.add_argument("--log-limit-mb", type=float, default=64.0,
                   help="cut each of the agent's logs past this size, keeping the older part in <log>.1 "
                   "(default 64; 0: never)")
    p.add_argument("--max-jobs-per-worker", type=int, default=0, metavar="N",
                   help="start a fresh worker process after N jobs, giving back all the memory the job code held "
                   "(default 0: never; every run has worker processes of its own anyway, and one is renewed when a "
                   "source file its chunks imported changes, or after a job left its CUDA context unusable)")
    p.add_argument("--run-workers", type=int, default=2, metavar="K",
                   help="keep the worker processes of at most K runs at once, each with its run's models loaded "
                   "(default 2: two runs sharing this agent do not reload them at every switch; 1: each switch "
                   "starts a fresh worker and gives the last run's GPU memory back at once)")
    p.add_argument("--spare-worker", action=argparse.BooleanOptionalAction, default=True,
                   help="keep a worker process ready for the next run, with the libraries recent runs imported "
                   "(torch, numpy...) already imported, so a new run starts without importing them again "
                   "(default: on; --no-spare-worker saves its memory)")
    p.add_argument("--threads", default="auto", metavar="N",
                   help="threads of the math libraries (OMP_NUM_THREADS, MKL_NUM_THREADS, OPENBLAS_NUM_THREADS...) "
                   "in each worker, unless set in the environment or by a run's --env (default auto: the usable "
                   "cores divided by the agents of this host, at least 1)")
    p.add_argument("--drain-after-gpu-errors", type=int, default=3, metavar="K",
                   help="drain this agent once K different chunks in a row failed with GPU errors that are not the "
                   "job's own (driver errors; out of memory in a fresh worker); its heartbeat's last_error says "
                   "why (default 3; 0: never)")
    p.add_argument("--allow-local-locks", action="store_true",
                   help="use BASE even on a filesystem whose locks are client-local (sshfs, NFS nolock/local_lock); "
                   "safe only if every agent and master of BASE runs on this machine (or $GPUPOOL_ALLOW_LOCAL_LOCKS=1)")
    p.add_argument("--idle-exit", type=float, metavar="S", help="stop after S seconds with no job to run (an "
                   "allocation that follows the work gives its node back; default: never)")
    end = p.add_mutually_exclusive_group()
    end.add_argument("--end-at", metavar="TIME", help="the time this agent must end by (seconds since the epoch, "
                     "2026-12-07T18:00, or 18:00 today): it starts no chunk that would not end in time by its run's "
                     "last chunk here, and stops --end-margin before it, its queued jobs going to other agents "
                     "(default inside a Slurm job: the job's end, from squeue)")
    end.add_argument("--time-left", type=float, metavar="S", help="the same, S seconds from now")
    p.add_argument("--end-margin", type=float, default=60.0, metavar="S",
                   help="with an end: stop this long before it (default 60)")
    p.add_argument("--log-level", default=os.environ.get("GPUPOOL_LOG_LEVEL", "INFO"))
    respell_parser(p, "agent")  # named as typed: gpupool-agent installed (issue 25)
    args = p.parse_args(argv)
    if args.base is None:
        print(f"{p.prog}: missing --base BASE, the spool folder (or set $GPUPOOL_BASE)", file=sys.stderr)
        sys.exit(2)
    return args

def _end(args: argparse.Namespace) -> tuple[float, str] | None | str:
    """The end the agent must stop by and what it is (``agent.lifetime``), None where it has none,
    or the message for a bad --idle-exit, --end-at, --time-left or --end-margin."""
    import time

    from gpupool.agent.lifetime import parse_end, slurm_end
    if args.idle_exit is not None and not 0 < args.idle_exit < math.inf:
        return "--idle-exit must be a positive number of seconds"
    if not 0 <= args.end_margin < math.inf:
        return "--end-margin must be 0 or a positive number of seconds"
    if args.time_left is not None:
        if not 0 < args.time_left < math.inf:
            return "--time-left must be a positive number of seconds"
        ends = (time.time() + args.time_left, f"its --time-left {args.time_left:g}")
    elif args.end_at is not None:
        try:
            ends = (parse_end(args.end_at), f"its --end-at {args.end_at}")
        except ValueError as e:
            return str(e)
    else:
        ends = slurm_end()
    if ends is not None and ends[0] - time.time() <= args.end_margin:
        return (f"{ends[1]} leaves {max(0.0, ends[0] - time.time()):.0f} s, no more than --end-margin "
                f"{args.end_margin:g}: the agent would stop at once")
    return ends



def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # Before anything can initialise CUDA: make CUDA count GPUs the way NVML does.
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    from gpupool.jobs.logsetup import logger

    from gpupool.jobs.logsetup import command_logs

    from gpupool.agent.agent import Agent, AgentConfig
    from gpupool.agent.gpu import make_probe
    from gpupool.agent.identity import host_id
    from gpupool.agent.slot import claim
    from gpupool.jobs.errors import SpoolError
    from gpupool.jobs.fsinfo import check_locks
    from gpupool.jobs.paths import Spool

    command_logs(args.log_level, "{time:HH:mm:ss.SSS} {level: <7} {message}")
    for name in ("poll_interval", "max_poll_interval", "rescan", "heartbeat"):
        if not 0 < getattr(args, name) < math.inf:
            print(f"agent: --{name.replace('_', '-')} must be a positive number of seconds", file=sys.stderr)
            return 2
    if not 0 <= args.prune_quiet < math.inf:
        print("agent: --prune-quiet must be 0 or a positive number of seconds", file=sys.stderr)
        return 2
    if not 0 <= args.log_limit_mb < math.inf:
        print("agent: --log-limit-mb must be 0 (never cut) or a positive number of megabytes", file=sys.stderr)
        return 2
    if args.run_workers < 1:
        print("agent: --run-workers must be 1 or more", file=sys.stderr)
        return 2
    threads = None if args.threads == "auto" else int(args.threads) if args.threads.isdigit() else 0
    if threads == 0:
        print(f"agent: --threads must be 'auto' or a whole number of at least 1, not {args.threads!r}", file=sys.stderr)
        return 2
    ends = _end(args)
    if isinstance(ends, str):
        print(f"agent: {ends}", file=sys.stderr)
        return 2
    for name in ("max_jobs_per_worker", "drain_after_gpu_errors"):
        if getattr(args, name) < 0:
            print(f"agent: --{name.replace('_', '-')} must be 0 (never) or a positive number", file=sys.stderr)
            return 2
    try:
        # Locks must reach the file server, or hosts sharing BASE do not exclude each other (issue 4).
        unsafe_locks = check_locks(args.base, args.allow_local_locks)
        if unsafe_locks:
            logger.warning(unsafe_locks)
        spool = Spool(args.base).ensure()
        spool.check_private()
        host = host_id(args.host_id)
        probe = make_probe()
        slot = claim(spool, probe, host, args.gpu, args.cpu, args.min_free_gb, args.allow_shared_gpu,
                     args.gpus_per_agent, args.slots, args.slot)
    except SpoolError as e:
        print(f"agent: {e}", file=sys.stderr)
        return 3 if type(e).__name__ == "LockHeld" else 2
    if slot.gpu is None and not args.cpu:
        cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = f"CUDA_VISIBLE_DEVICES={cvd!r} hides every GPU" if cvd is not None and probe.devices() else \
            getattr(probe, "why", "no GPUs")
        logger.info("no GPU in use ({}); rank {} runs jobs on the CPU", why, slot.number)
    # Opened here, not by loguru: no link followed (Spool.open_log); cut to <log>.1 by the heartbeat (cap_log)
    log_file = io.TextIOWrapper(spool.open_log(spool.agent_log(slot.agent_id)), encoding="utf-8",
                                errors="backslashreplace", line_buffering=True)
    logger.add(log_file, level=args.log_level, enqueue=False, colorize=False,
               format="{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | " + slot.agent_id + " | {message}")
    cfg = AgentConfig(watch=args.watch, poll_interval=args.poll_interval, max_poll_interval=args.max_poll_interval,
                      rescan=args.rescan, heartbeat=args.heartbeat, burst=args.burst,
                      log_limit=int(args.log_limit_mb * 2**20), prune_quiet=args.prune_quiet,
                      max_jobs_per_worker=args.max_jobs_per_worker, gpu_fault_limit=args.drain_after_gpu_errors,
                      threads=threads, run_workers=args.run_workers, spare_worker=args.spare_worker,
                      idle_exit=args.idle_exit, end_margin=args.end_margin,
                      **({"end_at": ends[0], "end_why": ends[1]} if ends else {}))
    agent = Agent(spool, slot, probe, host, cfg)
    agent.install_signals()
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

