"""Every command names itself as typed and names $GPUPOOL_BASE where --base is missing (issue 25),
run as a user runs them: real processes, from a folder that is not the checkout."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in env.items() if k != "GPUPOOL_BASE"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", ["status", "collect", "retry", "logs", "runs", "cancel", "rm", "dashboard"])
def test_a_missing_base_names_the_variable_that_would_do(tmp_path: Path, env, command: str) -> None:
    extra = ["--run", "r"] if command in ("collect", "retry", "cancel", "rm") else []
    r = _run([sys.executable, "-m", "master", command, *extra], tmp_path, env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip() == (f"python -m master {command}: missing --base BASE, the spool folder "
                                "(or set $GPUPOOL_BASE)")


def test_main_agent_and_start_agents_name_gpupool_base_too(tmp_path: Path, env) -> None:
    r = _run([sys.executable, str(REPO / "main.py"), "--task", "m:f", "--chunks", "2"], tmp_path, env)
    assert r.returncode == 2 and r.stderr.startswith("main.py: missing --base (or $GPUPOOL_BASE)"), r.stderr
    r = _run([sys.executable, "-m", "agent", "--cpu"], tmp_path, env)
    assert r.returncode == 2 and r.stderr.strip() == \
        "python -m agent: missing --base BASE, the spool folder (or set $GPUPOOL_BASE)", r.stderr
    r = _run([str(REPO / "start_agents.sh"), "2"], tmp_path, env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith(f"{REPO / 'start_agents.sh'}: missing BASE, the spool folder (or set $GPUPOOL_BASE)")


def test_a_checkout_command_run_elsewhere_points_to_files_that_exist(tmp_path: Path, env) -> None:
    # wide: argparse wraps help at hyphens, so a checkout path with one ("/tmp/ci-clone/...") came in two
    r = _run([sys.executable, str(REPO / "main.py"), "--help"], tmp_path, {**env, "COLUMNS": "10000"})
    assert r.returncode == 0
    assert "usage: python " + str(REPO / "main.py") in r.stdout.replace("\n", " ")
    assert "examples/" not in r.stdout
    for word in r.stdout.split():  # every docs page and script it names is there
        word = word.strip("()[];,")
        if word.endswith((".md", ".sh")) and "/" in word:
            assert (tmp_path / word).exists() or Path(word).exists(), word


def test_every_command_of_the_help_is_in_the_cli_docs(tmp_path: Path, env) -> None:
    r = _run([sys.executable, "-m", "master", "--help"], tmp_path, {**env, "COLUMNS": "10000"})
    assert r.returncode == 0, r.stderr
    listed = r.stdout.split("positional arguments:", 1)[1].split("options:", 1)[0]
    # a command is the first word of a line indented 4 (a long name has its help on the next, deeper line)
    commands = [line.split()[0] for line in listed.splitlines() if line[:4] == "    " and line[4:5].strip()]
    assert len(commands) >= 12 and "status" in commands and "save-config" in commands, commands
    rows = [line for line in (REPO / "docs" / "cli.md").read_text().splitlines() if line.startswith("| `")]
    missing = [c for c in commands if not any(row.startswith(f"| `{c}") or f"/ `{c} " in row for row in rows)]
    assert not missing, f"docs/cli.md has no row for: {missing}"
