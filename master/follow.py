"""Follow a run that another master feeds: OctoRun's multi-node pattern, where every machine runs
the same command on a shared filesystem.

The first command to take the run's master lock feeds it, to every live agent of the spool,
those the other machines started included. A command that finds the lock held follows the run
instead of failing: it reports progress from the results folder, and when the lock is free again
it ends with the run if every chunk has its final result (or the run was cancelled), or takes
over as the run's master if not (the other master died, was stopped or interrupted).
"""
from __future__ import annotations

import time
from typing import Any

from gpupool.jobs.descriptor import JobState
from gpupool.jobs.errors import BadFile
from gpupool.jobs.results import chunk_results, scan_run
from gpupool.master.core.dispatcher import summarize
from gpupool.master.core.feeder import Summary
from gpupool.master.report.progress import Progress
from gpupool.master.spec.runspec import RunSpec, UsageError
from gpupool.master.core.states import RunState, count_states, read_marks, run_state


class Follower:
    """The view of a run fed elsewhere: ``poll()`` once per pass, ``over()`` when its lock is free."""

    def __init__(self, run: Any, progress: bool, holder: dict[str, Any]) -> None:
        self.run, self.spool, self.spec = run, run.spool, run.spec
        self.started, self.checked = time.monotonic(), False
        self.bar = Progress(self.spec, enabled=progress, base=self.spool.base)
        who = f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}"
        self.bar.say(f"run {self.spec.name} is fed by another master ({who}): following it; the agents of this "
                     f"machine take its jobs too, and this command ends with the run (or takes it over should "
                     f"that master end first)")
        self.first = self._finals()
        self.bar.start(len(self.first))

    def _finals(self) -> set[int]:
        return {c for c in scan_run(self.spool, self.spec.name).finals if c < self.spec.chunks}

    def poll(self) -> None:
        """Check the run is ours (same script, chunks, kwargs...) once it is on record, and show progress."""
        if not self.checked:
            try:
                theirs = RunSpec.load(self.spool.run_spec(self.spec.name))
            except (FileNotFoundError, BadFile):
                theirs = None  # not written yet (its master has just started), or refused by that master too
            if theirs is not None:
                self.checked = True
                diff = [k for k, v in self.spec.identity().items() if theirs.identity()[k] != v]
                if diff:
                    self.bar.close()
                    raise UsageError(f"run {self.spec.name} is fed by another master with a different "
                                     f"{', '.join(diff)} ({', '.join(f'{k}={theirs.identity()[k]!r}' for k in diff)}); "
                                     "run the same config on every machine, or pass --run NAME for a run of its own")
        self.bar.advance(len(self._finals()))

    def over(self) -> bool:
        """With the lock free: the run ended (every chunk final, cancelled, or stopped early by its
        master: ``master.core.states``), not just its master."""
        return self._state() in (RunState.DONE, RunState.FAILED, RunState.CANCELLED, RunState.STOPPED_EARLY)

    def _state(self) -> RunState:
        finals = self._finals()  # every chunk final is all that counts here: done and failed end alike
        counts = count_states(self.spec.chunks, dict.fromkeys(finals, JobState.OK), (), ())
        return run_state(self.spec.chunks, counts, read_marks(self.spool, self.spec.name), lambda: False)

    def summary(self) -> Summary:
        scan = scan_run(self.spool, self.spec.name)
        finals = sorted(c for c in scan.finals if c < self.spec.chunks)
        outcomes = {c: summarize(rec) for c, rec in chunk_results(self.spool, self.spec.name, finals, scan)
                    if not isinstance(rec, Exception)}
        self.bar.close()
        marks = read_marks(self.spool, self.spec.name)
        return Summary(self.spec.name, self.spec.chunks, outcomes, time.monotonic() - self.started,
                       self.spool.result_dir(self.spec.name), marks.cancelled, len(set(finals) - self.first),
                       marks.seal.halted if marks.seal is not None else None)

    def close(self) -> None:
        self.bar.close()
