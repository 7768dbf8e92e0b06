"""``python main.py --octorun-config config.json``: an OctoRun config runs on the pool unchanged."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gpupool.jobs.paths import Spool
from gpupool.master.cli.octorun import DEFAULT_CONFIG, load_config
from gpupool.master.spec.runspec import UsageError, build
from tests.helpers import REPO, base_env, results, run_main, wait_for

SCRIPT = str(REPO / "examples" / "octorun_script.py")


def octorun_config(tmp: Path, **fields) -> Path:
    """What ``octorun save_config`` writes (its default_config.json), with ``fields`` changed."""
    cfg = {**DEFAULT_CONFIG, "script_path": "./tests/dummy_script.py", **fields}
    path = tmp / "config.json"
    path.write_text(json.dumps(cfg, indent=4))
    return path


def test_config_fields_mean_what_they_mean_in_octorun(tmp_path: Path) -> None:
    cfg = load_config(str(octorun_config(tmp_path)), {"batch_size": 64})
    assert cfg.total_chunks == 128 and cfg.gpus == "auto" and cfg.log_dir == "./logs"
    assert cfg.kwargs == {"batch_size": 64, "learning_rate": 0.001}  # --kwargs overrides, as octorun run does
    assert cfg.retries == 0  # restart_failed false: OctoRun does not retry
    assert any(n.startswith("chunk_lock_dir: no lock files are made") for n in cfg.notes)
    assert cfg.lock_dir == "./logs/locks"
    assert load_config(str(octorun_config(tmp_path, restart_failed=True, max_retries=2))).retries == 2
    full = load_config(str(octorun_config(tmp_path, success_codes=[0, 3], retry_base_delay=2, retry_max_delay=30)))
    assert (full.success_codes, full.retry_base_delay, full.retry_max_delay) == ([0, 3], 2.0, 30.0)
    minimal = tmp_path / "min.json"
    minimal.write_text(json.dumps({"script_path": "s.py"}))
    m = load_config(str(minimal))
    assert (m.total_chunks, m.gpus, m.retries, m.kwargs) == (128, "auto", 0, {})
    for bad, msg in (({"gpus": "0,1"}, "'gpus' must be"), ({"success_codes": [0, "3"]}, "'success_codes' must be a list of exit codes"),
                     ({"success_codes": []}, "'success_codes' must be a list"),
                     ({"retry_base_delay": -1}, "'retry_base_delay' must be"),
                     ({"retry_base_delay": 5, "retry_max_delay": 1}, "'retry_max_delay' 1 is shorter"),
                     ({"total_chunks": 0}, "'total_chunks' must be"), ({"kwargs": [1]}, "'kwargs' must be"),
                     ({"max_retries": -1}, "'max_retries' must be")):
        with pytest.raises(UsageError, match=msg):
            load_config(str(octorun_config(tmp_path, **bad)))
    with pytest.raises(UsageError, match="are the flags every script is given"):
        build(script=SCRIPT, chunks=2, kwargs={"chunk_id": 1})
    with pytest.raises(UsageError, match="cannot be flags"):
        build(script=SCRIPT, chunks=2, kwargs={"a b": 1})
    with pytest.raises(UsageError, match="reuse built-in argument names"):  # a callable is given them itself
        build(task="examples.noop:noop", chunks=2, kwargs={"device": "cpu"})
    (tmp_path / "new").mkdir()
    saved = subprocess.run([sys.executable, "-m", "master", "save-config", "--script", "w.py"], cwd=tmp_path / "new",
                           env=base_env(tmp_path), capture_output=True, text=True, timeout=60)  # octorun save_config
    assert saved.returncode == 0 and load_config(str(tmp_path / "new" / "config.json")).script_path == "w.py"
    with pytest.raises(UsageError, match="octorun save_config"):
        load_config(str(tmp_path / "missing.json"))


@pytest.mark.timeout(150)
def test_one_command_starts_agents_for_the_configured_gpus_and_matches_running_by_hand(tmp_path: Path) -> None:
    out, hand = tmp_path / "out", tmp_path / "hand"
    gpus = [{"name": "Fake A100", "mem_total_gb": 40}] * 3
    env = base_env(tmp_path, GPUPOOL_FAKE_GPUS=json.dumps(gpus))
    cfg = octorun_config(tmp_path, gpus=[0, 2], total_chunks=6, script_path=SCRIPT, log_dir=str(tmp_path / "logs"),
                         kwargs={"out_dir": str(out), "size": 40})
    r = run_main(["--octorun-config", str(cfg), "--no-progress"], env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "6 ok, 0 failed" in r.stdout and "agents testhost-gpu0 testhost-gpu2" in r.stdout
    assert "chunk_lock_dir: no lock files are made" in r.stderr
    spool = Spool(tmp_path / "logs" / "gpupool")
    for ident in ("testhost-gpu0", "testhost-gpu2"):  # started for the run, stopped after it
        assert json.loads(spool.heartbeat(ident).read_text())["state"] == "stopped"
    [run] = spool.run_names()
    used = {json.loads(p.read_text())["gpu_id"] for p in spool.result_dir(run).glob("0*.json") if p.stem.isdigit()}
    assert used <= {0, 2} and used
    for c in range(6):
        subprocess.run([sys.executable, SCRIPT, "--gpu_id", "0", "--chunk_id", str(c), "--total_chunks", "6",
                        "--out_dir", str(hand), "--size", "40"], check=True, capture_output=True)
        assert (out / f"chunk_{c}.npy").read_bytes() == (hand / f"chunk_{c}.npy").read_bytes()
    log = (spool.logs_dir / run / "000001.log").read_text()
    assert "--gpu_id" in log and "--chunk_id 1 --total_chunks 6 --out_dir" in log
    again = run_main(["--octorun-config", str(cfg), "--no-progress"], env, cwd=tmp_path)  # resumes, like OctoRun
    assert again.returncode == 0 and "6 of 6 chunks already done" in again.stderr
    for cmd in ([sys.executable, "-m", "master", "status", "--base", str(tmp_path / "logs")],  # OctoRun's log_dir
                [sys.executable, str(REPO / "main.py"), "--base", str(tmp_path / "logs"), "--task", "x.py:f",
                 "--chunks", "1"]):
        slip = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert slip.returncode == 2 and f"is one, as an OctoRun config keeps its spool in <log_dir>/gpupool: pass " \
            f"--base {spool.base})" in slip.stderr, slip.stderr


@pytest.mark.timeout(120)
def test_with_base_it_uses_the_running_agents_and_octorun_retries(spool: Spool, agents, env, tmp_path: Path) -> None:
    agents(2)
    cfg = octorun_config(tmp_path, total_chunks=3, script_path=SCRIPT, restart_failed=True, max_retries=1,
                         kwargs={"size": 30})  # no out_dir: the script exits 2, as it would under OctoRun
    # --max-failures 0: every chunk fails alike here, which would stop the run early (test_fail_fast)
    r = run_main(["--octorun-config", str(cfg), "--base", str(spool.base), "--no-progress", "--retry-delay", "0.05",
                  "--max-failures", "0"], env, cwd=tmp_path)
    assert r.returncode == 1 and "0 ok, 3 failed" in r.stdout and "'gpus' is not used" in r.stderr
    [run] = spool.run_names()
    # max_retries 1: each chunk failed on its last attempt after one retry (a job moved to an idle agent
    # before it started takes the next attempt number at no cost, as a handed-back one does)
    res = results(spool.base, run)
    assert all(rec["attempt"] == rec["max_attempts"] and rec["error"]["type"] == "ScriptFailed" for rec in res.values())
    assert all(len(list(spool.result_dir(run).glob(f"{c:06d}.a*.json"))) >= 2 for c in res)
    fixed = run_main(["--octorun-config", str(cfg), "--base", str(spool.base), "--no-progress", "--kwargs",
                      json.dumps({"out_dir": str(tmp_path / "o")})], env, cwd=tmp_path)
    assert fixed.returncode == 0 and "3 ok, 0 failed" in fixed.stdout
    clash = run_main(["--octorun-config", str(cfg), "--base", str(spool.base), "--chunks", "3"], env, cwd=tmp_path)
    assert clash.returncode == 2 and "replaces --task/--script/--chunks" in clash.stderr


DUMMY = str(REPO / "tests" / "octorun_dummy.py")


def starts(record_dir: Path) -> dict[int, list[dict]]:
    """Every start of every chunk the dummy script recorded, by chunk."""
    out: dict[int, list[dict]] = {}
    for p in sorted(record_dir.glob("chunk_*.json")):
        out.setdefault(int(p.name.split("_")[1].split(".")[0]), []).append(json.loads(p.read_text()))
    return out


@pytest.mark.timeout(150)
def test_a_kwargs_fix_reruns_only_the_failed_chunk_as_octorun_does(tmp_path: Path) -> None:
    rec, env = tmp_path / "rec", base_env(tmp_path)
    cfg = octorun_config(tmp_path, gpus=[0], total_chunks=4, script_path=DUMMY, log_dir=str(tmp_path / "logs"),
                         kwargs={"output-dir": "out", "device": "cpu", "fail_chunk_ids": "2", "record_dir": str(rec)})
    first = run_main(["--octorun-config", str(cfg), "--no-progress"], env, cwd=tmp_path)
    assert first.returncode == 1 and "3 ok, 1 failed" in first.stdout, first.stdout + first.stderr
    fixed = run_main(["--octorun-config", str(cfg), "--no-progress", "--kwargs", '{"fail_chunk_ids": ""}'],
                     env, cwd=tmp_path)
    assert fixed.returncode == 0 and "4 ok, 0 failed" in fixed.stdout, fixed.stdout + fixed.stderr
    assert "kwargs changed (fail_chunk_ids: '2' -> '')" in fixed.stderr
    assert "chunks 0-1, 3 (3 of 4) are done and kept: they ran with the earlier kwargs" in fixed.stderr
    runs = starts(rec)
    assert {c: len(r) for c, r in runs.items()} == {0: 1, 1: 1, 2: 2, 3: 1}  # only the failed chunk ran again
    assert runs[2][-1]["argv"][-4:] == ["--fail_chunk_ids", "", "--record_dir", str(rec)]
    assert runs[0][0]["extra"] == ["--output-dir", "out", "--device", "cpu"]  # flags a script takes, as OctoRun gives them
    assert len(Spool(tmp_path / "logs" / "gpupool").run_names()) == 1


def stop_agents(base: Path, *hosts: str) -> None:
    """What a failed test would leave running: the agents its commands started, and their chunks."""
    from gpupool.agent.launcher import stop

    for host in hosts:
        stop(str(base), host=host, now=True, timeout=20)


def start_main(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "main.py"), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.timeout(180)
def test_the_same_config_on_a_second_machine_joins_the_run_and_shares_its_chunks(tmp_path: Path) -> None:
    rec, gate = tmp_path / "rec", tmp_path / "gate"
    cfg = octorun_config(tmp_path, gpus=[0], total_chunks=4, script_path=DUMMY, log_dir=str(tmp_path / "logs"),
                         kwargs={"gate": str(gate), "record_dir": str(rec), "env_names": "GPUPOOL_AGENT"})
    hosts = {h: base_env(tmp_path, GPUPOOL_HOST_ID=h, GPUPOOL_LOCK_DIR=str(tmp_path / f"locks-{h}"))
             for h in ("nodea", "nodeb")}
    procs = [start_main(["--octorun-config", str(cfg), "--no-progress"], hosts["nodea"], tmp_path)]
    try:
        wait_for(lambda: starts(rec), 60, "node A's first chunk")  # node A's master feeds the run
        procs.append(start_main(["--octorun-config", str(cfg), "--no-progress"], hosts["nodeb"], tmp_path))

        def agents_seen() -> set[str]:
            return {r["env"]["GPUPOOL_AGENT"] for rs in starts(rec).values() for r in rs}
        assert wait_for(lambda: agents_seen() == {"nodea-cpu0", "nodeb-cpu0"}, 60, "both machines running chunks")
        gate.touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
        stop_agents(tmp_path / "logs" / "gpupool", *hosts)
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "4 ok, 0 failed" in out, out + err
    assert "is fed by another master (host" in outs[1][1]
    assert {c: len(r) for c, r in starts(rec).items()} == {0: 1, 1: 1, 2: 1, 3: 1}  # each chunk ran once
    spool = Spool(tmp_path / "logs" / "gpupool")
    for ident in ("nodea-cpu0", "nodeb-cpu0"):  # each machine stopped the agents it started
        assert json.loads(spool.heartbeat(ident).read_text())["state"] == "stopped"


@pytest.mark.timeout(150)
def test_success_codes_and_the_retry_delays_of_the_config_are_honoured(tmp_path: Path) -> None:
    rec, env = tmp_path / "rec", base_env(tmp_path)
    cfg = octorun_config(tmp_path, gpus=[0], total_chunks=3, script_path=DUMMY, log_dir=str(tmp_path / "logs"),
                         success_codes=[0, 3], restart_failed=True, max_retries=1, retry_base_delay=0.1,
                         retry_max_delay=30, kwargs={"exit_codes": "1:3,2:1", "record_dir": str(rec)})
    first = run_main(["--octorun-config", str(cfg), "--no-progress"], env, cwd=tmp_path)
    assert first.returncode == 1 and "2 ok, 1 failed" in first.stdout, first.stdout + first.stderr
    assert re.search(r"chunk 2 attempt 1 failed on \S+: ScriptFailed: the script exited with code 1; "
                     r"retrying in 0.1 s", first.stderr), first.stderr
    again = run_main(["--octorun-config", str(cfg), "--no-progress"], env, cwd=tmp_path)  # the failed chunk again:
    assert again.returncode == 1 and "2 ok, 1 failed" in again.stdout  # its back-off starts from the base again
    assert re.search(r"chunk 2 attempt 3 failed on \S+: .*; retrying in 0.1 s", again.stderr), again.stderr
    [run] = Spool(tmp_path / "logs" / "gpupool").run_names()
    res = results(tmp_path / "logs" / "gpupool", run)
    assert res[1]["status"] == "ok" and res[2]["status"] == "failed"  # exit code 3 is a success here
    assert {c: len(r) for c, r in starts(rec).items()} == {0: 1, 1: 1, 2: 4}


@pytest.mark.timeout(150)
def test_ctrl_c_stops_the_agents_it_started_and_their_running_chunks_at_once(tmp_path: Path) -> None:
    from gpupool.agent.launcher import pid_alive

    rec, gate, env = tmp_path / "rec", tmp_path / "gate", base_env(tmp_path)
    cfg = octorun_config(tmp_path, gpus=[0, 1], total_chunks=3, script_path=DUMMY, log_dir=str(tmp_path / "logs"),
                         kwargs={"gate": str(gate), "record_dir": str(rec)})  # chunks wait for the gate
    proc = start_main(["--octorun-config", str(cfg), "--no-progress"], env, tmp_path)
    try:
        running = wait_for(lambda: len(starts(rec)) == 2 and starts(rec), 60, "two chunks running")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)  # not after the chunks: they would wait for ever
    finally:
        proc.kill()
        stop_agents(tmp_path / "logs" / "gpupool", "testhost")
    assert proc.returncode == 130 and "interrupted: stopping this command's agents" in err, out + err
    assert not any(pid_alive(r[0]["pid"]) for r in running.values())  # the scripts are gone too
    spool = Spool(tmp_path / "logs" / "gpupool")
    for ident in ("testhost-cpu0", "testhost-cpu1"):
        assert json.loads(spool.heartbeat(ident).read_text())["state"] == "stopped"
    gate.touch()
    again = run_main(["--octorun-config", str(cfg), "--no-progress"], env, cwd=tmp_path)  # resumes
    assert again.returncode == 0 and "3 ok, 0 failed" in again.stdout, again.stdout + again.stderr
    assert sorted(len(r) for r in starts(rec).values()) == [1, 2, 2]  # the two interrupted chunks ran again


@pytest.mark.timeout(180)
def test_the_second_machine_takes_the_run_over_when_the_first_masters_command_dies(tmp_path: Path) -> None:
    rec, gate = tmp_path / "rec", tmp_path / "gate"
    cfg = octorun_config(tmp_path, gpus=[0], total_chunks=4, script_path=DUMMY, log_dir=str(tmp_path / "logs"),
                         kwargs={"gate": str(gate), "record_dir": str(rec)})
    hosts = {h: base_env(tmp_path, GPUPOOL_HOST_ID=h, GPUPOOL_LOCK_DIR=str(tmp_path / f"locks-{h}"))
             for h in ("nodea", "nodeb")}
    spool = Spool(tmp_path / "logs" / "gpupool")
    a = start_main(["--octorun-config", str(cfg), "--no-progress"], hosts["nodea"], tmp_path)
    procs = [a]
    try:
        wait_for(lambda: starts(rec), 60, "node A's first chunk")
        b = start_main(["--octorun-config", str(cfg), "--no-progress"], hosts["nodeb"], tmp_path)
        procs.append(b)
        wait_for(lambda: len(starts(rec)) == 2, 60, "node B's agent running a chunk too")
        a.kill()  # node A's command dies (its agent lives on, as after a crash of the command alone)
        [run] = spool.run_names()

        def holder() -> int | None:
            try:
                return json.loads(spool.master_lock(run).read_text()).get("pid")
            except (OSError, ValueError):
                return None
        wait_for(lambda: holder() == b.pid, 60, "node B's command becoming the run's master")
        gate.touch()
        out, err = b.communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
        stop_agents(spool.base, *hosts)
    assert b.returncode == 0 and "4 ok, 0 failed" in out, out + err
    assert "is fed by another master" in err
    assert {c: len(r) for c, r in starts(rec).items()} == {0: 1, 1: 1, 2: 1, 3: 1}
