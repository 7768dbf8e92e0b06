"""Run dependencies (issue 26, master.core.after), with real agents and masters: ``--after A`` starts
a run's chunks only once A is sealed with every chunk ok, and fails it at once when A failed;
``--after-any`` whatever A's outcome; unknown runs and cycles are refused at submit; ``--detach``
records the run and leaves a master of its own to feed it, later, while ``status`` says what it
waits for. A chunk of a run that must wait checks A's seal itself (``test -e``): a chunk started
too early fails its run, whatever the timing."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gpupool.jobs.paths import Spool
from gpupool.master.core.states import master_feeds
from tests.helpers import REPO, results, run_main, wait_for


def _status(spool: Spool, env: dict[str, str]) -> dict[str, dict]:
    r = subprocess.run([sys.executable, "-m", "master", "status", "--base", str(spool.base), "--json", "--all"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return {row["run"]: row for row in json.loads(r.stdout)["runs"]}


def _master(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "main.py", *cmd], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _detached_pid(out: str) -> int:
    m = re.search(r"its master runs detached \(pid (\d+)\)", out)
    assert m, out
    return int(m.group(1))


def _stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # its own session: its pid leads its group


def _sealed_ok(spool: Spool, run: str, chunks: int) -> bool:
    got = results(spool.base, run)
    return spool.sealed_flag(run).exists() and len(got) == chunks and all(r["status"] == "ok" for r in got.values())


def test_a_detached_run_after_another_starts_only_once_that_run_is_sealed_ok(spool: Spool, env, agents,
                                                                               tmp_path: Path) -> None:
    agents(2)
    gate = tmp_path / "gate"
    prep = _master(["--base", str(spool.base), "--cmd", f"while [ ! -e {gate} ]; do sleep 0.05; done", "--chunks",
                    "2", "--run", "prep", "--no-progress"], env)
    pid = None
    try:
        wait_for(lambda: _status(spool, env).get("prep", {}).get("running") == 2, 60, "prep's chunks to run")
        r = run_main(["--base", str(spool.base), "--cmd", f"test -e {spool.sealed_flag('prep')}", "--chunks", "3",
                      "--run", "train", "--after", "prep", "--detach"], env)
        assert r.returncode == 0, r.stdout + r.stderr
        pid = _detached_pid(r.stdout)
        assert f"python -m master status --base {spool.base} --run train" in r.stdout
        assert str(spool.master_log("train")) in r.stdout
        assert spool.run_spec("train").exists()  # recorded at once
        assert master_feeds(spool, "train")  # its detached master holds the run's lock when the command returns
        row = _status(spool, env)["train"]
        assert (row["state"], row["after"], row["running"] + row["queued"] + row["ok"]) == ("after", ["prep"], 0)
        text = subprocess.run([sys.executable, "-m", "master", "status", "--base", str(spool.base)], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=60).stdout
        assert re.search(r"^train .* after prep$", text, re.M), text
        text = subprocess.run([sys.executable, "-m", "master", "status", "--base", str(spool.base), "--run", "train"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=60).stdout
        assert "run train: waits for run prep to end before its chunks start (--after)" in text, text
        runs = subprocess.run([sys.executable, "-m", "master", "runs", "--base", str(spool.base)], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=60).stdout
        assert re.search(r"^train\b.*\bafter\b", runs, re.M), runs
        assert not results(spool.base, "train")
        gate.touch()
        assert prep.wait(timeout=120) == 0, prep.stdout.read()
        wait_for(lambda: _sealed_ok(spool, "train", 3), 120, "train to end ok")
        wait_for(lambda: not master_feeds(spool, "train"), 60, "train's detached master to end")
        log = spool.master_log("train").read_text()
        assert "run train: waits for run prep to end before its chunks start (--after)" in log, log
        assert _status(spool, env)["train"]["state"] == "done"
    finally:
        gate.touch()
        prep.kill()
        if pid is not None:
            _stop(pid)


def test_a_failed_run_fails_what_waits_for_it_at_once_unless_after_any(spool: Spool, env, agents) -> None:
    agents(1)
    base = ["--base", str(spool.base), "--no-progress"]
    r = run_main([*base, "--task", "examples.noop:fail_on", "--chunks", "2", "--kwargs", '{"bad": [1]}',
                  "--retries", "0", "--run", "prep"], env)
    assert r.returncode == 1, r.stdout + r.stderr
    r = run_main([*base, "--task", "examples.noop:noop", "--chunks", "2", "--run", "train", "--after", "prep"], env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "run prep failed (1 of 2 chunks failed); it must end with every chunk ok" in r.stdout, r.stdout
    assert f"python -m master retry --base {spool.base} --run prep" in r.stdout
    assert not results(spool.base, "train")  # none of its chunks ran
    assert _status(spool, env)["train"]["state"] == "stopped_early"
    # what waits for the failed run fails in its turn, naming why
    r = run_main([*base, "--task", "examples.noop:noop", "--chunks", "1", "--run", "report", "--after", "train"], env)
    assert r.returncode == 1 and "run train stopped early (--after: run prep failed" in r.stdout, r.stdout
    # --after-any: whatever its outcome
    r = run_main([*base, "--task", "examples.noop:noop", "--chunks", "2", "--run", "cleanup", "--after-any", "prep"],
                 env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(results(spool.base, "cleanup")) == 2
    # a cancelled run fails an --after run too
    r = run_main([*base, "--task", "examples.noop:noop", "--chunks", "1", "--run", "ok"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "master", "cancel", "--base", str(spool.base), "--run", "ok"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_main([*base, "--task", "examples.noop:noop", "--chunks", "1", "--run", "later", "--after", "ok"], env)
    assert r.returncode == 1 and "run ok was cancelled" in r.stdout, r.stdout


def test_unknown_runs_and_cycles_are_refused_at_submit(spool: Spool, env, agents) -> None:
    agents(1)
    base = ["--base", str(spool.base), "--no-progress", "--task", "examples.noop:noop", "--chunks", "1"]
    r = run_main([*base, "--run", "train", "--after", "prep"], env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"--after prep: no run 'prep' in {spool.base}; submit it first" in r.stderr
    assert not os.listdir(spool.runs_dir)  # nothing recorded
    r = run_main([*base, "--run", "train", "--after", "train"], env)
    assert r.returncode == 2 and "--after train: a run cannot wait for itself" in r.stderr, r.stderr
    assert run_main([*base, "--run", "prep"], env).returncode == 0
    assert run_main([*base, "--run", "train", "--after", "prep"], env).returncode == 0
    assert run_main([*base, "--run", "eval", "--after-any", "train"], env).returncode == 0
    saved = spool.run_spec("prep").read_bytes()
    r = run_main([*base, "--run", "prep", "--after", "eval", "--detach"], env)  # prep after eval after train after prep
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--after eval: a cycle: prep after eval after train after prep" in r.stderr
    assert spool.run_spec("prep").read_bytes() == saved  # unchanged
    r = run_main([*base, "--run", "prep", "--after", "other,eval"], env)
    assert r.returncode == 2 and "no run 'other'" in r.stderr, r.stderr


def test_detached_runs_wait_for_agents_then_for_each_other_from_any_folder(spool: Spool, env, agents,
                                                                              tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pids = []
    try:
        r = run_main(["--base", str(spool.base), "--cmd", "echo {chunk_id} > /dev/null", "--chunks", "2", "--run",
                      "prep", "--no-wait"], env, cwd=elsewhere)
        assert r.returncode == 0, r.stdout + r.stderr
        pids.append(_detached_pid(r.stdout))
        r = run_main(["--base", str(spool.base), "--cmd", f"test -e {spool.sealed_flag('prep')}", "--chunks", "2",
                      "--run", "train", "--after", "prep", "--detach"], env, cwd=elsewhere)
        assert r.returncode == 0, r.stdout + r.stderr
        pids.append(_detached_pid(r.stdout))
        rows = _status(spool, env)
        assert rows["prep"]["state"] == "waiting"  # fed, no agent yet
        assert (rows["train"]["state"], rows["train"]["after"]) == ("after", ["prep"])
        # its master gone (a reboot), the run still reads as waiting for prep, not interrupted
        _stop(pids[1])
        wait_for(lambda: not master_feeds(spool, "train"), 30, "train's master to be gone")
        assert _status(spool, env)["train"]["state"] == "after"
        r = run_main(["--base", str(spool.base), "--cmd", f"test -e {spool.sealed_flag('prep')}", "--chunks", "2",
                      "--run", "train", "--after", "prep", "--detach"], env, cwd=elsewhere)  # the same command
        assert r.returncode == 0, r.stdout + r.stderr
        pids.append(_detached_pid(r.stdout))
        # a waiting run cancelled: its master stops waiting, and it reads cancelled
        r = run_main(["--base", str(spool.base), "--cmd", "true", "--chunks", "1", "--run", "extra", "--after", "prep",
                      "--detach"], env, cwd=elsewhere)
        assert r.returncode == 0, r.stdout + r.stderr
        pids.append(_detached_pid(r.stdout))
        r = subprocess.run([sys.executable, "-m", "master", "cancel", "--base", str(spool.base), "--run", "extra"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: not master_feeds(spool, "extra"), 30, "extra's master to stop")
        assert _status(spool, env)["extra"]["state"] == "cancelled"
        agents(1)
        wait_for(lambda: _sealed_ok(spool, "prep", 2), 120, "prep to end ok")
        wait_for(lambda: _sealed_ok(spool, "train", 2), 120, "train to end ok")
        wait_for(lambda: not master_feeds(spool, "prep") and not master_feeds(spool, "train"), 60,
                 "the detached masters to end")
    finally:
        for pid in pids:
            _stop(pid)


def test_after_is_saved_only_where_given_and_kept_on_resume(tmp_path: Path) -> None:
    from gpupool.master.api import Pool
    from gpupool.master.errors import UsageError
    from gpupool.master.spec.runspec import build, load_run, save_or_check

    spool = Spool(tmp_path / "b").ensure()
    save_or_check(spool, build(task="examples.noop:noop", chunks=1, run="prep"), fresh=False)
    assert not {"after", "after_any"} & set(json.loads(spool.run_spec("prep").read_text()))  # older tools read it
    spec = build(task="examples.noop:noop", chunks=1, run="train", after=["prep,a", "b"], after_any="c")
    assert (spec.after, spec.after_any, spec.waits_for) == (["prep", "a", "b"], ["c"], ["prep", "a", "b", "c"])
    with pytest.raises(UsageError, match="--after and --after-any both name prep"):
        build(task="examples.noop:noop", chunks=1, after="prep", after_any="prep")
    with pytest.raises(UsageError, match="--after names no run"):
        build(task="examples.noop:noop", chunks=1, after=",")
    run = Pool(spool.base).submit(task="examples.noop:noop", chunks=1, run="train", after="prep")
    run.record()  # recorded, not fed: no master holds it now
    assert load_run(spool, "train").after == ["prep"] and not master_feeds(spool, "train")
    kept = save_or_check(spool, build(task="examples.noop:noop", chunks=1, run="train"), fresh=False)
    assert kept.after == ["prep"]  # a resume without --after keeps it, as --on-done
