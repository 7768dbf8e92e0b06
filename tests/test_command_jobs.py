"""Command jobs (``--cmd``, ``--commands``) and sweeps (``--sweep``): real agents, real shells,
the real main.py and ``python -m master collect``."""
from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpupool.agent.command import run_command
from gpupool.jobs.descriptor import Job, JobKind
from gpupool.jobs.paths import Spool
from tests.helpers import REPO, base_env, results, run_main, run_names, wait_for
from tests.test_job_pathologies import gone, killed_after, read_pid


def collect(env: dict[str, str], base: Path, run: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "master", "collect", "--base", str(base), "--run", run,
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(120)
def test_a_commands_file_runs_one_chunk_per_line_and_judges_each_by_its_exit_code_and_output(
        spool: Spool, agents, env, tmp_path: Path) -> None:
    agents(2)
    work = tmp_path / "work"
    (work / "repo").mkdir(parents=True)
    (work / "jobs.txt").write_text("# one chunk per line\n"
                                   "echo hello {chunk_id} of $GPUPOOL_TOTAL_CHUNKS in $(basename $PWD) > hello.txt\n"
                                   "\n"
                                   "exit 3\n"
                                   "echo partial; exit 2\n"
                                   "echo 'ERROR: disk quota' ; exit 0\n")
    r = run_main(["--base", str(spool.base), "--commands", "jobs.txt", "--prefix", "cd repo", "--success-codes", "0,2",
                  "--fail-on-output", "^ERROR", "--retries", "0", "--run", "lines", "--no-progress"], env, cwd=work)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "2 ok, 2 failed" in r.stdout
    res = results(spool.base, "lines")
    assert [res[c]["status"] for c in range(4)] == ["ok", "failed", "ok", "failed"]
    assert (work / "repo" / "hello.txt").read_text() == "hello 0 of 4 in repo\n"  # the prefix ran in its shell
    assert res[0]["exit_code"] == 0 and res[2]["exit_code"] == 2  # 2 is a success here
    assert res[1]["exit_code"] == 3 and res[1]["error"]["type"] == "CommandFailed"
    assert "exited with code 3" in res[1]["error"]["message"]
    assert res[3]["error"]["type"] == "OutputCheck" and "ERROR: disk quota" in res[3]["error"]["message"]
    log = (spool.logs_dir / "lines" / "000002.log").read_text()
    assert "partial" in log and "cd repo" in log  # the output, under a header naming the command
    # the same file again: nothing changed, so it is the same run; the failed lines run again
    again = run_main(["--base", str(spool.base), "--commands", "jobs.txt", "--prefix", "cd repo",
                      "--success-codes", "0,2", "--fail-on-output", "^ERROR", "--retries", "0", "--run", "lines",
                      "--no-progress"], env, cwd=work)
    assert again.returncode == 1 and "2 ok, 2 failed" in again.stdout, again.stdout + again.stderr
    assert results(spool.base, "lines")[0]["finished_at"] == res[0]["finished_at"]


@pytest.mark.timeout(150)
def test_a_cmd_template_over_a_grid_is_collected_with_its_parameters_and_a_grown_grid_runs_only_new_points(
        spool: Spool, agents, env, tmp_path: Path) -> None:
    agents(2)
    work = tmp_path / "work"
    work.mkdir()
    grid = work / "grid.yaml"
    grid.write_text("grid:\n  lr: [0.1, 0.01]\n  model: [small, mid, large]\n")
    cmd = ("echo {chunk_id} >> calls.txt; mkdir -p out; "
           "printf 'split,score\\ntrain,{lr}\\ntest,%s\\n' {model!q} > out/{chunk_id}.csv")
    args = ["--base", str(spool.base), "--cmd", cmd, "--sweep", "grid.yaml", "--result-file", "out/{chunk_id}.csv",
            "--no-progress"]
    r = run_main(args, env, cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "6 ok, 0 failed" in r.stdout
    [run] = run_names(spool.base)
    res = results(spool.base, run)
    assert {json.dumps(v["params"], sort_keys=True) for v in res.values()} == {
        json.dumps({"lr": lr, "model": m}, sort_keys=True) for lr in (0.1, 0.01) for m in ("small", "mid", "large")}
    first = {c: (v["params"], v["finished_at"]) for c, v in res.items()}
    assert collect(env, spool.base, run, tmp_path / "t.csv").returncode == 0
    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert len(rows) == 12  # 6 chunks x the 2 rows of each one's result file
    by = {(r["lr"], r["model"], r["split"]): r["score"] for r in rows}
    assert by[("0.01", "mid", "train")] == "0.01" and by[("0.1", "large", "test")] == "large"
    assert collect(env, spool.base, run, tmp_path / "t.jsonl").returncode == 0
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == 12
    # one more model: the same command resumes the same run and runs only its two new points
    grid.write_text("grid:\n  lr: [0.1, 0.01]\n  model: [small, mid, large, huge]\n")
    r2 = run_main(args, env, cwd=work)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert run_names(spool.base) == [run] and "8 ok, 0 failed" in r2.stdout
    res2 = results(spool.base, run)
    assert sorted(res2) == list(range(8))
    assert {c: (res2[c]["params"], res2[c]["finished_at"]) for c in first} == first  # kept, not run again
    assert {res2[c]["params"]["model"] for c in (6, 7)} == {"huge"}
    assert sorted(int(x) for x in (work / "calls.txt").read_text().split()) == list(range(8))  # each ran once
    assert collect(env, spool.base, run, tmp_path / "t8.csv").returncode == 0
    assert len(list(csv.DictReader((tmp_path / "t8.csv").open()))) == 16


def test_bad_templates_and_sweeps_are_refused_at_submit_naming_the_problem(spool: Spool, env, tmp_path: Path) -> None:
    def refused(*args: str) -> str:
        r = run_main(["--base", str(spool.base), *args, "--no-progress"], env, cwd=tmp_path)
        assert r.returncode == 2, r.stdout + r.stderr
        return r.stderr

    err = refused("--cmd", "python train.py --lr {lr} --seed {sed}", "--sweep", '{"grid": {"lr": [1, 2]}}')
    assert "unknown placeholder(s) {sed}" in err and "{chunk_id}, {total_chunks}, {gpu_id}, {device}, {lr}" in err
    assert "literal braces" in refused("--cmd", "awk '{print $1}' f", "--chunks", "2")  # needs {{print $1}}
    assert "{x}" in refused("--cmd", "echo", "--chunks", "2", "--result-file", "out/{x}.csv")
    (tmp_path / "bad.yaml").write_text("grid:\n  lr: [1, 2\n")
    err = refused("--cmd", "echo {lr}", "--sweep", "bad.yaml")
    assert str(tmp_path / "bad.yaml") in err and "not valid YAML at line 3" in err
    assert "no such file" in refused("--cmd", "echo {lr}", "--sweep", "missing.yaml")
    assert "pool's own" in refused("--cmd", "echo", "--sweep", '{"grid": {"gpu_id": [1]}}')
    assert "'grd' holds an object" in refused("--cmd", "echo", "--sweep", '{"grd": {"lr": [1, 2]}}')  # a typo
    assert "takes no such argument" in refused("--task", "examples.noop:sleepy", "--sweep", '{"secs": [1, 2]}')
    (tmp_path / "jobs.txt").write_text("echo a\necho b\n")
    assert "makes 2 chunks" in refused("--commands", "jobs.txt", "--chunks", "3")
    assert "only for command jobs" in refused("--script", str(REPO / "examples" / "octorun_script.py"),
                                              "--chunks", "1", "--fail-on-output", "x")
    assert not spool.runs_dir.exists() or not any(spool.runs_dir.iterdir())  # nothing recorded


@pytest.mark.timeout(120)
def test_a_command_past_its_timeout_is_killed_with_everything_it_started(spool: Spool, agents, env,
                                                                          tmp_path: Path) -> None:
    agents(1)
    pidfile = tmp_path / "bg.pid"
    with killed_after(pidfile):
        r = run_main(["--base", str(spool.base), "--cmd", "sleep 300 & echo $! > {pidfile}; wait", "--chunks", "1",
                      "--kwargs", json.dumps({"pidfile": str(pidfile)}), "--timeout", "1", "--retries", "1",
                      "--retry-delay", "0.05", "--run", "slow", "--no-progress"], env, timeout=90)
        assert r.returncode == 1, r.stdout + r.stderr
        [rec] = results(spool.base, "slow").values()
        assert rec["error"]["type"] == "Timeout" and "command ran past its timeout of 1 s" in rec["error"]["message"]
        assert rec["attempt"] == 2  # retried, as a script job is
        wait_for(lambda: gone(read_pid(pidfile)), what="the command's background child killed with its group")
    stuck = tmp_path / "stuck.pid"
    with killed_after(stuck):  # a cancel that stops running chunks kills the command's whole group too
        feeder = subprocess.Popen([sys.executable, "main.py", "--base", str(spool.base), "--cmd",
                                   "sleep 300 & echo $! > {pidfile}; wait", "--chunks", "1", "--kwargs",
                                   json.dumps({"pidfile": str(stuck)}), "--run", "stuck", "--no-progress"],
                                  cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            child = read_pid(stuck)
            c = subprocess.run([sys.executable, "-m", "master", "cancel", "--base", str(spool.base), "--run", "stuck",
                                "--stop-running"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
            assert c.returncode == 0, c.stdout + c.stderr
            wait_for(lambda: gone(child), what="the cancelled command's background child killed")
            feeder.wait(timeout=30)
        finally:
            feeder.kill()


@pytest.mark.timeout(60)
def test_a_command_job_sees_only_its_agents_gpu(spool: Spool, agents, tmp_path: Path) -> None:
    gpus = [{"name": "Fake H200", "mem_total_gb": 141}] * 2
    genv = base_env(tmp_path, GPUPOOL_FAKE_GPUS=json.dumps(gpus))
    agents(1, first=1, env_=genv, cpu=False)
    out = tmp_path / "seen.json"
    r = run_main(["--base", str(spool.base), "--cmd", "printf '{{\"cvd\": \"%s\", \"gpu\": {gpu_id}, \"device\": "
                  "\"{device}\"}}' \"$CUDA_VISIBLE_DEVICES\" > {out}", "--kwargs", json.dumps({"out": str(out)}),
                  "--result-file", str(out), "--chunks", "1", "--run", "seen", "--no-progress"], genv, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert results(spool.base, "seen")[0]["value"] == {"cvd": "GPU-fake-1", "gpu": 1, "device": "cuda:0"}


def parquet_or_a_clear_refusal(spool: Spool, run: str, out: Path) -> None:
    from gpupool.master.report.collect import CollectError, collect as collect_run

    if importlib.util.find_spec("pyarrow") is None:
        with pytest.raises(CollectError, match="needs pyarrow"):
            collect_run(spool, run, out)
        return
    import pyarrow.parquet as pq

    collect_run(spool, run, out)
    table = pq.read_table(out).to_pylist()
    assert [(x["tag"], x["seconds"], x["value"]) for x in table] == [("a", None, "a 0"), ("b", None, "b 1"),
                                                                     ("c", 0.01, "c 2")]


def command_job(tmp_path: Path, target: str, **options) -> Job:
    return Job(run="r", chunk_id=3, total_chunks=5, kind=JobKind.COMMAND, target=target, kwargs={"name": "a b"},
               workdir=str(tmp_path), options=options or None)


@pytest.mark.parametrize("target, options, kind, message", [
    ("true", {"result_file": "out/{chunk_id}.json"}, "ResultFileMissing", "wrote no result file"),
    ("echo '{{oops' > r.json", {"result_file": "r.json"}, "BadResultFile", "not valid JSON"),
    ("printf 'a,b\\n' > r.csv", {"result_file": "r.csv"}, "BadResultFile", "no rows"),
    ("touch ran", {"prefix": "cd nowhere"}, "CommandFailed", "exited with code"),
])
def test_result_files_and_prefixes_that_go_wrong_fail_the_attempt_saying_why(
        tmp_path: Path, target: str, options: dict, kind: str, message: str) -> None:
    fields = run_command(command_job(tmp_path, target, **options), 0, "cpu", base_env(tmp_path),
                         tmp_path / "log", lambda: False)
    assert fields["error"]["type"] == kind and message in fields["error"]["message"], fields
    assert not (tmp_path / "ran").exists()  # a failed prefix: the command did not run


def test_placeholders_are_filled_in_and_quoted_on_request(tmp_path: Path) -> None:
    job = command_job(tmp_path, "printf '%s|' {name!q} {name} {{x}} {chunk_id:03d} > out.txt",
                      result_file="out.txt")
    fields = run_command(job, 0, "cpu", base_env(tmp_path), tmp_path / "log", lambda: False)
    assert fields["value"] == "a b|a|b|{x}|003|", fields


@pytest.mark.timeout(120)
def test_a_sweep_gives_a_task_its_kwargs_and_a_script_its_flags(spool: Spool, agents, env, tmp_path: Path) -> None:
    agents(1)
    sweep = json.dumps({"grid": {"tag": ["a", "b"]}, "list": [{"tag": "c", "seconds": 0.01}]})
    r = run_main(["--base", str(spool.base), "--task", "tests.faulty:tagged", "--sweep", sweep, "--run", "tasks",
                  "--no-progress"], env)
    assert r.returncode == 0 and "3 ok, 0 failed" in r.stdout, r.stdout + r.stderr
    assert collect(env, spool.base, "tasks", tmp_path / "tasks.csv").returncode == 0
    rows = list(csv.DictReader((tmp_path / "tasks.csv").open()))
    assert [(x["tag"], x["seconds"], x["value"]) for x in rows] == [("a", "", "a 0"), ("b", "", "b 1"),
                                                                    ("c", "0.01", "c 2")]
    parquet_or_a_clear_refusal(spool, "tasks", tmp_path / "tasks.parquet")
    out = tmp_path / "out"
    r = run_main(["--base", str(spool.base), "--script", "examples/octorun_script.py", "--sweep", '{"size": [10, 20]}',
                  "--kwargs", json.dumps({"out_dir": str(out)}), "--run", "flags", "--no-progress"], env)
    assert r.returncode == 0 and "2 ok, 0 failed" in r.stdout, r.stdout + r.stderr
    for c, size in ((0, 10), (1, 20)):
        log = (spool.logs_dir / "flags" / f"{c:06d}.log").read_text()
        assert f"--size {size}" in log and f"chunk {c}/2" in log


def test_a_run_spec_or_job_with_bad_sweep_or_command_fields_is_refused_on_read(spool: Spool) -> None:
    from gpupool.jobs.errors import BadFile
    from gpupool.master.spec.runspec import RunSpec, build, save_or_check

    spec = save_or_check(spool, build(cmd="echo {x}", sweep='{"x": [1, 2]}', run="s", workdir=str(spool.base)), False)
    assert RunSpec.load(spool.run_spec("s")) == spec
    d = json.loads(spool.run_spec("s").read_text())
    for bad, why in (({"params": [{"x": 1}]}, "'params' must be a list of 2 dicts"),
                     ({"options": {"prefix": 3}}, "option 'prefix' has a bad value"),
                     ({"commands": "echo"}, "'commands' must be a list")):
        spool.run_spec("s").write_text(json.dumps({**d, **bad}))
        with pytest.raises(BadFile, match=why):
            RunSpec.load(spool.run_spec("s"))
    job = command_job(spool.base, "echo", success_codes=[0, 2]).to_dict()
    for bad, why in (({"options": {"success_codes": [0, 256]}}, "bad value"),
                     ({"options": {"rm": "-rf"}}, "unknown option"), ({"params": [1]}, "'params' must be a dict")):
        with pytest.raises(BadFile, match=why):
            Job.from_dict({**job, **bad})
