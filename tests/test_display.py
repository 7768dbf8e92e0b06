"""What status, logs, main.py and the dashboard show of what jobs and agents say (issue 23):
text from a job with its control characters escaped, and durations from one clock each, however
far the agents' clocks are off (tests/fake_clock: agents whose wall clock is an hour off)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from gpupool.jobs.names import printable
from gpupool.jobs.paths import Spool
from tests.helpers import REPO, wait_for
from tests.hostile_text import HOSTILE
from tests.test_dashboard import dashboard, get  # noqa: F401 (the fixture: a real dashboard process)

RAW = (b"\x1b", b"\x07", b"\r")  # what must never reach a terminal or a page from a job
SHOWN = r"boom \x1b]0;pwned\x07\x1b[2J\rchunk 0 ok"  # the escaped form of tests.hostile_text.HOSTILE


def run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """A command's output as bytes (text mode would turn a raw \\r into \\n and hide it)."""
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, timeout=timeout)


def clean(what: str, out: bytes) -> str:
    raw = [b for b in RAW if b in out]
    assert not raw, f"{what}: raw {raw} in its output: {out[-3000:]!r}"
    return out.decode()


def test_printable_escapes_control_characters_and_keeps_lines_where_asked() -> None:
    assert printable(HOSTILE) == SHOWN
    assert printable("a\nb\tc\x7f\x9b\ud800") == r"a\nb" + "\tc" + r"\x7f\x9b\ud800"
    assert printable("tb line\r\nnext\rover\n\tat x", lines=True) == "tb line\nnext\\r\nover\n\tat x"
    assert printable(None) == "None" and printable("plain é 漢") == "plain é 漢"


@pytest.mark.timeout(180)
def test_text_a_job_wrote_is_shown_escaped_by_main_status_logs_and_the_run_page(
        spool: Spool, agents, env, dashboard: str) -> None:  # noqa: F811
    (agent,) = agents(1)
    base = str(spool.base)
    r = run(["main.py", "--base", base, "--task", "tests.hostile_text:shout", "--chunks", "2", "--run", "esc",
             "--retries", "1", "--no-progress"], env)
    out = clean("main.py", r.stdout + r.stderr)
    assert r.returncode != 0 and "FAILED chunk 0" in out and SHOWN in out, out
    assert out.count(f"ValueError: {SHOWN}") >= 2  # the retry line as it happened, and the summary's

    r = run(["-m", "master", "status", "--base", base, "--run", "esc"], env)
    out = clean("status --run", r.stdout + r.stderr)
    assert r.returncode == 0 and re.search(r"\n +0 failed .*ValueError: " + re.escape(SHOWN), out), out
    rows = json.loads(run(["-m", "master", "status", "--base", base, "--run", "esc", "--json"], env).stdout)
    assert rows[0]["error"] == f"ValueError: {HOSTILE}"  # JSON keeps the text as it was (JSON escapes it)

    r = run(["-m", "master", "logs", "--base", base, "--run", "esc", "--chunk", "0"], env)
    out = clean("logs --chunk", r.stdout + r.stderr)
    assert "Traceback (most recent call last)" in out and SHOWN in out, out  # each attempt's header line
    assert "ValueError: boom \\x1b]0;pwned\\x07\\x1b[2J\\r\nchunk 0 ok" in out  # the traceback: a \r breaks the line
    assert "out: boom \\x1b]0;pwned\\x07\\x1b[2J\\r\nchunk 0 ok" in out and "err: boom \\x1b]0;pwned" in out  # its output
    r = run(["-m", "master", "logs", "--base", base, "--agent", agent.id, "--worker"], env)
    clean("logs --worker", r.stdout + r.stderr)
    r = run(["-m", "master", "logs", "--base", base], env)
    clean("logs", r.stdout + r.stderr)

    for url in ("run/esc", "run/esc/fragment", "run/esc/chunk/0"):
        with urllib.request.urlopen(dashboard + url, timeout=10) as resp:
            page = resp.read()
        text = clean(url, page)
        assert "pwned" in text and SHOWN.split("\\r")[0] in text, text[-3000:]
    assert json.loads(get(dashboard + "api/run/esc")[1])["failures"]["0"]["message"] == HOSTILE


# clocks ---------------------------------------------------------------------------------------
def skewed(env: dict[str, str], seconds: float) -> dict[str, str]:
    """``env`` for an agent whose wall clock is ``seconds`` off, and its workers' (see
    tests/fake_clock/sitecustomize.py); its monotonic clock and the file times stay true."""
    return {**env, "PYTHONPATH": os.pathsep.join([env["PYTHONPATH"], str(REPO / "tests" / "fake_clock")]),
            "GPUPOOL_TEST_CLOCK_SKEW_S": str(seconds)}


@pytest.mark.timeout(180)
def test_status_and_the_timeline_use_one_clock_per_measurement_with_agents_an_hour_off(
        spool: Spool, agents, env, dashboard: str, tmp_path) -> None:  # noqa: F811
    behind = agents(1, 0, env_=skewed(env, -3600))[0]
    ahead = agents(1, 1, env_=skewed(env, 3600))[0]
    assert abs(behind.heartbeat()["updated_at"] + 3600 - time.time()) < 600, "the agent's clock is not an hour behind"
    assert abs(ahead.heartbeat()["updated_at"] - 3600 - time.time()) < 600, "the agent's clock is not an hour ahead"
    gate, base = tmp_path / "gate", str(spool.base)
    began = time.monotonic()
    p = subprocess.Popen([sys.executable, "main.py", "--base", base, "--task", "tests.faulty:gated_array",
                          "--chunks", "2", "--run", "long", "--kwargs", json.dumps({"gate": str(gate), "mb": 0.01}),
                          "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def both_running() -> dict | None:
            data = json.loads(run(["-m", "master", "status", "--base", base, "--json"], env).stdout)
            cur = {a["id"]: a for a in data["agents"] if a["current"] and a["current"]["run"] == "long"}
            return data if len(cur) == 2 else None

        wait_for(both_running, timeout=60, what="a chunk of run long running on each agent")
        seen = time.monotonic()
        wait_for(lambda: time.monotonic() - seen >= 2.0, timeout=10, what="2 s of running")
        data = json.loads(run(["-m", "master", "status", "--base", base, "--json"], env).stdout)
        text = run(["-m", "master", "status", "--base", base], env).stdout.decode()
        rows = json.loads(run(["-m", "master", "status", "--base", base, "--run", "long", "--json"], env).stdout)
        most = time.monotonic() - began + 1.0  # no chunk can have run longer than the run has
        for a in data["agents"]:
            took = a["current_for_s"]
            assert took is not None and 1.5 <= took <= most, f"{a['id']} says its chunk ran {took} s (at most {most:.1f})"
            line = next(x for x in text.splitlines() if x.startswith(a["id"]))
            shown = re.search(r"long#\d+ ([\d.]+)s ", line)
            assert shown and 1 <= float(shown.group(1)) <= most, line
        assert [r["state"] for r in rows] == ["running", "running"] and all(1.5 <= r["seconds"] <= most for r in rows), rows
        gate.touch()
        assert p.wait(timeout=60) == 0, p.stderr.read().decode()[-3000:]
        length = time.monotonic() - began
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    bars = json.loads(get(dashboard + "api/run/long")[1])["bars"]
    assert sorted(b["agent"] for b in bars) == sorted([behind.id, ahead.id]) and all(b["status"] == "ok" for b in bars)
    span = max(b["end"] for b in bars) - min(b["start"] for b in bars)
    assert 2.0 <= span <= length + 1.0, f"the timeline spans {span:.1f} s of a {length:.1f} s run: {bars}"
    page = get(dashboard + "run/long")[1]
    assert "+1h" not in page and "+2h" not in page  # the axis of a run of seconds
