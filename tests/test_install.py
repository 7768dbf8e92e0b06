"""``pip install .`` gives the pool's commands on PATH, and they work from any folder."""
from __future__ import annotations

import shutil
import subprocess
import venv
from pathlib import Path

import pytest

from tests.helpers import REPO


@pytest.mark.timeout(300)
def test_pip_install_gives_commands_that_work_from_another_folder(tmp_path: Path, env) -> None:
    src = tmp_path / "src"  # a copy: the build leaves build/ and *.egg-info behind
    src.mkdir()
    for name in ("agent", "master", "jobs", "examples"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "gpupool.py"):
        shutil.copy(REPO / name, src / name)
    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=True)  # the dependencies: already here
    bin_ = tmp_path / "venv" / "bin"
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}  # nothing from the checkout
    pip = subprocess.run([str(bin_ / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          str(src)], env=env, capture_output=True, text=True, timeout=240)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert all((bin_ / c).exists() for c in ("gpupool", "gpupool-run", "gpupool-agents", "gpupool-agent"))
    work = tmp_path / "elsewhere"
    work.mkdir()
    demo = subprocess.run([str(bin_ / "gpupool-run"), "--no-progress"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=180)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "32 ok, 0 failed" in demo.stdout and "all 32 results checked" in demo.stdout
    status = subprocess.run([str(bin_ / "gpupool"), "status", "--base", "spool-demo", "--json"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and '"agents"' in status.stdout, status.stdout + status.stderr
    imported = subprocess.run([str(bin_ / "python"), "-c", "import gpupool.master as m; print(m.__file__)"],
                              cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert str(tmp_path / "venv") in imported.stdout  # the installed copy, not the checkout
    # one top-level name (issue 22): none of agent, jobs, master, examples next to other distributions
    record = next((tmp_path / "venv").glob("lib/python*/site-packages/gpupool-*.dist-info/RECORD")).read_text()
    tops = {line.split("/")[0] for line in record.splitlines() if line and ".dist-info" not in line.split("/")[0]
            and not line.startswith("..")}
    assert tops == {"gpupool"}, tops
    usage = subprocess.run([str(bin_ / "gpupool-agents")], cwd=work, env=env, capture_output=True, text=True,
                           timeout=60)
    assert usage.returncode == 2 and "stop BASE" in usage.stdout + usage.stderr
