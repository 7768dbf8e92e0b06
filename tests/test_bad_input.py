"""Every bad input gets one clear message naming the argument or file, and nothing is queued."""
from __future__ import annotations

import json

import os
from pathlib import Path

import numpy as np
import pytest

from gpupool.jobs.paths import Spool
from tests.helpers import run_main


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    np.savez(tmp_path / "good.npz", W=np.eye(2))
    np.savez(tmp_path / "pickled.npz", W=np.array([{"a": 1}], dtype=object))
    (tmp_path / "notzip.npz").write_text("hello")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "0.npz", X=np.ones(2))
    return {k: str(tmp_path / v) for k, v in {
        "good": "good.npz", "pickled": "pickled.npz", "notzip": "notzip.npz", "afile": "afile", "data": "data"}.items()}


CASES = [
    (["--task", "no_such_module_xyz:f"], "no module named 'no_such_module_xyz'"),
    (["--task", "examples.noop:missing_fn"], "defines no top-level function or name 'missing_fn'"),
    (["--task", "examples.noop"], "must look like 'package.module:function'"),
    (["--task", "nofile.py:f"], "does not exist"),
    (["--script", "no_such_script.py"], "--script 'no_such_script.py'"),
    (["--task", "examples.noop:noop", "--kwargs", "{bad json"], "--kwargs is not valid JSON"),
    (["--task", "examples.noop:noop", "--kwargs", "[1, 2]"], "--kwargs must be a JSON object"),
    (["--task", "examples.noop:noop", "--kwargs", '{"device": "cuda"}'], "reuse built-in argument names"),
    (["--task", "examples.noop:noop", "--kwargs", json.dumps({"x": "y" * 100_000})],
     "--kwargs: 98 KB as JSON, over the 64 KB limit: every job descriptor carries a copy. Put large inputs in --shared"),
    (["--task", "examples.noop:noop", "--shared", "{tmp}/missing.npz"], "--shared: "),
    (["--task", "examples.noop:noop", "--shared", "{notzip}"], "is not an .npz (zip) file"),
    (["--task", "examples.noop:noop", "--shared", "{pickled}"], "holds object arrays"),
    (["--task", "examples.noop:noop", "--data", "{tmp}/nodir"], "is not a folder"),
    (["--task", "examples.noop:noop", "--data", "{data}", "--chunks", "3"], "2 of 3 chunk files are missing (1.npz, 2.npz)"),
    (["--task", "examples.noop:noop", "--run", "../escape"], "--run name '../escape' is not allowed"),
    (["--task", "examples.noop:noop", "--chunks", "0"], "--chunks must be a whole number of at least 1"),
    (["--task", "examples.noop:noop", "--chunks", "-3"], "--chunks must be a whole number of at least 1"),
    (["--task", "examples.noop:noop", "--timeout", "0"], "--timeout must be a positive number"),
    (["--task", "examples.noop:noop", "--timeout", "nan"], "--timeout must be a positive number"),
    (["--task", "examples.noop:noop", "--dead-after", "nan"], "--dead-after must be a positive number of seconds"),
    (["--task", "examples.noop:noop", "--retry-delay", "-1"], "--retry-delay must be 0 or a positive number"),
    (["--task", "examples.noop:noop", "--depth", "0"], "--depth must be 1 or more"),
    (["--task", "examples.noop:noop", "--base", "{afile}/sub"], "is not a spool"),
    (["--task", "examples.noop:noop", "--base", "{afile}/sub", "--new-spool"], "cannot create the spool folder"),
    (["--task", "examples.noop:noop", "--base", "{tmp}/typo"], "{tmp}/typo: is not a spool (no agent has ever been "
                                                               "started there; a typo?)"),
    (["--task", "examples.noop:noop", "--wait-agents", "-1"], "--wait-agents must be 0 or a positive number"),
]


@pytest.mark.parametrize("args, message", CASES)
def test_bad_input_is_named(args: list[str], message: str, files: dict[str, str], tmp_path: Path, env) -> None:
    base = str(Spool(tmp_path / "base").ensure().base)  # a spool, as agents make one
    subst = {"{tmp}": str(tmp_path), **{"{" + k + "}": v for k, v in files.items()}}

    def fill(text: str) -> str:
        for key, value in subst.items():
            text = text.replace(key, value)
        return text

    args = [fill(a) for a in args]
    full = ["--base", base, "--chunks", "2", *args, "--no-progress"]  # later --base/--chunks win
    r = run_main(full, env, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert fill(message) in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # one clear line, no traceback
    runs = Path(base) / "runs"
    assert not runs.exists() or os.listdir(runs) == []  # nothing was queued


def test_missing_arguments_say_what_is_missing(tmp_path: Path, env) -> None:
    r = run_main(["--base", str(tmp_path / "b"), "--chunks", "3"], env, timeout=60)
    assert r.returncode == 2 and "missing --task, --script, --cmd or --commands" in r.stderr


def test_same_run_name_with_other_task_is_refused(tmp_path: Path, env) -> None:
    from gpupool.jobs.paths import Spool
    from gpupool.master.spec.runspec import build, save_or_check
    spool = Spool(tmp_path / "b").ensure()
    save_or_check(spool, build(task="examples.noop:noop", chunks=2, run="r1"), fresh=False)
    r = run_main(["--base", str(spool.base), "--task", "examples.noop:square", "--chunks", "2", "--run", "r1"], env)
    assert r.returncode == 2 and "already exists" in r.stderr and "target" in r.stderr and "--fresh" in r.stderr


def test_agent_refuses_a_world_writable_spool(tmp_path: Path, env) -> None:
    import subprocess
    import sys
    from tests.helpers import REPO
    base = tmp_path / "open"
    base.mkdir()
    os.chmod(base, 0o777)
    r = subprocess.run([sys.executable, "-m", "agent", "--base", str(base), "--cpu", "--gpu", "0"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "writable by every user" in r.stderr and "chmod o-w" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--heartbeat", "0"], "--heartbeat must be a positive number of seconds"),
    (["--poll-interval", "-1"], "--poll-interval must be a positive number of seconds"),
    (["--rescan", "nan"], "--rescan must be a positive number of seconds"),
    (["--heartbeat", "inf"], "--heartbeat must be a positive number of seconds"),
    (["--log-limit-mb", "-5"], "--log-limit-mb must be 0 (never cut) or a positive number"),
    (["--log-limit-mb", "nan"], "--log-limit-mb must be 0 (never cut) or a positive number"),
])
def test_agent_names_a_bad_option(args: list[str], message: str, tmp_path: Path, env) -> None:
    import subprocess
    import sys
    from tests.helpers import REPO
    r = subprocess.run([sys.executable, "-m", "agent", "--base", str(tmp_path / "b"), "--cpu", "--gpu", "0", *args],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr and not (tmp_path / "b").exists()


def test_a_master_gives_up_waiting_for_agents_when_told_and_base_comes_from_the_environment(tmp_path: Path,
                                                                                              env) -> None:
    spool = Spool(tmp_path / "b").ensure()
    r = run_main(["--task", "examples.noop:noop", "--chunks", "2", "--wait-agents", "0.5", "--no-progress"],
                 {**env, "GPUPOOL_BASE": str(spool.base)}, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no live agents in" in r.stderr and "no live agent came in 0.5 s (--wait-agents); 2 chunks not run" in \
        r.stderr and "Traceback" not in r.stderr
    fresh = run_main(["--base", str(tmp_path / "new"), "--new-spool", "--task", "examples.noop:noop", "--chunks", "1",
                      "--wait-agents", "0", "--no-progress"], env, timeout=60)
    assert fresh.returncode == 2 and Spool(tmp_path / "new").exists()  # made a spool, then gave up at once


def test_commands_and_start_agents_name_a_folder_that_is_not_a_spool(tmp_path: Path, env) -> None:
    import subprocess
    import sys

    from tests.helpers import REPO

    (tmp_path / "plain").mkdir()
    for cmd in (["status"], ["logs"], ["cancel", "--run", "x"]):
        r = subprocess.run([sys.executable, "-m", "master", *cmd, "--base", str(tmp_path / "plain")], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "is not a spool" in r.stderr, (cmd, r.stderr)
    sh = str(REPO / "start_agents.sh")
    stop = subprocess.run([sh, "stop", str(tmp_path / "plain")], env=env, capture_output=True, text=True, timeout=60)
    assert stop.returncode == 1 and "is not a spool" in stop.stderr and "nothing to stop" in stop.stderr
    spool = Spool(tmp_path / "s").ensure()
    stop = subprocess.run([sh, "stop", str(spool.base)], env=env, capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0 and "no agent of host testhost is running" in stop.stdout
    bare = subprocess.run([sh, "2"], env={k: v for k, v in env.items() if k != "GPUPOOL_BASE"}, capture_output=True,
                          text=True, timeout=60)
    assert bare.returncode == 2 and "missing BASE" in bare.stderr and "usage: usage:" not in bare.stderr


def test_kwargs_that_cannot_fit_the_tasks_signature_are_refused_at_submit(tmp_path: Path, env) -> None:
    """Read from the source (no user code runs): a misspelt keyword, or a required argument nobody
    gives, would fail every chunk the same way."""
    (tmp_path / "task.py").write_text("def f(chunk_id, alpha, beta=2, *, gamma):\n    return chunk_id\n"
                                      "def g(chunk_id, **options):\n    return options\n")
    base = str(Spool(tmp_path / "b").ensure().base)

    def submit(task: str, kwargs: dict) -> str:
        r = run_main(["--base", base, "--task", task, "--chunks", "2", "--kwargs", json.dumps(kwargs),
                      "--no-progress", "--wait-agents", "0"], env, cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        return r.stderr

    refused = submit("task.py:f", {"alpah": 1, "gamma": 3})
    assert "--kwargs key(s) ['alpah']: f() in" in refused and len(refused.strip().splitlines()) == 1
    assert "f() needs ['alpha', 'gamma'], which neither --kwargs nor the agent" in submit("task.py:f", {"beta": 1})
    assert "no live agent came" in submit("task.py:f", {"alpha": 1, "gamma": 3})  # fits: queued, then no agent
    assert "no live agent came" in submit("task.py:g", {"anything": 1})  # **options takes every keyword


def test_submit_refuses_a_keyword_that_is_no_run_option_as_a_function_would(tmp_path: Path) -> None:
    from gpupool.master.api import Pool
    from gpupool.master.errors import UsageError
    pool = Pool(tmp_path / "b")
    with pytest.raises(TypeError, match=r"Pool.submit\(\) got an unexpected keyword argument 'chunk'"):
        pool.submit(task="examples.noop:noop", chunk=2)
    run = pool.submit(task="examples.noop:noop", chunks=2, run="k", targets=["node1::0"], gpu_mem=8)
    assert run.spec.targets == ["node1::0"] and run.spec.placement.gpu_mem == 8
    with pytest.raises(UsageError, match="--gpu-mem must be a positive number"):
        pool.submit(task="examples.noop:noop", chunks=2, gpu_mem=0)


def test_run_json_names_placement_only_where_a_run_has_one(tmp_path: Path) -> None:
    from gpupool.master.spec.runspec import build, load_run, save_or_check
    spool = Spool(tmp_path / "b").ensure()
    save_or_check(spool, build(task="examples.noop:noop", chunks=2, run="plain"), fresh=False)
    assert "targets" not in json.loads(spool.run_spec("plain").read_text())  # older tools refuse unknown fields
    notes: list[str] = []
    save_or_check(spool, build(task="examples.noop:noop", chunks=2, run="h", hosts="a,b"), fresh=False)
    kept = save_or_check(spool, build(task="examples.noop:noop", chunks=2, run="h", gpu_mem=4.0), False, notes=notes)
    assert (kept.hosts, kept.gpu_mem, notes) == ("a,b", 4.0, ["run h: placement changed: --gpu-mem (none) -> 4"])
    assert load_run(spool, "h").placement.hosts == ("a", "b")
