"""The spool contract without processes: atomic files, descriptors, mailboxes, results, npz."""
from __future__ import annotations

import dataclasses

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gpupool.jobs.atomic import read_bounded, write_exclusive, write_replace
from gpupool.jobs.descriptor import SCHEMA, Job, JobKind, JobState
from gpupool.jobs.errors import BadFile, BadName, BadNpz, LockHeld, NewerSchema
from gpupool.jobs.fsinfo import mount_of
from gpupool.jobs.locks import HolderLock
from gpupool.jobs.mailbox import Mailbox
from gpupool.jobs.names import check_name
from gpupool.jobs.npzio import load_npz
from gpupool.jobs.paths import Spool
from gpupool.jobs.results import commit, read_result, record, reopen_failed


def job(chunk: int = 0, attempt: int = 1, max_attempts: int = 2, run: str = "r1", **kw) -> Job:
    return Job(run=run, chunk_id=chunk, total_chunks=10, kind=JobKind.CALLABLE, target="m:f",
               attempt=attempt, max_attempts=max_attempts, **kw)


def test_write_replace_leaves_no_temp_and_replaces(tmp_path: Path) -> None:
    p = tmp_path / "f.json"
    write_replace(p, b"one")
    write_replace(p, b"two")
    assert p.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["f.json"]


def test_commit_link_only_first_wins(tmp_path: Path) -> None:
    final = tmp_path / "x.json"
    assert write_exclusive(final, b"first")
    assert not write_exclusive(final, b"second")
    assert final.read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["x.json"]  # the loser's temp file is gone


def test_commit_link_race_between_threads(tmp_path: Path) -> None:
    final, wins = tmp_path / "race.json", []
    def go(i: int) -> None:
        if write_exclusive(final, str(i).encode()):
            wins.append(i)
    threads = [threading.Thread(target=go, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and final.read_bytes() == str(wins[0]).encode()


def test_read_bounded_refuses_symlink_and_huge(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    target.write_text("x")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(BadFile, match="symlink"):
        read_bounded(tmp_path / "link")
    (tmp_path / "big").write_bytes(b"a" * 101)
    with pytest.raises(BadFile, match="larger"):
        read_bounded(tmp_path / "big", limit=100)


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "a\0b", "x" * 200, "..", "a..b", 5])
def test_bad_names_are_refused(name: object) -> None:
    with pytest.raises(BadName):
        check_name(name, "run name")


def test_descriptor_round_trip() -> None:
    j = job(3, kwargs={"a": 1}, shared="/x/s.npz", timeout=2.5)
    assert Job.from_dict(json.loads(j.encode())) == j
    assert j.key == ("r1", 3, 1)
    with pytest.raises(Exception):
        j.chunk_id = 4  # frozen


@pytest.mark.parametrize("change, message", [
    ({"schema": SCHEMA + 1}, "newer"),
    ({"chunk_id": 10}, "outside"),
    ({"chunk_id": -1}, "outside"),
    ({"chunk_id": True}, "not an integer"),
    ({"run": "../../etc"}, "not allowed"),
    ({"kind": "pickle"}, "malformed"),
    ({"kwargs": []}, "kwargs"),
    ({"kwargs": {"device": 1}}, "built-in"),
    ({"timeout": -1}, "timeout"),
    ({"shared": "a\0b"}, "NUL"),
])
def test_descriptor_validation(change: dict, message: str) -> None:
    d = {**job().to_dict(), **change}
    with pytest.raises(BadFile, match=message):
        Job.from_dict(d, "mailbox")


def test_fields_of_a_newer_version_that_may_be_ignored_are_ignored() -> None:
    """The evolution rule (jobs.descriptor): unknown fields in a schema this version reads are hints."""
    j = Job.from_dict({**job().to_dict(), "priority_hint": 3}, "mailbox")
    assert j == job() and "priority_hint" not in j.to_dict()


def test_a_field_an_older_agent_must_understand_raises_the_schema_it_is_written_with(monkeypatch) -> None:
    from gpupool.jobs import descriptor
    newer = SCHEMA + 1
    monkeypatch.setattr(descriptor, "MUST_UNDERSTAND", {"epoch": newer})
    plain, marked = job(), dataclasses.replace(job(), epoch="e1")
    assert plain.to_dict()["schema"] == 1 and marked.to_dict()["schema"] == newer  # only jobs that use it
    with pytest.raises(NewerSchema):  # an agent that reads older schemas refuses it, never runs it without the field
        Job.from_dict(marked.to_dict(), "mailbox")
    monkeypatch.setattr(descriptor, "SCHEMA", newer)
    assert Job.from_dict(marked.to_dict(), "mailbox").epoch == "e1"


def test_command_jobs_and_sweep_fields_need_schema_2_other_jobs_stay_readable_by_older_agents() -> None:
    assert job().to_dict()["schema"] == 1
    assert dataclasses.replace(job(), kind=JobKind.COMMAND, target="echo").to_dict()["schema"] == 2
    assert dataclasses.replace(job(), params={"lr": 1}).to_dict()["schema"] == 2
    assert dataclasses.replace(job(), kind=JobKind.SCRIPT, target="/s.py").to_dict()["schema"] == 1


def test_env_and_a_scripts_success_codes_are_fields_an_older_agent_must_understand() -> None:
    plain = job()
    for marked in (dataclasses.replace(plain, kind=JobKind.SCRIPT, target="/s.py", options={"success_codes": [0, 3]}),
                   dataclasses.replace(plain, env={"FOO": "1"})):
        assert plain.to_dict()["schema"] == 1 and marked.to_dict()["schema"] == 2
        assert Job.from_dict(marked.to_dict()) == marked  # this version reads them


def test_newer_schema_is_its_own_error() -> None:
    with pytest.raises(NewerSchema):
        Job.from_dict({**job().to_dict(), "schema": 99})


def test_mailbox_update_and_read(spool: Spool) -> None:
    mb = Mailbox(spool, "h-cpu0")
    mb.ensure()
    assert mb.read().jobs == []
    mb.update(lambda jobs: jobs + [job(1), job(2)])
    assert [j.chunk_id for j in mb.read().jobs] == [1, 2]
    mb.update(lambda jobs: [j for j in jobs if j.chunk_id != 1])
    assert [j.chunk_id for j in mb.read().jobs] == [2]
    assert sorted(os.listdir(spool.pool_dir)) == [".tmp", "h-cpu0.POOL", "h-cpu0.lock"]
    assert os.listdir(spool.pool_tmp_dir) == []  # the temp files of the writes are gone


def test_mailbox_keeps_lock_file_inode(spool: Spool) -> None:
    mb = Mailbox(spool, "h-cpu0")
    mb.ensure()
    ino = os.stat(mb.lock.path).st_ino
    for i in range(3):
        mb.update(lambda jobs: jobs + [job(i)])
    assert os.stat(mb.lock.path).st_ino == ino  # never replaced: waiters lock the same inode


def test_a_mailbox_write_reaches_the_watched_folder_as_one_event_not_a_rename_pair(spool: Spool) -> None:
    """watchdog holds the first half of a rename pair (IN_MOVED_FROM) up to 0.5 s for its match, and
    its reader then sleeps that long even once the match came: a mailbox published by a rename
    within agent_pool/ woke some agents 0.4 s late. Its temp file is made in agent_pool/.tmp, so
    the folder the agents watch sees it arrive (a "created" event) and never a rename within it."""
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer

    mb = Mailbox(spool, "h-cpu0")
    mb.ensure()
    seen: list[tuple[str, str]] = []

    class Record(FileSystemEventHandler):
        def on_any_event(self, event) -> None:
            seen.append((event.event_type, os.path.basename(os.fsdecode(event.src_path))))

    observer = Observer()
    observer.schedule(Record(), str(spool.pool_dir), recursive=False)
    observer.start()
    try:
        mb.update(lambda jobs: jobs + [job(1)])
        deadline = time.monotonic() + 30
        while ("created", "h-cpu0.POOL") not in seen and time.monotonic() < deadline:
            time.sleep(0.01)
        mb.update(lambda jobs: jobs + [job(2)])
        deadline = time.monotonic() + 30
        while seen.count(("created", "h-cpu0.POOL")) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        observer.stop()
        observer.join(timeout=10)
    assert seen.count(("created", "h-cpu0.POOL")) == 2, seen
    assert not [e for e in seen if e[0] == "moved"], seen
    assert [j.chunk_id for j in mb.read().jobs] == [1, 2]


@pytest.mark.parametrize("what", ["file", "symlink"])
def test_a_file_where_the_mailbox_temp_folder_belongs_costs_nothing(spool: Spool, tmp_path: Path, what: str) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if what == "file":
        spool.pool_tmp_dir.write_bytes(b"not a folder")
    else:
        spool.pool_tmp_dir.symlink_to(elsewhere)
    mb = Mailbox(spool, "h-cpu0")
    mb.update(lambda jobs: jobs + [job(1)])
    mb.update(lambda jobs: jobs + [job(2)])
    assert [j.chunk_id for j in mb.read().jobs] == [1, 2]  # written beside the mailbox, as before the folder
    assert sorted(os.listdir(spool.pool_dir)) == [".tmp", "h-cpu0.POOL", "h-cpu0.lock"]
    assert os.listdir(elsewhere) == []  # nothing written through the link


def test_the_purge_of_temp_files_never_reaches_through_a_linked_mailbox_temp_folder(spool: Spool, tmp_path: Path
                                                                                    ) -> None:
    from gpupool.jobs.atomic import purge_temp

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".notes.tmp-1-ab").write_bytes(b"a user's file")
    spool.pool_tmp_dir.symlink_to(elsewhere)
    purge_temp([spool.pool_dir, spool.pool_tmp_dir], older_than=-1.0)  # every temp file counts as old
    assert os.listdir(elsewhere) == [".notes.tmp-1-ab"]
    os.unlink(spool.pool_tmp_dir)
    (spool.pool_dir / ".h-cpu0.POOL.tmp-1-ab").write_bytes(b"")  # a killed writer's, in both temp places
    spool.pool_tmp_dir.mkdir()
    (spool.pool_tmp_dir / ".h-cpu0.POOL.tmp-2-cd").write_bytes(b"")
    assert purge_temp([spool.pool_dir, spool.pool_tmp_dir], older_than=-1.0) == 2


def test_the_mailbox_temp_folder_removed_meanwhile_is_made_again(spool: Spool) -> None:
    mb = Mailbox(spool, "h-cpu0")
    mb.update(lambda jobs: jobs + [job(1)])
    os.rmdir(spool.pool_tmp_dir)
    mb.update(lambda jobs: jobs + [job(2)])  # its temp file where the folder was: beside the mailbox, this once
    assert not spool.pool_tmp_dir.exists()
    mb.update(lambda jobs: jobs + [job(3)])
    assert spool.pool_tmp_dir.is_dir() and os.listdir(spool.pool_tmp_dir) == []
    assert [j.chunk_id for j in mb.read().jobs] == [1, 2, 3]
    assert sorted(os.listdir(spool.pool_dir)) == [".tmp", "h-cpu0.POOL", "h-cpu0.lock"]


def test_mailbox_concurrent_appends_lose_nothing(spool: Spool) -> None:
    def add(start: int) -> None:
        mb = Mailbox(spool, "h-cpu0")
        for i in range(start, start + 25):
            mb.update(lambda jobs, i=i: jobs + [job(i % 10, attempt=i + 1, max_attempts=200)])
    threads = [threading.Thread(target=add, args=(k * 25,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(Mailbox(spool, "h-cpu0").read().jobs) == 100


@pytest.mark.parametrize("content", [b"", b"\x00\xff garbage", b"[1, 2]", b'{"jobs": 3}', b'{"schema": 1, "jobs": [',
                                     b'{"schema": 9, "jobs": []}'])
def test_broken_mailbox_is_rejected_and_replaced(spool: Spool, content: bytes) -> None:
    mb = Mailbox(spool, "h-cpu0")
    mb.path.write_bytes(content)
    with pytest.raises(BadFile):
        mb.read()
    mb.update(lambda jobs: jobs + [job(1)])
    assert [j.chunk_id for j in mb.read().jobs] == [1]
    whys = list(spool.rejected_dir.glob("*.why"))
    assert len(whys) == 1 and "h-cpu0.POOL" in json.loads(whys[0].read_text())["origin"]


def test_bad_descriptor_in_good_mailbox_is_dropped_alone(spool: Spool) -> None:
    mb = Mailbox(spool, "h-cpu0")
    doc = {"schema": 1, "agent": "h-cpu0", "jobs": [job(1).to_dict(), {"run": "../x"}, job(2).to_dict()]}
    mb.path.write_text(json.dumps(doc))
    snap = mb.read()
    assert [j.chunk_id for j in snap.jobs] == [1, 2] and len(snap.bad) == 1
    mb.update(lambda jobs: None)
    assert len(mb.read().bad) == 0 and len(list(spool.rejected_dir.glob("*.why"))) == 1


def test_commit_ok_exactly_once_and_arrays_first(spool: Spool) -> None:
    j1, j2 = job(4, attempt=1), job(4, attempt=2)
    spool.result_dir("r1").mkdir(parents=True)
    tmp = spool.result_dir("r1") / ".tmp-a"
    with open(tmp, "wb") as f:
        np.savez(f, y=np.arange(3))
    assert commit(spool, j2, record(j2, JobState.OK, value=2, arrays="000004.a2.npz"), tmp)
    late = spool.result_dir("r1") / ".tmp-b"  # an older attempt with arrays of its own, later: loses
    with open(late, "wb") as f:
        np.savez(f, y=np.zeros(3))
    assert not commit(spool, j1, record(j1, JobState.OK, value=1, arrays="000004.a1.npz"), late)
    rec = read_result(spool.result_json("r1", 4))
    assert rec["value"] == 2 and rec["attempt"] == 2
    assert load_npz(spool.arrays_of("r1", rec))["y"].tolist() == [0, 1, 2]
    # each attempt wrote its own arrays: the winner's are untouched, the loser's are gone
    assert sorted(os.listdir(spool.result_dir("r1"))) == ["000004.a2.npz", "000004.json"]


@pytest.mark.parametrize("arrays", ["../../secret.npz", "000005.a1.npz", "000004.a1.json", 7, "/etc/x.npz"])
def test_a_result_naming_arrays_outside_its_chunk_is_refused(spool: Spool, arrays: object) -> None:
    j = job(4)
    spool.result_dir("r1").mkdir(parents=True)
    commit(spool, j, record(j, JobState.OK, arrays=arrays))
    with pytest.raises(BadFile, match="not an .npz of its chunk"):
        read_result(spool.result_json("r1", 4))


def test_failed_attempt_with_retries_left_is_history_only(spool: Spool) -> None:
    spool.result_dir("r1").mkdir(parents=True)
    j = job(1, attempt=1, max_attempts=2)
    assert not commit(spool, j, record(j, JobState.FAILED, error={"type": "E", "message": "m"}))
    assert not spool.result_json("r1", 1).exists()
    assert spool.history_json("r1", 1, 1).exists()
    last = job(1, attempt=2, max_attempts=2)
    assert commit(spool, last, record(last, JobState.FAILED, error={"type": "E", "message": "m"}))
    assert read_result(spool.result_json("r1", 1))["status"] == "failed"
    assert reopen_failed(spool, "r1", 1) and not spool.result_json("r1", 1).exists()


def test_reopen_never_drops_an_ok_result(spool: Spool) -> None:
    spool.result_dir("r1").mkdir(parents=True)
    j = job(2)
    commit(spool, j, record(j, JobState.OK))
    assert not reopen_failed(spool, "r1", 2)
    assert spool.result_json("r1", 2).exists()


def test_npz_safety(tmp_path: Path) -> None:
    good = tmp_path / "g.npz"
    np.savez(good, a=np.arange(4.0), b=np.ones((2, 3), order="F"))
    arrays = load_npz(good)
    assert arrays["a"].tolist() == [0, 1, 2, 3] and isinstance(arrays["a"], np.memmap)
    np.savez(tmp_path / "o.npz", x=np.array([object()], dtype=object))
    with pytest.raises(BadNpz, match="object arrays"):
        load_npz(tmp_path / "o.npz")
    (tmp_path / "t.npz").write_bytes(good.read_bytes()[:200])
    with pytest.raises(BadNpz):
        load_npz(tmp_path / "t.npz")
    (tmp_path / "z.npz").write_bytes(b"not a zip")
    with pytest.raises(BadNpz, match="not an .npz"):
        load_npz(tmp_path / "z.npz")
    with pytest.raises(BadNpz, match="does not exist"):
        load_npz(tmp_path / "missing.npz")


def test_holder_lock_names_the_holder(tmp_path: Path) -> None:
    a = HolderLock(tmp_path / "gpu.lock")
    a.take("GPU 0", agent="h-gpu0")
    with pytest.raises(LockHeld, match="h-gpu0"):
        HolderLock(tmp_path / "gpu.lock").take("GPU 0")
    a.close()
    HolderLock(tmp_path / "gpu.lock").take("GPU 0")  # free again once the holder is gone


def test_mount_of_reads_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text("22 1 0:21 / / rw - ext4 /dev/vda rw\n"
                    "40 22 0:40 / /shared\\040base rw - fuse.glusterfs host:/vol rw,user_id=0\n")
    assert mount_of("/shared base/x", str(info))[1] == "fuse.glusterfs"
    assert mount_of("/home", str(info))[1] == "ext4"


def test_purge_removes_only_old_temp_files(tmp_path: Path) -> None:
    from gpupool.jobs.atomic import purge_temp
    old_tmp, new_tmp = tmp_path / ".a.json.tmp-1-ab", tmp_path / ".b.json.tmp-2-cd"
    keep = tmp_path / "000001.json"
    for p in (old_tmp, new_tmp, keep):
        p.write_text("x")
    os.utime(old_tmp, (1, 1))
    os.utime(keep, (1, 1))
    assert purge_temp([tmp_path], older_than=3600) == 1
    assert sorted(os.listdir(tmp_path)) == [".b.json.tmp-2-cd", "000001.json"]


def test_world_writable_spool_is_refused(tmp_path: Path) -> None:
    from gpupool.jobs.errors import SpoolError
    spool = Spool(tmp_path / "b").ensure()
    spool.check_private()
    assert not os.stat(spool.base).st_mode & 0o002  # created not writable by others
    os.chmod(spool.pool_dir, 0o777)
    with pytest.raises(SpoolError, match="writable by every user"):
        spool.check_private()


def test_update_waits_for_a_fresh_mailbox_instead_of_dropping_a_change(spool: Spool) -> None:
    """A shared filesystem may show the previous version for a moment: the update must not
    write back a list that lacks what the last writer added."""
    mb = Mailbox(spool, "h-cpu0")
    mb.update(lambda jobs: [job(1)])  # seq 1
    mb.update(lambda jobs: jobs + [job(2)])  # seq 2; the lock file now says 2
    fresh = mb.path.read_bytes()
    stale = json.loads(fresh)
    stale.update(seq=1, jobs=stale["jobs"][:1])
    mb.path.write_text(json.dumps(stale))  # what a lagging client would read

    def catch_up() -> None:
        time.sleep(0.3)
        write_replace(mb.path, fresh)

    t = threading.Thread(target=catch_up)
    t.start()
    mb.update(lambda jobs: jobs + [job(3)])
    t.join()
    assert [j.chunk_id for j in mb.read().jobs] == [1, 2, 3]
    assert mb.read().seq == 3


def test_a_mailbox_lock_held_by_a_frozen_process_is_waited_for_only_so_long(spool: Spool) -> None:
    from tests.helpers import frozen_holder

    mb = Mailbox(spool, "h-cpu0")
    mb.update(lambda jobs: [job(1)])
    holder = frozen_holder(spool.mailbox_lock("h-cpu0"))
    try:
        with pytest.raises(TimeoutError, match=r"h-cpu0.lock has been held by another process for over 0.3 s"):
            mb.update(lambda jobs: [], wait=0.3)
        assert [j.chunk_id for j in mb.read().jobs] == [1]
        # the agent is dead (and may be the frozen holder): its jobs are taken back all the same
        assert mb.update(lambda jobs: [], wait=0.3, force=True) == [] and mb.read().jobs == []
    finally:
        holder.kill()
        holder.wait()
    assert mb.update(lambda jobs: [job(2)], wait=0.3)[0].chunk_id == 2  # free again


def test_the_epoch_travels_only_when_set_and_must_be_a_plain_token() -> None:
    assert "epoch" not in job(1).to_dict() and Job.from_dict(job(1, epoch="ab12").to_dict()).epoch == "ab12"
    assert job(1, epoch="a").uid != job(1, epoch="b").uid and job(1, epoch="a").key == job(1, epoch="b").key
    for bad in ("../x", "", "a" * 65, 7):
        with pytest.raises(BadFile, match="epoch"):
            Job.from_dict({**job(1).to_dict(), "epoch": bad})


def test_a_lock_file_replaced_under_its_holders_still_excludes(tmp_path: Path) -> None:
    """A lock is on an open file: a lock file replaced (or removed) after one holder opened it
    must not let that holder and a newcomer, who opens the new file, both in."""
    from gpupool.jobs.locks import FileLock

    path = tmp_path / "agent.lock"
    old = FileLock(path)
    assert old.acquire(blocking=False)
    old.release()  # it keeps the file open, as an agent's mailbox lock does for its whole life
    (tmp_path / "fresh").write_bytes(b"")
    os.replace(tmp_path / "fresh", path)  # replaced by someone else
    new = FileLock(path)
    assert new.acquire(blocking=False)
    assert not old.acquire(blocking=False)  # it locks the file the name now gives, which is held
    new.release()
    path.unlink()  # removed outright: the next acquire makes and locks a new one
    assert new.acquire(blocking=False) and path.exists()
    assert not old.acquire(blocking=False)  # not the removed file it had open: the new one, held
    new.close()
    assert old.acquire(blocking=False)
    old.close()


def test_a_heartbeat_names_its_jobs_by_type_and_reads_what_older_agents_wrote(spool: Spool) -> None:
    from gpupool.jobs.heartbeat import Heartbeat, JobRef, read_status, write_status

    hb = Heartbeat("h-cpu0", 3, "busy", current=JobRef("r", 2, 1, 10.5), ahead=JobRef("r", 3, 1))
    write_status(spool, "h-cpu0", hb)
    assert read_status(spool.heartbeat("h-cpu0")) == hb
    # as an older agent wrote them: no attempt, no since
    write_status(spool, "h-cpu0", {"agent": "h-cpu0", "seq": 4, "state": "busy", "current": {"run": "r", "chunk_id": 2},
                                   "ahead": {"run": "r", "chunk_id": 3, "attempt": 1}})
    old = read_status(spool.heartbeat("h-cpu0"))
    assert old.current == JobRef("r", 2) and old.current.since is None and old.ahead.key == ("r", 3, 1)
