"""A run's --on-done hook (issue 26, master.hooks), with real agents and masters: run once when the
run ends, with its placeholders; not again when the same command resumes a finished run, even
after its master was killed while the hook ran; again when a retry seals the run anew."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from gpupool.jobs.paths import Spool
from tests.helpers import REPO, run_main, wait_for


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_the_hook_runs_with_the_run_s_outcome_each_time_the_run_is_sealed(spool: Spool, env, agents,
                                                                                tmp_path: Path) -> None:
    agents(2)
    said = tmp_path / "said.txt"
    args = ["--base", str(spool.base), "--task", "examples.noop:fail_on", "--chunks", "6", "--kwargs",
            '{"bad": [4]}', "--retries", "0", "--max-failures", "0", "--run", "hooked", "--no-progress",
            "--on-done", f"echo {{run}} {{status}} {{ok}} {{failed}} {{results!q}} >> {said}; echo printed; exit 3"]
    r = run_main(args, env)
    assert r.returncode == 1, r.stdout + r.stderr  # a chunk failed
    assert _lines(said) == [f"hooked failed 5 1 {spool.result_dir('hooked')}"]
    log = spool.on_done_log("hooked")
    assert f"--on-done exited with code 3 (its output: {log})" in r.stdout + r.stderr
    assert log.read_text().splitlines()[1:] == ["printed"]
    rec = json.loads(spool.on_done_record("hooked").read_text())
    assert rec["exit_code"] == 3 and rec["status"] == "failed"
    r = subprocess.run([sys.executable, "-m", "master", "status", "--base", str(spool.base), "--json"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    [row] = [row for row in json.loads(r.stdout)["runs"] if row["run"] == "hooked"]
    assert row["on_done"]["exit_code"] == 3 and row["on_done"]["status"] == "failed"

    # the same command again retries the failed chunk: the run has work again, and once it is sealed anew
    # its hook (kept with the run) runs anew; so does python -m master retry's
    r = run_main(args, env)
    assert _lines(said)[1:] == [f"hooked failed 5 1 {spool.result_dir('hooked')}"], r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "master", "retry", "--base", str(spool.base), "--run", "hooked"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert len(_lines(said)) == 3, r.stdout + r.stderr

def test_a_master_killed_while_its_hook_runs_never_runs_it_twice(spool: Spool, env, agents, tmp_path: Path) -> None:
    agents(1)
    said, gate = tmp_path / "said.txt", tmp_path / "gate"
    args = [sys.executable, "main.py", "--base", str(spool.base), "--task", "examples.noop:noop", "--chunks", "3",
            "--run", "killed", "--no-progress", "--on-done",
            f"echo started >> {said}; while [ ! -e {gate} ]; do sleep 0.1; done; echo ended >> {said}"]
    master = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: _lines(said) == ["started"], 120, "the hook to start")
        master.send_signal(signal.SIGKILL)
        master.wait(timeout=30)
        rec = json.loads(spool.on_done_record("killed").read_text())
        assert rec["status"] == "done" and "exit_code" not in rec  # claimed, never ended
        r = subprocess.run([sys.executable, "-m", "master", "status", "--base", str(spool.base), "--run", "killed"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert "on-done (done): started, no end recorded (its master stopped while it ran)" in r.stdout, r.stdout
        r = run_main(args[2:], env)  # the same command: the run is done, its hook claimed
        assert r.returncode == 0, r.stdout + r.stderr
        gate.touch()  # the orphaned hook ends now
        wait_for(lambda: "ended" in _lines(said), 30, "the first hook to end")
        assert _lines(said) == ["started", "ended"]
    finally:
        gate.touch()
        master.kill()


def test_a_hook_with_an_unknown_placeholder_is_refused_at_submit(spool: Spool, env, agents) -> None:
    agents(1)
    r = run_main(["--base", str(spool.base), "--task", "examples.noop:noop", "--chunks", "2",
                  "--on-done", "notify {rnu}"], env)
    assert r.returncode == 2
    assert "--on-done 'notify {rnu}': unknown placeholder(s) {rnu}; known: {failed}, {ok}, {results}, {run}, " \
           "{status}" in r.stderr
    assert not os.listdir(spool.runs_dir)  # nothing recorded
