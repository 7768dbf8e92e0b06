"""Agent heartbeat/status files ``agents/<agent_id>.json``, replaced every few seconds.

``seq`` grows by one on every write, so a reader judges liveness by how long *its own*
clock has seen the same ``seq`` (never by comparing two machines' clocks).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from gpupool.jobs.atomic import NotAFile
from gpupool.jobs.errors import BadFile
from gpupool.jobs.jsonio import clean, is_int, is_num, is_str, is_time, read_json
from gpupool.jobs.owners import user_name
from gpupool.jobs.paths import Spool, warn_once

STATUS_LIMIT = 256 * 1024


class AgentState(str, Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"  # takes no new job (BASE/agents/<id>.drain exists)
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True)
class JobRef:
    """A job a heartbeat names: ``current`` (the one the agent runs, ``since`` when it started, by
    the agent's wall clock, and ``running_s`` how long it had run when the heartbeat was written,
    by the agent's monotonic clock) or ``ahead`` (the one already in its worker's pipe).
    ``attempt``, ``since`` and ``running_s`` may be None (an older agent, or dropped by
    ``read_status`` for their type). ``since`` is for display as a time of day only: a duration is
    ``running_s`` plus the heartbeat's age (``master.core.liveness.AgentView.running_for``), never
    another host's clock minus ``since``. A batch (``jobs.batches``) is named by its first chunk,
    ``batch`` its chunk count (None: a single chunk, or an older agent)."""

    run: str
    chunk_id: int
    attempt: int | None = None
    since: float | None = None
    running_s: float | None = None
    batch: int | None = None

    @property
    def key(self) -> tuple[str, int, int | None]:
        """(run, chunk, attempt), as ``Job.key``."""
        return (self.run, self.chunk_id, self.attempt)

    def to_dict(self) -> dict[str, Any]:
        d = {"run": self.run, "chunk_id": self.chunk_id, "attempt": self.attempt, "since": self.since}
        if self.running_s is not None:
            d["running_s"] = self.running_s
        return d if self.batch is None else {**d, "batch": self.batch}


@dataclass(frozen=True)
class Heartbeat:
    """What an agent says of itself in ``agents/<agent>.json``, as every reader sees it.

    ``agent``, ``seq`` and ``state`` are always there (a heartbeat without them is refused); any
    other field may be None: not written by an older agent, or dropped by ``read_status`` for its
    type. Fields a newer agent adds are ignored. ``current``/``ahead`` name a job (``JobRef``);
    ``gpu`` is its (first) GPU's figures, ``gpus`` every GPU's (name, util,
    mem_used, mem_total, temp, or {"error": ...})."""

    agent: str
    seq: int
    state: str
    schema: int | None = None
    host: str | None = None  # host id (--host-id, $GPUPOOL_HOST_ID or the short host name)
    hostname: str | None = None
    pid: int | None = None
    base: str | None = None
    device: str | None = None  # "cuda:0" or "cpu"
    gpu_id: int | None = None  # its --gpu N (a CPU agent's rank)
    gpu_index: int | None = None
    gpu_uuid: str | None = None
    current: JobRef | None = None  # the job it runs
    ahead: JobRef | None = None  # the job already in its worker's pipe
    jobs_done: int | None = None
    jobs_failed: int | None = None
    started_at: float | None = None
    updated_at: float | None = None
    heartbeat_s: float | None = None
    watch: str | None = None  # "inotify" or "poll"
    job_schema: int | None = None  # the newest job descriptors it reads (None: an older agent, 1)
    worker_pid: int | None = None  # the worker of the run it ran last
    workers: list[dict[str, Any]] | None = None  # each run's worker process: {"run", "pid"} (agent.workers)
    spare_pid: int | None = None  # the spare worker, ready for the next run
    worker_threads: int | None = None  # the math libraries' threads each worker was given (agent.threads)
    log: str | None = None
    last_error: str | None = None
    died_under: Any = None  # what its former process may have died under (jobs.losses.died_under)
    mailbox_lag_s: float | None = None
    gpu: dict[str, Any] | None = None
    gpus: list[dict[str, Any]] | None = None
    gpu_ids: list[int] | None = None
    gpu_uuids: list[str] | None = None
    slot: int | None = None  # --slots: which of the agents sharing its GPU
    slots: int | None = None
    gpu_mem_reserved: float | None = None  # bytes the running job declared (--gpu-mem)
    waiting: str | None = None  # why its next job waits
    # attempts whose outcome it could not write (permission denied, a read-only filesystem): each
    # {"run", "chunk_id", "attempt", "max_attempts", "epoch", "error"[, "batch": its chunk count]}; their
    # master records them (agent.diskpause.DiskPause._uncommittable)
    uncommitted: list[dict[str, Any]] | None = None
    mps: str | None = None  # the CUDA_MPS_PIPE_DIRECTORY its jobs get
    uid: int | None = None  # the user it runs as (jobs.owners: drain/undrain of another user's agent want --force)
    user: str | None = None  # that uid's passwd name where the agent runs (the uid as text where it has none)
    slurm_job: str | None = None  # the Slurm job it runs in ($SLURM_JOB_ID): master.alloc knows its agents by it

    @staticmethod
    def user_of(uid: int) -> str:
        """The ``user`` an agent of ``uid`` names (``jobs.owners.user_name``)."""
        return user_name(uid)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Heartbeat":
        """From a mapping already checked field by field (``read_status``), or written by hand (tests)."""
        fields = {k: v for k, v in d.items() if k in _NAMES}
        for key in _JOB_REFS:
            if isinstance(fields.get(key), dict):
                job = fields[key]
                fields[key] = JobRef(job["run"], job["chunk_id"], job.get("attempt"), job.get("since"),
                                     job.get("running_s"), job.get("batch"))
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in _NAMES}
        for key in _JOB_REFS:
            if d[key] is not None:
                d[key] = d[key].to_dict()
        return d


_NAMES = frozenset(f.name for f in dataclasses.fields(Heartbeat))
_JOB_REFS = ("current", "ahead")


def write_status(spool: Spool, agent_id: str, status: Heartbeat | dict[str, Any]) -> None:
    """Publish a heartbeat (a ``Heartbeat``; tests may write a hand-made mapping)."""
    # No fsync: a heartbeat lost in an OS crash is simply stale, which is its meaning.
    data = status.to_dict() if isinstance(status, Heartbeat) else status
    spool.write_over(spool.heartbeat(agent_id), json.dumps(data).encode(), "heartbeat")


def read_status(path: Path) -> Heartbeat:
    """Read a heartbeat; raises BadFile if it is not a valid one, OSError if unreadable.

    ``agent``, ``seq`` and ``state`` must be right, or the whole heartbeat is refused. Every other
    field the tools read is checked for its type (``FIELDS``): a wrong one is dropped (None), with
    one warning naming the file and the field, so no reader ever meets ``"gpu": []``."""
    try:
        st = read_json(path, "heartbeat", STATUS_LIMIT)
    except NotAFile as e:
        raise BadFile(f"heartbeat {e.strerror}", path) from e
    if not isinstance(st, dict) or not isinstance(st.get("agent"), str) or not is_int(st.get("seq")):
        raise BadFile("heartbeat lacks 'agent'/'seq'", path)
    state = st.get("state")
    if not isinstance(state, str) or state not in _STATES:
        raise BadFile(f"heartbeat has unknown state {_cut(state)}", path)
    bad = clean(st, FIELDS)
    for n, gpu in enumerate(st.get("gpus") or []):  # each GPU of an agent that holds several, as "gpu" is
        bad += clean(gpu, _GPU, f"gpus[{n}].")
    for key in _JOB_REFS:  # a job is named by its run and chunk, or not at all
        job = st.get(key)
        if isinstance(job, dict) and not (isinstance(job.get("run"), str) and is_int(job.get("chunk_id"))):
            st[key] = None
            bad.append(key)
    if bad:
        warn_once(f"{path}: heartbeat fields of the wrong type ignored: {', '.join(bad)}")
    return Heartbeat.from_dict(st)


_STATES = {s.value for s in AgentState}
_JOB = {"run": is_str, "chunk_id": is_int, "attempt": is_int, "since": is_time,
        "running_s": lambda v: is_num(v) and v >= 0, "batch": is_int}
_GPU = {"name": is_str, "uuid": is_str, "util": is_num, "mem_used": is_num, "mem_total": is_num, "temp": is_num,
        "worker_mem": is_num}
# field -> its check, or the checks of the fields of an object (see jobs.jsonio.clean)
FIELDS: dict[str, Any] = {
    "schema": is_int, "host": is_str, "hostname": is_str, "pid": is_int, "base": is_str, "device": is_str,
    "gpu_id": is_int, "gpu_index": is_int, "gpu_uuid": is_str, "current": _JOB, "ahead": _JOB, "jobs_done": is_int,
    "jobs_failed": is_int, "started_at": is_time, "updated_at": is_time, "heartbeat_s": is_num,
    "watch": is_str, "job_schema": is_int, "worker_pid": is_int,
    "workers": lambda v: isinstance(v, list) and len(v) <= 64 and all(
        isinstance(w, dict) and is_str(w.get("run")) and is_int(w.get("pid")) for w in v),
    "spare_pid": is_int, "worker_threads": is_int, "log": is_str, "last_error": is_str,
    "mailbox_lag_s": is_num, "gpu": _GPU,
    "gpus": lambda v: isinstance(v, list) and len(v) <= 64 and all(isinstance(g, dict) for g in v),
    "gpu_ids": lambda v: isinstance(v, list) and len(v) <= 64 and all(is_int(g) for g in v),
    "gpu_uuids": lambda v: isinstance(v, list) and len(v) <= 64 and all(is_str(g) for g in v),
    "slot": is_int, "slots": is_int, "gpu_mem_reserved": is_num, "waiting": is_str, "mps": is_str,
    "uncommitted": lambda v: isinstance(v, list) and len(v) <= 64 and all(
        isinstance(u, dict) and is_str(u.get("run")) and is_int(u.get("chunk_id")) and is_int(u.get("attempt"))
        and is_int(u.get("max_attempts")) and isinstance(u.get("error"), dict)
        and is_str(u["error"].get("message")) for u in v),
    "uid": lambda v: is_int(v) and v >= 0, "user": is_str, "slurm_job": is_str,
}


def _cut(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:80] + "..."


assert set(FIELDS) <= _NAMES, set(FIELDS) - _NAMES  # every checked field is one a reader can get
