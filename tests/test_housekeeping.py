"""Housekeeping a daily user expects (issue 25): ``status`` shows active and recent runs (``--all``
every run), an Executor's run is removed when it closes cleanly, ``rm`` asks on a terminal and
wants ``--yes`` elsewhere, a refused OctoRun config makes no folder, and the progress bar stays out
of a redirected log. Real processes, run from a folder that is not the checkout."""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpupool.jobs.atomic import server_now
from gpupool.jobs.descriptor import JobKind
from gpupool.jobs.owners import claim_run
from gpupool.jobs.paths import Spool
from gpupool.master.executor import Executor
from gpupool.master.spec.runspec import RunSpec, save_or_check
from tests.helpers import REPO, run_main

TASK = "def square(chunk_id):\n    return {'y': chunk_id * chunk_id}\n"


def arrays(n: int) -> dict:
    """An Executor call whose value comes back as the call's .npz."""
    return {"r": np.arange(n, dtype=np.float64), "s": np.ones((2, n))}


def master(args: list[str], env: dict[str, str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "master", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60, **kw)


def age(spool: Spool, run: str, days: float) -> None:
    """Make every file and folder of ``run`` look ``days`` old, by the file server's clock."""
    then = server_now(spool.base) - days * 86400
    for top in (spool.run_dir(run), spool.result_dir(run), spool.run_log_dir(run)):
        if not top.exists():
            continue
        for root, dirs, files in os.walk(top, topdown=False):
            for name in files + dirs:
                os.utime(os.path.join(root, name), (then, then), follow_symlinks=False)
        os.utime(top, (then, then))


def recorded_run(spool: Spool, name: str, chunks: int = 3) -> None:
    """A run on record as its master leaves it (spec and owner), fed by nobody, with one result file."""
    save_or_check(spool, RunSpec(name, JobKind.CALLABLE, "examples.noop:noop", chunks, workdir=str(REPO)), fresh=False)
    claim_run(spool, name)
    spool.result_dir(name).mkdir(parents=True, exist_ok=True)
    spool.result_json(name, 0).write_text(json.dumps({"status": "ok", "chunk_id": 0, "value": "x" * 1000}))


@pytest.mark.timeout(150)
def test_status_shows_active_and_recent_runs_and_all_shows_the_old_one(spool: Spool, agents, env, tmp_path) -> None:
    agents(1)
    work = tmp_path / "work"
    work.mkdir()
    (work / "task.py").write_text(TASK)
    for run in ("old", "new"):
        r = run_main(["--base", str(spool.base), "--task", "task.py:square", "--chunks", "3", "--run", run], env,
                     cwd=work)
        assert r.returncode == 0, r.stdout + r.stderr
    assert spool.sealed_flag("old").exists()
    age(spool, "old", 3)
    st = master(["status", "--base", str(spool.base)], env, work)
    assert st.returncode == 0, st.stderr
    assert "\nnew " in st.stdout and "\nold " not in st.stdout, st.stdout
    assert "(1 older run hidden; --all shows them)" in st.stdout, st.stdout
    every = master(["status", "--base", str(spool.base), "--all"], env, work)
    assert every.returncode == 0 and "\nnew " in every.stdout and "\nold " in every.stdout, every.stdout
    assert "hidden" not in every.stdout
    data = json.loads(master(["status", "--base", str(spool.base), "--json"], env, work).stdout)
    assert [r["run"] for r in data["runs"]] == ["new"] and data["runs_hidden"] == 1
    assert data["runs_hidden_unfinished"] == 0 and set(data["run_progress"]) == {"new"}
    assert 0 <= data["run_progress"]["new"]["idle_s"] < 3600
    data = json.loads(master(["status", "--base", str(spool.base), "--json", "--all"], env, work).stdout)
    assert [r["run"] for r in data["runs"]] == ["new", "old"] and "runs_hidden" not in data
    assert data["run_progress"]["old"]["idle_s"] > 2 * 86400 and data["run_progress"]["old"]["sealed"]
    one = master(["status", "--base", str(spool.base), "--run", "old"], env, work)  # any run, however old
    assert one.returncode == 0 and "run old: 3 chunks" in one.stdout, one.stdout
    # an old run with work queued is active again: shown
    recorded_run(spool, "stale")
    age(spool, "stale", 5)
    st = master(["status", "--base", str(spool.base)], env, work)
    assert "(2 older runs hidden, 1 of them unfinished; --all shows them)" in st.stdout, st.stdout


@pytest.mark.timeout(150)
def test_an_executors_run_goes_when_it_closes_cleanly_and_stays_when_kept(spool: Spool, agents) -> None:
    agents(1)
    with Executor(spool.base) as ex:
        got = ex.submit(arrays, 4)
        value = got.result(timeout=60)
        assert spool.run_dir(ex.run).exists() and list(spool.result_dir(ex.run).glob("*.npz"))
        plain = ex.submit(pow, 2, 10)
    assert not spool.run_dir(ex.run).exists() and not spool.result_dir(ex.run).exists()
    assert not spool.run_log_dir(ex.run).exists() and ex.run not in spool.run_names()
    assert np.array_equal(value["r"], [0, 1, 2, 3]) and plain.result() == 1024  # what the futures hold stays
    assert np.array_equal(got.result()["s"], np.ones((2, 4)))

    with Executor(spool.base, keep=True) as kept:
        assert kept.submit(pow, 3, 3).result(timeout=60) == 27
    with Executor(spool.base, run="named-by-me") as named:
        assert named.submit(pow, 3, 2).result(timeout=60) == 9
    ex2 = Executor(spool.base)
    assert ex2.submit(pow, 2, 2).result(timeout=60) == 4
    ex2.shutdown(wait=True)  # a clean shutdown without a with block removes it too
    with pytest.raises(ZeroDivisionError), Executor(spool.base) as raised:
        raised.submit(divmod, 1, 0).result(timeout=60)  # the block raises: its run stays for logs
    with Executor(spool.base, run="named-not-kept", keep=False) as gone:
        assert gone.submit(pow, 2, 3).result(timeout=60) == 8
    assert sorted(spool.run_names()) == sorted([kept.run, "named-by-me", raised.run])
    assert spool.result_json(kept.run, 0).exists() and spool.result_json("named-by-me", 0).exists()


def _read_until(fd: int, text: bytes, timeout: float = 30.0) -> bytes:
    seen, deadline = b"", time.monotonic() + timeout
    while text not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {text!r} on the terminal: {seen!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the other side closed
                break
            if not chunk:
                break
            seen += chunk
    return seen


def _rm_on_a_terminal(spool: Spool, run: str, answer: bytes, env: dict[str, str], cwd: Path) -> tuple[int, bytes]:
    primary, secondary = os.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "master", "rm", "--base", str(spool.base), "--run", run],
                                cwd=cwd, env=env, stdin=secondary, stdout=secondary, stderr=secondary, close_fds=True)
        os.close(secondary)
        seen = _read_until(primary, b"[y/N] ")
        os.write(primary, answer)
        code = proc.wait(timeout=60)
        try:
            while select.select([primary], [], [], 0.5)[0]:
                chunk = os.read(primary, 4096)
                if not chunk:
                    break
                seen += chunk
        except OSError:
            pass
        return code, seen
    finally:
        os.close(primary)


@pytest.mark.timeout(120)
def test_rm_asks_on_a_terminal_and_wants_yes_elsewhere(spool: Spool, env, tmp_path) -> None:
    recorded_run(spool, "precious")
    code, seen = _rm_on_a_terminal(spool, "precious", b"n\n", env, tmp_path)
    assert b"remove run precious (1 result, " in seen and b" KB)? [y/N] " in seen, seen
    assert code == 1 and b"run precious kept" in seen and spool.result_json("precious", 0).exists(), seen
    code, seen = _rm_on_a_terminal(spool, "precious", b"\n", env, tmp_path)  # the default is no
    assert code == 1 and spool.run_dir("precious").exists(), seen
    code, seen = _rm_on_a_terminal(spool, "precious", b"y\n", env, tmp_path)
    assert code == 0 and b"removed run precious" in seen and not spool.run_dir("precious").exists(), seen
    assert not spool.result_dir("precious").exists()

    recorded_run(spool, "scripted")
    r = master(["rm", "--base", str(spool.base), "--run", "scripted"], env, tmp_path, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and spool.result_json("scripted", 0).exists(), r
    assert r.stderr.startswith("python -m master rm: not removing run scripted (1 result, ") and "--yes" in r.stderr
    r = master(["rm", "--base", str(spool.base), "--run", "scripted", "-y"], env, tmp_path, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and "removed run scripted" in r.stdout and not spool.run_dir("scripted").exists(), r
    r = master(["rm", "--base", str(spool.base), "--run", "scripted", "--yes"], env, tmp_path)
    assert r.returncode == 2 and "no run 'scripted'" in r.stderr, r


@pytest.mark.timeout(120)
@pytest.mark.parametrize("config, extra, why", [
    ({"gpus": "auto"}, [], "no visible GPU"),  # refused when the agents would start: after the spool was made
    ({"gpus": [0]}, ["--timeout", "-1"], "timeout"),  # the run's own checks: after agents had started
    ({"gpus": [0]}, ["--depth", "0"], "--depth must be 1 or more"),
    ({"gpus": [0], "total_chunks": 0}, [], "total_chunks"),
])
def test_a_refused_octorun_config_leaves_the_folder_as_it_was(tmp_path, env, config, extra, why) -> None:
    work = tmp_path / "project"
    work.mkdir()
    (work / "run.py").write_text("print('hi')\n")
    (work / "config.json").write_text(json.dumps({"script_path": "./run.py", "total_chunks": 2, **config}))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    r = run_main(["--octorun-config", "config.json", *extra], {**env, "GPUPOOL_FAKE_GPUS": "[]"}, cwd=work)
    assert r.returncode == 2 and why in r.stderr, r.stdout + r.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no logs/gpupool skeleton
    r = run_main(["--octorun-config", "config.json", "--base", str(tmp_path / "typo"), *extra], env, cwd=work)
    assert r.returncode == 2 and not (tmp_path / "typo").exists(), r.stdout + r.stderr


@pytest.mark.timeout(150)
def test_no_progress_bar_in_a_redirected_log_unless_asked(spool: Spool, agents, env, tmp_path) -> None:
    agents(1)
    work = tmp_path / "work"
    work.mkdir()
    (work / "task.py").write_text(TASK + "\ndef bad(chunk_id):\n    raise ValueError(f'bad {chunk_id}')\n")
    log = work / "run.log"
    with open(log, "w") as err:
        r = subprocess.run([sys.executable, str(REPO / "main.py"), "--base", str(spool.base), "--task", "task.py:bad",
                            "--chunks", "2", "--retries", "0", "--max-failures", "0", "--run", "quiet"], cwd=work,
                           env=env, stdout=subprocess.PIPE, stderr=err, text=True, timeout=120)
    assert r.returncode == 1, r.stdout
    text = log.read_text()
    assert "\r" not in text and "%|" not in text and "chunk/s" not in text, text  # tqdm's bar draws these
    assert "chunk 0 failed for good" in text and "chunk 1 failed for good" in text, text  # one line per event
    assert "run quiet: 2 chunks, 0 ok, 2 failed" in r.stdout
    with open(log, "w") as err:
        r = subprocess.run([sys.executable, str(REPO / "main.py"), "--base", str(spool.base), "--task",
                            "task.py:square", "--chunks", "2", "--run", "loud", "--progress"], cwd=work, env=env,
                           stdout=subprocess.PIPE, stderr=err, text=True, timeout=120)
    assert r.returncode == 0 and "%|" in log.read_text(), log.read_text()  # --progress forces it
    retry = subprocess.run([sys.executable, "-m", "master", "retry", "--base", str(spool.base), "--run", "quiet"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert retry.returncode == 1 and "re-queuing 2 failed chunks" in retry.stdout, retry.stdout + retry.stderr
    assert "%|" not in retry.stderr and "\r" not in retry.stderr, retry.stderr
