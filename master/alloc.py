"""``python -m master alloc slurm``: agents that Slurm starts while there is work (issue 26), as
HyperQueue's automatic allocation does.

One allocator per spool (``BASE/alloc/alloc.lock``). Every ``poll`` seconds it

1. asks ``squeue`` for its own jobs (named ``gpupool-alloc-<hash of BASE>``, this user's), and
   updates their records (``master.core.allocs``): state, nodes, and the agents seen from each;
2. counts the chunks that wait (``master.core.allocs.waiting``: fed runs' chunks at no agent, less
   the idle agents that may take them) and submits what ``master.core.allocs.plan`` says with the
   Slurm recipe, ``examples/slurm/agents.sbatch BASE --idle-exit IDLE``, so that its agents end
   themselves once the pool has had no work for them for IDLE seconds and the job gives its
   nodes back; each with ``--time`` and the user's sbatch options;
3. gives back (``scancel``) a job that has not started when no chunk waits any more;
4. backs off after an allocation that failed (sbatch refused it, or the job ended with no agent
   seen from it): 10 s, doubled at each failure in a row up to 10 min; after ``max_failures`` in a
   row it stops (exit 1);
5. stops (exit 0) once no run is fed, none of its allocations is left in Slurm, and that has lasted
   IDLE seconds (so an allocator started just before ``main.py`` waits for it), unless ``forever``;
   on SIGTERM or Ctrl-C at once, cancelling the jobs that have not started.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, TextIO

from gpupool.jobs.errors import BadFile
from gpupool.jobs.invoked import ROOT
from gpupool.jobs.locks import HolderLock
from gpupool.jobs.paths import Spool
from gpupool.jobs.words import plural
from gpupool.master.core.allocs import ENDED, Allocation, RunDemand, load_all, plan, save, waiting
from gpupool.master.core.states import RunState
from gpupool.master.errors import UsageError
from gpupool.master.report.status import StatusReader
from gpupool.master.spec.runspec import RunSpec

BACKOFF_S = (10.0, 600.0)  # the first wait after a failed allocation, and the longest
TIME_FORMAT = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$")  # sbatch --time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S


class AllocError(Exception):
    """A Slurm command failed: the message says which and what it printed."""


def job_name(spool: Spool) -> str:
    """The name of this spool's allocations: one allocator's jobs told from every other's."""
    return "gpupool-alloc-" + hashlib.sha1(str(spool.base.resolve()).encode()).hexdigest()[:8]


def recipe(explicit: str | None = None) -> Path:
    """The sbatch script: ``explicit``, else ``$GPUPOOL_HOME`` or this checkout's
    ``examples/slurm/agents.sbatch``; UsageError saying what to give where there is none."""
    if explicit:
        path = Path(explicit)
    else:
        home = Path(os.environ.get("GPUPOOL_HOME") or ROOT)
        path = home / "examples" / "slurm" / "agents.sbatch"
    if not path.is_file():
        raise UsageError(f"no sbatch recipe at {path}: give --script PATH (examples/slurm/agents.sbatch of a "
                         "gpupool checkout the nodes can read), or set $GPUPOOL_HOME to such a checkout")
    return path.resolve()


@dataclass
class SlurmJob:
    state: str
    nodes: str  # squeue's %N: a node list, possibly compressed (node[01-04])
    start: float | None  # when it started (squeue's %S), for a job that has


class Slurm:
    """The Slurm commands the allocator uses (a test may put a fake in its place)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = env

    def _run(self, cmd: list[str]) -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=self.env)
        except (OSError, subprocess.SubprocessError) as e:
            raise AllocError(f"{cmd[0]}: {e}") from e
        if r.returncode != 0:
            raise AllocError(f"{' '.join(cmd[:1] + cmd[1:3])}... exited with {r.returncode}: "
                             f"{(r.stderr or r.stdout).strip()[:500]}")
        return r.stdout

    def submit(self, args: list[str], env: dict[str, str]) -> str:
        out = self._run_env(["sbatch", "--parsable", *args], env)
        job = out.strip().split(";")[0]
        if not job:
            raise AllocError(f"sbatch printed no job id: {out.strip()[:200]!r}")
        return job

    def _run_env(self, cmd: list[str], env: dict[str, str]) -> str:
        saved, self.env = self.env, env
        try:
            return self._run(cmd)
        finally:
            self.env = saved

    def jobs(self, name: str) -> dict[str, SlurmJob]:
        """This user's jobs called ``name`` that Slurm still lists, in any state."""
        user = str(os.getuid())
        out = self._run(["squeue", "-h", "-t", "all", "-u", user, "--name", name, "-o", "%i|%T|%N|%S"])
        found = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) != 4:
                continue
            job, state, nodes, start = parts
            found[job] = SlurmJob(state, "" if nodes in ("", "(null)") else nodes, _when(start))
        return found

    def hostnames(self, nodes: str) -> list[str]:
        return self._run(["scontrol", "show", "hostnames", nodes]).split() if nodes else []

    def cancel(self, job: str) -> None:
        self._run(["scancel", job])


def _when(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        return None  # N/A, Unknown: not started


@dataclass
class AllocConfig:
    max_jobs: int
    time: str  # sbatch --time
    idle_timeout: float  # the agents' --idle-exit, and how long the allocator lingers with no work
    backlog: int = 1
    sbatch_args: list[str] = field(default_factory=list)
    agent_args: list[str] = field(default_factory=list)
    script: Path | None = None
    poll: float = 5.0
    forever: bool = False
    dead_after: float = 20.0
    max_failures: int = 10

    def check(self) -> None:
        if self.max_jobs < 1:
            raise UsageError(f"--max-jobs must be 1 or more, not {self.max_jobs}")
        if self.backlog < 1:
            raise UsageError(f"--backlog must be 1 or more, not {self.backlog}")
        if not TIME_FORMAT.match(self.time):
            raise UsageError(f"--time {self.time!r}: expected Slurm's time format, e.g. 12:00:00, 90 (minutes), 1-00:00:00")
        margin = end_margin(self.agent_args)
        if slurm_seconds(self.time) <= margin:  # agent.lifetime: each agent refuses to start, and no job ever works
            raise UsageError(f"--time {self.time}: the agents stop --end-margin {margin:g} s before their job's end, which "
                             f"leaves them no time; give a longer --time, or --agent-args '--end-margin S'")
        for name in ("idle_timeout", "poll", "dead_after"):
            v = getattr(self, name)
            if not 0 < v < float("inf"):
                raise UsageError(f"--{name.replace('_', '-')} must be a positive number of seconds, not {v:g}")
        if self.max_failures < 1:
            raise UsageError(f"--max-failures must be 1 or more, not {self.max_failures}")


class Allocator:
    def __init__(self, spool: Spool, cfg: AllocConfig, slurm: Slurm | None = None, out: TextIO = sys.stdout,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.spool, self.cfg, self.slurm, self.out, self.clock = spool, cfg, slurm or Slurm(), out, clock
        self.name = job_name(spool)
        self.reader = StatusReader(spool, cfg.dead_after)
        self.allocs: dict[str, Allocation] = {a.job: a for a in load_all(spool)}
        self.failures = 0  # allocations that failed in a row
        self.too_long: set[str] = set()  # runs whose chunks an allocation is too short for (said once)
        self.next_try = clock()
        self.quiet_since: float | None = None  # since when no run is fed and no allocation is left
        self.stop_requested = False

    def say(self, text: str, level: str = "INFO") -> None:
        """One line, in the agents' log format: ``logs`` merges it with theirs."""
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        print(f"{stamp} | {level:<7} | alloc | {text}", file=self.out, flush=True)

    # one pass ------------------------------------------------------------------------------------
    def step(self) -> int | None:
        """One look at Slurm and the spool; the exit code once the allocator is done, else None."""
        try:
            listed = self.slurm.jobs(self.name)
        except AllocError as e:
            self.say(f"squeue failed, trying again: {e}", "WARNING")
            return None
        self._update(listed)
        data = self.reader.gather()
        views = self.reader.liveness.views
        self._match(views)
        fed = [r for r in data["runs"] if RunState(r["state"]).fed]
        idle = [views[a["id"]].status for a in data["agents"]
                if a["alive"] and a["state"] == "idle" and not a["queued"] and a["current"] is None
                and not a["drain_flag"] and a["id"] in views]
        wait = waiting([d for r in fed if r["pending"] and (d := self._demand(r["run"], r["pending"])) is not None],
                       idle)
        active = [a for a in self.allocs.values() if a.active]
        starting = sum(a.starting for a in active)
        if wait == 0:
            self._give_back_pending()
        n = plan(wait, starting, len(active) - starting, self.cfg.max_jobs, self.cfg.backlog)
        if n and self.clock() >= self.next_try:
            self.say(f"{plural(wait, 'chunk')} of {plural(len(fed), 'fed run')} wait for agents "
                     f"({starting} allocation(s) starting, {len(active) - starting} serving): submitting {n}")
            for _ in range(n):
                if not self._submit():
                    break
        if self.failures >= self.cfg.max_failures:
            self.say(f"{plural(self.failures, 'allocation')} failed in a row: stopping (see the lines above)", "ERROR")
            return 1
        if fed or any(a.active for a in self.allocs.values()):
            self.quiet_since = None
            return None
        if self.quiet_since is None:
            self.quiet_since = self.clock()
            self.say(f"no run is fed and no allocation is left; stopping in {self.cfg.idle_timeout:g} s unless "
                     "work comes" if not self.cfg.forever else "no work now; waiting for more (--forever)")
        if not self.cfg.forever and self.clock() - self.quiet_since >= self.cfg.idle_timeout:
            self.say("done: no work left and every allocation ended")
            return 0
        return None

    def _demand(self, run: str, pending: int) -> RunDemand | None:
        """A fed run's chunks that wait, and which agents may take them (its placement); None where
        its chunks (its --chunk-time) take longer than an allocation leaves its agents, who would
        start none of them (agent.lifetime): no allocation is submitted for it, and that is said once."""
        try:
            spec = RunSpec.load(self.spool.run_spec(run))
        except (OSError, BadFile, ValueError):
            return RunDemand(run, pending)
        room = slurm_seconds(self.cfg.time) - end_margin(self.cfg.agent_args)
        if spec.chunk_time is not None and spec.chunk_time > room:
            if run not in self.too_long:
                self.too_long.add(run)
                self.say(f"run {run}: its chunks take {spec.chunk_time:g} s (--chunk-time), more than an allocation "
                         f"of --time {self.cfg.time} leaves its agents ({room:g} s before their --end-margin): none is "
                         "submitted for it", "WARNING")
            return None
        placement = spec.placement
        return RunDemand(run, pending, None if not placement.any else (lambda h: placement.why_not(h) is None))

    def _update(self, listed: dict[str, SlurmJob]) -> None:
        for job in listed.keys() - self.allocs.keys():  # submitted by an allocator that stopped before its record
            self.allocs[job] = Allocation(job, listed[job].state, submitted_at=time.time())
            self.say(f"found job {job} ({listed[job].state}) of this spool: taken over")
        for a in self.allocs.values():
            if not a.active:
                continue
            got = listed.get(a.job)
            state = got.state if got is not None else ENDED
            changed = state != a.state
            if got is not None and got.start is not None and a.started_at is None and state != "PENDING":
                a.started_at = got.start
            if got is not None and got.nodes and not a.nodes and state != "PENDING":
                try:
                    a.nodes = self.slurm.hostnames(got.nodes)
                    changed = True
                except AllocError as e:
                    self.say(f"job {a.job}: cannot expand its nodes {got.nodes!r}: {e}", "WARNING")
            a.state = state
            if not a.active:
                a.ended_at = time.time()
                if a.failed:
                    self._failed(f"job {a.job} ended ({state}) with no agent seen from it: see its output, "
                                 f"{self._output(a.job)}")
                else:
                    self.say(f"job {a.job} ended ({state}); agents seen from it: {', '.join(a.agents) or '-'}")
            elif changed:
                self.say(f"job {a.job}: {state}" + (f" on {', '.join(a.nodes)}" if a.nodes else ""))
            if changed or not a.active:
                save(self.spool, a)

    def _match(self, views: dict) -> None:
        """Agents seen from each running allocation: those whose heartbeat names its Slurm job; for
        an agent that names none (an older one), on one of its nodes and started after it (a
        second's slack for the two clocks of one node)."""
        for a in self.allocs.values():
            if not a.active or not a.nodes or a.started_at is None:
                continue
            new = []
            for ident, v in views.items():
                st = v.status
                names = {st.host, (st.hostname or "").split(".")[0]}
                ours = st.slurm_job == a.job if st.slurm_job is not None else \
                    bool(names & set(a.nodes)) and (st.started_at or 0.0) >= a.started_at - 1.0
                if ident not in a.agents and ours:
                    new.append(ident)
            if new:
                a.agents = sorted(set(a.agents) | set(new))
                save(self.spool, a)
                self.failures, self.next_try = 0, self.clock()
                self.say(f"job {a.job}: agent(s) {', '.join(new)} started")

    def _output(self, job: str) -> Path:
        return self.spool.logs_dir / "alloc" / f"slurm-{job}.out"

    def _submit(self) -> bool:
        script = self.cfg.script or recipe()
        out_dir = self.spool.mkdir(self.spool.logs_dir / "alloc")
        args = [f"--job-name={self.name}", f"--time={self.cfg.time}", f"--output={out_dir}/slurm-%j.out",
                *self.cfg.sbatch_args, str(script), str(self.spool.base.resolve()),
                "--idle-exit", f"{self.cfg.idle_timeout:g}", *self.cfg.agent_args]
        env = {**os.environ, "GPUPOOL_HOME": str(script.parent.parent.parent)}
        env.setdefault("PYTHON", sys.executable)  # the agents run on the Python that runs this (a shared venv)
        try:
            job = self.slurm.submit(args, env)
        except AllocError as e:
            self._failed(f"sbatch refused the allocation: {e}")
            return False
        a = Allocation(job, "PENDING", submitted_at=time.time())
        self.allocs[job] = a
        save(self.spool, a)
        self.say(f"submitted job {job} (--time {self.cfg.time}; agents end after {self.cfg.idle_timeout:g} s "
                 f"without work; output {self._output(job)})")
        return True

    def _failed(self, why: str) -> None:
        self.failures += 1
        wait = min(BACKOFF_S[0] * 2 ** (self.failures - 1), BACKOFF_S[1])
        self.next_try = self.clock() + wait
        self.say(f"{why}; next allocation in {wait:g} s at the earliest "
                 f"({self.failures} failed in a row, stopping at {self.cfg.max_failures})", "WARNING")

    def _give_back_pending(self) -> None:
        for a in self.allocs.values():
            if a.state == "PENDING" and not a.cancelled:
                try:
                    self.slurm.cancel(a.job)
                except AllocError as e:
                    self.say(f"job {a.job}: scancel failed: {e}", "WARNING")
                    continue
                a.cancelled = True
                save(self.spool, a)
                self.say(f"job {a.job} had not started and no chunk waits any more: cancelled")

    # the loop ----------------------------------------------------------------------------------
    def run(self) -> int:
        def stop(signum, frame) -> None:
            self.stop_requested = True

        old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.say(f"allocator of {self.spool.base} started (pid {os.getpid()}; jobs named {self.name}; at most "
                     f"{self.cfg.max_jobs}, backlog {self.cfg.backlog}, --time {self.cfg.time}, "
                     f"idle timeout {self.cfg.idle_timeout:g} s)")
            while not self.stop_requested:
                code = self.step()
                if code is not None:
                    return code
                deadline = self.clock() + self.cfg.poll
                while not self.stop_requested and self.clock() < deadline:
                    time.sleep(min(0.2, max(0.0, deadline - self.clock())))
            self._give_back_pending()  # jobs that never started: nobody waits for them now
            left = [a.job for a in self.allocs.values() if a.active and not a.cancelled]
            self.say("stop requested: exiting; " + (f"job(s) {', '.join(left)} stay, their agents ending when idle"
                                                    if left else "no job left"))
            return 0
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def take_lock(spool: Spool) -> HolderLock:
    """The spool's allocator lock, or LockHeld naming its holder."""
    spool.mkdir(spool.alloc_dir)
    lock = HolderLock(spool.alloc_lock())
    lock.take(f"the allocator of {spool.base}")
    return lock


def slurm_seconds(text: str) -> int:
    """Seconds of a Slurm time limit (``TIME_FORMAT``: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S)."""
    days, _, rest = text.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if days:  # D-H, D-H:M, D-H:M:S
        h, m, s = (parts + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + m) * 60 + s
    return parts[0] * 60 if len(parts) == 1 else parts[0] * 60 + parts[1] if len(parts) == 2 else \
        (parts[0] * 60 + parts[1]) * 60 + parts[2]


def end_margin(args: list[str]) -> float:
    """The agents' --end-margin among ``args`` (the last one given), else the agent's default."""
    from gpupool.agent.lifetime import END_MARGIN_S

    margin = END_MARGIN_S
    for i, a in enumerate(args):
        with contextlib.suppress(ValueError, IndexError):
            margin = float(a.split("=", 1)[1]) if a.startswith("--end-margin=") else \
                float(args[i + 1]) if a == "--end-margin" else margin
    return margin


def agent_args(text: str | None) -> list[str]:
    return shlex.split(text) if text else []
