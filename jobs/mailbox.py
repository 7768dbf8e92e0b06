"""An agent's mailbox ``agent_pool/<agent_id>.POOL``: the jobs queued for (and run by) one agent.

Content: ``{"schema": 1, "agent": "<id>", "seq": N, "jobs": [<job descriptor>, ...]}``, oldest
first. Reading needs no lock (the file is only ever replaced by rename); every
read-modify-write holds ``agent_pool/<agent_id>.lock``.

Stale reads: a client of a shared filesystem may, for about a second, still open the version
another client has just renamed away (cached directory entries), and a read-modify-write
based on it would drop the other client's change. So every write also records its ``seq``
in the (never replaced) lock file, and an update waits, under the lock, until the mailbox it
reads carries at least that ``seq``.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from gpupool.jobs.logsetup import logger

from gpupool.jobs.atomic import NotAFile, file_kind, read_bounded, read_if_changed, write_replace
from gpupool.jobs.descriptor import Job
from gpupool.jobs.errors import BadFile, NewerSchema
from gpupool.jobs.fsinfo import NameRefresh
from gpupool.jobs.jsonio import load_json
from gpupool.jobs.locks import FileLock
from gpupool.jobs.paths import Spool

MAILBOX_LIMIT = 16 * 1024 * 1024
# The mailbox's own format (its "schema"), apart from that of the jobs in it: each job says the schema
# it needs (jobs.descriptor), and a new master writes an older agent's mailbox, with jobs that agent
# reads, in a format it reads (2: the format since schema-2 jobs; unchanged by newer job fields).
SCHEMA = 2


STALE_WAIT = 3.0  # seconds an update waits for a fresh mailbox before going on regardless
HOLD_LIMIT = 5.0  # seconds a master waits for a mailbox lock before it takes the holder for frozen


@dataclass
class Snapshot:
    jobs: list[Job] = field(default_factory=list)
    bad: list[tuple[Any, str]] = field(default_factory=list)  # (raw entry, why)
    seq: int | None = None  # the write that produced it (None: written by an older version)


def parse_mailbox(data: bytes, where: Path, known: dict[Any, tuple[dict, Job]] | None = None) -> Snapshot:
    """Parse untrusted mailbox bytes. Raises BadFile for a broken file as a whole;
    single bad descriptors are returned in ``Snapshot.bad``.

    ``known`` maps (run, chunk, attempt) to an entry validated before and its Job: an
    identical entry is not validated again (a deep mailbox is reread after every job)."""
    if not data.strip():
        raise BadFile("mailbox is empty (a valid mailbox always holds a JSON object)", where)
    doc = load_json(data, "mailbox", where)
    if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), list):
        raise BadFile("mailbox must be a JSON object with a 'jobs' list", where)
    schema = doc.get("schema")
    if isinstance(schema, int) and schema > SCHEMA:
        raise NewerSchema(f"mailbox schema {schema} is newer than this tool's {SCHEMA}; upgrade", where)
    seq = doc.get("seq")
    snap, seen = Snapshot(seq=seq if isinstance(seq, int) and not isinstance(seq, bool) else None), {}
    for raw in doc["jobs"]:
        key = _key(raw)
        hit = known.get(key) if known is not None and key is not None else None
        if hit is not None and hit[0] == raw:
            snap.jobs.append(hit[1])
            seen[key] = hit
            continue
        try:
            job = Job.from_dict(raw, where)
        except BadFile as e:
            snap.bad.append((raw, str(e)))
            continue
        snap.jobs.append(job)
        if key is not None:
            seen[key] = (raw, job)
    if known is not None:
        known.clear()
        known.update(seen)
    return snap


def _key(raw: object) -> tuple[str, int, int] | None:
    """(run, chunk, attempt) of a raw descriptor, if they have the right types (a list where the
    run belongs is not hashable, and such an entry is validated, and refused, every time)."""
    if not isinstance(raw, dict):
        return None
    key = (raw.get("run"), raw.get("chunk_id"), raw.get("attempt"))
    ok = isinstance(key[0], str) and all(isinstance(v, int) and not isinstance(v, bool) for v in key[1:])
    return key if ok else None


class Mailbox:
    def __init__(self, spool: Spool, agent_id: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.spool, self.clock = spool, clock
        self.agent_id = agent_id
        self.path = spool.mailbox(agent_id)
        self.lock = FileLock(spool.mailbox_lock(agent_id))
        self._known: dict[Any, tuple[dict, Job]] = {}
        self._encoded: dict[Any, tuple[Job, dict]] = {}  # key -> (a job this process wrote, its to_dict)
        self._last: tuple[tuple[int, int, int], Snapshot, float] | None = None  # (sig, parsed, when)
        self.changed_at = clock()  # when read() last saw different content (this process's clock)
        self.refresh = NameRefresh(self.path.parent)  # a stale read on a network filesystem (see _read_fresh)

    def read(self) -> Snapshot:
        """The current content; a missing mailbox is empty. Raises BadFile if broken.

        The agent rereads its mailbox after every job, and it rarely changes in between (the
        master refills it every few jobs): when the opened file is the one parsed last time
        (same inode, mtime and size; every write is a rename of a new inode), its snapshot is
        reused instead of reading and parsing the whole queue again; at least once a second it is
        read anyway, in case a coarse-grained filesystem clock hides a change."""
        now = self.clock()
        known = self._last[0] if self._last and now - self._last[2] < 1.0 else None
        try:
            data, sig = read_if_changed(self.path, MAILBOX_LIMIT, known)
        except FileNotFoundError:
            return Snapshot()
        except NotAFile as e:  # a folder or FIFO in its place: update() moves it aside
            raise BadFile(f"mailbox {e.strerror}", self.path) from e
        if data is None:
            snap = self._last[1]
        else:
            if self._last is None or self._last[0] != sig:
                self.changed_at = now
            snap = parse_mailbox(data, self.path, self._known)
            self._last = (sig, snap, now)
        return dataclasses.replace(snap, jobs=list(snap.jobs), bad=list(snap.bad))

    @property
    def mtime(self) -> float | None:
        """The modification time of the content read last, as the file server stamped it."""
        return self._last[0][1] / 1e9 if self._last is not None else None

    def update(self, change: Callable[[list[Job]], list[Job] | None], wait: float | None = None,
               force: bool = False) -> list[Job]:
        """Under the lock: read, let ``change`` return the new job list (None = unchanged), write.

        A broken mailbox or descriptor is moved to ``rejected/`` here and dropped.
        Returns the job list now in the mailbox.

        ``wait``: raise TimeoutError if the lock is not had within that many seconds (a process
        frozen while holding it, by SIGSTOP or a suspended job, holds it until it is killed).
        With ``force`` the change is then made without the lock, for changes that may be lost
        again: taking jobs back from a dead agent (which may be the frozen holder: if it comes
        back and rewrites its mailbox from an older read, those jobs may run twice, and a result
        is still committed once) or dropping a cancelled run's jobs (agents skip those anyway).
        """
        self._check_lock_file()
        if not self.lock.acquire(timeout=wait):  # wait None: for as long as it takes
            if not force:
                raise TimeoutError(f"{self.lock.path} has been held by another process for over {wait:g} s")
            logger.warning("{} has been held for over {:g} s by a process that may be frozen; changed without it",
                           self.lock.path, wait)
            return self._change(change)
        try:
            return self._change(change)
        finally:
            self.lock.release()

    def _change(self, change: Callable[[list[Job]], list[Job] | None]) -> list[Job]:
        expected = self._lock_seq()
        snap, dirty = self._read_fresh(expected)
        new = change(list(snap.jobs))
        if new is None and not dirty:
            return snap.jobs
        jobs = snap.jobs if new is None else new
        self._write(jobs, max(expected, snap.seq or 0) + 1)
        return jobs

    def _check_lock_file(self) -> None:
        """A folder, FIFO or symlink where the lock file belongs would make every update fail (or,
        a FIFO, block): moved into ``rejected/``, so that the lock is created afresh. A real lock
        file is never moved (every waiter must lock the same inode)."""
        try:
            mode = os.lstat(self.lock.path).st_mode
        except OSError:
            return  # missing: FileLock creates it
        if not stat.S_ISREG(mode):
            why = f"mailbox lock is a {file_kind(mode)}, not a regular file; moved aside, a new lock is made"
            logger.warning("{}: {}", self.lock.path, why)
            self.spool.reject(b"", self.lock.path, why, move=True)

    def _lock_seq(self) -> int:
        note = self.lock.read_note(64).strip()
        return int(note) if note.isdigit() else 0

    def _read_fresh(self, expected: int) -> tuple[Snapshot, bool]:
        """Read under the lock until the mailbox is at least as new as the last write."""
        deadline = time.monotonic() + STALE_WAIT
        while True:
            snap, dirty = self._read_repairing()
            if dirty or snap.seq is None or snap.seq >= expected:
                return snap, dirty
            if time.monotonic() >= deadline:
                logger.warning("{}: still reads as write {} after {} s, not {}; going on", self.path, snap.seq,
                               STALE_WAIT, expected)
                return snap, dirty
            self.refresh()  # a network filesystem's client cache: the listing brings the newer file into view
            time.sleep(0.02)

    def ensure(self) -> None:
        """Create the mailbox if missing, keeping any jobs already in it."""
        if not self.path.exists():
            self.update(lambda jobs: jobs)

    def _read_repairing(self) -> tuple[Snapshot, bool]:
        try:
            snap = self.read()
        except BadFile as e:
            self._reject_file(str(e))
            return Snapshot(), True
        except FileNotFoundError:
            return Snapshot(), True
        if not self.path.exists():
            return snap, True
        for raw, why in snap.bad:
            logger.warning("rejected a job descriptor: {}", why)
            self.spool.reject(json.dumps(raw, default=repr).encode(), self.path, why)
        return snap, bool(snap.bad)

    def _reject_file(self, why: str) -> None:
        """Keep the broken mailbox in ``rejected/``; a folder or FIFO in its place is moved there
        (nothing could be renamed over a folder), anything else is copied and then replaced."""
        try:
            mode = os.lstat(self.path).st_mode
        except OSError:
            mode = stat.S_IFREG
        move = not (stat.S_ISREG(mode) or stat.S_ISLNK(mode))
        data = b""
        if not move:
            try:
                data = read_bounded(self.path, MAILBOX_LIMIT)
            except (OSError, BadFile):
                pass
        logger.warning("rejected a broken mailbox: {}", why)
        self.spool.reject(data, self.path, why, move=move)

    def _write(self, jobs: list[Job], seq: int) -> None:
        """Write ``jobs`` as write ``seq``; what is written is remembered as read (see ``_wrote``)."""
        encoded, raws = {}, []
        for j in jobs:  # a job kept from the last write is not encoded again (a deep mailbox, refilled often)
            hit = self._encoded.get(j.key)
            raw = hit[1] if hit is not None and hit[0] is j else j.to_dict()
            raws.append(raw)
            encoded[j.key] = (j, raw)
        doc = {"schema": SCHEMA, "agent": self.agent_id, "seq": seq, "jobs": raws}
        data = json.dumps(doc).encode()
        if len(data) > MAILBOX_LIMIT:  # readers would reject it, and its jobs would vanish: refused here
            raise OSError(errno.EFBIG, f"{len(jobs)} jobs would make the mailbox {len(data) >> 20} MB, over its "
                                       f"{MAILBOX_LIMIT >> 20} MB limit; left as it was", str(self.path))
        # No fsync: the mailbox is rebuilt from results on any restart, and rename alone
        # already makes the new content atomic for every other process (see jobs/__init__).
        folder = self.spool.mailbox_temp_dir()
        try:
            sig = write_replace(self.path, data, fsync=False, folder=folder)
        except OSError as e:
            if folder is None or e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM) \
                    or not self.path.parent.is_dir():
                raise
            self.spool.forget_mailbox_temp_dir()  # its temp folder went (or broke): beside it, this once
            sig = write_replace(self.path, data, fsync=False)
        self.lock.write_note(str(seq).encode())
        self._wrote(sig, jobs, seq, encoded)

    def _wrote(self, sig: tuple[int, int, int], jobs: list[Job], seq: int, encoded: dict[Any, tuple[Job, dict]]
               ) -> None:
        """What this process just wrote is what its next ``read`` returns while the file is that one
        (the same inode, mtime and size: ``read_if_changed``), without reading, parsing and checking
        its own jobs again (a master refilling a deep mailbox did that for every job it queued); a
        file another process wrote since is read as before."""
        now = self.clock()
        self._encoded = encoded
        self._known = {key: (raw, job) for key, (job, raw) in encoded.items()}
        self._last = (sig, Snapshot(jobs=list(jobs), seq=seq), now)
        self.changed_at = now  # as the next read would have said (it changed: this write)


def without_run(run: str, counter: list[int] | None = None) -> Callable[[list[Job]], list[Job] | None]:
    """A change for ``Mailbox.update`` that removes every job of ``run`` (None if there is none);
    the number removed is added to ``counter[0]``."""
    def drop(jobs: list[Job]) -> list[Job] | None:
        keep = [j for j in jobs if j.run != run]
        if counter is not None:
            counter[0] += len(jobs) - len(keep)
        return keep if len(keep) != len(jobs) else None
    return drop


def drop_run(spool: Spool, run: str) -> int:
    """Remove every queued job of ``run`` from every mailbox (cancel, --fresh); returns how many."""
    dropped = [0]
    for ident in spool.agent_ids():
        Mailbox(spool, ident).update(without_run(run, dropped), wait=HOLD_LIMIT, force=True)
    return dropped[0]
