"""Run dependencies (issue 26): ``main.py --after A,B`` starts a run's chunks only once runs A and
B are over with every chunk ok (Slurm's ``afterok``); ``--after-any`` once they are over whatever
their outcome (``afterany``). Saved with the run (``RunSpec.after``, ``RunSpec.after_any``).

A run is over when it is sealed (``jobs.results.read_seal``: its master saw every chunk's final
result, or stopped it early) or cancelled; a run whose master was interrupted is not over: it may
be resumed, and what waits for it waits on. The run's own master waits (``wait_for_runs``, called
by ``api.Run.wait`` under the run's master lock); a run an ``--after`` run needs ok that failed,
stopped early, was cancelled or is gone makes it fail at once: its master seals it stopped early,
naming why. Meanwhile its state is ``after`` (``master.core.states``), whether or not a master
waits for it. Unknown runs and cycles are refused when the run is submitted (``check_after``).
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from gpupool.jobs.errors import BadFile, SpoolError
from gpupool.jobs.paths import Spool
from gpupool.jobs.results import read_seal
from gpupool.jobs.words import plural
from gpupool.master.core.states import JobState, final_states
from gpupool.master.errors import UsageError
from gpupool.master.spec.runspec import RunSpec

POLL_S = 0.5  # how often a waiting master looks at the runs it waits for (two stats each)
SAY_EVERY_S = 60.0  # a waiting master says again what it waits for, at most this often
HALTED = "--after: "  # how the seal's reason of a run stopped by a run it needed ok begins (``blocked``)


def outcome(spool: Spool, run: str) -> str | None:
    """How ``run`` ended: "" for every chunk ok, else why not ("was cancelled", "failed (1 of 4
    chunks failed)", ...); None while it is not over."""
    if spool.cancel_flag(run).exists():
        return "was cancelled"
    try:
        spec = RunSpec.load(spool.run_spec(run))
    except FileNotFoundError:
        return "is gone (removed)"
    except (OSError, BadFile, SpoolError) as e:
        return f"cannot be read ({e})"
    seal = read_seal(spool, run)
    if seal is None:
        return None
    if seal.halted is not None:
        return f"stopped early ({seal.halted})"
    states = final_states(spool, run, spec.chunks)
    ok = sum(s is JobState.OK for s in states.values())
    if ok >= spec.chunks:
        return ""
    failed = len(states) - ok
    return f"failed ({failed} of {plural(spec.chunks, 'chunk')} failed)" if failed else \
        f"ended with {ok} of {plural(spec.chunks, 'chunk')} ok"


def blocked(spool: Spool, spec: RunSpec) -> tuple[list[str], str | None]:
    """(the runs ``spec`` still waits for, why it can never start: a run it needs ok that ended
    otherwise, or None)."""
    waiting: list[str] = []
    for run in spec.waits_for:
        why = outcome(spool, run)
        if why is None:
            waiting.append(run)
        elif why and run in (spec.after or ()):
            return waiting, f"{HALTED}run {run} {why}; it must end with every chunk ok (--after-any {run}: " \
                            "whatever its outcome)"
    return waiting, None


def wait_for_runs(spool: Spool, spec: RunSpec, say: Callable[[str], None],
                  stop: threading.Event | None = None) -> str | None:
    """Wait until every run ``spec`` names is over (``--after``: ok); returns why the run fails
    instead (see ``blocked``), or None to go on: the runs are over, or the run was cancelled, or
    ``stop`` was set (the caller's feeder then ends as they say). Says what it waits for once, and
    again at most every ``SAY_EVERY_S`` seconds."""
    said_at = None
    started = time.monotonic()
    while True:
        waiting, why = blocked(spool, spec)
        if why is not None or not waiting:
            return why
        if spool.cancel_flag(spec.name).exists() or (stop is not None and stop.is_set()):
            return None
        now = time.monotonic()
        if said_at is None or now - said_at >= SAY_EVERY_S:
            since = "" if said_at is None else f" ({int(now - started) // 60} min so far)"
            say(f"run {spec.name}: waits for run{'s' if len(waiting) > 1 else ''} {', '.join(waiting)} to end "
                f"before its chunks start (--after){since}")
            said_at = now
        if stop is not None:
            stop.wait(POLL_S)
        else:
            time.sleep(POLL_S)


def check_after(spool: Spool, spec: RunSpec) -> None:
    """Refuse (UsageError) a run that names an unknown run, or closes a cycle through the runs
    recorded (A after B after A, itself included)."""
    for run in spec.waits_for:
        flag = "--after" if run in (spec.after or ()) else "--after-any"
        if run == spec.name:
            raise UsageError(f"{flag} {run}: a run cannot wait for itself")
        if not spool.run_spec(run).exists():
            raise UsageError(f"{flag} {run}: no run {run!r} in {spool.base}; submit it first "
                             "(python -m master runs lists the runs)")
        path = _path_to(spool, run, spec.name, set())
        if path is not None:
            raise UsageError(f"{flag} {run}: a cycle: " + " after ".join([spec.name, *path]))


def _path_to(spool: Spool, run: str, target: str, seen: set[str]) -> list[str] | None:
    """The chain of recorded runs from ``run`` to ``target`` along what each waits for, or None."""
    if run == target:
        return [run]
    if run in seen:
        return None
    seen.add(run)
    try:
        upstream = RunSpec.load(spool.run_spec(run)).waits_for
    except (OSError, BadFile, SpoolError):
        return None
    for up in upstream:
        path = _path_to(spool, up, target, seen)
        if path is not None:
            return [run, *path]
    return None


__all__ = ["HALTED", "outcome", "blocked", "wait_for_runs", "check_after"]
