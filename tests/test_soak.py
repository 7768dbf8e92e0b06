"""Randomized soak: agents and the master killed at random over many tiny chunks; every chunk
committed exactly once. Short form always; the long form with GPUPOOL_SOAK=1."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpupool.jobs import batches
from gpupool.jobs.paths import BATCH_RE, Spool
from tests.faulty import tally
from tests.helpers import REPO, AgentProc, claims, results

LONG = os.environ.get("GPUPOOL_SOAK") == "1"
CHUNKS = 20000 if LONG else 1500
BUDGET = 600 if LONG else 75  # seconds of random kills before the run is left to finish


def _master(spool: Spool, env: dict, marks: Path, batch: int) -> subprocess.Popen:
    # one chunk a job (as before batches), or batches of 10 chunks of 5 ms: long enough that kills
    # strike in the middle of the run
    kwargs = {"marks": str(marks), **({"seconds": 0.005} if batch > 1 else {})}
    return subprocess.Popen(
        [sys.executable, "main.py", "--base", str(spool.base), "--task", "tests.faulty:counted", "--chunks",
         str(CHUNKS), "--kwargs", json.dumps(kwargs), "--run", "soak", "--dead-after", "1.0", "--batch", str(batch),
         "--retry-delay", "0.05", "--no-progress"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)


@pytest.mark.soak
@pytest.mark.timeout(BUDGET + 240)
@pytest.mark.parametrize("batch", [1, 10])
def test_random_kills_of_agents_and_master(spool: Spool, env, tmp_path: Path, batch: int) -> None:
    rng = random.Random(20261122)
    marks = tmp_path / "marks"
    agents = [AgentProc(spool.base, i, env).wait_ready() for i in range(2)]
    master = _master(spool, env, marks, batch)
    agent_kills = master_kills = 0
    graveyard = []
    try:
        deadline = time.monotonic() + BUDGET
        while time.monotonic() < deadline and master.poll() is None:
            time.sleep(rng.uniform(0.2, 0.8))  # when to strike: random, not a synchronisation
            if rng.random() < 0.75:
                i = rng.randrange(len(agents))
                agents[i].kill()
                agent_kills += 1
                graveyard.append(agents[i])
                agents[i] = AgentProc(spool.base, i, env).wait_ready()
            else:
                master.kill()
                master.wait()
                master_kills += 1
                master = _master(spool, env, marks, batch)
        if master.poll() is not None and master.returncode != 0:
            master = _master(spool, env, marks, batch)  # killed or stopped: the same command finishes the run
        _, err = master.communicate(timeout=240)
        assert master.returncode == 0, err
    finally:
        master.kill()
        for a in agents + graveyard:
            a.kill()
    res = results(spool.base, "soak")
    assert len(res) == CHUNKS and all(r["status"] == "ok" for r in res.values())
    starts, ends = tally(str(marks))
    assert set(ends) == set(range(CHUNKS))
    assert set(claims(spool.base, "soak").values()) == {1}  # counted raw: one final result a chunk
    # only a killed agent's jobs run twice: the running one and the one being committed, each a
    # chunk or a batch of them (jobs.batches: a batch lost with its agent runs again chunk by chunk)
    folder = spool.result_dir("soak")
    job = max([1] + [batches.read_slot(p).count for p in folder.iterdir() if BATCH_RE.match(p.name)])
    assert sum(starts.values()) - CHUNKS <= 2 * agent_kills * job
    assert sum(ends.values()) - CHUNKS <= 2 * agent_kills * job
    print(f"soak: {CHUNKS} chunks, {agent_kills} agent kills, {master_kills} master kills, "
          f"{sum(starts.values()) - CHUNKS} re-runs")
