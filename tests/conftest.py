from __future__ import annotations

from pathlib import Path

import pytest

from gpupool.jobs.paths import Spool
from tests.helpers import AgentProc, base_env


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "base").ensure()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return base_env(tmp_path)


@pytest.fixture
def agents(spool: Spool, env: dict[str, str]):
    """Start real CPU agents: ``agents(2)``; all are SIGKILLed at the end of the test."""
    started: list[AgentProc] = []

    def start(n: int = 1, first: int = 0, args: list[str] | None = None, env_: dict | None = None,
              cpu: bool = True) -> list[AgentProc]:
        procs = [AgentProc(spool.base, first + i, env_ or env, args, cpu) for i in range(n)]
        started.extend(procs)
        return [p.wait_ready() for p in procs]

    yield start
    for p in started:
        p.kill()
