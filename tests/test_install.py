"""``pip install .`` gives the pool's commands on PATH, and they work from any folder."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import venv
from pathlib import Path

import pytest

from tests.helpers import REPO


@pytest.mark.timeout(600)
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
    # the installed commands name themselves and what a pip user has (issue 25)
    assert "Next: gpupool-agents 2 /tmp/b && gpupool-run --base /tmp/b" in demo.stdout, demo.stdout
    assert "main.py" not in demo.stdout and "start_agents.sh" not in demo.stdout
    env = {k: v for k, v in env.items() if k != "GPUPOOL_BASE"}
    for cmd in (["gpupool-run", "--help"], ["gpupool", "--help"], ["gpupool", "collect", "--help"],
                ["gpupool-agents", "--help"], ["gpupool-agent", "--help"]):
        h = subprocess.run([str(bin_ / cmd[0]), *cmd[1:]], cwd=work, env=env, capture_output=True, text=True,
                           timeout=60)
        assert h.returncode == 0 and h.stdout.startswith(f"usage: {' '.join(cmd[:-1])}"), h.stdout + h.stderr
        for wrong in ("main.py", "start_agents.sh", "python -m master", "python -m agent", "examples/"):
            assert wrong not in h.stdout, (cmd, wrong)
        assert not re.search(r"docs/\w+\.md(?! of gpupool's source)", " ".join(h.stdout.split())), h.stdout  # no path a pip user lacks
    for cmd, said in ((["gpupool-run", "--task", "m:f", "--chunks", "2"], "gpupool-run: missing --base (or $GPUPOOL_BASE)"),
                      (["gpupool", "status"], "gpupool status: missing --base BASE, the spool folder (or set $GPUPOOL_BASE)"),
                      (["gpupool-agent"], "gpupool-agent: missing --base BASE, the spool folder (or set $GPUPOOL_BASE)"),
                      (["gpupool-agents", "2"], "gpupool-agents: missing BASE, the spool folder (or set $GPUPOOL_BASE)")):
        e = subprocess.run([str(bin_ / cmd[0]), *cmd[1:]], cwd=work, env=env, capture_output=True, text=True,
                           timeout=60)
        assert e.returncode == 2 and e.stderr.startswith(said), e.stderr
    status = subprocess.run([str(bin_ / "gpupool"), "status", "--base", "spool-demo", "--json"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and '"agents"' in status.stdout, status.stdout + status.stderr
    # --detach: the run's master started apart, from the installed package, holds the run when the command returns
    det = subprocess.run([str(bin_ / "gpupool-run"), "--base", "spool-demo", "--cmd", "true", "--chunks", "1", "--run",
                          "detached", "--detach"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    pid = re.search(r"its master runs detached \(pid (\d+)\)", det.stdout)
    assert det.returncode == 0 and pid, det.stdout + det.stderr
    os.killpg(int(pid.group(1)), signal.SIGKILL)  # no agent: it would wait on
    assert f"follow it: gpupool status --base {work / 'spool-demo'} --run detached" in det.stdout, det.stdout
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
    _readme_first_run_as_shown(tmp_path, bin_, env)


def _readme_first_run_as_shown(tmp_path: Path, bin_: Path, env: dict[str, str]) -> None:
    """The README's "A first run" commands, taken from README.md (a README that drifts breaks this),
    run as shown with the installed commands from a project folder, on a spool in place of /tmp/b."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## A first run", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    project, base = tmp_path / "project", tmp_path / "b"
    project.mkdir()
    for lang, code in blocks:
        if lang == "python":
            name = code.splitlines()[0].removeprefix("# ").strip()  # "# my_job.py"
            (project / name).write_text(code)
    script = "\n".join(code for lang, code in blocks if lang == "bash").replace("/tmp/b", str(base))
    assert "gpupool collect" in script and "my_job.py:process" in script
    run_env = {**env, "PATH": f"{bin_}:{env.get('PATH', '')}"}
    try:
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=project, env=run_env, capture_output=True,
                           text=True, timeout=400)
    finally:
        subprocess.run([str(bin_ / "gpupool-agents"), "stop", str(base), "--now"], env=run_env, capture_output=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    import numpy as np

    first = np.load(project / "first.npz")  # collect's default: RUN.npz in the current folder
    assert first["chunk_id"].tolist() == list(range(100))
    mine = np.load(project / "mine.npz")
    assert mine["Y"].shape == (64, 4, 8) and float(mine["Y"][3, 0, 0]) == 6.0  # 2 * 3 * eye
