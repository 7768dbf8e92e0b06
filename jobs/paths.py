"""The one place that knows every path of the spool; nobody else joins names into BASE."""
from __future__ import annotations

import json
import os
import re
import stat
import time
from pathlib import Path

from jobs.atomic import is_temp_name, write_replace
from jobs.errors import BadFile, SpoolError
from jobs.names import check_chunk, check_name

RESULT_RE = re.compile(r"^(\d{6,})\.json$")
HISTORY_RE = re.compile(r"^(\d{6,})\.a(\d+)\.json$")
ARRAYS_RE = re.compile(r"^(\d{6,})(?:\.a(\d+))?\.npz$")  # <chunk>.a<attempt>.npz (<chunk>.npz: older versions)


class Spool:
    """Paths under one BASE folder (see the ``jobs`` package docstring for the protocol)."""

    def __init__(self, base: str | os.PathLike) -> None:
        self.base = Path(base).absolute()
        self.pool_dir = self.base / "agent_pool"
        self.agents_dir = self.base / "agents"
        self.runs_dir = self.base / "runs"
        self.results_dir = self.base / "results"
        self.logs_dir = self.base / "logs"
        self.rejected_dir = self.base / "rejected"

    def ensure(self) -> "Spool":
        """Create the layout (idempotent). Folders are not writable by other users."""
        try:
            for d in (self.base, self.pool_dir, self.agents_dir, self.runs_dir,
                      self.results_dir, self.logs_dir, self.rejected_dir):
                d.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as e:
            raise SpoolError(f"cannot create the spool folder: {e.strerror}", e.filename or self.base) from e
        return self

    def check_private(self) -> None:
        """Refuse a spool that every user may write: whoever can write it runs code as us."""
        for d in (self.base, self.pool_dir, self.agents_dir, self.runs_dir, self.results_dir):
            st = os.stat(d) if d == self.base else os.lstat(d)
            if d != self.base and stat.S_ISLNK(st.st_mode):
                raise SpoolError("is a symlink; the spool's own folders must be real folders", d)
            if st.st_mode & stat.S_IWOTH:
                raise SpoolError(f"is writable by every user (mode {stat.S_IMODE(st.st_mode):o}): anyone who can "
                                 f"write the spool can run code as this user. Fix it with: chmod o-w {d}", d)

    def run_dirs(self, run: str) -> Path:
        """Create ``results/<run>`` and ``logs/<run>`` if needed; refuse them if they are symlinks
        (a hostile link would make us write outside BASE). Returns the results folder."""
        out = self.result_dir(run)
        for d in (out, self.logs_dir / check_name(run, "run name")):
            d.mkdir(mode=0o755, parents=True, exist_ok=True)
            if os.path.islink(d):
                raise BadFile("is a symlink; results and logs are never written through a link", d)
        return out

    # agents
    def mailbox(self, agent_id: str) -> Path:
        return self.pool_dir / f"{check_name(agent_id, 'agent id')}.POOL"

    def mailbox_lock(self, agent_id: str) -> Path:
        return self.pool_dir / f"{check_name(agent_id, 'agent id')}.lock"

    def heartbeat(self, agent_id: str) -> Path:
        return self.agents_dir / f"{check_name(agent_id, 'agent id')}.json"

    def agent_lock(self, agent_id: str) -> Path:
        return self.agents_dir / f"{check_name(agent_id, 'agent id')}.lock"

    def drain_flag(self, agent_id: str) -> Path:
        return self.agents_dir / f"{check_name(agent_id, 'agent id')}.drain"

    def agent_log(self, agent_id: str) -> Path:
        return self.logs_dir / f"{check_name(agent_id, 'agent id')}.log"

    def worker_log(self, agent_id: str) -> Path:
        """The output of the agent's worker process (the job code's prints and warnings)."""
        return self.logs_dir / f"{check_name(agent_id, 'agent id')}.worker.log"

    def agent_ids(self) -> list[str]:
        """Agents that ever wrote a heartbeat in this spool, sorted."""
        out = []
        for name in os.listdir(self.agents_dir) if self.agents_dir.is_dir() else ():
            if name.endswith(".json") and not is_temp_name(name):
                out.append(name[: -len(".json")])
        return sorted(out)

    # runs
    def run_dir(self, run: str) -> Path:
        return self.runs_dir / check_name(run, "run name")

    def run_spec(self, run: str) -> Path:
        return self.run_dir(run) / "run.json"

    def cancel_flag(self, run: str) -> Path:
        """Present = the run is cancelled; its JSON says {"stop_running": bool}."""
        return self.run_dir(run) / "cancel"

    def run_epoch(self, run: str) -> Path:
        """A token drawn anew each time the run is started afresh (``--fresh``); its jobs carry it."""
        return self.run_dir(run) / "epoch"

    def sealed_flag(self, run: str) -> Path:
        """Present = the run finished and its results were flushed to disk."""
        return self.run_dir(run) / "sealed"

    def master_lock(self, run: str) -> Path:
        return self.run_dir(run) / "master.lock"

    def run_names(self) -> list[str]:
        if not self.runs_dir.is_dir():
            return []
        return sorted(n for n in os.listdir(self.runs_dir) if not is_temp_name(n))

    # results
    def result_dir(self, run: str) -> Path:
        return self.results_dir / check_name(run, "run name")

    def result_json(self, run: str, chunk: int) -> Path:
        return self.result_dir(run) / f"{check_chunk(chunk):06d}.json"

    def result_npz(self, run: str, chunk: int, attempt: int) -> Path:
        """The arrays of one attempt: each attempt writes its own, so commits need no lock."""
        return self.result_dir(run) / f"{check_chunk(chunk):06d}.a{int(attempt)}.npz"

    def arrays_of(self, run: str, rec: dict) -> Path | None:
        """The arrays file a result read by ``jobs.results.read_result`` names, or None."""
        return self.result_dir(run) / rec["arrays"] if rec.get("arrays") else None

    def history_json(self, run: str, chunk: int, attempt: int) -> Path:
        return self.result_dir(run) / f"{check_chunk(chunk):06d}.a{int(attempt)}.json"

    def chunk_log(self, run: str, chunk: int) -> Path:
        return self.logs_dir / check_name(run, "run name") / f"{check_chunk(chunk):06d}.log"

    # rejected files
    def reject(self, data: bytes, origin: Path | str, why: str) -> Path:
        """Keep a refused file (or descriptor) in ``rejected/`` with a ``.why`` note beside it."""
        self.rejected_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.monotonic_ns() % 10**9}-{Path(origin).name}"
        dest = self.rejected_dir / stem[:200]
        write_replace(dest, data, fsync=False)
        note = {"origin": str(origin), "why": why, "at": time.time()}
        write_replace(dest.with_name(dest.name + ".why"), json.dumps(note, indent=1).encode(), fsync=False)
        return dest
