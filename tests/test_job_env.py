"""``main.py --env NAME[=VALUE]``: the caller's variables reach script and callable jobs on agents
started elsewhere (with another environment)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpupool.jobs.paths import Spool
from gpupool.master.spec.runspec import UsageError, parse_env
from tests.helpers import results, run_main


def test_env_options_are_checked() -> None:
    assert parse_env(["A=1", "B", "C="], {"B": "from here"}) == {"A": "1", "B": "from here", "C": ""}
    for items, msg in ((["MISSING"], "'MISSING' is not set here"), (["1A=x"], "are not variable names"),
                       (["CUDA_VISIBLE_DEVICES=0"], "which the agent sets itself"),
                       ([f"BIG={'x' * 20000}"], "over the 16 KB limit")):
        with pytest.raises(UsageError, match=msg):
            parse_env(items, {})


@pytest.mark.timeout(120)
def test_script_and_callable_jobs_get_the_callers_variables(spool: Spool, agents, env, tmp_path: Path) -> None:
    agents(1)  # started without FOO
    caller = {**env, "FOO": "from the shell"}
    rec = tmp_path / "rec"
    r = run_main(["--base", str(spool.base), "--script", "tests/octorun_dummy.py", "--chunks", "2", "--no-progress",
                  "--env", "FOO", "--env", "BAR=given", "--kwargs",
                  json.dumps({"record_dir": str(rec), "env_names": "FOO,BAR"})], caller)
    assert r.returncode == 0, r.stdout + r.stderr
    seen = [json.loads(p.read_text())["env"] for p in rec.glob("*.json")]
    assert seen == [{"FOO": "from the shell", "BAR": "given"}] * 2
    task = ["--base", str(spool.base), "--task", "tests/envtask.py:env_of", "--chunks", "2", "--no-progress",
            "--kwargs", '{"names": "FOO,BAR"}']
    r = run_main(task + ["--env", "FOO", "--env", "BAR=given"], caller)
    assert r.returncode == 0, r.stdout + r.stderr
    [run] = [n for n in spool.run_names() if n.startswith("env_of")]
    assert [v["value"] for v in results(spool.base, run).values()] == [{"FOO": "from the shell", "BAR": "given"}] * 2
    r = run_main(task + ["--run", "without"], caller)  # the same worker: its own environment is back
    assert r.returncode == 0, r.stdout + r.stderr
    assert [v["value"] for v in results(spool.base, "without").values()] == [{"FOO": None, "BAR": None}] * 2
    bad = run_main(task + ["--env", "NOT_SET_ANYWHERE"], caller)
    assert bad.returncode == 2 and "--env NOT_SET_ANYWHERE: 'NOT_SET_ANYWHERE' is not set here" in bad.stderr
