"""GPUs for real (issue 13): a poisoned CUDA context is replaced, an agent whose GPU keeps failing
drains itself, GPU memory is given back. The worker's side of torch is faked by tests/fake_torch,
put on the workers' PYTHONPATH through the agents' environment (never imported here)."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gpupool.agent.agent import Agent, AgentConfig
from gpupool.agent.gpu import Gpu, NoGpu
from gpupool.agent.slot import Slot
from gpupool.agent.worker_process import Session, gpu_fault, handle
from gpupool.agent.worker_control import Worker
from gpupool.jobs.descriptor import Job, JobKind
from gpupool.jobs.mailbox import Mailbox
from gpupool.jobs.paths import Spool
from gpupool.jobs.results import read_result
from tests.helpers import HOST, REPO, InProcessWorker, base_env, results, run_main, wait_for

FAKE_TORCH = str(REPO / "tests" / "fake_torch")
TASK = "tests.gputasks:step"


def torch_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = base_env(tmp_path, **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), FAKE_TORCH])
    return env


def main_args(spool: Spool, run: str, chunks: int, kwargs: dict, *extra: str) -> list[str]:
    return ["--base", str(spool.base), "--task", TASK, "--chunks", str(chunks), "--kwargs", json.dumps(kwargs),
            "--run", run, "--no-progress", *extra]


def marks_of(path: Path) -> list[tuple[int, int]]:
    """(chunk, worker pid) of each start mark, in the order the chunks started."""
    out = []
    for line in path.read_text().splitlines():
        event, chunk, _agent, pid = line.split()
        if event == "start":
            out.append((int(chunk), int(pid)))
    return out


def history(spool: Spool, run: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(spool.result_dir(run).glob("*.a*.json"))]


# the worker's judgement, in this process (torch is not imported here) ------------------------------
@pytest.mark.parametrize("exc, kind", [
    (RuntimeError("CUDA error: device-side assert triggered"), "kernel"),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), "kernel"),
    (RuntimeError("CUDA error: unspecified launch failure"), "kernel"),
    (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, opb, m, n, k, ...)`"),
     "kernel"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out_of_memory"),
    (RuntimeError("CUDA error: out of memory"), "out_of_memory"),
    (RuntimeError("Found no NVIDIA driver on your system."), "driver"),
    (RuntimeError("CUDA error: no CUDA-capable device is detected"), "driver"),
    (RuntimeError("CUDA driver initialization failed, you might not have a CUDA gpu."), "driver"),
    (ValueError("chunk refuses"), None),
    (MemoryError(), None),
])
def test_gpu_faults_are_told_apart_by_their_message(exc: BaseException, kind: str | None) -> None:
    assert gpu_fault(exc) == kind


def test_a_gpu_fault_raised_from_another_exception_is_still_seen() -> None:
    try:
        try:
            raise RuntimeError("CUDA error: device-side assert triggered")
        except RuntimeError as e:
            raise ValueError("inference failed") from e
    except ValueError as e:
        assert gpu_fault(e) == "kernel"


def test_a_kernel_error_marks_the_reply_poisoned_and_keeps_the_jobs_own_type_and_message(tmp_path: Path) -> None:
    (tmp_path / "t.py").write_text("def f():\n    raise RuntimeError('CUDA error: device-side assert triggered')\n")
    job = Job(run="r", chunk_id=0, total_chunks=1, kind=JobKind.CALLABLE, target=f"{tmp_path / 't.py'}:f")
    reply = handle({"job": job.to_dict(), "gpu_id": 0, "device": "cpu", "arrays_path": str(tmp_path / "0.npz")},
                   Session())
    err = reply["error"]
    assert not reply["ok"] and err["type"] == "RuntimeError" and "device-side assert" in err["message"]
    assert err["gpu_error"] == "kernel" and "device-side assert" in err["poisoned"]


# one step of the agent, its worker a real process --------------------------------------------------
def _agent(spool: Spool, make_worker: Any, gpu: bool = False, **cfg: Any) -> Agent:
    slot = Slot("t-gpu0" if gpu else "t-cpu0", 0, Gpu(0, "0", "GPU-fake-0", "Fake") if gpu else None, [])
    a = Agent(spool, slot, NoGpu(), "t", AgentConfig(**{"watch": "poll", "prune_quiet": 0.0, "spare_worker": False,
                                                        **cfg}), make_worker=make_worker)
    a.mailbox.ensure()
    return a


def _put(spool: Spool, agent: Agent, *jobs: Job) -> None:
    for j in jobs:
        spool.result_dir(j.run).mkdir(parents=True, exist_ok=True)
    Mailbox(spool, agent.id).update(lambda js: js + list(jobs))


def _job(chunk: int, modes: list[str], run: str = "r", **kw: Any) -> Job:
    return Job(run=run, chunk_id=chunk, total_chunks=8, kind=JobKind.CALLABLE, target=TASK, workdir=str(REPO),
               kwargs={"modes": modes, **kw})


@pytest.mark.timeout(60)
def real_workers(spool: Spool, tmp_path: Path) -> tuple[list[Worker], Any]:
    """Real worker processes with the fake torch on their path: (those made so far, an agent's make_worker)."""
    made: list[Worker] = []

    def make(env: dict[str, str], preload: tuple[str, ...]) -> Worker:
        made.append(Worker({**env, "PYTHONPATH": torch_env(tmp_path)["PYTHONPATH"]}, spool.worker_log("t-cpu0"),
                           cwd=str(REPO), preload=preload))
        return made[-1]
    return made, make


def test_the_job_sent_ahead_to_a_poisoned_worker_runs_on_the_fresh_one(spool: Spool, tmp_path: Path) -> None:
    made, make = real_workers(spool, tmp_path)
    agent = _agent(spool, make)
    modes = ["assert", "ok", "ok"]
    _put(spool, agent, *(_job(c, modes) for c in range(3)))
    agent._durations["r"] = 0.01  # short chunks: the next one waits in the worker's pipe (pipelining)
    try:
        assert agent.step()
        rec = read_result(spool.result_json("r", 0))
        assert rec["status"] == "failed" and rec["error"]["type"] == "RuntimeError"
        assert "device-side assert" in rec["error"]["message"] and rec["error"]["gpu_error"] == "kernel"
        assert "device-side assert" in rec["error"]["poisoned"]
        assert agent.runner.ahead is not None and agent.runner.ahead.chunk_id == 1  # sent again, to the fresh worker
        assert len(made) == 2 and agent.worker is made[1]
        fresh = made[1].pid
        assert fresh != made[0].pid
        assert agent.step() and agent.step()
        for c in (1, 2):
            rec = read_result(spool.result_json("r", c))
            assert rec["status"] == "ok" and rec["value"]["pid"] == fresh, rec
    finally:
        agent.runner.workers.stop_all()


@pytest.mark.timeout(60)
def test_a_job_sent_again_to_a_fresh_worker_and_taken_back_is_no_longer_its_first(spool: Spool, tmp_path: Path
                                                                                 ) -> None:
    """Sent again to the fresh worker after a poisoned context, the job is that process's first (an
    out-of-memory there would be the GPU's fault); taken back (the agent drains), it is not any
    more, or it would count as one whenever it ran here later."""
    made, make = real_workers(spool, tmp_path)
    agent = _agent(spool, make)
    _put(spool, agent, *(_job(c, ["assert", "ok"]) for c in range(2)))
    agent._durations["r"] = 0.01
    try:
        assert agent.step()
        ahead = agent.runner.ahead
        assert ahead is not None and ahead.chunk_id == 1
        agent.runner.take_back()
        assert agent.runner.ahead is None and not agent.runner.was_first(ahead)
    finally:
        agent.runner.workers.stop_all()


def _raising(tmp_path: Path, message: str) -> str:
    (tmp_path / "gpu_broken.py").write_text(f"def f(chunk_id):\n    raise RuntimeError({message!r})\n")
    return f"{tmp_path / 'gpu_broken.py'}:f"


def test_a_gpu_agent_drains_itself_after_three_different_chunks_fail_with_driver_errors(spool: Spool,
                                                                                     tmp_path: Path) -> None:
    target = _raising(tmp_path, "CUDA error: no CUDA-capable device is detected")
    worker = InProcessWorker()
    agent = _agent(spool, worker.make, gpu=True)
    jobs = [Job(run="r", chunk_id=c, total_chunks=8, kind=JobKind.CALLABLE, target=target, max_attempts=3)
            for c in range(5)]
    _put(spool, agent, *jobs)
    assert agent.step() and agent.step()
    assert not spool.drain_flag(agent.id).exists() and worker.starts == 3  # the first, and a fresh one after each
    assert agent.step()
    assert spool.drain_flag(agent.id).exists()
    assert "drained itself: 3 different chunks" in agent.last_error and "no CUDA-capable device" in agent.last_error
    assert not agent.step()  # draining: chunks 3 and 4 stay queued for other agents
    assert not spool.result_json("r", 3).exists()
    os.unlink(spool.drain_flag(agent.id))  # python -m master undrain
    assert agent.step() and agent.last_error is None and not spool.drain_flag(agent.id).exists()


def test_the_same_chunk_failing_again_or_a_cpu_agent_never_drains(spool: Spool, tmp_path: Path) -> None:
    target = _raising(tmp_path, "CUDA error: no CUDA-capable device is detected")
    worker = InProcessWorker()
    gpu = _agent(spool, worker.make, gpu=True)
    _put(spool, gpu, *(Job(run="r", chunk_id=0, total_chunks=1, kind=JobKind.CALLABLE, target=target, attempt=a,
                           max_attempts=4) for a in (1, 2, 3, 4)))
    for _ in range(4):
        assert gpu.step()
    assert worker.starts == 5  # each attempt in a fresh worker (and one after the last)
    assert not spool.drain_flag(gpu.id).exists()  # one chunk, whatever its attempts: it may be the chunk
    cpu = _agent(spool, InProcessWorker().make)  # on a CPU agent, a job that uses CUDA fails by its own doing
    _put(spool, cpu, *(Job(run="c", chunk_id=c, total_chunks=4, kind=JobKind.CALLABLE, target=target)
                       for c in range(4)))
    for _ in range(4):
        assert cpu.step()
    assert not spool.drain_flag(cpu.id).exists()


def test_the_jobs_own_cuda_errors_never_drain_an_agent(spool: Spool, tmp_path: Path) -> None:
    """A run whose kernels assert poisons each worker it runs in: its chunks fail, each replaced
    worker is fresh, yet no agent drains (the bug is the run's, not the GPU's)."""
    target = _raising(tmp_path, "CUDA error: device-side assert triggered")
    worker = InProcessWorker()
    agent = _agent(spool, worker.make, gpu=True)
    _put(spool, agent, *(Job(run="r", chunk_id=c, total_chunks=4, kind=JobKind.CALLABLE, target=target)
                         for c in range(4)))
    for _ in range(4):
        assert agent.step()
    assert worker.starts == 5 and not spool.drain_flag(agent.id).exists()


# real agents, real main.py ------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_poisoned_context_costs_its_own_chunk_only_and_the_worker_is_replaced_once(spool: Spool, agents,
                                                                                       tmp_path: Path) -> None:
    env = torch_env(tmp_path)
    a = agents(1, env_=env)[0]
    marks = tmp_path / "marks"
    modes = ["ok"] * 3 + ["assert"] + ["ok"] * 8
    r = run_main(main_args(spool, "poison", len(modes), {"modes": modes, "marks": str(marks)}, "--retries", "0"), env)
    assert r.returncode == 1, r.stdout + r.stderr
    res = results(spool.base, "poison")
    assert sorted(res) == list(range(len(modes)))
    assert [c for c in res if res[c]["status"] != "ok"] == [3], res
    err = res[3]["error"]
    assert err["type"] == "RuntimeError" and "device-side assert" in err["message"]  # the job's own
    assert err["gpu_error"] == "kernel" and "device-side assert" in err["poisoned"]  # and why the worker went
    started = marks_of(marks)
    assert sorted(c for c, _ in started) == list(range(len(modes)))  # each chunk ran once: none lost, none twice
    pids = [pid for _, pid in started]
    changes = [i for i in range(1, len(pids)) if pids[i] != pids[i - 1]]
    assert len(changes) == 1 and started[changes[0] - 1][0] == 3, started  # replaced once, right after chunk 3
    assert {res[c]["value"]["pid"] for c in res if c != 3} <= set(pids)
    wait_for(lambda: (a.heartbeat() or {}).get("worker_pid") == pids[-1], 10, "the heartbeat naming the fresh worker")
    assert a.output().count("CUDA context unusable after poison chunk 3") == 1
    assert a.proc.poll() is None


@pytest.mark.timeout(120)
def test_a_context_found_unusable_after_the_jobs_other_error_is_replaced_too(spool: Spool, agents,
                                                                             tmp_path: Path) -> None:
    env = torch_env(tmp_path)
    agents(1, env_=env)
    modes = ["poison_quietly", "ok", "ok"]
    r = run_main(main_args(spool, "quiet", 3, {"modes": modes}, "--retries", "0"), env)
    assert r.returncode == 1, r.stdout + r.stderr
    res = results(spool.base, "quiet")
    assert res[0]["error"]["type"] == "ValueError" and res[0]["error"]["gpu_error"] == "context"
    assert "synchronize() failed" in res[0]["error"]["poisoned"]
    assert "illegal memory access" in res[0]["error"]["poisoned"]
    assert res[1]["status"] == res[2]["status"] == "ok"


@pytest.mark.timeout(180)
def test_an_agent_whose_gpu_keeps_failing_drains_itself_and_the_other_agent_does_the_run(spool: Spool, agents,
                                                                                         tmp_path: Path) -> None:
    gpus = json.dumps([{"name": "Fake A"}, {"name": "Fake B"}])
    broken = torch_env(tmp_path, GPUPOOL_FAKE_GPUS=gpus, FAKE_TORCH_DRIVER_ERROR="1")
    good = torch_env(tmp_path, GPUPOOL_FAKE_GPUS=gpus)
    sick = agents(1, first=0, env_=broken, cpu=False)[0]
    feeder = subprocess.Popen([sys.executable, "main.py", *main_args(spool, "sick", 10, {"modes": ["ok"]},
                                                                     "--retries", "5", "--retry-delay", "0.05")],
                              cwd=REPO, env=good, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        hb = wait_for(lambda: (h := sick.heartbeat()) and h["state"] == "draining" and h, 90,
                      "the agent with the broken GPU to drain itself")
        assert "drained itself: 3 different chunks" in hb["last_error"]
        assert "CUDA driver initialization failed" in hb["last_error"], hb["last_error"]
        healthy = agents(1, first=1, env_=good, cpu=False)[0]
        out, err = feeder.communicate(timeout=120)
    finally:
        if feeder.poll() is None:
            feeder.kill()
    assert feeder.returncode == 0, out + err
    res = results(spool.base, "sick")
    assert sorted(res) == list(range(10)) and all(r["status"] == "ok" for r in res.values())
    assert {r["agent"] for r in res.values()} == {healthy.id}
    failed = [h for h in history(spool, "sick") if h.get("agent") == sick.id]
    assert len({h["chunk_id"] for h in failed}) >= 3
    assert all(h["error"]["gpu_error"] == "driver" and h["error"]["poisoned"] for h in failed), failed
    assert spool.drain_flag(sick.id).exists()
    st = subprocess.run([sys.executable, "-m", "master", "status", "--base", str(spool.base), "--json"], cwd=REPO,
                        env=good, capture_output=True, text=True, timeout=60)
    row = next(a for a in json.loads(st.stdout)["agents"] if a["id"] == sick.id)
    assert row["state"] == "draining" and row["drain_flag"] and "drained itself" in row["last_error"], row
    text = subprocess.run([sys.executable, "-m", "master", "status", "--base", str(spool.base)], cwd=REPO, env=good,
                          capture_output=True, text=True, timeout=60).stdout
    assert f"{sick.id} (draining): " in text and "drained itself: 3 different chunks" in text, text
    assert sick.output().count("drained itself") == 1


@pytest.mark.timeout(180)
def test_every_run_gets_a_worker_of_its_own_which_its_chunks_share_and_which_goes_when_it_is_over(
        spool: Spool, agents, tmp_path: Path) -> None:
    """Issue 22: a worker reused by the next run computed it with the last run's code and model.
    Two runs of the same module, then a run of another: three workers, one per run, each kept for
    all the chunks of its run; once the runs are over, their workers are gone (GPU memory back)."""
    env = torch_env(tmp_path)
    a = agents(1, env_=env)[0]

    def pids(run: str) -> set[int]:
        res = results(spool.base, run)
        assert res and all(r["status"] == "ok" for r in res.values()), res
        return {r["value"]["pid"] for r in res.values()}

    for run, kwargs in (("a1", {"modes": ["ok"]}), ("a2", {"modes": ["ok", "ok"]})):
        r = run_main(main_args(spool, run, 6, kwargs), env)
        assert r.returncode == 0, r.stdout + r.stderr
    r = run_main(["--base", str(spool.base), "--task", "examples.noop:env_probe", "--chunks", "6", "--run", "b",
                  "--no-progress"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    each = [pids(run) for run in ("a1", "a2", "b")]
    assert [len(p) for p in each] == [1, 1, 1] and len(set().union(*each)) == 3, each
    gone = set().union(*each)
    wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in gone), 30, "the workers of the runs that are over")
    wait_for(lambda: (a.heartbeat() or {}).get("workers") == [], 10, "a heartbeat naming no worker")


@pytest.mark.timeout(120)
def test_max_jobs_per_worker_starts_a_fresh_worker_after_n_jobs(spool: Spool, agents, tmp_path: Path) -> None:
    env = torch_env(tmp_path)
    agents(1, env_=env, args=["--max-jobs-per-worker", "2"])
    r = run_main(["--base", str(spool.base), "--task", "examples.noop:env_probe", "--chunks", "7", "--run", "n",
                  "--no-progress", "--batch", "1"], env)  # a job a chunk (a batch is one job of its worker)
    assert r.returncode == 0, r.stdout + r.stderr
    res = sorted(results(spool.base, "n").values(), key=lambda r: r["started_at"])
    pids = [r["value"]["pid"] for r in res]
    runs = [len(list(g)) for _, g in itertools.groupby(pids)]
    assert runs == [2, 2, 2, 1] and len(set(pids)) == 4, pids


@pytest.mark.timeout(120)
def test_out_of_memory_frees_gpu_memory_before_the_next_job_in_the_same_worker(spool: Spool, agents,
                                                                                tmp_path: Path) -> None:
    log = tmp_path / "torch.log"
    env = torch_env(tmp_path, FAKE_TORCH_LOG=str(log))
    agents(1, env_=env)
    modes = ["ok", "oom", "ok", "oom_text", "ok"]
    r = run_main(main_args(spool, "oom", len(modes), {"modes": modes}, "--retries", "0"), env)
    assert r.returncode == 1, r.stdout + r.stderr
    res = results(spool.base, "oom")
    assert res[1]["error"]["type"] == "OutOfMemoryError" and res[3]["error"]["type"] == "RuntimeError"
    for c in (1, 3):
        assert res[c]["error"]["gpu_error"] == "out_of_memory" and "poisoned" not in res[c]["error"]
    ok_pids = {res[c]["value"]["pid"] for c in (0, 2, 4)}
    assert len(ok_pids) == 1  # no fresh worker for an out-of-memory error: the memory is given back instead
    assert log.read_text().splitlines() == [f"empty_cache {ok_pids.pop()}"] * 2


@pytest.mark.timeout(120)
def test_a_gpu_lost_at_run_time_drains_its_agent_whose_heartbeat_goes_on(spool: Spool, agents,
                                                                        tmp_path: Path) -> None:
    """NVML's "GPU is lost": the heartbeat used to stop (and thousands of log lines piled up); now
    it reports the error, the agent drains itself (said once), and its queued jobs go elsewhere."""
    lost = tmp_path / "gpu0.lost"
    gpus = json.dumps([{"name": "Fake A", "lost_if": str(lost)}, {"name": "Fake B"}])
    env = torch_env(tmp_path, GPUPOOL_FAKE_GPUS=gpus)
    sick, well = agents(2, env_=env, cpu=False)
    lost.touch()
    hb = wait_for(lambda: (h := sick.heartbeat()) and h["state"] == "draining" and h, 60, "the agent to drain")
    assert "GpuIsLost" in hb["gpu"]["error"] and "its GPU does not answer" in hb["last_error"]
    seq = hb["seq"]
    wait_for(lambda: sick.heartbeat()["seq"] > seq + 2, 30, "heartbeats going on")
    r = run_main(main_args(spool, "after-lost", 6, {"modes": ["ok"] * 6}), env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {rec["agent"] for rec in results(spool.base, "after-lost").values()} == {well.id}
    out = sick.output()
    assert out.count("its GPU does not answer: ") == 1 and out.count("drained itself") == 1, out
    assert sick.proc.poll() is None
    lost.unlink()  # back (a reset): undrained by hand, it serves again
    subprocess.run([sys.executable, "-m", "master", "undrain", "--base", str(spool.base), sick.id], cwd=REPO, env=env,
                   capture_output=True, timeout=60, check=True)
    wait_for(lambda: sick.heartbeat()["state"] == "idle" and not (sick.heartbeat()["gpu"] or {}).get("error"), 30,
             "the agent serving again")
