"""Agent heartbeat/status files ``agents/<agent_id>.json``, replaced every few seconds.

``seq`` grows by one on every write, so a reader judges liveness by how long *its own*
clock has seen the same ``seq`` (never by comparing two machines' clocks).
"""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any

from jobs.atomic import read_bounded, write_replace
from jobs.errors import BadFile
from jobs.paths import Spool

STATUS_LIMIT = 256 * 1024


class AgentState(str, Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"  # takes no new job (BASE/agents/<id>.drain exists)
    STOPPING = "stopping"
    STOPPED = "stopped"


def write_status(spool: Spool, agent_id: str, status: dict[str, Any]) -> None:
    # No fsync: a heartbeat lost in an OS crash is simply stale, which is its meaning.
    write_replace(spool.heartbeat(agent_id), json.dumps(status).encode(), fsync=False)


def read_status(path: Path) -> dict[str, Any]:
    """Read a heartbeat; raises BadFile if it is not a valid one, OSError if unreadable."""
    data = read_bounded(path, STATUS_LIMIT)
    try:
        st = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadFile(f"heartbeat is not valid JSON ({e})", path) from e
    if not isinstance(st, dict) or not isinstance(st.get("seq"), int) or not isinstance(st.get("agent"), str):
        raise BadFile("heartbeat lacks 'agent'/'seq'", path)
    try:
        AgentState(st.get("state"))
    except ValueError as e:
        raise BadFile(f"heartbeat has unknown state {st.get('state')!r}", path) from e
    return st
