"""``python -m master`` status, logs, collect, retry, cancel, drain: real agents, real spool, real CLI."""
from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpupool.jobs.paths import Spool
from gpupool.master.cli.pool_cli import EXAMPLES, parser
from tests.helpers import REPO, base_env, results, run_main, wait_for


def master(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "master", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def master_bg(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "master", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def main_bg(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "main.py", *args, "--no-progress"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def status_json(spool: Spool, env: dict[str, str], *extra: str) -> dict:
    r = master(["status", "--base", str(spool.base), "--json", *extra], env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def read_until(stream, pattern: str, timeout: float = 20) -> str:
    """Read lines from a pipe until one matches ``pattern`` (deadline, never a fixed sleep)."""
    seen, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], 0.2)
        if ready:
            chunk = os.read(stream.fileno(), 65536)  # raw: a text wrapper's buffer would hide lines from select
            seen += chunk.decode(errors="replace")
            if re.search(pattern, seen):
                return seen
            if not chunk:
                break
    raise AssertionError(f"no {pattern!r} within {timeout} s in:\n{seen}")


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


# status ---------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_status_shows_gpus_current_chunk_rate_eta_and_dead_agents(spool: Spool, agents, tmp_path: Path) -> None:
    gpus = [{"name": "Fake H100", "mem_total_gb": 80, "mem_used_gb": 3, "util": 71, "temp": 55}] * 2
    genv = base_env(tmp_path, GPUPOOL_FAKE_GPUS=json.dumps(gpus))
    a0, a1 = agents(2, env_=genv, cpu=False)
    gate = tmp_path / "gate"  # chunks 4.. run until the test has looked (a machine's load cannot end the run first)
    feeder = main_bg(["--base", str(spool.base), "--task", "tests.faulty:held_after", "--chunks", "16", "--kwargs",
                      json.dumps({"gate": str(gate), "free": 4}), "--run", "slow"], genv)
    try:
        wait_for(lambda: len(results(spool.base, "slow")) >= 4, what="a few results")
        data = status_json(spool, genv)
        a = {x["id"]: x for x in data["agents"]}["testhost-gpu0"]
        assert a["gpu_name"] == "Fake H100" and a["gpu_util"] == 71 and a["gpu_temp"] == 55
        assert a["gpu_mem_total"] == 80 * 1024**3 and a["alive"] and a["heartbeat_age_s"] < 5
        busy = [x for x in data["agents"] if x["current"]]
        assert busy and busy[0]["current"]["run"] == "slow" and busy[0]["current_for_s"] is not None
        [run] = data["runs"]
        assert run["run"] == "slow" and run["running"] + run["queued"] > 0 and run["ok"] >= 4
        prog = data["run_progress"]["slow"]
        assert prog["chunks_per_s"] > 0 and prog["eta_s"] is not None and not prog["done"]
        table = master(["status", "--base", str(spool.base)], genv).stdout
        assert "Fake H100" in table and "71%" in table and "55C" in table and "CHUNK/S" in table
        assert re.search(r"slow#\d+", table) and "\033[" not in table  # no colours off a TTY
        gate.touch()
        assert feeder.wait(timeout=60) == 0
    finally:
        feeder.kill()
    assert status_json(spool, genv)["run_progress"]["slow"]["done"] is True
    a1.kill()
    data = wait_for(lambda: (d := status_json(spool, genv, "--dead-after", "1")) and
                    {x["id"]: x["state"] for x in d["agents"]}["testhost-gpu1"] == "dead" and d, what="dead agent")
    assert not {x["id"]: x for x in data["agents"]}["testhost-gpu1"]["alive"]
    table = master(["status", "--base", str(spool.base), "--dead-after", "1"], genv).stdout
    assert "DEAD" in table and "testhost-gpu1" in table.split("DEAD (no heartbeat):")[1]


@pytest.mark.timeout(60)
def test_status_watch_refreshes_in_place_with_colours_on_a_tty(spool: Spool, agents, env) -> None:
    agents(1)
    mfd, sfd = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "master", "status", "--base", str(spool.base), "--watch", "0.2"],
                         cwd=REPO, env=env, stdout=sfd, stderr=sfd, close_fds=True)
    os.close(sfd)
    out = b""
    try:
        deadline = time.monotonic() + 30
        while out.count(b"\033[H") < 2 and time.monotonic() < deadline:
            if select.select([mfd], [], [], 0.2)[0]:
                out += os.read(mfd, 65536)
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=10)
        os.close(mfd)
    assert out.count(b"\033[H") >= 2, out[-500:]  # redrawn from the top, twice
    assert b"\033[32m" in out and b"testhost-cpu0" in out  # idle agent in green
    plain = subprocess.Popen([sys.executable, "-m", "master", "status", "--base", str(spool.base), "--watch", "0.2"],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        text = read_until(plain.stdout, r"(?s)testhost-cpu0.*testhost-cpu0")
    finally:
        stop(plain)
    assert "\033[" not in text


# logs -----------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_logs_merge_agents_show_one_chunk_and_follow(spool: Spool, agents, env) -> None:
    agents(2)
    r = run_main(["--base", str(spool.base), "--task", "examples.noop:fail_on", "--chunks", "8", "--kwargs",
                  '{"bad": [3]}', "--retries", "1", "--retry-delay", "0.05", "--run", "fl", "--no-progress"], env)
    assert r.returncode == 1
    merged = master(["logs", "--base", str(spool.base)], env)
    assert merged.returncode == 0, merged.stderr
    lines = [ln for ln in merged.stdout.splitlines() if re.match(r"\d{4}-", ln)]
    assert {ln.split(" | ")[2] for ln in lines} == {"testhost-cpu0", "testhost-cpu1"}
    assert [ln[:23] for ln in lines] == sorted(ln[:23] for ln in lines)  # merged in time order
    one = master(["logs", "--base", str(spool.base), "--agent", "testhost-cpu1", "-n", "3"], env).stdout
    assert len(one.strip().splitlines()) == 3 and "testhost-cpu0" not in one
    chunk = master(["logs", "--base", str(spool.base), "--run", "fl", "--chunk", "3"], env)
    assert chunk.returncode == 0, chunk.stderr
    out = chunk.stdout
    assert "run fl chunk 3: FAILED on attempt 2/2" in out and out.count("Traceback (most recent call last)") == 2
    assert "ValueError: chunk 3 is on the bad list" in out and "fl chunk 3 attempt 1/2: started" in out
    rep = json.loads(master(["logs", "--base", str(spool.base), "--run", "fl", "--chunk", "3", "--json"], env).stdout)
    assert rep["status"] == "failed" and [a["attempt"] for a in rep["attempts"]] == [1, 2]
    assert rep["result"]["error"]["type"] == "ValueError"
    ok = master(["logs", "--base", str(spool.base), "--run", "fl", "--chunk", "0"], env).stdout
    assert "OK on attempt 1" in ok and "value: 0" in ok
    bad = master(["logs", "--base", str(spool.base), "--run", "nope", "--chunk", "0"], env)
    assert bad.returncode == 2 and "no run 'nope'" in bad.stderr and "fl" in bad.stderr
    follower = master_bg(["logs", "--base", str(spool.base), "-f", "--run", "later"], env)
    try:
        time.sleep(0.3)  # give the follower its first look at the files before new lines come
        assert run_main(["--base", str(spool.base), "--task", "examples.noop:noop", "--chunks", "2", "--run", "later",
                         "--no-progress"], env).returncode == 0
        text = read_until(follower.stdout, r"later chunk \d: ok")
    finally:
        stop(follower)
    assert "fl chunk" not in text  # only the run asked for


@pytest.mark.timeout(60)
def test_logs_of_a_failed_script_chunk_show_its_output(spool: Spool, agents, env) -> None:
    agents(1)
    r = run_main(["--base", str(spool.base), "--script", "examples/octorun_script.py", "--chunks", "1",
                  "--retries", "0", "--run", "noarg", "--no-progress"], env)  # --out_dir missing: exit 2
    assert r.returncode == 1
    out = master(["logs", "--base", str(spool.base), "--run", "noarg", "--chunk", "0"], env).stdout
    assert "ScriptFailed" in out and "--- output of every attempt" in out
    assert "the following arguments are required: --out_dir" in out


# collect --------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_collect_arrays_values_and_refusals(spool: Spool, agents, env, tmp_path: Path) -> None:
    agents(2)
    for args in (["--task", "gpupool.master.matmul:multiply", "--chunks", "6", "--run", "mm"],
                 ["--task", "examples.noop:square", "--chunks", "5", "--run", "sq"],
                 ["--task", "examples.noop:fail_on", "--chunks", "4", "--kwargs", '{"bad": [1]}', "--retries", "0",
                  "--run", "fl"]):
        run_main(["--base", str(spool.base), *args, "--no-progress"], env)
    b = str(spool.base)
    r = master(["collect", "--base", b, "--run", "mm", "--out", str(tmp_path / "mm.npz")], env)
    assert r.returncode == 0 and "6 chunks" in r.stdout, r.stderr
    stacked = np.load(tmp_path / "mm.npz")
    assert stacked["Y"].shape == (6, 64, 128) and list(stacked["chunk_id"]) == list(range(6))
    for c in range(6):
        rec = json.loads(spool.result_json("mm", c).read_text())  # the attempt that committed
        assert np.array_equal(stacked["Y"][c], np.load(spool.arrays_of("mm", rec))["Y"])
    meta = json.loads(str(stacked["run_json"]))
    assert meta["spec"]["name"] == "mm" and [m["chunk_id"] for m in meta["chunks"]] == list(range(6))
    assert master(["collect", "--base", b, "--run", "mm", "--out", str(tmp_path / "c.npz"), "--concat"],
                  env).returncode == 0
    cat = np.load(tmp_path / "c.npz")
    assert cat["Y"].shape == (6 * 64, 128) and np.array_equal(cat["Y"][64:128], stacked["Y"][1])
    assert master(["collect", "--base", b, "--run", "sq", "--out", str(tmp_path / "sq.csv")], env).returncode == 0
    rows = (tmp_path / "sq.csv").read_text().splitlines()
    assert rows[0].startswith("run,chunk_id,status,attempt,agent,host,device,") and rows[0].endswith("square,builtins")
    assert len(rows) == 6 and re.match(r"sq,2,ok,\d+,testhost-cpu", rows[3]) and ",4," in rows[3]  # attempts count dispatches (a moved job is attempt 2)
    assert master(["collect", "--base", b, "--run", "sq", "--out", str(tmp_path / "sq.jsonl")], env).returncode == 0
    recs = [json.loads(x) for x in (tmp_path / "sq.jsonl").read_text().splitlines()]
    assert [x["square"] for x in recs] == [c * c for c in range(5)] and recs[0]["run"] == "sq"
    from datetime import datetime
    when = datetime.fromisoformat(recs[0]["started_at"])  # ISO 8601 with its time zone, the epoch beside it
    assert when.tzinfo is not None and abs(when.timestamp() - recs[0]["started_at_epoch"]) < 0.001
    refused = master(["collect", "--base", b, "--run", "fl", "--out", str(tmp_path / "fl.csv")], env)
    assert refused.returncode == 2 and "1 chunk(s) failed (1)" in refused.stderr and "--partial" in refused.stderr
    assert "python -m master retry" in refused.stderr and not (tmp_path / "fl.csv").exists()
    part = master(["collect", "--base", b, "--run", "fl", "--out", str(tmp_path / "fl.csv"), "--partial"], env)
    assert part.returncode == 0 and "left out 1 chunk " in part.stdout
    wrong = master(["collect", "--base", b, "--run", "mm", "--out", str(tmp_path / "mm.csv")], env)
    assert wrong.returncode == 2 and "use --out FILE.npz" in wrong.stderr
    ext = master(["collect", "--base", b, "--run", "mm", "--out", str(tmp_path / "mm.txt")], env)
    assert ext.returncode == 2 and ".npz (arrays), .csv, .jsonl or .parquet" in ext.stderr


# retry / cancel / drain -----------------------------------------------------------------------
FLAKY = """
import os
def f(chunk_id, marker):
    if chunk_id in (2, 5) and not os.path.exists(marker):
        raise RuntimeError("not yet")
    return chunk_id
"""


@pytest.mark.timeout(120)
def test_retry_requeues_only_the_failed_chunks(spool: Spool, agents, env, tmp_path: Path) -> None:
    agents(2)
    task = tmp_path / "flaky.py"
    task.write_text(FLAKY)
    marker = tmp_path / "fixed"
    r = run_main(["--base", str(spool.base), "--task", f"{task}:f", "--chunks", "8", "--kwargs",
                  json.dumps({"marker": str(marker)}), "--retries", "0", "--run", "fk", "--no-progress"], env)
    assert r.returncode == 1 and "python -m master retry --base" in r.stdout
    before = {c: rec["finished_at"] for c, rec in results(spool.base, "fk").items()}
    marker.touch()
    again = master(["retry", "--base", str(spool.base), "--run", "fk", "--no-progress"], env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "re-queuing 2 failed chunks [2, 5]" in again.stdout and "8 ok, 0 failed" in again.stdout
    after = results(spool.base, "fk")
    assert all(after[c]["finished_at"] == before[c] for c in before if c not in (2, 5))  # ok chunks not rerun
    assert after[2]["status"] == "ok" and after[2]["attempt"] == 2
    nothing = master(["retry", "--base", str(spool.base), "--run", "fk"], env)
    assert nothing.returncode == 0 and "nothing to retry" in nothing.stdout
    missing = master(["retry", "--base", str(spool.base), "--run", "nope"], env)
    assert missing.returncode == 2 and "no run 'nope'" in missing.stderr and "fk" in missing.stderr


@pytest.mark.timeout(120)
def test_cancel_stops_the_master_drops_queued_jobs_and_retry_resumes(spool: Spool, agents, env) -> None:
    agents(2)
    args = ["--base", str(spool.base), "--task", "examples.noop:sleepy", "--chunks", "30", "--kwargs",
            '{"seconds": 0.3}', "--run", "long"]
    feeder = main_bg(args, env)
    try:
        wait_for(lambda: len(results(spool.base, "long")) >= 2, what="first results")
        c = master(["cancel", "--base", str(spool.base), "--run", "long"], env)
        assert c.returncode == 0, c.stderr
        assert "cancelled run long" in c.stdout and "its master has stopped" in c.stdout
        assert "python -m master retry" in c.stdout
        out, err = feeder.communicate(timeout=30)
    finally:
        feeder.kill()
    assert feeder.returncode == 1 and "was cancelled" in err and "CANCELLED run long" in out
    for ident in spool.agent_ids():
        assert '"long"' not in spool.mailbox(ident).read_text()
    wait_for(lambda: not any(a["current"] for a in status_json(spool, env)["agents"]), what="agents idle")
    data = status_json(spool, env)
    assert data["run_progress"]["long"]["cancelled"] and data["runs"][0]["ok"] < 30
    assert "cancelled" in master(["status", "--base", str(spool.base)], env).stdout
    resumed = master(["retry", "--base", str(spool.base), "--run", "long", "--no-progress"], env)
    assert resumed.returncode == 0, resumed.stderr
    assert "without a result" in resumed.stdout and "30 ok, 0 failed" in resumed.stdout
    assert not spool.cancel_flag("long").exists()


@pytest.mark.timeout(90)
def test_cancel_stop_running_kills_the_running_chunk(spool: Spool, agents, env) -> None:
    a = agents(1)[0]
    feeder = main_bg(["--base", str(spool.base), "--task", "examples.noop:sleepy", "--chunks", "2", "--kwargs",
                      '{"seconds": 60}', "--run", "stuck"], env)
    try:
        wait_for(lambda: ((a.heartbeat() or {}).get("current") or {}).get("run") == "stuck", what="busy")
        t0 = time.monotonic()
        c = master(["cancel", "--base", str(spool.base), "--run", "stuck", "--stop-running"], env)
        assert c.returncode == 0 and "still running" not in c.stdout, c.stdout
        assert time.monotonic() - t0 < 30
        feeder.wait(timeout=30)
    finally:
        feeder.kill()
    assert results(spool.base, "stuck") == {}
    wait_for(lambda: (a.heartbeat() or {}).get("current") is None, what="agent free")
    # re-running the same main.py command removes the flag and runs the chunks
    r = run_main(["--base", str(spool.base), "--task", "examples.noop:sleepy", "--chunks", "2", "--kwargs",
                  '{"seconds": 60}', "--run", "stuck", "--no-progress", "--timeout", "0.5", "--retries", "0"], env)
    assert not spool.cancel_flag("stuck").exists() and "Timeout" in r.stdout


@pytest.mark.timeout(120)
def test_drain_takes_no_new_jobs_and_undrain_gives_them_back(spool: Spool, agents, env) -> None:
    a0, a1 = agents(2)
    d = master(["drain", "--base", str(spool.base), a0.id], env)
    assert d.returncode == 0, d.stderr
    assert f"agent {a0.id} is draining: running nothing" in d.stdout
    assert a0.heartbeat()["state"] == "draining" and spool.drain_flag(a0.id).exists()
    assert a0.id in master(["status", "--base", str(spool.base)], env).stdout
    r = run_main(["--base", str(spool.base), "--task", "examples.noop:noop", "--chunks", "6", "--run", "d",
                  "--no-progress"], env)
    assert r.returncode == 0 and {v["agent"] for v in results(spool.base, "d").values()} == {a1.id}
    u = master(["undrain", "--base", str(spool.base), a0.id], env)
    assert u.returncode == 0 and "taking jobs again" in u.stdout and not spool.drain_flag(a0.id).exists()
    assert a0.heartbeat()["state"] in ("idle", "busy")
    # drain while running: it reports the chunk it still runs, then --wait-idle waits for it
    feeder = main_bg(["--base", str(spool.base), "--task", "examples.noop:sleepy", "--chunks", "1", "--kwargs",
                      '{"seconds": 1.5}', "--run", "one"], env)
    try:
        busy = wait_for(lambda: next((a for a in (a0, a1) if ((a.heartbeat() or {}).get("current") or {})
                                      .get("run") == "one"), None), what="busy agent")
        w = master(["drain", "--base", str(spool.base), busy.id, "--wait-idle"], env)
        assert w.returncode == 0 and "still running one chunk 0" in w.stdout and "running nothing" in w.stdout
        assert feeder.wait(timeout=30) == 0
    finally:
        feeder.kill()
    bad = master(["drain", "--base", str(spool.base), "nosuch-gpu9"], env)
    assert bad.returncode == 2 and "no agent 'nosuch-gpu9'" in bad.stderr and a0.id in bad.stderr


# help and errors ------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_every_command_help_shows_an_example(capsys) -> None:
    for cmd in EXAMPLES:
        with pytest.raises(SystemExit) as e:
            parser().parse_args([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out and (f"python -m master {cmd} --base" in out or cmd in ("gpus", "save-config")), cmd
    with pytest.raises(SystemExit):
        parser().parse_args(["--help"])
    top = capsys.readouterr().out
    assert all(f"python -m master {c}" in top for c in EXAMPLES if c != "undrain")


@pytest.mark.timeout(30)
def test_a_missing_spool_says_how_to_make_one(tmp_path: Path, env) -> None:
    r = master(["status", "--base", str(tmp_path / "nothing")], env)
    assert r.returncode == 2 and "does not exist" in r.stderr and "./start_agents.sh" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["status", "--watch", "nan"], "status: --watch must be a positive number of seconds, not nan"),
    (["status", "--dead-after", "0"], "status: --dead-after must be a positive number of seconds, not 0"),
    (["logs", "-n", "-2"], "logs: --lines must be 0 (all) or a positive number, not -2"),
    (["dashboard", "--port", "70000"], "dashboard: --port must be a TCP port, 0 to 65535, not 70000"),
    (["cancel", "--run", "r", "--timeout", "inf"], "cancel: --timeout must be 0 or a positive number of seconds"),
    (["retry", "--run", "r", "--retries", "-1"], "retry: --retries must be 0 or more, not -1"),
])
def test_a_number_out_of_range_is_named_in_one_line(args: list[str], message: str, spool: Spool, env) -> None:
    r = master([args[0], "--base", str(spool.base), *args[1:]], env)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_chunk_rate_needs_enough_finishes_and_slows_when_they_stop() -> None:
    from gpupool.master.report.status import chunk_rate

    assert chunk_rate([100.0, 100.01], now=100.02) is None  # two quick ones: unknown, not 199 chunks/s
    assert chunk_rate([100.0, 100.01, 100.02, 100.03], now=100.04) == pytest.approx(100.0)
    assert chunk_rate([100.0, 100.01, 100.02, 100.03], now=104.0) == pytest.approx(1.0)  # then nothing for 4 s
    assert chunk_rate([1.0, 2.0, 3.0], now=1000.0) is None  # nothing in the last two minutes


def test_status_counts_what_agents_run_and_not_a_finished_current_job(spool: Spool) -> None:
    from gpupool.jobs.descriptor import Job, JobKind, JobState
    from gpupool.jobs.heartbeat import write_status
    from gpupool.jobs.mailbox import Mailbox
    from gpupool.jobs.results import commit, record
    from gpupool.master.spec.runspec import RunSpec, save_or_check
    from gpupool.master.report.status import StatusReader

    save_or_check(spool, RunSpec("r", JobKind.CALLABLE, "examples.noop:noop", 4), fresh=False)
    jobs = [Job(run="r", chunk_id=c, total_chunks=4, kind=JobKind.CALLABLE, target="x:y") for c in range(4)]
    for i, ident in enumerate(("h-cpu0", "h-cpu1")):
        Mailbox(spool, ident).update(lambda _, i=i: jobs[2 * i:2 * i + 2])
        write_status(spool, ident, {"agent": ident, "seq": 1, "state": "busy", "pid": 1, "host": "h",
                                    "current": {"run": "r", "chunk_id": 2 * i, "attempt": 1, "since": 1.0}})
    spool.run_dirs("r")
    commit(spool, jobs[2], record(jobs[2], JobState.OK, agent="h-cpu1"))  # h-cpu1's heartbeat is behind
    data = StatusReader(spool).gather()
    [run] = data["runs"]
    assert (run["ok"], run["running"], run["queued"], run["pending"]) == (1, 1, 2, 0)
    cur = {a["id"]: a["current"] for a in data["agents"]}
    assert cur["h-cpu0"]["chunk_id"] == 0 and cur["h-cpu1"] is None  # not shown running once it is done


@pytest.mark.timeout(120)
def test_status_of_one_run_lists_every_chunk_with_its_state_agent_attempt_and_error(spool: Spool, agents,
                                                                                    env) -> None:
    agents(2)
    feeder = main_bg(["--base", str(spool.base), "--task", "examples.noop:sleepy", "--chunks", "12", "--kwargs",
                      '{"seconds": 1.0}', "--run", "rows", "--depth", "2"], env)
    try:
        def rows() -> list[dict]:
            r = master(["status", "--base", str(spool.base), "--run", "rows", "--json"], env)
            if r.returncode == 2 and "no run 'rows'" in r.stderr:
                return []  # its master has not written run.json yet
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)

        during = wait_for(lambda: (x := rows()) and sum(r["state"] == "running" for r in x) == 2 and x,
                          60, "two chunks running")
        assert len(during) == 12 and {r["state"] for r in during} <= {"ok", "running", "queued", "pending"}
        busy = [r for r in during if r["state"] == "running"]
        assert {r["agent"] for r in busy} == set(spool.agent_ids()) and all(r["attempt"] >= 1 for r in busy)
        assert all(r["agent"] for r in during if r["state"] == "queued")
        only = master(["status", "--base", str(spool.base), "--run", "rows", "--state", "running", "--json"], env)
        assert {r["state"] for r in json.loads(only.stdout)} <= {"running"}
        assert feeder.wait(timeout=90) == 0
    finally:
        feeder.kill()
    table = master(["status", "--base", str(spool.base), "--run", "rows"], env).stdout
    assert table.startswith("run rows: 12 chunks") and table.count(" ok ") == 12
    bad = master(["status", "--base", str(spool.base), "--run", "rows", "--state", "done"], env)
    assert bad.returncode == 2 and "--state done: not one of ok,failed,running,queued,pending" in bad.stderr
    run_main(["--base", str(spool.base), "--task", "tests.faulty:misbehave", "--chunks", "3", "--kwargs",
              json.dumps({"modes": ["ok", "raise", "ok"]}), "--retries", "0", "--run", "oops", "--no-progress"], env)
    failed = json.loads(master(["status", "--base", str(spool.base), "--run", "oops", "--state", "failed", "--json"],
                               env).stdout)
    assert [(r["chunk"], r["attempt"], r["error"]) for r in failed] == [(1, 1, "ValueError: chunk refuses")]


@pytest.mark.timeout(120)
def test_runs_lists_state_and_size_and_rm_removes_a_run_but_not_one_being_fed(spool: Spool, agents, env) -> None:
    agents(1)
    assert run_main(["--base", str(spool.base), "--task", "examples.noop:square", "--chunks", "5", "--run", "old",
                     "--no-progress"], env).returncode == 0
    feeder = main_bg(["--base", str(spool.base), "--task", "examples.noop:sleepy", "--chunks", "40", "--kwargs",
                      '{"seconds": 0.5}', "--run", "busy"], env)
    try:
        wait_for(lambda: spool.result_dir("busy").exists() and len(results(spool.base, "busy")) >= 1, 60,
                 "the busy run under way")
        runs = {r["run"]: r for r in json.loads(master(["runs", "--base", str(spool.base), "--json"], env).stdout)}
        assert (runs["old"]["state"], runs["old"]["ok"], runs["old"]["chunks"]) == ("done", 5, 5)
        assert runs["old"]["bytes"] > 0 and runs["old"]["last_activity"] is not None
        assert runs["busy"]["state"] == "feeding"
        refused = master(["rm", "--base", str(spool.base), "--run", "busy"], env)
        assert refused.returncode == 2 and "is being fed by a master" in refused.stderr and "--force" in refused.stderr
        assert spool.result_dir("busy").exists()
        gone = master(["rm", "--base", str(spool.base), "--run", "old", "--yes"], env)
        assert gone.returncode == 0 and "removed run old" in gone.stdout
        assert not spool.result_dir("old").exists() and not spool.run_dir("old").exists()
        forced = master(["rm", "--base", str(spool.base), "--run", "busy", "--force", "--yes"], env)
        assert forced.returncode == 0, forced.stderr
        feeder.wait(timeout=60)  # cancelled under it: it stops
    finally:
        feeder.kill()
    assert json.loads(master(["runs", "--base", str(spool.base), "--json"], env).stdout) == []
    for ident in spool.agent_ids():
        assert '"busy"' not in spool.mailbox(ident).read_text()


@pytest.mark.timeout(120)
def test_gpus_lists_this_hosts_gpus_and_the_agent_holding_each(spool: Spool, agents, tmp_path: Path) -> None:
    gpus = [{"name": "Fake H100", "mem_total_gb": 80, "mem_used_gb": 3, "util": 71, "temp": 55}, {"name": "Fake B"}]
    genv = base_env(tmp_path, GPUPOOL_FAKE_GPUS=json.dumps(gpus))
    [a] = agents(1, env_=genv, cpu=False)
    r = master(["gpus", "--json"], genv)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(g["gpu"], g["name"], g["agent"]) for g in rows] == [(0, "Fake H100", a.id), (1, "Fake B", None)]
    assert rows[0]["base"] == str(spool.base) and rows[0]["agent_pid"] == a.proc.pid and rows[0]["util"] == 71
    table = master(["gpus"], genv).stdout
    assert "Fake H100" in table and a.id in table and "free" in table
    a.kill()
    assert json.loads(master(["gpus", "--json"], genv).stdout)[0]["agent"] is None  # its lock's note outlives it
