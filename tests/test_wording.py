"""The commands' output read as a user reads it (issue 25): real runs with failures, retries and a
lost agent, ``status``, ``drain``/``undrain``, ``logs --chunk`` and a refused resubmission, grepped
for the grammar slips once seen ("1 chunks", "is no heartbeat", "a different chunks", a draining
agent called busy, sub-second chunk times shown as ``0s``, a script's output printed twice)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpupool.jobs.paths import Spool
from tests.helpers import REPO, run_main, wait_for

SLIPS = [r"(?<![\d.])\b1 (chunks|agents|runs|attempts|jobs|failed attempts|failed chunks|queued jobs)\b", r"\bis no heartbeat",
         r"a different chunks", r"is busy: taking jobs again", r"(?<![\d.])0s\b"]
TASK = "tests.repeating:fails"


def master(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "master", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)


def no_slips(text: str) -> None:
    for slip in SLIPS:
        hit = re.search(slip, text)
        assert hit is None, f"{slip!r} matches {text[max(0, hit.start() - 80):hit.end() + 80]!r}"


@pytest.mark.timeout(180)
def test_the_commands_say_what_happened_in_plain_words(spool: Spool, agents, env, tmp_path: Path) -> None:
    a0, a1 = agents(2)
    base, marks, said = str(spool.base), str(tmp_path / "marks"), []

    # a one-chunk run that fails and is retried: its summary counts the failed attempts
    r = run_main(["--base", base, "--task", TASK, "--chunks", "1", "--run", "one", "--kwargs",
                  json.dumps({"marks": marks, "how": "varied"}), "--retries", "1", "--retry-delay", "0.05",
                  "--no-progress"], env)
    said.append(r.stdout + r.stderr)
    assert r.returncode == 1 and "run one: 1 chunk, 0 ok, 1 failed (2 failed attempts, 1 of them retried)" in r.stdout
    assert "results: " in r.stdout and "/one/000000.json, one per chunk" in r.stdout, r.stdout

    # the same run name with another chunk count: refused, in words
    again = run_main(["--base", base, "--task", TASK, "--chunks", "2", "--run", "one", "--kwargs",
                      json.dumps({"marks": marks, "how": "varied"}), "--no-progress"], env)
    said.append(again.stdout + again.stderr)
    assert again.returncode == 2 and "already exists" in again.stderr and "another chunk count" in again.stderr

    # sub-second chunks: their times read as tenths, not 0s
    quick = run_main(["--base", base, "--task", TASK, "--chunks", "2", "--run", "quick", "--kwargs",
                      json.dumps({"marks": marks, "how": "varied", "ok": [0, 1], "pause": 0.3}), "--no-progress"], env)
    assert quick.returncode == 0, quick.stdout + quick.stderr
    table = master(["status", "--base", base, "--run", "quick"], env).stdout
    said += [quick.stdout + quick.stderr, table, master(["status", "--base", base], env).stdout]
    assert len(re.findall(r"\b0\.\ds\b", table)) == 2, table

    # a script whose chunk failed: its traceback is in its output, shown once
    s = run_main(["--base", base, "--script", str(REPO / "tests" / "repeating.py"), "--chunks", "1", "--run", "script",
                  "--kwargs", json.dumps({"marks": marks, "how": "runtime"}), "--retries", "0", "--no-progress"], env)
    assert s.returncode == 1, s.stdout + s.stderr
    logs = master(["logs", "--base", base, "--run", "script", "--chunk", "0"], env).stdout
    said += [s.stdout, logs]
    assert logs.count("RuntimeError: the config has no section 'model'") == 1, logs
    assert logs.count("Traceback (most recent call last)") == 1, logs

    # an agent lost mid-chunk, another drained and undrained while busy
    gate = tmp_path / "gate"
    feed = subprocess.Popen([sys.executable, "main.py", "--base", base, "--task", TASK, "--chunks", "2", "--run", "held",
                             "--kwargs", json.dumps({"marks": marks, "how": "varied", "ok": [0, 1], "gate": str(gate)}),
                             "--dead-after", "1", "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: all((a.heartbeat() or {}).get("current") for a in (a0, a1)), 30, "both agents busy")
        d = master(["drain", "--base", base, a1.id], env)
        u = master(["undrain", "--base", base, a1.id], env)
        said += [d.stdout + d.stderr, u.stdout + u.stderr]
        assert u.returncode == 0 and f"agent {a1.id} is taking jobs again (it runs held chunk " in u.stdout, u.stdout
        a0.kill()  # its chunk can only end on the other agent, once the master has found a0 dead
    finally:
        gate.touch()
    out, err = feed.communicate(timeout=60)
    said.append(out + err)
    assert feed.returncode == 0 and "run held: 2 chunks, 2 ok, 0 failed in " in out, out + err  # a first loss is free
    assert f"agent {a0.id}: no heartbeat for" in err, err
    for text in said:
        no_slips(text)
