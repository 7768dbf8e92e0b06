"""The demo on a GPU host where CUDA does not work (issue 13): its workload falls back to numpy
whenever torch cannot compute on the GPU, not only when torch is missing. torch is faked for
the workers by tests/fake_torch (never imported here); the GPUs by $GPUPOOL_FAKE_GPUS."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, base_env


@pytest.mark.timeout(180)
@pytest.mark.parametrize("broken, why", [
    ("FAKE_TORCH_DRIVER_ERROR", "sees no usable CUDA device"),  # a CPU-only build, no driver: is_available() False
    ("FAKE_TORCH_INIT_ERROR", "CUDA does not initialise (RuntimeError: CUDA error: CUDA-capable device(s) is/are busy"),
])
def test_the_demo_on_gpu_agents_whose_cuda_is_unusable_computes_with_numpy(tmp_path: Path, broken: str,
                                                                            why: str) -> None:
    """Before: torch imported fine, so every chunk tried CUDA and all 32 failed."""
    env = base_env(tmp_path, GPUPOOL_FAKE_GPUS=json.dumps([{}, {}]), **{broken: "1"})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests" / "fake_torch")])
    r = subprocess.run([sys.executable, str(REPO / "main.py"), "--no-progress"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "starting 2 GPU agents" in r.stdout and "32 ok, 0 failed" in r.stdout
    assert "all 32 results checked" in r.stdout
    logs = "".join(p.read_text() for p in (tmp_path / "spool-demo" / "logs").glob("*/*.log"))  # what the chunks printed
    assert f"gpupool.master.matmul: torch 0.0+fake {why}" in logs or f"gpupool.master.matmul: {why}" in logs, logs[-2000:]
    assert "computing on the CPU with numpy" in logs
