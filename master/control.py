"""Steering a pool: ``retry`` a run's failed chunks, ``cancel`` a run, ``drain``/``undrain`` an agent.

cancel: write ``runs/<run>/cancel`` ({"stop_running": bool}); take the run's queued jobs out
of every mailbox (``jobs.mailbox.drop_run``). Agents skip (or, with stop_running, kill) the
run's jobs; a master feeding it stops. Submitting the run again (``retry``, or the same
``main.py`` command) removes the flag and resumes it.

drain: create ``agents/<agent>.drain``. The agent finishes its current chunk, takes no new
one and says "draining" in its heartbeat; masters hand its queued jobs to other agents.

Each of them (and ``rm``) refuses a run or an agent of another user unless told ``force``
(``jobs.owners``): a guard against mistakes between colleagues, not a security boundary.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

from gpupool.jobs.atomic import server_now
from gpupool.jobs.errors import BadFile, SpoolError
from gpupool.jobs.descriptor import JobState
from gpupool.jobs.heartbeat import AgentState, JobRef, read_status
from gpupool.jobs.mailbox import Mailbox, drop_run
from gpupool.jobs.owners import agent_owner, check_run, refuse, run_owner
from gpupool.jobs.paths import Spool
from gpupool.jobs.results import scan_run
from gpupool.master.api import Run
from gpupool.master.core.liveness import DEAD, GONE, Liveness
from gpupool.master.spec.options import problem
from gpupool.master.spec.runspec import RunSpec, load_run
from gpupool.master.core.states import AtAgents, final_states, holdings, master_feeds, state_of_run


class ControlError(SpoolError):
    """A steering command cannot do what was asked; the message says why and what to do."""


def _note(**extra: Any) -> bytes:
    return json.dumps({"by": f"{socket.gethostname()}:{os.getpid()}", "at": time.time(), **extra}).encode()


def wait_until(cond: Callable[[], Any], timeout: float, poll: float = 0.1) -> Any:
    """``cond()``'s first true value within ``timeout`` seconds, else its last (false) value."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(poll)


# retry ----------------------------------------------------------------------------------------
def chunk_statuses(spool: Spool, spec: RunSpec) -> dict[int, JobState]:
    """chunk -> JobState.OK or JobState.FAILED (``master.core.states.chunk_state``), for the run's
    chunks with a readable committed result."""
    return final_states(spool, spec.name, spec.chunks)


def failed_chunks(spool: Spool, spec: RunSpec) -> list[int]:
    """Chunks whose committed result is a failure."""
    return [c for c, status in chunk_statuses(spool, spec).items() if status is JobState.FAILED]


def retry_run(spool: Spool, run: str, retries: int | None = None, force: bool = False) -> tuple[Run, list[int], int]:
    """The Run to feed again (failed chunks are re-opened by the feeder's recovery, under the
    run's master lock, with ``jobs.results.reopen_failed``), its failed chunks and how many
    chunks have no result at all (a cancelled or interrupted run). Another user's run is
    refused unless ``force`` (``jobs.owners``)."""
    spec = load_run(spool, run)
    check_run(spool, run, force, "retry it")
    from gpupool.master.executor import is_executor_run

    if is_executor_run(spec):
        raise ControlError(f"run {run} was made by a master.executor.Executor, whose chunks each call their own "
                           "function; submit them again from Python")
    if retries is not None:
        if why := problem("retries", retries):
            raise ControlError(why)
        spec = dataclasses.replace(spec, retries=retries)  # its placement, as saved, is kept (RunSpec.placement)
    statuses = chunk_statuses(spool, spec)
    failed = [c for c, status in statuses.items() if status is JobState.FAILED]
    missing = spec.chunks - len(statuses)
    return Run(spool, spec, fresh=False, force=force), failed, missing


# cancel ---------------------------------------------------------------------------------------
@dataclass
class Cancelled:
    dropped: int  # queued jobs taken out of mailboxes
    running: list[tuple[str, int]]  # (agent, chunk) still running when we stopped waiting
    master_stopped: bool  # no master feeds the run any more


def cancel_run(spool: Spool, run: str, stop_running: bool, timeout: float = 10.0, force: bool = False) -> Cancelled:
    """Cancel ``run`` (see the module docstring); waits up to ``timeout`` for its master to stop
    and, with ``stop_running``, for its running chunks to be killed. Another user's run is
    refused unless ``force`` (``jobs.owners``)."""
    load_run(spool, run)
    check_run(spool, run, force, "cancel it")
    spool.write_over(spool.cancel_flag(run), _note(stop_running=stop_running), "flag")
    dropped = drop_run(spool, run)
    stopped = wait_until(lambda: _master_gone(spool, run), timeout)
    dropped += drop_run(spool, run)  # what a master queued before it saw the flag
    if stop_running:
        wait_until(lambda: not _running(spool, run), timeout)
    return Cancelled(dropped, _running(spool, run), bool(stopped))


def _master_gone(spool: Spool, run: str) -> bool:
    return not master_feeds(spool, run)


def _running(spool: Spool, run: str) -> list[tuple[str, int]]:
    out = []
    for ident, view in Liveness(spool, 20.0).refresh().items():
        cur = view.status.current
        if view.alive and cur is not None and cur.run == run:
            out.append((ident, cur.chunk_id))
    return out


# runs and rm ----------------------------------------------------------------------------------
@dataclass
class RunInfo:
    run: str
    state: str  # a master.core.states.RunState's value (feeding, waiting, done, ...), or unreadable
    chunks: int | None
    ok: int
    failed: int
    bytes: int  # results, logs and the run's own folder on disk
    last_activity: float | None  # the newest file of the run (results, logs, run folder), by the server's clock
    owner: str | None = None  # who submitted it (jobs.owners; None: unknown)
    owner_uid: int | None = None


def list_runs(spool: Spool) -> list[RunInfo]:
    """Every run of the spool, what state it is in and what it holds on disk (``runs``)."""
    out, at = [], None
    for run in spool.run_names():
        size, newest = _footprint(spool, run)
        owner = run_owner(spool, run)
        try:
            spec = load_run(spool, run)
        except (OSError, SpoolError):
            out.append(RunInfo(run, "unreadable", None, 0, 0, size, newest, owner.user, owner.uid))
            continue
        at = at or AtAgents.of(holdings(spool, Liveness(spool, 20.0).refresh()))  # every mailbox read once
        n = at.counts(run, spec.chunks, chunk_statuses(spool, spec), spool.cancel_flag(run).exists())
        state = state_of_run(spool, run, spec.chunks, n, spec.waits_for)
        out.append(RunInfo(run, state.value, spec.chunks, n[JobState.OK], n[JobState.FAILED], size, newest,
                           owner.user, owner.uid))
    return out


def _footprint(spool: Spool, run: str) -> tuple[int, float | None]:
    size, newest = 0, None
    for folder in (spool.result_dir(run), spool.run_log_dir(run), spool.run_dir(run)):
        for root, _, files in os.walk(folder):
            for name in files:
                try:
                    st = os.lstat(os.path.join(root, name))
                except OSError:
                    continue
                size += st.st_size
                newest = st.st_mtime if newest is None else max(newest, st.st_mtime)
    return size, newest


def remove_run(spool: Spool, run: str, force: bool = False,
               confirm: Callable[[int, int], bool] | None = None) -> int | None:
    """Remove a run: its queued jobs, results, logs and run folder (``rm``); returns the bytes
    freed. Refused while a master feeds it, and for another user's run (``jobs.owners``), unless
    ``force`` (which cancels it first). ``confirm(results, bytes)``, when given, is asked after
    those checks and before anything changes (``rm``'s question); False: nothing is removed and
    None is returned."""
    if run not in spool.run_names():
        raise ControlError(f"no run {run!r} in {spool.base} (see python -m master runs)")
    check_run(spool, run, force, "remove it")
    fed = not _master_gone(spool, run)
    if fed and not force:
        raise ControlError(f"run {run} is being fed by a master; cancel it first (python -m master cancel "
                           f"--base {spool.base} --run {run}), or pass --force")
    if confirm is not None and not confirm(len(scan_run(spool, run).finals), _footprint(spool, run)[0]):
        return None
    if fed:
        cancel_run(spool, run, stop_running=True, timeout=10.0, force=force)
    size, _ = _footprint(spool, run)
    drop_run(spool, run)
    for folder in (spool.result_dir(run), spool.run_log_dir(run), spool.run_dir(run)):
        shutil.rmtree(folder, ignore_errors=True)
    return size


# drain ----------------------------------------------------------------------------------------
@dataclass
class AgentReport:
    agent: str
    state: str  # heartbeat state, or DEAD (master.core.liveness)
    current: JobRef | None
    queued: int
    reached: bool  # the agent reported the state we waited for
    current_for_s: float | None = None  # how long ``current`` has run (AgentView.running_for), if known


def check_agent(spool: Spool, agent: str, force: bool = True, doing: str = "") -> None:
    """Refuse an agent id that is not there, and (unless ``force``) another user's agent, by the
    uid its heartbeat names (``jobs.owners``; an agent of an earlier release names none)."""
    if agent not in spool.agent_ids():
        known = ", ".join(spool.agent_ids()) or "none yet"
        raise ControlError(f"no agent {agent!r} in {spool.base} (agents there: {known}; "
                           "see python -m master status)")
    if not force:
        try:
            hb = read_status(spool.heartbeat(agent))
        except (OSError, BadFile):
            hb = None
        refuse(f"agent {agent}", agent_owner(hb), force, doing)


def agent_report(spool: Spool, agent: str, live: Liveness, want: Callable[[str], bool]) -> AgentReport:
    view = live.refresh().get(agent)
    state = DEAD if view is None or not view.alive else view.state  # a stopped one too: it takes nothing
    try:
        queued = len(Mailbox(spool, agent).read().jobs)
    except (OSError, BadFile):
        queued = 0
    cur = view.status.current if view is not None and view.alive else None
    took = view.running_for(server_now(spool.agents_dir)) if cur is not None and view is not None else None
    return AgentReport(agent, state, cur, queued, want(state), took)


def drain(spool: Spool, agent: str, timeout: float = 30.0, dead_after: float = 20.0,
          force: bool = False) -> AgentReport:
    """Tell ``agent`` to take no new job; wait until it says "draining" (or is not alive).
    Another user's agent is refused unless ``force``.

    A busy agent reads the flag when its current chunk ends, so "busy" is answer enough."""
    check_agent(spool, agent, force, "drain it")
    spool.write_over(spool.drain_flag(agent), _note(), "flag")
    live = Liveness(spool, dead_after)

    def reached() -> AgentReport | None:
        # A busy agent looks at the flag when its chunk ends; until then it says "busy".
        rep = agent_report(spool, agent, live, lambda s: s == AgentState.DRAINING or s == AgentState.BUSY)
        return rep if rep.reached or rep.state in GONE else None

    return wait_until(reached, timeout) or agent_report(spool, agent, live, lambda s: False)


def undrain(spool: Spool, agent: str, timeout: float = 30.0, dead_after: float = 20.0,
            force: bool = False) -> AgentReport:
    """Remove ``agent``'s drain flag; wait until it takes jobs again (or is not alive). Another
    user's agent is refused unless ``force``."""
    check_agent(spool, agent, force, "undrain it")
    try:
        os.unlink(spool.drain_flag(agent))
    except FileNotFoundError:
        pass
    live = Liveness(spool, dead_after)
    accepting = (AgentState.IDLE, AgentState.BUSY)

    def reached() -> AgentReport | None:
        rep = agent_report(spool, agent, live, lambda s: s in accepting)
        return rep if rep.reached or rep.state in GONE else None

    return wait_until(reached, timeout) or agent_report(spool, agent, live, lambda s: False)


def wait_idle(spool: Spool, agent: str, timeout: float, dead_after: float = 20.0) -> AgentReport:
    """After a drain: wait until the agent has finished its current chunk."""
    live = Liveness(spool, dead_after)

    def idle() -> AgentReport | None:
        rep = agent_report(spool, agent, live, lambda s: s == AgentState.DRAINING)
        return rep if (rep.reached and rep.current is None) or rep.state in GONE else None

    return wait_until(idle, timeout) or agent_report(spool, agent, live, lambda s: False)
