"""Start and stop this host's agents in the background (what ``start_agents.sh`` runs).

``start N BASE``: one agent per GPU 0..N-1 (or N CPU agents), detached from the terminal,
skipping those already running; waits until each has written its first heartbeat.
``stop BASE``: SIGTERM to this host's agents (each finishes its current job), then waits.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gpupool.agent.gpu import make_probe, visible_gpus
from gpupool.agent.identity import agent_id, host_id
from gpupool.agent.slot import label
from gpupool.agent.threads import share
from gpupool.agent.worker_control import pid_alive, tail as log_tail
from gpupool.agent.pychild import is_agent_argv, python_argv
from gpupool.jobs.errors import BadFile, SpoolError
from gpupool.jobs.heartbeat import AgentState, read_status
from gpupool.jobs.invoked import prog, respell
from gpupool.jobs.locks import FileLock
from gpupool.jobs.paths import Spool
from gpupool.jobs.words import plural


USAGE = """usage: ./start_agents.sh N BASE [--cpu] [--gpus-per-agent K] [--slots K] [--host-id ID] [--timeout S]
                          [-- AGENT OPTIONS...]
       ./start_agents.sh stop BASE [--now] [--host-id ID]
examples:
  ./start_agents.sh 8 /shared/base          # one agent per GPU 0..7 of this host
  ./start_agents.sh 2 /tmp/b --cpu          # two CPU agents
  ./start_agents.sh 8 /shared/base --gpus-per-agent 2   # four agents, each holding two GPUs (0+1, 2+3, ...)
  ./start_agents.sh 1 /shared/base --slots 4            # four agents sharing GPU 0, one job each at a time
  ./start_agents.sh 4 /shared/base -- --watch poll --poll-interval 0.2
  ./start_agents.sh stop /shared/base       # graceful: each finishes its current job
BASE: the spool folder the agents serve (default: $GPUPOOL_BASE)"""


@dataclass
class Started:
    agent_id: str
    pid: int
    log: Path
    new: bool


def is_running(spool: Spool, ident: str) -> bool:
    """True if a live process holds this agent id's lock (a dead one's lock is free)."""
    path = spool.agent_lock(ident)
    if not path.exists():
        return False
    lock = FileLock(path)
    try:
        return not lock.acquire(blocking=False)
    finally:
        lock.close()


def agent_pid(spool: Spool, ident: str) -> int | None:
    try:
        return int(read_status(spool.heartbeat(ident)).pid)
    except (OSError, BadFile, ValueError, TypeError):
        return None


def start(base: str, n: int, cpu: bool = False, host: str | None = None, agent_args: list[str] | None = None,
          timeout: float = 120.0, numbers: list[int] | None = None, partial: bool = False, per_agent: int = 1,
          slots: int = 1) -> list[Started]:
    """Start agents for GPUs (or CPU ranks) 0..n-1, or for the given ``numbers``: one per GPU, one per
    ``per_agent`` GPUs in order (--gpus-per-agent: 0+1, 2+3, ...), or ``slots`` per GPU (--slots).
    Raises AgentsFailed if some did not start (an unusable GPU), after starting the others; with
    ``partial``, says why on stderr and returns those that did, unless none did."""
    spool = Spool(base).ensure()
    host = host_id(host)
    gpus = [] if cpu else visible_gpus(make_probe())
    numbers = list(range(n)) if numbers is None else numbers
    if gpus and max(numbers, default=0) >= len(gpus):
        raise SpoolError(f"asked for GPU(s) {numbers} but this host has {len(gpus)} visible GPU(s), "
                         f"numbered 0..{len(gpus) - 1}; ask for fewer, or use --cpu for CPU agents")
    procs: list[tuple[str, subprocess.Popen | None, Path]] = []
    specs = _agents(numbers, bool(gpus), per_agent, slots)
    threads = ["--threads", str(share(len(specs)))]  # each its share of the cores (agent.threads); theirs go after
    for group, j in specs:
        ident = agent_id(host, label([gpus[i] for i in group], j) if gpus else f"cpu{group[0]}")
        out = spool.agent_out(ident)
        if is_running(spool, ident):
            procs.append((ident, None, out))
            continue
        cmd = python_argv("agent", "--base", str(spool.base), "--gpu", ",".join(map(str, group)),
                          "--host-id", host) + ([] if j is None else ["--slots", str(slots), "--slot", str(j)])
        cmd += (["--cpu"] if not gpus else []) + threads + list(agent_args or [])
        with spool.open_log(out) as f:  # no link followed (one there is moved to rejected/)
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # survives the shell closing
        procs.append((ident, proc, out))
    started, failed = [], []
    for ident, proc, out in procs:  # one agent that cannot start (an unusable GPU) stops none of the others
        try:
            started.append(_wait_ready(spool, ident, proc, out, timeout))
        except SpoolError as e:
            failed.append(str(e))
    if failed and partial and started:
        for why in failed:
            print(f"warning: {why}; going on with {plural(len(started), 'agent')}", file=sys.stderr)
    elif failed:
        raise AgentsFailed(started, failed)
    return started


def _agents(numbers: list[int], gpus: bool, per_agent: int, slots: int) -> list[tuple[list[int], int | None]]:
    """(GPU numbers, slot) of each agent to start; SpoolError for a shape that does not fit."""
    if per_agent < 1 or slots < 1:
        raise SpoolError(f"--{'gpus-per-agent' if per_agent < 1 else 'slots'} must be 1 or more")
    if per_agent > 1 and slots > 1:
        raise SpoolError("--gpus-per-agent with --slots: slots share one GPU; use one or the other")
    if not gpus and (per_agent > 1 or slots > 1):
        raise SpoolError(f"--{'gpus-per-agent' if per_agent > 1 else 'slots'} needs GPUs, and these agents have none "
                         "(--cpu, or no GPU visible); start more CPU agents instead")
    if len(numbers) % per_agent:
        raise SpoolError(f"{len(numbers)} GPU(s) do not split into agents of {per_agent} (--gpus-per-agent "
                         f"{per_agent}): ask for a multiple of {per_agent}")
    groups = [numbers[i:i + per_agent] for i in range(0, len(numbers), per_agent)]
    return [(g, None) for g in groups] if slots == 1 else [(g, j) for g in groups for j in range(slots)]


class AgentsFailed(SpoolError):
    """Some agents did not start (``failures``: one message each); ``started`` did."""

    def __init__(self, started: list[Started], failures: list[str]) -> None:
        self.started, self.failures = started, failures
        super().__init__(f"{plural(len(failures), 'agent')} did not start:\n" + "\n".join(failures))


def _wait_ready(spool: Spool, ident: str, proc: subprocess.Popen | None, out: Path, timeout: float) -> Started:
    if proc is None:
        return Started(ident, agent_pid(spool, ident) or -1, spool.agent_log(ident), False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            tail = log_tail(out, 4000).strip().splitlines()[-5:]
            raise SpoolError(f"agent {ident} exited with code {code} at start:\n  " + "\n  ".join(tail), out)
        try:
            st = read_status(spool.heartbeat(ident))
            if st.pid == proc.pid and st.state in (AgentState.IDLE, AgentState.BUSY):
                return Started(ident, proc.pid, spool.agent_log(ident), True)
        except (OSError, BadFile):
            pass
        time.sleep(0.05)
    raise SpoolError(f"agent {ident} (pid {proc.pid}) did not report ready within {timeout:g} s; see its log", out)


def stop(base: str, host: str | None = None, now: bool = False, timeout: float = 600.0,
         only: list[str] | None = None) -> list[str]:
    """Stop this host's running agents (or those in ``only``); returns the ids stopped."""
    spool = Spool(base)
    prefix = host_id(host) + "-"
    targets = []
    for ident in only if only is not None else spool.agent_ids():
        if (only is not None or ident.startswith(prefix)) and is_running(spool, ident):
            pid = agent_pid(spool, ident)
            if pid and pid_alive(pid) and _is_agent_process(pid, spool):
                targets.append((ident, pid))
    for _ in range(2 if now else 1):
        for _, pid in targets:
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.05)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(p) for _, p in targets):
        time.sleep(0.05)
    return [i for i, _ in targets]


def _is_agent_process(pid: int, spool: Spool) -> bool:
    """Pids are reused: only signal a process whose command line is an agent of this spool."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return is_agent_argv(argv) and os.fsencode(str(spool.base)) in argv


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    agent_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, agent_args = argv[:cut], argv[cut + 1:]
    me, usage = prog("agents"), respell(USAGE, "agents")  # as typed: gpupool-agents installed (issue 25)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    p = argparse.ArgumentParser(prog=me, usage=usage.removeprefix("usage: "))
    p.add_argument("what")
    p.add_argument("base", nargs="?", default=os.environ.get("GPUPOOL_BASE") or None)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--gpus-per-agent", type=int, default=1)
    p.add_argument("--slots", type=int, default=1)
    p.add_argument("--now", action="store_true")
    p.add_argument("--host-id")
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    if args.base is None:
        print(f"{me}: missing BASE, the spool folder (or set $GPUPOOL_BASE)\n{usage}", file=sys.stderr)
        return 2
    try:
        if args.what == "stop":
            if not Spool(args.base).exists():
                print(f"{me}: {args.base} is not a spool (no agent was ever started there): nothing to "
                      "stop", file=sys.stderr)
                return 1
            stopped = stop(args.base, args.host_id, args.now, args.timeout)
            print(f"stopped {plural(len(stopped), 'agent')}: {' '.join(stopped)}" if stopped else
                  f"no agent of host {host_id(args.host_id)} is running in {args.base}: nothing to stop")
            return 0
        try:
            n = int(args.what)
        except ValueError:
            print(f"{me}: N must be a number of agents or 'stop', not {args.what!r}\n{usage}", file=sys.stderr)
            return 2
        if n < 1:
            print(f"{me}: N must be at least 1, not {n}", file=sys.stderr)
            return 2
        try:
            started, failed = start(args.base, n, args.cpu, args.host_id, agent_args, args.timeout,
                                    per_agent=args.gpus_per_agent, slots=args.slots), []
        except AgentsFailed as e:
            started, failed = e.started, e.failures
    except SpoolError as e:
        print(f"{me}: {e}", file=sys.stderr)
        return 1
    for s in started:
        print(f"{s.agent_id:<24} pid {s.pid:<8} {'started' if s.new else 'already running':<16} log {s.log}")
    for why in failed:
        print(f"{me}: {why}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
