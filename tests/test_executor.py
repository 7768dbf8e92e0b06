"""master.executor.Executor: concurrent.futures on real agents."""
from __future__ import annotations

import json
import math
import operator
import re
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, CancelledError, as_completed, wait
from pathlib import Path

import numpy as np
import pytest

from gpupool.jobs.paths import Spool
from gpupool.master.executor import Executor, RemoteError, RunCancelled, bind, target_of
from tests.faulty import misbehave
from tests.helpers import REPO, wait_for


# the functions the agents import (module-level, by name) ------------------------------------------
def add(x: int, y: int = 0) -> int:
    return x + y


def where(tag: str, device: str = "?", gpu_id: int = -1) -> dict:
    return {"tag": tag, "device": device, "gpu_id": gpu_id}


def ramp(n: int, scale: float = 1.0) -> dict:
    return {"r": np.arange(n) * scale}


def boom(message: str) -> None:
    raise ValueError(message)


def nap(seconds: float, tag: int = 0) -> int:
    time.sleep(seconds)
    return tag


def flexible(a: int, **extra: int) -> dict:
    return {"a": a, "extra": {k: v for k, v in extra.items() if k not in ("chunk_id", "total_chunks", "gpu_id",
                                                                          "device", "shared", "data")}}


# ------------------------------------------------------------------------------------------------
def test_calls_travel_by_name_with_bound_json_arguments() -> None:
    assert target_of(add) == ("tests.test_executor:add", str(REPO))
    assert bind(add, (1,), {"y": 2}) == ([], {"x": 1, "y": 2})
    assert bind(flexible, (1,), {"b": 2}) == ([], {"a": 1, "b": 2})
    assert bind(where, ("t",), {}) == ([], {"tag": "t"})
    assert bind(operator.truediv, (1, 2), {}) == ([1, 2], {})  # positional-only: positionally
    assert bind(time.sleep, (0.1,), {}) == ([0.1], {})  # no signature: as given
    assert bind(add, ((1, 2),), {}) == ([], {"x": {"__gpupool__": "tuple", "items": [1, 2]}})
    assert target_of(pow) == ("builtins:pow", None) and target_of(math.factorial) == ("math:factorial", None)
    with pytest.raises(TypeError, match="module-level function"):
        target_of(lambda: 1)
    with pytest.raises(TypeError, match=r"add: argument\['x'\] is a builtins.object, which cannot travel"):
        bind(add, (object(),), {})
    with pytest.raises(TypeError, match="filled in by the agent"):
        bind(where, ("t",), {"device": "cuda:3"})
    with pytest.raises(TypeError, match="missing required"):
        bind(add, (), {"y": 1})
    with pytest.raises(TypeError):
        bind(add, (1, 2, 3), {})
    with pytest.raises(ValueError, match=r"add\(...\) arguments: 293 KB as JSON, over the 64 KB limit"):
        bind(add, ("y" * 300_000, 1), {})  # every descriptor carries them: refused at submit



@pytest.mark.parametrize("option, value", [("retries", -1), ("timeout", float("nan")), ("timeout", 0),
                                           ("depth", 0), ("dead_after", float("inf")), ("poll", 0)])
def test_a_bad_option_is_named_before_anything_is_written(option: str, value: object, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"Executor: {option} must be"):
        Executor(tmp_path / "b", **{option: value})
    assert not (tmp_path / "b").exists()

@pytest.mark.timeout(90)
def test_submit_map_as_completed_wait_arrays_and_remote_errors(spool: Spool, agents, env) -> None:
    agents(2)
    with Executor(spool.base, retries=1, keep=True) as ex:  # its run is read below
        futures = [ex.submit(add, i, y=100) for i in range(12)]
        assert sorted(f.result() for f in as_completed(futures, timeout=60)) == [100 + i for i in range(12)]
        assert list(ex.map(add, range(5), range(5), timeout=60)) == [0, 2, 4, 6, 8]
        arrays = ex.submit(ramp, 4, scale=0.5).result(timeout=60)
        assert np.array_equal(arrays["r"], [0, 0.5, 1.0, 1.5])
        info = ex.submit(where, "x").result(timeout=60)
        assert info == {"tag": "x", "device": "cpu", "gpu_id": info["gpu_id"]} and info["gpu_id"] in (0, 1)
        assert ex.submit(flexible, 1, b=2).result(timeout=60) == {"a": 1, "extra": {"b": 2}}
        bad = ex.submit(boom, "no good")
        done, _ = wait([bad], timeout=60)
        assert bad in done
        with pytest.raises(ValueError) as e:  # the remote class, and a RemoteError too
            bad.result()
        assert str(e.value) == "no good" and isinstance(e.value, RemoteError) and e.value.type == "ValueError" and e.value.message == "no good"
        assert "in boom" in e.value.remote_traceback and "in boom" in e.value.__notes__[0]
        run = ex.run
    res = json.loads(spool.result_json(run, bad_chunk(spool, run)).read_text())
    assert res["attempt"] == 2  # retries=1: tried twice
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(add, 1)
    st = subprocess.run([sys.executable, "-m", "master", "status", "--base", str(spool.base), "--json"], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=60)
    [row] = [r for r in json.loads(st.stdout)["runs"] if r["run"] == run]
    assert row["chunks"] == 21 and row["ok"] == 20 and row["failed"] == 1
    retry = subprocess.run([sys.executable, "-m", "master", "retry", "--base", str(spool.base), "--run", run],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert retry.returncode == 2 and "Executor" in retry.stderr


def bad_chunk(spool: Spool, run: str) -> int:
    return next(int(p.stem) for p in spool.result_dir(run).glob("*.json")
                if p.stem.isdigit() and json.loads(p.read_text())["status"] == "failed")


@pytest.mark.timeout(90)
def test_calls_of_a_dead_agent_go_to_another_and_shutdown_cancels_pending(spool: Spool, agents) -> None:
    a0, a1 = agents(2)
    ex = Executor(spool.base, dead_after=1.0, depth=3)
    try:
        futures = [ex.submit(nap, 0.4, tag=i) for i in range(8)]
        wait_for(lambda: (a0.heartbeat() or {}).get("state") == "busy", what="agent 0 busy")
        a0.kill()
        assert sorted(f.result(timeout=60) for f in futures) == list(range(8))
        slow = [ex.submit(nap, 0.3, tag=i) for i in range(20)]
        first, _ = wait(slow, timeout=60, return_when=FIRST_COMPLETED)
        assert first
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
    cancelled = [f for f in slow if f.cancelled()]
    assert cancelled and all(f.done() for f in slow)
    with pytest.raises(CancelledError):
        cancelled[0].result()
    assert all(f.result() == i for i, f in enumerate(slow) if not f.cancelled())


@pytest.mark.timeout(90)
def test_a_call_that_kills_its_agent_fails_instead_of_taking_every_agent_down(spool: Spool, agents) -> None:
    procs = agents(4)
    modes = ["ok"] * 5 + ["killagent"]
    with Executor(spool.base, dead_after=1.5, retries=1) as ex:
        futs = [ex.submit(misbehave, modes=modes) for _ in modes]  # the agent passes each call's number as chunk_id
        with pytest.raises(RemoteError, match="AgentLost") as e:
            futs[-1].result(timeout=60)
        assert [f.result(timeout=30) for f in futs[:-1]] == ["ok"] * 5
    # its first agent's death is free, each further one costs an attempt: 1 + (1 + retries) agents (its attempt
    # number also counts a move to an idle agent before it started, which costs nothing)
    assert "3 agents so far" in str(e.value) and sum(p.proc.poll() is not None for p in procs) == 3


@pytest.mark.timeout(90)
def test_cancelling_the_run_fails_its_futures(spool: Spool, agents, env) -> None:
    agents(1)
    with Executor(spool.base) as ex:
        futures = [ex.submit(nap, 0.5, tag=i) for i in range(6)]
        wait_for(lambda: spool.run_spec(ex.run).exists(), what="run.json")
        r = subprocess.run([sys.executable, "-m", "master", "cancel", "--base", str(spool.base), "--run", ex.run],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        done, _ = wait(futures, timeout=30)
    assert len(done) == 6
    assert any(isinstance(f.exception(), RunCancelled) or f.cancelled() for f in futures)


SCRIPT_USER = """
from gpupool.master.executor import Executor

def triple(x):
    return 3 * x

if __name__ == "__main__":
    import sys
    with Executor(sys.argv[1]) as ex:
        print(list(ex.map(triple, range(4), timeout=60)))
"""


@pytest.mark.timeout(90)
def test_functions_of_the_main_script_work_like_multiprocessing_spawn(spool: Spool, agents, env,
                                                                         tmp_path: Path) -> None:
    agents(1)
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT_USER)
    r = subprocess.run([sys.executable, str(script), str(spool.base)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=80)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[0, 3, 6, 9]"


def test_an_executor_run_is_named_after_the_script_that_made_it(tmp_path: Path, env) -> None:
    """So that python -m master runs says whose runs pile up (was executor-<host>-<pid>-<hex>)."""
    import subprocess
    import sys

    script = tmp_path / "my_sweep.py"
    script.write_text("import sys\nfrom gpupool.master.executor import Executor\n"
                      "ex = Executor(sys.argv[1])\nprint(ex.run)\nex.shutdown()\n")
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "b")], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"executor-my_sweep-\d{4}-\d{6}-[0-9a-f]{4}", r.stdout.strip()), r.stdout
