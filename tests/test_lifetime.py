"""Agents that end by themselves (issue 26, agent.lifetime), as real processes: after an idle time
(--idle-exit), and before the time they must end by (--time-left; --end-at and a Slurm job's end
are the same rule), never starting a chunk their run's last chunk says would not fit, their
queued work going to the other agents."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from gpupool.jobs.paths import Spool
from tests.helpers import REPO, AgentProc, run_main, wait_for


def _results(spool: Spool, run: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((spool.results_dir / run).glob("[0-9]*.json"))
            if ".a" not in p.name]


def test_an_agent_with_an_idle_exit_serves_a_run_then_stops_by_itself(spool: Spool, env) -> None:
    feeder = subprocess.Popen([sys.executable, "main.py", "--base", str(spool.base), "--task", "examples.noop:noop",
                               "--chunks", "4", "--run", "idle", "--no-progress"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    agent = AgentProc(spool.base, 0, env, ["--idle-exit", "10"])  # the run waits for it: work comes at once
    try:
        out, _ = feeder.communicate(timeout=120)
        assert feeder.returncode == 0, out
        wait_for(lambda: agent.proc.poll() is not None, 120, "the idle agent to stop by itself")
        assert agent.proc.returncode == 0, agent.output()
        assert "stops: no job for 10 seconds (--idle-exit)" in agent.output()
        assert agent.heartbeat()["state"] == "stopped"
        assert [r["status"] for r in _results(spool, "idle")] == ["ok"] * 4
    finally:
        feeder.kill()
        agent.kill()


def test_an_agent_near_its_end_starts_no_chunk_that_would_not_fit_and_its_work_goes_elsewhere(
        spool: Spool, env, agents) -> None:
    # chunks of at least 2 s; the agent's end 9 s after it starts, with 1 s to stop: by its run's last
    # chunk it starts none less than 3 s before its end, so at most 3 (at 0, 2 and 4 s at the earliest)
    ending = AgentProc(spool.base, 0, env, ["--time-left", "9", "--end-margin", "1"]).wait_ready()
    try:
        agents(1, first=1)
        r = run_main(["--base", str(spool.base), "--task", "examples.noop:pause", "--chunks", "10",
                      "--kwargs", '{"seconds": 2}', "--run", "late", "--no-progress"], env, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: ending.proc.poll() is not None, 60, "the agent to stop before its end")
        assert ending.proc.returncode == 0, ending.output()
        assert "left before its --time-left 9" in ending.output() and "stops: " in ending.output(), ending.output()
        results = _results(spool, "late")
        assert [r["status"] for r in results] == ["ok"] * 10
        # what it had queued went elsewhere at no cost: handed back, never a failed attempt
        assert not list((spool.results_dir / "late").glob("*.a*.json"))
        by_agent = Counter(r["agent"] for r in results)
        assert by_agent[ending.id] <= 3, by_agent
        assert by_agent[ending.id] + by_agent[f"{ending.id[:-1]}1"] == 10, by_agent
    finally:
        ending.kill()


def test_an_end_that_leaves_no_time_is_refused_at_start(spool: Spool, env, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "agent", "--base", str(spool.base), "--cpu", "--time-left", "30"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "its --time-left 30 leaves 30 s, no more than --end-margin 60: the agent would stop at once" in r.stderr
    r = subprocess.run([sys.executable, "-m", "agent", "--base", str(spool.base), "--cpu", "--end-at", "soon"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--end-at 'soon': expected seconds since the epoch" in r.stderr


def test_a_run_s_chunk_time_keeps_even_its_first_chunk_off_an_agent_too_near_its_end(spool: Spool, env,
                                                                                     agents) -> None:
    ending = AgentProc(spool.base, 0, env, ["--time-left", "600", "--end-margin", "1"]).wait_ready()
    feeder = subprocess.Popen([sys.executable, "main.py", "--base", str(spool.base), "--task", "examples.noop:noop",
                               "--chunks", "4", "--chunk-time", "900", "--run", "long", "--no-progress"], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:  # the only agent is given the run's jobs: it starts none (900 s would not end in 600), and stops
        wait_for(lambda: ending.proc.poll() is not None, 120, "the agent to stop rather than start a chunk")
        assert "long's chunks take about 900 s" in ending.output(), ending.output()
        agents(1, first=1)  # its jobs go to the next agent, at no cost
        out, _ = feeder.communicate(timeout=120)
        assert feeder.returncode == 0, out
        results = _results(spool, "long")
        assert [r["status"] for r in results] == ["ok"] * 4
        assert {r["agent"] for r in results} == {f"{ending.id[:-1]}1"}
        assert not list((spool.results_dir / "long").glob("*.a*.json"))
    finally:
        feeder.kill()
        ending.kill()
