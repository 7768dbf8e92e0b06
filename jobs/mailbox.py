"""An agent's mailbox ``agent_pool/<agent_id>.POOL``: the jobs queued for (and run by) one agent.

Content: ``{"schema": 1, "agent": "<id>", "jobs": [<job descriptor>, ...]}``, oldest first.
Reading needs no lock (the file is only ever replaced by rename); every
read-modify-write holds ``agent_pool/<agent_id>.lock``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from loguru import logger

from jobs.atomic import read_bounded, write_replace
from jobs.descriptor import SCHEMA, Job
from jobs.errors import BadFile, NewerSchema
from jobs.locks import FileLock
from jobs.paths import Spool

MAILBOX_LIMIT = 16 * 1024 * 1024


@dataclass
class Snapshot:
    jobs: list[Job] = field(default_factory=list)
    bad: list[tuple[Any, str]] = field(default_factory=list)  # (raw entry, why)


def parse_mailbox(data: bytes, where: Path, known: dict[Any, tuple[dict, Job]] | None = None) -> Snapshot:
    """Parse untrusted mailbox bytes. Raises BadFile for a broken file as a whole;
    single bad descriptors are returned in ``Snapshot.bad``.

    ``known`` maps (run, chunk, attempt) to an entry validated before and its Job: an
    identical entry is not validated again (a deep mailbox is reread after every job)."""
    if not data.strip():
        raise BadFile("mailbox is empty (a valid mailbox always holds a JSON object)", where)
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadFile(f"mailbox is not valid JSON ({e})", where) from e
    if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), list):
        raise BadFile("mailbox must be a JSON object with a 'jobs' list", where)
    schema = doc.get("schema")
    if isinstance(schema, int) and schema > SCHEMA:
        raise NewerSchema(f"mailbox schema {schema} is newer than this tool's {SCHEMA}; upgrade", where)
    snap, seen = Snapshot(), {}
    for raw in doc["jobs"]:
        key = (raw.get("run"), raw.get("chunk_id"), raw.get("attempt")) if isinstance(raw, dict) else None
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


class Mailbox:
    def __init__(self, spool: Spool, agent_id: str) -> None:
        self.spool = spool
        self.agent_id = agent_id
        self.path = spool.mailbox(agent_id)
        self.lock = FileLock(spool.mailbox_lock(agent_id))
        self._known: dict[Any, tuple[dict, Job]] = {}

    def read(self) -> Snapshot:
        """The current content; a missing mailbox is empty. Raises BadFile if broken."""
        try:
            data = read_bounded(self.path, MAILBOX_LIMIT)
        except FileNotFoundError:
            return Snapshot()
        return parse_mailbox(data, self.path, self._known)

    def update(self, change: Callable[[list[Job]], list[Job] | None]) -> list[Job]:
        """Under the lock: read, let ``change`` return the new job list (None = unchanged), write.

        A broken mailbox or descriptor is moved to ``rejected/`` here and dropped.
        Returns the job list now in the mailbox.
        """
        with self.lock:
            snap, dirty = self._read_repairing()
            new = change(list(snap.jobs))
            if new is None and not dirty:
                return snap.jobs
            jobs = snap.jobs if new is None else new
            self._write(jobs)
            return jobs

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
        try:
            data = read_bounded(self.path, MAILBOX_LIMIT)
        except (OSError, BadFile):
            data = b""
        logger.warning("rejected a broken mailbox: {}", why)
        self.spool.reject(data, self.path, why)

    def _write(self, jobs: list[Job]) -> None:
        doc = {"schema": SCHEMA, "agent": self.agent_id, "jobs": [j.to_dict() for j in jobs]}
        # No fsync: the mailbox is rebuilt from results on any restart, and rename alone
        # already makes the new content atomic for every other process (see jobs/__init__).
        write_replace(self.path, json.dumps(doc).encode(), fsync=False)


def drop_run(spool: Spool, run: str) -> int:
    """Remove every queued job of ``run`` from every mailbox (cancel, --fresh); returns how many."""
    dropped = 0
    for ident in spool.agent_ids():
        def drop(jobs: list[Job]) -> list[Job] | None:
            nonlocal dropped
            keep = [j for j in jobs if j.run != run]
            dropped += len(jobs) - len(keep)
            return keep if len(keep) != len(jobs) else None
        Mailbox(spool, ident).update(drop)
    return dropped
