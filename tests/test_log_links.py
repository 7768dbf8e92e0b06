"""Logs and results are never written (or read back) through a link (issue 23): a symlink planted
at a log, or at a folder on the way to one, is moved to ``rejected/`` with a ``.why`` and the job
goes on with a real one; a symlink at ``results/<run>`` planted while the run goes on is moved
there too, and the agent's commit writes nothing through it. Real agents, the real main.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gpupool.agent.worker_control import cap_log
from gpupool.jobs.paths import Spool
from tests.helpers import REPO, results, run_main, wait_for


def _rejected(spool: Spool) -> dict[str, dict]:
    """The ``.why`` notes in ``rejected/``, by the name of what was rejected."""
    return {p.name[:-4]: json.loads(p.read_text()) for p in spool.rejected_dir.glob("*.why")}


def _outside(tmp_path: Path) -> tuple[Path, Path]:
    """A folder outside BASE holding a file a link can point at, and that file."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("SECRET: not the job's\n")
    return outside, victim


@pytest.mark.timeout(120)
def test_a_link_at_a_chunk_log_is_rejected_and_the_command_writes_a_real_log(spool: Spool, agents, env,
                                                                              tmp_path: Path) -> None:
    outside, victim = _outside(tmp_path)
    agents(1)
    spool.run_log_dir("linklog").mkdir(parents=True)
    for chunk in (0, 1):  # chunk 0 succeeds, chunk 1 fails: its result carries the tail of its log
        spool.chunk_log("linklog", chunk).symlink_to(victim)
    r = run_main(["--base", str(spool.base), "--cmd", "echo output-of-{chunk_id}; exit {chunk_id}", "--chunks", "2",
                  "--retries", "0", "--run", "linklog", "--no-progress"], env)
    assert r.returncode == 1, r.stdout + r.stderr  # chunk 1 exits 1
    assert victim.read_text() == "SECRET: not the job's\n" and [p.name for p in outside.iterdir()] == ["victim.txt"]
    res = results(spool.base, "linklog")
    assert res[0]["status"] == "ok" and res[0]["attempt"] == 1  # no attempt spent on the planted link
    assert res[1]["status"] == "failed" and res[1]["error"]["type"] == "CommandFailed"
    assert "output-of-1" in res[1]["error"]["traceback"] and "SECRET" not in res[1]["error"]["traceback"]
    for chunk in (0, 1):
        log = spool.chunk_log("linklog", chunk)
        assert not log.is_symlink() and f"output-of-{chunk}" in log.read_text()
    whys = {name: note for name, note in _rejected(spool).items() if name.endswith(".log")}
    assert len(whys) == 2 and all("symlink" in n["why"] and str(victim) in n["why"] for n in whys.values())
    assert all((spool.rejected_dir / name).is_symlink() for name in whys)  # the link itself, kept
    # reading it back: `python -m master logs --chunk` follows no link either
    log = spool.chunk_log("linklog", 0)
    log.unlink()
    log.symlink_to(victim)
    shown = subprocess.run([sys.executable, "-m", "master", "logs", "--base", str(spool.base), "--run", "linklog",
                            "--chunk", "0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "SECRET" not in shown.stdout and "run linklog chunk 0: OK" in shown.stdout


@pytest.mark.timeout(120)
def test_a_link_at_the_runs_log_folder_is_rejected_and_a_real_one_made(spool: Spool, agents, env,
                                                                        tmp_path: Path) -> None:
    outside, victim = _outside(tmp_path)
    (outside / "000000.log").write_text("SECRET log\n")
    agents(1)
    spool.logs_dir.mkdir(exist_ok=True)
    spool.run_log_dir("linkdir").symlink_to(outside)
    r = run_main(["--base", str(spool.base), "--cmd", "echo output-of-{chunk_id}", "--chunks", "2",
                  "--run", "linkdir", "--no-progress"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in outside.iterdir()) == ["000000.log", "victim.txt"]
    assert (outside / "000000.log").read_text() == "SECRET log\n" and victim.read_text() == "SECRET: not the job's\n"
    folder = spool.run_log_dir("linkdir")
    assert folder.is_dir() and not folder.is_symlink()
    assert all(f"output-of-{c}" in spool.chunk_log("linkdir", c).read_text() for c in (0, 1))
    assert all(results(spool.base, "linkdir")[c]["status"] == "ok" for c in (0, 1))
    [(name, note)] = _rejected(spool).items()
    assert (spool.rejected_dir / name).is_symlink() and "logs/linkdir/" in note["why"] and "symlink" in note["why"]


@pytest.mark.timeout(120)
def test_a_link_at_results_run_planted_while_the_run_goes_on_is_not_written_through(spool: Spool, agents, env,
                                                                                     tmp_path: Path) -> None:
    outside, _ = _outside(tmp_path)
    before = sorted(p.name for p in outside.iterdir())
    [agent] = agents(1)
    flag = tmp_path / "go"
    main = subprocess.Popen([sys.executable, "main.py", "--base", str(spool.base), "--cmd",
                             f"while [ ! -e '{flag}' ]; do sleep 0.05; done; echo finished-{{chunk_id}}",
                             "--chunks", "1", "--run", "linkres", "--no-progress"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        log = spool.chunk_log("linkres", 0)
        wait_for(lambda: log.is_file() and "# attempt 1" in log.read_text(), what="the chunk running")
        rdir = spool.result_dir("linkres")
        os.rename(rdir, tmp_path / "results-aside")  # the run's real results folder, swapped for a link
        rdir.symlink_to(outside)
        flag.touch()
        wait_for(lambda: any(n["origin"] == str(rdir) for n in _rejected(spool).values())
                 or sorted(p.name for p in outside.iterdir()) != before, what="the agent's commit")
        assert sorted(p.name for p in outside.iterdir()) == before  # no result, history or temp file there
        [(name, note)] = [(k, n) for k, n in _rejected(spool).items() if n["origin"] == str(rdir)]
        assert (spool.rejected_dir / name).is_symlink() and "results/linkres/" in note["why"]
        assert "finished-0" in log.read_text()  # the job ran to its end
        assert agent.proc.poll() is None
    finally:
        os.killpg(main.pid, signal.SIGKILL)
        main.wait(timeout=10)


@pytest.mark.timeout(120)
def test_links_at_the_agents_own_logs_are_rejected_and_real_ones_made(spool: Spool, agents, env,
                                                                       tmp_path: Path) -> None:
    outside, victim = _outside(tmp_path)
    ident = "testhost-cpu0"
    for log in (spool.agent_log(ident), spool.worker_log(ident)):
        log.symlink_to(victim)
    agents(1)
    r = run_main(["--base", str(spool.base), "--task", "examples.noop:square", "--chunks", "2", "--run", "own",
                  "--no-progress"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert victim.read_text() == "SECRET: not the job's\n" and [p.name for p in outside.iterdir()] == ["victim.txt"]
    for log in (spool.agent_log(ident), spool.worker_log(ident)):
        wait_for(lambda: log.is_file() and not log.is_symlink() and log.stat().st_size > 0, what=f"a real {log.name}")
    assert sorted(n["origin"] for n in _rejected(spool).values()) == sorted(
        str(p) for p in (spool.agent_log(ident), spool.worker_log(ident)))


def test_cap_log_neither_reads_nor_writes_through_a_link(spool: Spool, tmp_path: Path) -> None:
    outside, victim = _outside(tmp_path)
    log = spool.worker_log("h-cpu0")
    log.symlink_to(victim)  # a link at the log: not cut, moved to rejected/
    assert not cap_log(log, 4, spool)
    assert victim.read_text() == "SECRET: not the job's\n" and not os.path.lexists(log)
    assert "symlink" in next(iter(_rejected(spool).values()))["why"]
    log.write_text("x" * 100)
    old = log.with_name(log.name + ".1")
    old.symlink_to(victim)  # a link at <log>.1: replaced, never written through
    assert cap_log(log, 10, spool)
    assert victim.read_text() == "SECRET: not the job's\n"
    assert not old.is_symlink() and old.read_text() == "x" * 100 and log.read_text() == ""


@pytest.mark.timeout(120)
def test_a_link_at_results_run_planted_while_a_callable_computes_gets_none_of_its_arrays(
        spool: Spool, agents, env, tmp_path: Path) -> None:
    """The worker saves a callable's arrays beside their final name before the agent commits them:
    that save, too, refuses a link on its way (nothing lands outside BASE, not even a temp file)."""
    outside, _ = _outside(tmp_path)
    before = sorted(p.name for p in outside.iterdir())
    [agent] = agents(1)
    gate = tmp_path / "gate"
    main = subprocess.Popen([sys.executable, "main.py", "--base", str(spool.base), "--task", "tests.faulty:gated_array",
                             "--kwargs", f'{{"gate": "{gate}", "mb": 0.1}}', "--chunks", "1", "--run", "linkarr",
                             "--retries", "0", "--no-progress"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for(lambda: (agent.heartbeat() or {}).get("current"), what="the chunk running")
        rdir = spool.result_dir("linkarr")
        os.rename(rdir, tmp_path / "results-aside")
        rdir.symlink_to(outside)
        gate.touch()
        wait_for(lambda: any(n["origin"] == str(rdir) for n in _rejected(spool).values())
                 or sorted(p.name for p in outside.iterdir()) != before, what="the save and the commit")
        assert sorted(p.name for p in outside.iterdir()) == before  # no arrays, temp file or result there
        assert agent.proc.poll() is None
    finally:
        os.killpg(main.pid, signal.SIGKILL)
        main.wait(timeout=10)
