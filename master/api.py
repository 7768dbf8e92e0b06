"""The Python API: submit a run to a pool, wait for it with progress, iterate its results.

    from gpupool.master.api import Pool
    pool = Pool("/shared/base")
    run = pool.submit(task="gpupool.master.matmul:multiply", chunks=100, shared="shared.npz", data="chunks/")
    summary = run.wait()            # feeds live agents until every chunk has a final result
    for res in run.results():       # in chunk order
        print(res.chunk_id, res.status, res.value, res.arrays.keys())
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from gpupool.jobs.logsetup import logger

from gpupool.jobs.atomic import purge_temp
from gpupool.jobs.descriptor import JobState
from gpupool.jobs.errors import LockHeld, SpoolError
from gpupool.jobs.fsinfo import check_locks
from gpupool.jobs.logsetup import pool_logs
from gpupool.jobs.locks import HolderLock
from gpupool.jobs.mailbox import drop_run
from gpupool.jobs.owners import check_run, claim_run
from gpupool.jobs.paths import Spool
from gpupool.jobs.results import chunk_results, new_epoch, read_epoch, scan_run, unseal
from gpupool.master.core.after import check_after, wait_for_runs
from gpupool.master.core.feeder import FeedConfig, Feeder, Summary
from gpupool.master.hooks import run_hook
from gpupool.master.core.liveness import Liveness
from gpupool.master.spec.options import spec_values
from gpupool.master.spec.placement import Placement
from gpupool.master.report.progress import Progress
from gpupool.master.spec.runspec import RunSpec, build, save_or_check
from gpupool.master.core.states import (AtAgents, RunState, chunk_state, count_states, final_states, holdings,
                                   state_of_run)

__all__ = ["Pool", "Run", "Result", "pool_logs"]  # pool_logs: the one call that routes the pool's logs


@dataclass
class Result:
    chunk_id: int
    record: dict[str, Any]
    npz: Path | None

    @property
    def status(self) -> str:
        return self.record["status"]

    @property
    def state(self) -> JobState:
        """OK or FAILED: a committed result's chunk state (``master.core.states.chunk_state``)."""
        return chunk_state(self.status, False, False)

    @property
    def ok(self) -> bool:
        return self.state is JobState.OK

    @property
    def value(self) -> Any:
        """The value the task returned, decoded (``jobs.codec``: a tuple comes back a tuple)."""
        from gpupool.jobs.codec import decode

        return decode(self.record.get("value"))

    @property
    def arrays(self) -> dict[str, Any]:
        from gpupool.jobs.npzio import load_npz  # numpy only where arrays are read: main.py starts sooner

        return load_npz(self.npz) if self.npz else {}


class Pool:
    def __init__(self, base: str | Path, allow_local_locks: bool = False, create: bool = True) -> None:
        """``create=False``: refuse a ``base`` that is not a spool yet (a mistyped path would
        otherwise be made a new, empty spool and waited on for ever)."""
        # Locks must reach the file server, or masters and agents on other hosts do not exclude
        # us: checked before anything is written.
        unsafe = check_locks(Path(base).absolute(), allow_local_locks)
        if unsafe:
            logger.warning(unsafe)
        spool = Spool(base)
        if not create and not spool.exists():
            hint = spool.hint_below() or ("; a typo?). Start agents there first (./start_agents.sh N "
                                          f"{spool.base}), or pass --new-spool to make it one")
            raise SpoolError(f"is not a spool (no agent has ever been started there{hint}", spool.base)
        self.spool = spool.ensure()
        self.spool.check_private()

    def submit(self, *, fresh: bool = False, kwargs_may_change: bool = False, force: bool = False,
               **options: Any) -> "Run":
        """Validate and record a run (nothing is queued until ``wait``). ``options``: the run's
        options (``master.spec.options.OPTIONS``, main.py's flags with underscores): one of ``task``,
        ``script``, ``cmd`` or ``commands`` (command jobs, ``agent.command``: with prefix,
        success_codes, fail_on_output, result_file), ``chunks``, ``kwargs``, ``sweep`` (a file, inline
        JSON or a list of parameter sets, ``master.spec.sweep``: one chunk each), ``shared``, ``data``,
        ``run``, ``retries``, ``timeout``, ``workdir``, ``share`` (the run's weight when several runs
        use the pool at once), ``arrays_as_kwargs`` (each array of ``data`` and ``shared`` passed by
        its name), ``visible_gpu_id`` (``gpu_id`` is the GPU's index as the job sees it, 0:
        docs/executor.md), ``env`` (a dict of variables set for every job), ``setup`` (``"file.py:fn"``
        or ``"module:fn"``, called once per worker process before the run's first chunk there; its
        value is each chunk's ``state``), and placement (``master.spec.placement``: ``targets`` a list of
        ``"HOST::GPU,GPU"``, ``hosts`` and ``exclude_hosts`` ``"H1,H2"``, ``min_free_gb``,
        ``gpus_per_job``, ``gpu_mem``), saved with the run and kept when it is resumed or retried
        without it; ``on_done`` (a shell command run once when the run ends, ``master.hooks``), ``after``
        and ``after_any`` (runs to wait for, ``master.core.after``), ``chunk_time`` (how long a chunk
        takes, for agents that must end by a time): as main.py's --on-done, --after, --after-any and
        --chunk-time. A keyword that is none of them raises TypeError. ``kwargs_may_change``: a run of
        this name with other kwargs is resumed with these, its done chunks kept (OctoRun's way:
        completion is keyed on chunk ids alone). ``force``: resume or start over a run of this name
        that belongs to another user (``jobs.owners``; refused without it)."""
        spec = build(**spec_values(options, "Pool.submit()"))  # an unknown keyword: TypeError naming it
        check_after(self.spool, spec)  # --after: an unknown run or a cycle is refused here (master.core.after)
        return Run(self.spool, spec, fresh, kwargs_may_change, force)

    def run(self, name: str) -> "Run":
        """An existing run by name (to read its results)."""
        return Run(self.spool, RunSpec.load(self.spool.run_spec(name)), fresh=False)


class Run:
    def __init__(self, spool: Spool, spec: RunSpec, fresh: bool, kwargs_may_change: bool = False,
                 force: bool = False) -> None:
        self.spool, self.spec, self.fresh = spool, spec, fresh
        self.force = force  # act on another user's run of this name (jobs.owners)
        self.may_change = ("kwargs", "options") if kwargs_may_change else ()  # options: a script's success_codes

    @property
    def name(self) -> str:
        return self.spec.name

    def record(self) -> None:
        """Record the run (its spec checked and saved, as ``wait`` does first) without feeding it: the
        run is in the spool, and ``status`` shows it, before a master started apart feeds it (--detach)."""
        self.wait(progress=False, _record_only=True)

    def wait(self, progress: bool = True, cfg: FeedConfig | None = None, wait_for_lock: bool = False,
             stop: threading.Event | None = None, placement: Placement | None = None,
             _record_only: bool = False) -> Summary:
        """Be this run's master until every chunk has a final result; returns the summary.
        ``placement``: which agents may take its jobs (``master.spec.placement``; default: the run's own,
        ``RunSpec.placement``); raises Unplaceable if live agents are there and none may. A run with
        ``after`` waits for the runs it names first (``master.core.after``)."""
        self.spool.mkdir(self.spool.run_dir(self.name))
        check_run(self.spool, self.name, self.force, "start it over" if self.fresh else "resume it")
        lock = HolderLock(self.spool.master_lock(self.name))
        if wait_for_lock:
            while not lock.acquire(blocking=True, timeout=1.0):
                if stop is not None and stop.is_set():
                    raise LockHeld(f"run {self.name} still has another master", lock.path)
            lock.release()
        lock.take(f"run {self.name!r}", run=self.name)
        try:
            claim_run(self.spool, self.name)  # a new run is ours from now on; an older one its folder's owner's
            self.uncancel()  # submitting or retrying a cancelled run resumes it
            if self.fresh:
                new_epoch(self.spool, self.name)  # first: from now on, agents drop what the run queued before
                self._clear()
            elif read_epoch(self.spool, self.name) is None:
                new_epoch(self.spool, self.name)
            earlier = self._on_record() if self.may_change and not self.fresh else None
            notes: list[str] = []  # a placement given again that differs from the saved one
            # a sweep may have grown; the placement saved is kept unless given again
            self.spec = save_or_check(self.spool, self.spec, self.fresh, self.may_change, notes)
            if earlier is not None and earlier.kwargs != self.spec.kwargs:
                new_epoch(self.spool, self.name)  # what was queued with the earlier kwargs neither runs nor commits
                drop_run(self.spool, self.name)
            else:
                earlier = None
            self.spool.run_dirs(self.name)
            purge_temp([self.spool.result_dir(self.name), self.spool.run_dir(self.name), self.spool.pool_dir,
                        self.spool.pool_tmp_dir])
            if _record_only:  # record(): saved, not fed
                return None  # type: ignore[return-value]
            bar = Progress(self.spec, enabled=progress, base=self.spool.base)
            for note in notes:
                bar.say(note)
            feeder = Feeder(self.spool, self.spec, cfg, on_event=bar.event, placement=placement)
            feeder.recover()
            if self.spec.waits_for and not feeder.done:  # --after: a run it needs ok that did not fails it
                feeder.halted = wait_for_runs(self.spool, self.spec, bar.say, stop)
            if earlier is not None:
                bar.event("kwargs_changed", {"earlier": earlier.kwargs, "kwargs": self.spec.kwargs,
                                             "kept": sorted(c for c, o in feeder.final.items() if o.status == JobState.OK)})
            bar.start(len(feeder.final))
            try:
                summary = feeder.run(stop)
            finally:
                bar.close()
            said = run_hook(self.spool, self.spec, summary)  # --on-done: once, under the run's master lock
            if said is not None:
                bar.say(said)
            return summary
        finally:
            lock.close()

    def _on_record(self) -> RunSpec | None:
        try:
            return RunSpec.load(self.spool.run_spec(self.name))
        except FileNotFoundError:
            return None

    def join(self, progress: bool = True, cfg: FeedConfig | None = None, placement: Placement | None = None,
             poll: float = 1.0) -> Summary:
        """Be this run's master, or follow it while another master feeds it (the same OctoRun
        config on a second machine; see ``master.follow``): this ends with the run, or takes it
        over when that master ends first."""
        from gpupool.master.follow import Follower

        check_run(self.spool, self.name, self.force, "start it over" if self.fresh else "resume it")
        follower = None
        try:
            while True:
                lock = HolderLock(self.spool.master_lock(self.name))
                self.spool.mkdir(self.spool.run_dir(self.name))
                if lock.acquire(blocking=False):
                    over = follower is not None and follower.over()
                    lock.close()
                    if over:
                        return follower.summary()
                    if follower is not None:
                        follower.close()
                        follower = None
                    try:
                        return self.wait(progress, cfg, placement=placement)
                    except LockHeld:  # another follower took it over first
                        continue
                if follower is None:
                    follower = Follower(self, progress, lock.holder())
                lock.close()
                follower.poll()
                time.sleep(poll)
        finally:
            if follower is not None:
                follower.close()

    def uncancel(self) -> bool:
        """Remove the run's cancel flag (``python -m master cancel``); True if there was one."""
        try:
            os.unlink(self.spool.cancel_flag(self.name))
            return True
        except FileNotFoundError:
            return False

    def _clear(self) -> None:
        """--fresh: drop this run's results, logs and queued jobs; it is no longer sealed (a result
        of the earlier start committed before this master reads the folder must be read, and
        refused, not trusted by its name as a sealed run's are)."""
        unseal(self.spool, self.name)
        drop_run(self.spool, self.name)
        for d in (self.spool.result_dir(self.name), self.spool.run_log_dir(self.name)):
            shutil.rmtree(d, ignore_errors=True)

    def state(self) -> RunState:
        """What state the run is in (``master.core.states.run_state``): feeding, waiting, done, failed,
        stopped early, interrupted or cancelled."""
        statuses = final_states(self.spool, self.name, self.spec.chunks)
        counts = count_states(self.spec.chunks, statuses, (), ())
        if counts[JobState.OK] + counts[JobState.FAILED] < self.spec.chunks:  # what agents hold: only then
            at = AtAgents.of(holdings(self.spool, Liveness(self.spool, 20.0).refresh()))
            counts = at.counts(self.name, self.spec.chunks, statuses, self.spool.cancel_flag(self.name).exists())
        return state_of_run(self.spool, self.name, self.spec.chunks, counts, self.spec.waits_for)

    def results(self) -> Iterator[Result]:
        """Committed results in chunk order (chunks without one, or with one that cannot be read,
        are skipped): each from its own file or its batch's (``jobs.results.chunk_results``)."""
        epoch, scan = read_epoch(self.spool, self.name), scan_run(self.spool, self.name)
        for c, rec in chunk_results(self.spool, self.name, sorted(c for c in scan.finals if c < self.spec.chunks),
                                    scan, epoch):
            if isinstance(rec, Exception):
                continue
            npz = self.spool.arrays_of(self.name, rec)
            yield Result(c, rec, npz if npz is not None and npz.exists() else None)
