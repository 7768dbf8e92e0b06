"""Limits of the host: a user with no inotify instance left (the default is 128 per user, shared
with editors, IDE servers and every other tool) still gets agents and masters that serve.

The limit is set for real, in a user namespace of its own (``unshare -U -r``, where
``/proc/sys/user/max_inotify_instances`` is per namespace), so nothing outside the test feels it.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO, results, wait_for


def in_namespace(instances: int, cmd: list[str]) -> list[str]:
    """``cmd`` run in a user namespace whose user may hold ``instances`` inotify instances."""
    return ["unshare", "-U", "-r", "sh", "-c", f'echo {instances} > /proc/sys/user/max_inotify_instances && exec "$@"',
            "_", *cmd]


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(in_namespace(0, ["true"]), capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.timeout(180)
@pytest.mark.skipif(not _namespaces_work(), reason="needs unshare -U -r (util-linux, user namespaces) to set an "
                                                    "inotify limit without touching the host's")
def test_agents_and_a_master_with_no_inotify_left_poll_instead_of_failing(tmp_path: Path, env) -> None:
    base, sh = tmp_path / "b", str(REPO / "start_agents.sh")
    started = subprocess.run(in_namespace(2, [sh, "4", str(base), "--cpu"]), env=env, capture_output=True, text=True,
                             timeout=120)
    try:
        assert started.returncode == 0 and started.stdout.count("started") == 4, started.stdout + started.stderr
        assert "Traceback" not in started.stdout + started.stderr
        beats = [base / "agents" / f"testhost-cpu{i}.json" for i in range(4)]
        modes = wait_for(lambda: [json.loads(b.read_text())["watch"] for b in beats], 30, "4 heartbeats")
        assert sorted(modes) == ["inotify", "inotify", "poll", "poll"], modes  # two instances for four agents
        logs = "".join((base / "logs" / f"testhost-cpu{i}.log").read_text() for i in range(4))
        assert logs.count("polling instead") == 2 and "Traceback" not in logs
        main = subprocess.run(in_namespace(0, ["python3", str(REPO / "main.py"), "--base", str(base), "--task",
                                               "examples.noop:square", "--chunks", "40", "--no-progress"]),
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert main.returncode == 0, main.stdout + main.stderr
        assert main.stderr.count("polling instead") == 1 and "Traceback" not in main.stderr
        [run] = [p.name for p in (base / "runs").iterdir()]
        res = results(base, run)
        assert sorted(res) == list(range(40)) and all(r["status"] == "ok" and r["value"]["square"] == c * c
                                                      for c, r in res.items())
        assert len({r["agent"] for r in res.values()}) == 4  # the polling agents served too
    finally:
        stop = subprocess.run([sh, "stop", str(base)], env=env, capture_output=True, text=True, timeout=120)
    assert "stopped 4 agents" in stop.stdout, stop.stdout + stop.stderr
