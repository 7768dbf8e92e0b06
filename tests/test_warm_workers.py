"""Warm workers you can trust (issue 22): each run computes with its own code, data, settings and
threads; setup once per worker; the user's own module names work. Real agents, real runs, each
case as a user meets it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gpupool.agent.threads import usable_cores
from gpupool.jobs.paths import Spool
from tests.helpers import REPO, results, run_main, wait_for


def project(folder: Path, files: dict[str, str]) -> Path:
    """A user's project folder with these files (dedented)."""
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return folder


def values(spool: Spool, run: str) -> list:
    res = results(spool.base, run)
    assert res and all(r["status"] == "ok" for r in res.values()), res
    return [res[c]["value"] for c in sorted(res)]


def feed(spool: Spool, env: dict, cwd: Path, run: str, *args: str) -> None:
    r = run_main(["--base", str(spool.base), "--run", run, "--no-progress", *args], env, cwd=cwd)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.timeout(120)
def test_a_helper_module_edited_between_two_runs_is_used_as_edited(spool: Spool, agents, env, tmp_path: Path) -> None:
    """The task file imports helper.py; K = 10, then 20: the next run on the same warm agents says 20."""
    proj = project(tmp_path / "proj", {"job.py": "import helper\n\ndef f(chunk_id):\n    return helper.K\n",
                                       "helper.py": "K = 10\n"})
    agents(2)
    feed(spool, env, proj, "e3", "--task", "job.py:f", "--chunks", "6")
    (proj / "helper.py").write_text("K = 20  # edited\n")
    feed(spool, env, proj, "e4", "--task", "job.py:f", "--chunks", "6")
    assert values(spool, "e3") == [10] * 6 and values(spool, "e4") == [20] * 6


@pytest.mark.timeout(120)
def test_a_helper_edited_while_its_run_goes_on_is_picked_up_by_the_next_chunk(spool: Spool, agents, env,
                                                                            tmp_path: Path) -> None:
    """Chunk 2 of a run edits the helper its chunks import: the chunks after it (one agent, in
    order) compute with the edited one, in a fresh worker."""
    proj = project(tmp_path / "proj", {
        "job.py": """\
            import os
            import helper

            def f(chunk_id):
                if chunk_id == 2:
                    with open(os.path.join(os.path.dirname(__file__), "helper.py"), "w") as out:
                        out.write("K = 'edited'\\n")
                return [helper.K, os.getpid()]
            """,
        "helper.py": "K = 'first'\n"})
    agents(1)
    feed(spool, env, proj, "live", "--task", "job.py:f", "--chunks", "6")
    got = values(spool, "live")
    assert [k for k, _ in got] == ["first"] * 3 + ["edited"] * 3, got
    assert len({pid for _, pid in got[:3]}) == 1 and len({pid for _, pid in got[3:]}) == 1
    assert got[0][1] != got[3][1]  # a fresh worker, not a reload


@pytest.mark.timeout(120)
def test_a_model_cached_at_module_level_never_leaks_into_the_next_run(spool: Spool, agents, env,
                                                                      tmp_path: Path) -> None:
    """The obvious way to keep a model loaded: built from `shared` on the first chunk, kept in a
    module global. A run with weights2.npz, then one with weights1.npz of the same module: each
    run's chunks compute with its own weights."""
    proj = project(tmp_path / "proj", {"model.py": """\
        _model = None

        def predict(chunk_id, shared):
            global _model
            if _model is None:
                _model = shared["W"].copy()
            return float(_model.sum())
        """})
    np.savez(proj / "weights1.npz", W=np.ones(4))
    np.savez(proj / "weights2.npz", W=np.full(4, 2.0))
    agents(2)
    feed(spool, env, proj, "w2", "--task", "model.py:predict", "--chunks", "8", "--shared", "weights2.npz")
    feed(spool, env, proj, "w1b", "--task", "model.py:predict", "--chunks", "8", "--shared", "weights1.npz")
    assert values(spool, "w2") == [8.0] * 8 and values(spool, "w1b") == [4.0] * 8


@pytest.mark.timeout(120)
def test_env_reaches_the_worker_before_any_import_and_threads_default_to_a_share_of_the_cores(
        spool: Spool, agents, env, tmp_path: Path) -> None:
    """`--env OMP_NUM_THREADS=3` is what a library reads at import; without it, a worker gets its
    share of the host's usable cores (one agent here: all of them), and the heartbeat says so."""
    proj = project(tmp_path / "proj", {"threads.py": """\
        import os

        AT_IMPORT = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}

        def f(chunk_id):
            return AT_IMPORT
        """})
    env = {k: v for k, v in env.items() if not k.endswith("_NUM_THREADS")}
    a = agents(1, env_=env)[0]
    feed(spool, env, proj, "plain", "--task", "threads.py:f", "--chunks", "2")
    feed(spool, env, proj, "three", "--task", "threads.py:f", "--chunks", "2", "--env", "OMP_NUM_THREADS=3")
    share = str(usable_cores())
    assert values(spool, "plain") == [{"OMP_NUM_THREADS": share, "MKL_NUM_THREADS": share,
                                       "OPENBLAS_NUM_THREADS": share}] * 2
    assert values(spool, "three") == [{"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": share,
                                       "OPENBLAS_NUM_THREADS": share}] * 2
    assert (a.heartbeat() or {}).get("worker_threads") == int(share)


@pytest.mark.timeout(120)
def test_threads_set_in_the_agents_environment_are_left_alone(spool: Spool, agents, env, tmp_path: Path) -> None:
    proj = project(tmp_path / "proj", {"threads.py": "import os\n\ndef f(chunk_id):\n"
                                                     "    return os.environ.get('OMP_NUM_THREADS')\n"})
    agents(1, env_={**env, "OMP_NUM_THREADS": "7"})
    feed(spool, env, proj, "seven", "--task", "threads.py:f", "--chunks", "2")
    assert values(spool, "seven") == ["7", "7"]


USER_PROJECT = {
    "agent.py": """\
        from jobs import JOBS
        from master import MASTER
        from examples.things import THING

        class PPOAgent:
            name = "ppo"

        def act(chunk_id):
            return [PPOAgent.name, JOBS, MASTER, THING, chunk_id]

        def decide(x):
            return act(x)
        """,
    "jobs.py": "JOBS = 'user jobs'\n",
    "master.py": "MASTER = 'user master'\n",
    "examples/__init__.py": "",
    "examples/things.py": "THING = 'user examples'\n",
}


@pytest.mark.timeout(180)
def test_a_project_with_its_own_agent_jobs_master_and_examples_works(tmp_path: Path) -> None:
    """An RL project's `from agent import PPOAgent` failed every chunk with ImportError: the workers
    imported the pool's own `agent`. Agents started as users start them (./start_agents.sh, no
    PYTHONPATH), the run fed from the project's folder."""
    proj = project(tmp_path / "rl", USER_PROJECT)
    base = tmp_path / "base"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(GPUPOOL_LOCK_DIR=str(tmp_path / "locks"), GPUPOOL_HOST_ID="testhost")
    start = subprocess.run([str(REPO / "start_agents.sh"), "2", str(base), "--cpu"], cwd=proj, env=env,
                           capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        r = run_main(["--base", str(base), "--task", "agent:act", "--chunks", "4", "--run", "rl", "--no-progress"],
                     env, cwd=proj)
        assert r.returncode == 0, r.stdout + r.stderr
        assert values(Spool(base), "rl") == [["ppo", "user jobs", "user master", "user examples", c] for c in range(4)]
        # a command job inherits nothing of the pool's on its PYTHONPATH either
        r = run_main(["--base", str(base), "--cmd", "echo PP=[$PYTHONPATH]", "--chunks", "1", "--run", "pp",
                      "--no-progress"], env, cwd=proj)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "PP=[]" in (base / "logs" / "pp" / "000000.log").read_text()
    finally:
        subprocess.run([str(REPO / "start_agents.sh"), "stop", str(base), "--now"], env=env, capture_output=True,
                       timeout=120)


@pytest.mark.timeout(180)
def test_an_executor_script_beside_its_own_master_and_jobs_modules_works(spool: Spool, agents, env,
                                                                          tmp_path: Path) -> None:
    """The user's own process: a script that uses the Executor, with `master.py` and `jobs.py`
    beside it, imports the pool as gpupool and its own modules as themselves."""
    proj = project(tmp_path / "rl", {**USER_PROJECT, "run.py": f"""\
        import master, jobs
        from gpupool.master.executor import Executor
        import agent

        if __name__ == "__main__":
            with Executor({str(spool.base)!r}) as ex:
                print(master.MASTER, jobs.JOBS, list(ex.map(agent.decide, range(3))))
        """})
    agents(2)
    r = subprocess.run([sys.executable, "run.py"], cwd=proj, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    row = ["ppo", "user jobs", "user master", "user examples"]
    assert r.stdout.strip() == f"user master user jobs {[row + [c] for c in range(3)]}", r.stdout


SETUP = """\
    import os

    def load(shared, device, scale, marks):
        with open(marks, "a") as out:
            out.write(f"{os.getpid()}\\n")
        return {"w": shared["W"] * scale, "pid": os.getpid(), "device": device}

    def infer(chunk_id, state, scale, marks):
        return [state["pid"], os.getpid(), float(state["w"].sum()), state["device"]]

    def broken(shared):
        raise RuntimeError("the weights are not where they should be")

    def from_path(path):
        return path
    """


@pytest.mark.timeout(180)
def test_setup_is_called_once_per_worker_of_a_run_and_its_value_is_each_chunks_state(
        spool: Spool, agents, env, tmp_path: Path) -> None:
    proj = project(tmp_path / "proj", {"model.py": SETUP})
    np.savez(proj / "W.npz", W=np.ones(3))
    agents(2)
    for run, marks in (("s1", tmp_path / "marks1"), ("s2", tmp_path / "marks2")):
        feed(spool, env, proj, run, "--task", "model.py:infer", "--setup", "model.py:load", "--chunks", "12",
             "--shared", "W.npz", "--kwargs", json.dumps({"scale": 2.0, "marks": str(marks)}))
    workers = []
    for run, marks in (("s1", tmp_path / "marks1"), ("s2", tmp_path / "marks2")):
        got = values(spool, run)
        assert all(state_pid == pid and total == 6.0 and device == "cpu" for state_pid, pid, total, device in got), got
        calls = marks.read_text().split()
        assert sorted(calls) == sorted({str(pid) for _, pid, _, _ in got}), (calls, got)  # once in each worker
        workers.append(set(calls))
    assert workers[0].isdisjoint(workers[1])  # the next run: its own workers, its own setup


@pytest.mark.timeout(120)
def test_a_setup_that_raises_fails_its_chunks_naming_it_and_a_bad_setup_is_refused_at_submit(
        spool: Spool, agents, env, tmp_path: Path) -> None:
    proj = project(tmp_path / "proj", {"model.py": SETUP})
    np.savez(proj / "W.npz", W=np.ones(3))
    agents(1)
    r = run_main(["--base", str(spool.base), "--run", "bad", "--no-progress", "--task", "model.py:infer", "--setup",
                  "model.py:broken", "--chunks", "2", "--shared", "W.npz", "--retries", "0", "--kwargs",
                  json.dumps({"scale": 1, "marks": "x"})], env, cwd=proj)
    assert r.returncode == 1
    res = results(spool.base, "bad")
    assert all(rec["status"] == "failed" and rec["error"]["setup"].endswith("model.py:broken")
               and "the weights are not where they should be" in rec["error"]["message"] for rec in res.values()), res
    run_kwargs = {"marks": "m", "scale": 1}
    for setup, kwargs, says in (("model.py:nothing", run_kwargs, "defines no top-level function or name 'nothing'"),
                                ("model.py:from_path", run_kwargs, "from_path() needs ['path']"),
                                ("model.py:load", {**run_kwargs, "state": 1}, "'state'"),
                                ("model.py:load", {}, "infer() needs ['scale', 'marks']")):  # the task's, first
        r = run_main(["--base", str(spool.base), "--run", "refused", "--no-progress", "--task", "model.py:infer",
                      "--chunks", "2", "--shared", "W.npz", "--setup", setup, "--kwargs", json.dumps(kwargs)], env,
                     cwd=proj)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.timeout(180)
def test_executor_initializer_runs_once_per_worker_and_a_failing_one_breaks_the_executor(
        spool: Spool, agents, tmp_path: Path) -> None:
    from concurrent.futures.process import BrokenProcessPool

    from gpupool.master.executor import Executor
    from tests import warm_tasks

    agents(2)
    marks = tmp_path / "marks"
    with Executor(spool.base, initializer=warm_tasks.init, initargs=("hello", str(marks))) as ex:
        got = list(ex.map(warm_tasks.tagged, range(10)))
    assert [x for _, _, x in got] == list(range(10)) and {tag for tag, _, _ in got} == {"hello"}
    assert sorted(marks.read_text().split()) == sorted({str(pid) for _, pid, _ in got})
    with Executor(spool.base, initializer=warm_tasks.init_fails, initargs=(3,)) as ex:
        futures = [ex.submit(warm_tasks.tagged, x) for x in range(4)]
        for f in futures:
            with pytest.raises(BrokenProcessPool) as caught:
                f.result(timeout=60)
        assert "init_fails" in str(caught.value) and "no weights at 3" in str(caught.value)
        with pytest.raises(BrokenProcessPool):
            ex.submit(warm_tasks.tagged, 5)
