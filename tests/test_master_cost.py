"""What a master pass costs (issue 27: a million chunks): work per pass in proportion to what
changed, not to the run's size. Step tests against a tmp spool, counting the calls that cost."""
from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

from gpupool.jobs.paths import Spool
from gpupool.jobs.watching import IN_CREATE, IN_Q_OVERFLOW, OVERFLOW, parse_events, watch_names
from gpupool.master.core.dispatcher import ResultNames
from tests.helpers import wait_for
from tests.test_dispatcher_step import agents
from tests.test_feeder_step import finish, make, queued


def _event(mask: int, name: bytes = b"") -> bytes:
    padded = name + b"\0" * (-len(name) % 16 or (16 if name else 0))
    return struct.pack("iIII", 1, mask, 0, len(padded)) + padded


def test_parse_events_names_new_files_skips_temp_ones_and_says_when_events_were_lost() -> None:
    data = _event(IN_CREATE, b".000001.json.tmp-1-ab") + _event(IN_CREATE, b"000001.json") + \
        _event(IN_Q_OVERFLOW) + _event(IN_CREATE, b"000002.a1.json")
    assert parse_events(data) == ["000001.json", OVERFLOW, "000002.a1.json"]


def test_the_results_watch_hands_on_what_is_linked_in_and_not_temp_files(tmp_path: Path) -> None:
    seen: list[str] = []
    lock = threading.Lock()

    def on_names(names: list[str]) -> None:
        with lock:
            seen.extend(names)

    watch = watch_names(tmp_path, on_names, "a test")
    assert watch is not None
    try:
        for c in range(50):  # as an agent commits: a temp file, linked to the result's name, removed
            tmp = tmp_path / f".{c:06d}.json.tmp-1-x"
            tmp.write_bytes(b"{}")
            os.link(tmp, tmp_path / f"{c:06d}.json")
            os.unlink(tmp)
        wait_for(lambda: len(seen) >= 50, 10, "50 names")
    finally:
        watch.stop()
    assert sorted(seen) == [f"{c:06d}.json" for c in range(50)]


def test_lost_events_make_the_next_pass_look_at_every_chunk_in_flight(spool: Spool) -> None:
    agents(spool, 1)
    f, clock, _ = make(spool, chunks=6, depth=2, max_depth=2)
    f.names = ResultNames()
    f.step()
    clock.t += 0.1  # within the second between full passes
    for job in queued(spool, "h-cpu0"):
        finish(spool, job)
    f.step()  # nothing was named: nothing taken in
    assert not f.final
    f.names.add_all([OVERFLOW])
    f.step()
    assert sorted(f.final) == [0, 1]


class _CountingDict(dict):
    looks = 0

    def values(self):  # type: ignore[override]
        _CountingDict.looks += 1
        return super().values()


def test_a_failed_chunk_does_not_make_the_master_look_at_every_final(spool: Spool) -> None:
    """Fail fast asks whether any chunk is ok: kept as results come, not a look at every final
    result per failure (a run of 100,000 chunks failing each its own way was quadratic)."""
    from gpupool.jobs.descriptor import Job, JobKind, JobState
    from gpupool.jobs.results import commit, record
    agents(spool, 2)
    f, clock, _ = make(spool, chunks=40, retries=0, depth=8, max_depth=8, max_failures=3)
    f.final = _CountingDict(f.final)
    letters = "abcdefghijklmnopqrstuvwxyz"
    while not f.done:
        f.step()
        for ident in ("h-cpu0", "h-cpu1"):
            for c, a in queued(spool, ident):
                j = Job(run="run1", chunk_id=c, total_chunks=40, kind=JobKind.CALLABLE, target="x:y", attempt=a,
                        max_attempts=1)
                words = f"{letters[c % 26]} {letters[c // 26]}"  # every chunk its own error (digits are alike)
                commit(spool, j, record(j, JobState.FAILED, agent=ident, error={"type": "E", "message": words}))
        clock.t += 1.0
    assert f.halted is None and len(f.final) == 40 and all(o.status == "failed" for o in f.final.values())
    assert _CountingDict.looks <= 2  # the assert above's own look, and none per failure


def test_a_mailbox_is_not_read_back_after_its_own_write_but_another_writer_is_seen(spool: Spool, monkeypatch
                                                                                   ) -> None:
    """A master refilling a mailbox took its own jobs back through Job.from_dict on the next
    refill, one check per chunk queued; what it wrote is now what it read. A write by another
    process (an agent's prune) is read as before."""
    from gpupool.jobs.descriptor import Job
    from gpupool.jobs.mailbox import Mailbox
    agents(spool, 1)
    f, clock, _ = make(spool, chunks=40, depth=8, max_depth=8)
    checks = []
    real = Job.from_dict.__func__
    monkeypatch.setattr(Job, "from_dict", classmethod(lambda cls, d, where=None: checks.append(1) or real(cls, d, where)))
    in_steps = 0
    for _ in range(4):  # refills: the first 8, then each time the agent finished its jobs
        before = len(checks)
        f.step()
        in_steps += len(checks) - before
        for job in queued(spool, "h-cpu0")[-8:]:  # (a fresh Mailbox: reads and checks every job)
            finish(spool, job)
        clock.t += 1.0
    assert len(f.final) == 24 and in_steps == 0
    Mailbox(spool, "h-cpu0").update(lambda jobs: jobs[:1])  # another writer: the master sees its change
    assert [j.key for j in f._mailbox("h-cpu0").read().jobs] == [j.key for j in Mailbox(spool, "h-cpu0").read().jobs]
    assert len(f._mailbox("h-cpu0").read().jobs) == 1
