"""SGE-template code unchanged (issue 15): ``expensive_task(A, B, shared)`` gets the arrays of its
chunk's and the shared .npz by name (--arrays-as-kwargs) and returns a tuple, stored and collected
like a dict of arrays; code that builds ``cuda:{gpu_id}`` runs on any GPU with --visible-gpu-id;
code that asks for CUDA on a CPU agent fails saying so. Real agents; the GPU probe and torch are
the fakes of tests/ (GPUPOOL_FAKE_GPUS, tests/fake_torch)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpupool.jobs.paths import Spool
from gpupool.master.executor import Executor
from tests.helpers import REPO, base_env, results, run_main
from tests.sge_template import expensive_task

FAKE_TORCH = str(REPO / "tests" / "fake_torch")


def template_inputs(tmp_path: Path, chunks: int) -> tuple[Path, Path, list[tuple[np.ndarray, ...]]]:
    """A --data folder of {A, B} per chunk and a --shared .npz holding the array 'shared'."""
    data, rng = tmp_path / "chunks", np.random.default_rng(0)
    data.mkdir()
    shared = rng.standard_normal((3, 2))
    np.savez(tmp_path / "shared.npz", shared=shared)
    inputs = []
    for c in range(chunks):
        a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
        np.savez(data / f"{c}.npz", A=a, B=b)
        inputs.append((a, b, shared))
    return data, tmp_path / "shared.npz", inputs


@pytest.mark.timeout(120)
def test_expensive_task_runs_unchanged_with_arrays_as_kwargs(spool: Spool, agents, env, tmp_path: Path) -> None:
    agents(2)
    data, shared, inputs = template_inputs(tmp_path, 4)
    args = ["--base", str(spool.base), "--task", "tests.sge_template:expensive_task", "--chunks", "4",
            "--data", str(data), "--shared", str(shared), "--run", "sge", "--no-progress"]
    r = run_main(args, env)  # without the option the function's A and B come from nowhere: refused up front
    assert r.returncode == 2 and "expensive_task() needs ['A', 'B']" in r.stderr, r.stderr
    r = run_main(args + ["--arrays-as-kwargs"], env)
    assert r.returncode == 0, r.stderr
    for c, rec in results(spool.base, "sge").items():
        assert rec["arrays_form"] == "tuple"
        stored = np.load(spool.arrays_of("sge", rec))
        for want, key in zip(expensive_task(*inputs[c]), ("arr_0", "arr_1")):
            assert np.array_equal(stored[key], want)
    out = tmp_path / "all.npz"
    c = subprocess.run([sys.executable, "-m", "master", "collect", "--base", str(spool.base), "--run", "sge", "--out",
                        str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert c.returncode == 0, c.stderr
    got = np.load(out)
    assert got["arr_0"].shape == (4, 3, 2) and np.array_equal(got["arr_1"][2], expensive_task(*inputs[2])[1])
    with Executor(spool.base) as ex:  # the same function through the Executor: its tuple comes back a tuple
        back = ex.submit(expensive_task, *inputs[0]).result(timeout=60)
    assert isinstance(back, tuple) and all(np.array_equal(g, w) for g, w in zip(back, expensive_task(*inputs[0])))


@pytest.mark.parametrize("extra, message", [
    (["--script", "examples/octorun_script.py"], "--arrays-as-kwargs is for --task"),
    (["--task", "tests.sge_template:expensive_task"], "give at least one"),
    (["--task", "tests.sge_template:expensive_task", "--data", "DATA", "--kwargs", '{"A": 1}'],
     "has array(s) ['A'], which --kwargs also gives"),
])
def test_arrays_as_kwargs_refuses_what_cannot_work(spool: Spool, env, tmp_path: Path, extra: list[str],
                                                   message: str) -> None:
    data, _, _ = template_inputs(tmp_path, 2)
    extra = [str(data) if x == "DATA" else x for x in extra]
    r = run_main(["--base", str(spool.base), "--chunks", "2", "--arrays-as-kwargs", "--no-progress", *extra], env)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def gpu_env(tmp_path: Path, gpus: int = 0) -> dict[str, str]:
    env = base_env(tmp_path, **({"GPUPOOL_FAKE_GPUS": json.dumps([{"name": "Fake", "mem_total_gb": 40}] * gpus)}
                                if gpus else {}))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), FAKE_TORCH])
    return env


@pytest.mark.timeout(120)
def test_cuda_from_gpu_id_runs_unchanged_with_visible_gpu_id(spool: Spool, agents, tmp_path: Path) -> None:
    env = gpu_env(tmp_path, gpus=2)
    agents(1, first=1, env_=env, cpu=False)  # GPU 1: its job sees it as cuda:0
    data, _, _ = template_inputs(tmp_path, 1)
    args = ["--base", str(spool.base), "--task", "tests.sge_template:on_gpu", "--chunks", "1", "--data", str(data),
            "--arrays-as-kwargs", "--retries", "0", "--no-progress"]
    r = run_main(args + ["--run", "plain"], env)
    assert r.returncode == 1 and "invalid device ordinal" in r.stdout + r.stderr
    r = run_main(args + ["--run", "visible", "--visible-gpu-id"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert results(spool.base, "visible")[0]["gpu_id"] == 1  # the agent's GPU, as status shows it
    script = ["--base", str(spool.base), "--script", "examples/octorun_script.py", "--chunks", "1", "--kwargs",
              json.dumps({"out_dir": str(tmp_path / "out")}), "--no-progress", "--visible-gpu-id", "--run", "script"]
    assert run_main(script, env).returncode == 0  # a script's --gpu_id is the same index
    assert "\ngpu 0: chunk 0/1 did" in (spool.run_log_dir("script") / "000000.log").read_text()
    seer = tmp_path / "seer.py"  # and index 0 is the agent's GPU: the script sees that one only
    seer.write_text("import os, sys\nprint('sees', os.environ.get('CUDA_VISIBLE_DEVICES'), sys.argv[1:3])\n")
    assert run_main(["--base", str(spool.base), "--script", str(seer), "--chunks", "1", "--no-progress",
                     "--visible-gpu-id", "--run", "seer"], env).returncode == 0
    assert "sees GPU-fake-1 ['--gpu_id', '0']" in (spool.run_log_dir("seer") / "000000.log").read_text()


@pytest.mark.timeout(120)
def test_cuda_asked_on_a_cpu_agent_fails_saying_so(spool: Spool, agents, tmp_path: Path) -> None:
    env = gpu_env(tmp_path)
    agents(1, env_=env)
    data, _, _ = template_inputs(tmp_path, 1)
    r = run_main(["--base", str(spool.base), "--task", "tests.sge_template:on_gpu", "--chunks", "1", "--data",
                  str(data), "--arrays-as-kwargs", "--retries", "0", "--run", "cpu", "--no-progress"], env)
    assert r.returncode == 1
    err = results(spool.base, "cpu")[0]["error"]
    assert err["type"] == "RuntimeError" and err["message"].startswith("the job asked for CUDA on an agent without a "
                                                                       "GPU (device 'cpu')")
    assert err["message"].endswith(": No CUDA GPUs are available")
    assert "the job asked for CUDA on an agent without a GPU" in r.stdout + r.stderr
