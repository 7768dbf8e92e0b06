"""Several GPUs per job and several jobs per GPU (docs/multigpu.md), with real agents over the stand-in
pynvml (tests/fake_nvml), so the real probe runs: agents holding two GPUs each, a run's
--gpus-per-job, two slots sharing one GPU, and --gpu-mem holding a slot back."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gpupool.jobs.descriptor import Job, JobKind
from gpupool.jobs.errors import BadFile
from gpupool.jobs.paths import Spool
from tests.helpers import FAST, REPO, results, run_main, wait_for
from tests.test_nvml import nvml, nvml_env, stop_all, uuids  # noqa: F401 (nvml, stop_all: fixtures)

FOUR = {"gpus": [{"name": "NVIDIA H200", "mem_total_gb": 141}] * 4}
ONE = {"gpus": [{"name": "NVIDIA H200", "mem_total_gb": 16, "mem_used_gb": 6}]}  # 10 GB free
# each chunk says it started, sees the GPUs it is given, and waits for the test's gate
GATED = ("touch {dir}/started{chunk_id}; printf '%s' \"$CUDA_VISIBLE_DEVICES\" > {dir}/cvd{chunk_id}; "
         "printf '%s' \"$CUDA_MPS_PIPE_DIRECTORY\" > {dir}/mps{chunk_id}; "
         "while [ ! -e {dir}/gate ]; do sleep 0.05; done")


def heartbeat(base: Path, ident: str) -> dict[str, Any]:
    try:
        return json.loads((base / "agents" / f"{ident}.json").read_text())
    except (OSError, ValueError):
        return {}


def status(base: Path, env: dict[str, str], *flags: str) -> str:
    out = subprocess.run([sys.executable, "-m", "master", "status", "--base", str(base), *flags], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def host_gpus(env: dict[str, str]) -> list[dict[str, Any]]:
    """``python -m master gpus --json``: this host's GPUs and the agents holding each."""
    out = subprocess.run([sys.executable, "-m", "master", "gpus", "--json"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def agent(base: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """``python -m agent --burst``: it refuses to start, or starts and exits once its mailbox is empty."""
    return subprocess.run([sys.executable, "-m", "agent", "--base", str(base), "--burst", *FAST, *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)


def gated_run(base: Path, env: dict[str, str], tmp_path: Path, run: str, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "main.py", "--base", str(base), "--cmd", GATED, "--kwargs",
                             json.dumps({"dir": str(tmp_path)}), "--chunks", "2", "--run", run, "--no-progress",
                             *flags], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# several GPUs per agent -----------------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_agents_holding_two_gpus_each_give_a_job_both_as_cuda_0_and_1(spool: Spool, tmp_path: Path, stop_all) -> None:
    env = nvml_env(tmp_path, FOUR)
    ids = uuids(tmp_path, FOUR)
    started = subprocess.run([str(REPO / "start_agents.sh"), "4", str(spool.base), "--gpus-per-agent", "2",
                              "--timeout", "60", "--", *FAST], env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    assert sorted(p.stem for p in (spool.base / "agents").glob("*.json")) == ["testhost-gpu0+1", "testhost-gpu2+3"]
    hb = heartbeat(spool.base, "testhost-gpu2+3")
    assert hb["gpu_uuids"] == ids[2:] and hb["gpu_ids"] == [2, 3] and [g["uuid"] for g in hb["gpus"]] == ids[2:]
    assert hb["gpu"]["uuid"] == ids[2] and all(g["mem_total"] == 141 * 2**30 for g in hb["gpus"])  # NVML's figures
    # every GPU of an agent is locked on the host: a one-GPU agent cannot take GPU 3
    assert agent(spool.base, env, "--gpu", "3").returncode == 3
    row = {a["id"]: a for a in json.loads(status(spool.base, env, "--json"))["agents"]}["testhost-gpu0+1"]
    assert row["gpus"] == 2 and row["gpu_ids"] == [0, 1] and row["gpu_mem_total"] == 2 * 141 * 2**30
    assert "2x NVIDIA H200" in status(spool.base, env)
    assert [g["agent"] for g in host_gpus(env)] == ["testhost-gpu0+1"] * 2 + ["testhost-gpu2+3"] * 2

    out = tmp_path / "out"
    r = run_main(["--base", str(spool.base), "--cmd", "mkdir -p {out}; printf '{{\"cvd\": \"%s\", \"device\": "
                  "\"{device}\"}}' \"$CUDA_VISIBLE_DEVICES\" > {out}/{chunk_id}.json", "--kwargs",
                  json.dumps({"out": str(out)}), "--result-file", str(out / "{chunk_id}.json"), "--chunks", "4",
                  "--gpus-per-job", "2", "--run", "pairs", "--no-progress"], env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    seen = {(rec["agent"], rec["value"]["cvd"], rec["value"]["device"])
            for rec in results(spool.base, "pairs").values()}
    assert seen == {("testhost-gpu0+1", f"{ids[0]},{ids[1]}", "cuda:0"),
                    ("testhost-gpu2+3", f"{ids[2]},{ids[3]}", "cuda:0")}
    # an OctoRun-style script there sees its agent's two GPUs too, --gpu_id 0 the first of them
    script = tmp_path / "octo.py"
    script.write_text("import argparse, json, os\np = argparse.ArgumentParser()\n"
                      "for f in ('--gpu_id', '--chunk_id', '--total_chunks', '--out'):\n    p.add_argument(f)\n"
                      "a = p.parse_args()\nopen(os.path.join(a.out, 's' + a.chunk_id), 'w').write(json.dumps("
                      "[a.gpu_id, os.environ['CUDA_VISIBLE_DEVICES']]))\n")
    r = run_main(["--base", str(spool.base), "--script", str(script), "--kwargs", json.dumps({"out": str(out)}),
                  "--chunks", "2", "--gpus-per-job", "2", "--run", "octo", "--no-progress"], env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    pairs = {f"{ids[0]},{ids[1]}", f"{ids[2]},{ids[3]}"}
    assert all(json.loads((out / f"s{c}").read_text())[0] == "0" for c in (0, 1))
    assert {json.loads((out / f"s{c}").read_text())[1] for c in (0, 1)} <= pairs
    # a run that does not ask for two GPUs per job is refused at once, naming what the pool has
    r = run_main(["--base", str(spool.base), "--cmd", "true", "--chunks", "1", "--no-progress"], env, cwd=tmp_path)
    assert r.returncode == 2 and "holds 2 GPUs" in r.stderr and "--gpus-per-job 2" in r.stderr, r.stderr


@pytest.mark.timeout(120)
def test_an_agent_takes_all_of_its_gpus_or_none(spool: Spool, tmp_path: Path, agents) -> None:
    env = nvml_env(tmp_path, FOUR)
    agents(1, first=1, env_=env, cpu=False)  # GPU 1 held by a one-GPU agent
    r = agent(spool.base, env, "--gpu", "0,1")
    assert r.returncode == 3 and "GPU 1" in r.stderr, r.stderr
    agents(1, first=0, env_=env, cpu=False)  # GPU 0 was not left locked by the refused pair
    r = agent(spool.base, env, "--gpus-per-agent", "2")  # --gpu auto: the two GPUs left (--burst: it exits at once)
    assert r.returncode == 0 and heartbeat(spool.base, "testhost-gpu2+3")["gpu_ids"] == [2, 3], r.stderr
    # asking for a shape that does not fit is refused with its fix
    for args, why in ((["--gpus-per-agent", "2", "--gpu", "3"], "give 2 GPU numbers (--gpu 3,4) or --gpu auto"),
                      (["--gpus-per-agent", "2", "--cpu"], "--gpus-per-agent 2 needs GPUs"),
                      (["--gpu", "2,3", "--slots", "2"], "use one or the other"),
                      (["--gpu", "2,2"], "names a GPU twice"), (["--gpu", "0", "--slots", "2", "--slot", "2"],
                                                                 "numbered 0..1")):
        r = agent(spool.base, env, *args)
        assert r.returncode == 2 and why in r.stderr, (args, r.stderr)
    launcher = subprocess.run([str(REPO / "start_agents.sh"), "3", str(spool.base), "--gpus-per-agent", "2"], env=env,
                              capture_output=True, text=True, timeout=60)
    assert launcher.returncode == 1 and "ask for a multiple of 2" in launcher.stderr, launcher.stderr


@pytest.mark.timeout(120)
def test_gpus_per_job_2_on_a_pool_of_one_gpu_agents_is_refused_at_once(spool: Spool, tmp_path: Path, agents) -> None:
    env = nvml_env(tmp_path, FOUR)
    agents(2, env_=env, cpu=False)
    r = run_main(["--base", str(spool.base), "--cmd", "true", "--chunks", "2", "--gpus-per-job", "2", "--no-progress"],
                 env, cwd=tmp_path, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--gpus-per-job 2" in r.stderr and "the pool has 2 agents with 1 GPU" in r.stderr, r.stderr
    assert "testhost-gpu0" in r.stderr and "holds 1 GPU, not the 2 of --gpus-per-job" in r.stderr, r.stderr
    r = run_main(["--base", str(spool.base), "--cmd", "true", "--chunks", "1", "--gpus-per-job", "0"], env,
                 cwd=tmp_path)
    assert r.returncode == 2 and "--gpus-per-job must be a whole number from 1" in r.stderr, r.stderr


def test_a_job_asking_for_gpus_or_memory_needs_an_agent_that_reads_schema_2() -> None:
    job = Job(run="r", chunk_id=0, total_chunks=1, kind=JobKind.CALLABLE, target="m:f", gpus=2, gpu_mem=4.5)
    d = job.to_dict()
    assert d["schema"] == 2 and Job.from_dict(d) == job
    assert Job(run="r", chunk_id=0, total_chunks=1, kind=JobKind.CALLABLE, target="m:f").to_dict()["schema"] == 1
    for bad in ({"gpus": 0}, {"gpus": True}, {"gpu_mem": -1}, {"gpu_mem": "4"}):
        with pytest.raises(BadFile):
            Job.from_dict({**d, **bad})


# several jobs per GPU ------------------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_two_slots_run_two_jobs_at_once_on_one_gpu_each_seeing_only_it(spool: Spool, tmp_path: Path, stop_all) -> None:
    mps = tmp_path / "mps"  # where an MPS control daemon would listen: passed through, never required
    env = nvml_env(tmp_path, ONE, CUDA_MPS_PIPE_DIRECTORY=str(mps))
    started = subprocess.run([str(REPO / "start_agents.sh"), "1", str(spool.base), "--slots", "2", "--timeout", "60",
                              "--", *FAST], env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    assert {heartbeat(spool.base, f"testhost-gpu0s{j}").get("slot") for j in (0, 1)} == {0, 1}
    assert [g["agent"] for g in host_gpus(env)] == ["testhost-gpu0s0, testhost-gpu0s1"]
    # a third agent cannot have the GPU to itself while slots share it
    assert agent(spool.base, env, "--gpu", "0").returncode == 3
    feeder = gated_run(spool.base, env, tmp_path, "both", "--gpu-mem", "4")  # 4 + 4 of the 10 GB free
    try:
        wait_for(lambda: all((tmp_path / f"started{c}").exists() for c in (0, 1)), 60, "both chunks running at once")
        wait_for(lambda: all(heartbeat(spool.base, f"testhost-gpu0s{j}").get("gpu_mem_reserved") for j in (0, 1)),
                 30, "each slot's heartbeat naming its job's memory")
        rows = {a["id"]: a for a in json.loads(status(spool.base, env, "--json"))["agents"]}
        assert [(rows[f"testhost-gpu0s{j}"]["slot"], rows[f"testhost-gpu0s{j}"]["slots"]) for j in (0, 1)] == \
            [(0, 2), (1, 2)]
        assert all(rows[f"testhost-gpu0s{j}"]["gpu_mem_reserved"] == 4 * 2**30 for j in (0, 1))
        table = status(spool.base, env)
        assert "JOB GB" in table and " 0/2 " in table and " 1/2 " in table, table
    finally:
        (tmp_path / "gate").touch()
        out = feeder.communicate(timeout=60)[0]
    assert feeder.returncode == 0, out
    gpu = uuids(tmp_path, ONE)[0]
    assert [(tmp_path / f"cvd{c}").read_text() for c in (0, 1)] == [gpu, gpu]
    assert [(tmp_path / f"mps{c}").read_text() for c in (0, 1)] == [str(mps)] * 2
    assert heartbeat(spool.base, "testhost-gpu0s0")["mps"] == str(mps)
    assert {r["agent"] for r in results(spool.base, "both").values()} == {"testhost-gpu0s0", "testhost-gpu0s1"}


@pytest.mark.timeout(180)
def test_gpu_mem_larger_than_what_is_left_holds_the_second_slot_back(spool: Spool, tmp_path: Path, stop_all) -> None:
    env = nvml_env(tmp_path, ONE)
    started = subprocess.run([str(REPO / "start_agents.sh"), "1", str(spool.base), "--slots", "2", "--timeout", "60",
                              "--", *FAST], env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    feeder = gated_run(spool.base, env, tmp_path, "one-by-one", "--gpu-mem", "6")  # 6 + 6 > the 10 GB free

    def waiting() -> str | None:
        beats = [heartbeat(spool.base, f"testhost-gpu0s{j}") for j in (0, 1)]
        return next((hb["waiting"] for hb in beats if hb.get("waiting")), None)
    try:
        why = wait_for(waiting, 60, "a slot's heartbeat saying its job waits for memory")
        assert "needs 6.0 GB" in why and "it has 4.0 GB" in why and "--gpu-mem 6" in why, why
        wait_for(lambda: any((tmp_path / f"started{c}").exists() for c in (0, 1)), 30, "the other slot's job running")
        assert waiting() and sum((tmp_path / f"started{c}").exists() for c in (0, 1)) == 1  # only one runs
        assert "waits: needs 6.0 GB" in status(spool.base, env)
    finally:
        (tmp_path / "gate").touch()
        out = feeder.communicate(timeout=60)[0]
    assert feeder.returncode == 0, out
    recs = sorted(results(spool.base, "one-by-one").values(), key=lambda r: r["started_at"])
    assert {r["agent"] for r in recs} == {"testhost-gpu0s0", "testhost-gpu0s1"}
    assert recs[1]["started_at"] >= recs[0]["finished_at"]  # the second started once the first gave its memory back
    # a job that could never fit the GPU is refused at submit
    r = run_main(["--base", str(spool.base), "--cmd", "true", "--chunks", "1", "--gpu-mem", "20", "--no-progress"], env,
                 cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "16.0 GB in all, under the run's --gpu-mem 20" in r.stderr, r.stderr


@pytest.mark.timeout(120)
def test_a_slot_takes_its_gpu_while_its_sibling_computes_on_it_but_not_beside_a_stranger(
        spool: Spool, tmp_path: Path) -> None:
    procs = tmp_path / "procs.json"
    procs.write_text("[]")
    env = nvml_env(tmp_path, {"gpus": [{"processes_file": str(procs)}]})
    first = subprocess.Popen([sys.executable, "-m", "agent", "--base", str(spool.base), "--gpu", "0", "--slots", "2",
                              *FAST], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        hb = wait_for(lambda: heartbeat(spool.base, "testhost-gpu0s0").get("spare_pid"), 30, "slot 0 ready")
        procs.write_text(json.dumps([{"pid": hb, "mem_mb": 2048}]))  # slot 0's worker computes on the GPU
        wait_for(lambda: heartbeat(spool.base, "testhost-gpu0s0")["gpu"]["worker_mem"] == 2048 * 2**20, 30,
                 "slot 0's own memory in its heartbeat")
        r = agent(spool.base, env, "--gpu", "0", "--slots", "2")  # slot 1 (--burst: it exits when idle)
        assert r.returncode == 0 and heartbeat(spool.base, "testhost-gpu0s1")["slot"] == 1, r.stderr
        procs.write_text(json.dumps([{"pid": hb, "mem_mb": 2048}, {"pid": 4000000, "mem_mb": 512}]))
        r = agent(spool.base, env, "--gpu", "0", "--slots", "2")
        assert r.returncode == 2 and "pid 4000000" in r.stderr and "pid %d" % hb not in r.stderr, r.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)


@pytest.mark.timeout(120)
def test_the_slurm_recipe_follows_the_allocation_two_gpus_per_agent(spool: Spool, tmp_path: Path) -> None:
    env = nvml_env(tmp_path, FOUR, CUDA_VISIBLE_DEVICES="0,1,2,3", GPUPOOL_GPUS_PER_AGENT="2")
    node = subprocess.Popen([str(REPO / "examples" / "slurm" / "node_agents.sh"), str(spool.base), *FAST], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: all(heartbeat(spool.base, i).get("state") == "idle" for i in ("testhost-gpu0+1",
                                                                                       "testhost-gpu2+3")),
                 60, "two agents of two GPUs each")
        assert heartbeat(spool.base, "testhost-gpu2+3")["gpu_ids"] == [2, 3]
        node.send_signal(signal.SIGTERM)  # not under srun: it passes the stop on to its agents
        assert node.wait(timeout=60) == 0
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
    out = node.stdout.read()
    assert "started 2 agent(s)" in out, out
    slots = {**env, "CUDA_VISIBLE_DEVICES": "1", "GPUPOOL_GPUS_PER_AGENT": "1", "GPUPOOL_SLOTS": "2"}
    node = subprocess.Popen([str(REPO / "examples" / "slurm" / "node_agents.sh"), str(spool.base), *FAST], env=slots,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:  # GPUPOOL_SLOTS: two agents sharing the one GPU allocated (GPU 1 of the host, seen as 0)
        wait_for(lambda: all(heartbeat(spool.base, f"testhost-gpu1s{j}").get("state") == "idle" for j in (0, 1)),
                 60, "two slots of the allocated GPU")
        node.send_signal(signal.SIGTERM)
        assert node.wait(timeout=60) == 0
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
    bad = subprocess.run([str(REPO / "examples" / "slurm" / "node_agents.sh"), str(spool.base)],
                         env={**env, "CUDA_VISIBLE_DEVICES": "0,1,2"}, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "do not split into agents of GPUPOOL_GPUS_PER_AGENT=2" in bad.stderr, bad.stderr


def test_a_promise_counts_only_for_what_its_slots_processes_do_not_hold_yet(nvml, tmp_path: Path) -> None:
    """agent.gpumem over the stand-in NVML: slot 1 promised 6 GB; once its job's process holds them (NVML's
    used memory and per-process figure both show them) they are not counted twice; memory slot 0's own
    worker holds is free for slot 0's next job."""
    from gpupool.agent.gpumem import MemoryGate
    from gpupool.agent.worker_control import agent_marks

    procs = tmp_path / "procs.json"
    procs.write_text("[]")
    base, ids = str(tmp_path / "base"), {0: "h-gpu0s0", 1: "h-gpu0s1"}

    def gates(used_gb: float) -> tuple[MemoryGate, MemoryGate]:
        probe = nvml({"gpus": [{"mem_total_gb": 16, "mem_used_gb": used_gb, "processes_file": str(procs)}]})
        gpu = probe.devices()[0]
        return tuple(MemoryGate(probe, (gpu,), ids[j], base, j, ids, tmp_path) for j in (0, 1))

    s0, s1 = gates(0)
    assert s1.reserve(6) is None and s1.reserved == 6 * 2**30  # 16 free: slot 1's job may start
    why = s0.reserve(12)
    assert why is not None and "it has 10.0 GB (16.0 GB free, 6.0 GB promised" in why, why
    sleepers = [subprocess.Popen(["sleep", "60"], env={**os.environ, **agent_marks(ids[j], base)}) for j in (1, 0)]
    try:
        wait_for(lambda: all(Path(f"/proc/{p.pid}/environ").read_bytes().count(b"GPUPOOL_AGENT") for p in sleepers),
                 10, "the marked processes started")
        # slot 1's job now holds its 6 GB, slot 0's worker 3 GB of cache: NVML says 9 GB used
        procs.write_text(json.dumps([{"pid": sleepers[0].pid, "mem_mb": 6 * 1024},
                                     {"pid": sleepers[1].pid, "mem_mb": 3 * 1024}]))
        s0, _ = gates(9)
        assert s0.reserve(10) is None  # 7 free + its own 3, the promise already held: nothing counted twice
        s0.release()
        assert "it has 10.0 GB" in (s0.reserve(11) or "")
    finally:
        for p in sleepers:
            p.kill()
            p.wait()
    s1.release()
    s0, _ = gates(0)
    procs.write_text("[]")
    assert s0.reserve(16) is None  # the promise withdrawn


@pytest.mark.timeout(60)
def test_a_job_for_two_gpus_that_reaches_a_one_gpu_agent_fails_there_instead_of_running(
        spool: Spool, tmp_path: Path, agents) -> None:
    from gpupool.jobs.mailbox import Mailbox

    env = nvml_env(tmp_path, FOUR)
    (a,) = agents(1, env_=env, cpu=False)
    ran = tmp_path / "ran"
    job = Job(run="misplaced", chunk_id=0, total_chunks=1, kind=JobKind.COMMAND, target=f"touch {ran}", gpus=2,
              workdir=str(tmp_path))  # as a master with a bug, or a hand-edited mailbox, would queue it
    Mailbox(spool, a.id).update(lambda jobs: jobs + [job])
    rec = wait_for(lambda: results(spool.base, "misplaced").get(0), 30, "the job's result")
    assert rec["status"] == "failed" and rec["error"]["type"] == "WrongAgent", rec
    assert "needs 2 GPU(s)" in rec["error"]["message"] and not ran.exists()
    assert rec["gpu_uuids"] == uuids(tmp_path, FOUR)[:1]  # the result names the GPUs it was given


def test_a_heartbeat_with_bad_gpu_lists_is_read_with_those_fields_dropped(spool: Spool) -> None:
    from gpupool.jobs.heartbeat import read_status
    from gpupool.master.spec.placement import Placement
    from gpupool.master.report.status import gather

    hb = {"agent": "h-gpu0+1", "seq": 1, "state": "idle", "device": "cuda:0", "gpu_uuids": ["a", 3],
          "gpu_ids": "0,1", "gpus": [{"mem_total": "80", "name": 7}, {"mem_used": 1, "mem_total": 2**31}],
          "slot": "1", "waiting": ["x"], "gpu_mem_reserved": True}
    path = spool.heartbeat("h-gpu0+1")
    path.write_text(json.dumps(hb))
    st = read_status(path)
    assert st.gpu_uuids is None and st.gpu_ids is None and st.slot is None and st.waiting is None
    assert st.gpus[0] == {"mem_total": None, "name": None} and st.gpu_mem_reserved is None
    assert Placement(gpus_per_job=2).why_not(st) is None and "holds 2 GPUs" in Placement().why_not(st)
    assert Placement(gpus_per_job=2, gpu_mem=1.5).why_not(st) is None  # what cannot be judged is the agent's to judge
    assert Placement(gpus_per_job=2, gpu_mem=3).why_not(st) == "its GPU has 2.0 GB in all, under the run's --gpu-mem 3"
    row = gather(spool)["agents"][0]
    assert row["gpu_mem_total"] is None and row["gpu_name"] == "2 GPUs"


def test_a_target_names_an_agent_of_several_gpus_by_all_of_them() -> None:
    from gpupool.master.spec.placement import Placement

    from gpupool.jobs.heartbeat import Heartbeat
    pair = Heartbeat("n1-gpu2+3", 1, "idle", host="n1", device="cuda:0", gpu_id=2, gpu_ids=[2, 3], gpu_uuids=["a", "b"])
    assert Placement.parse(["n1::2,3"], gpus_per_job=2).why_not(pair) is None
    assert Placement.parse(["n1::2"], gpus_per_job=2).why_not(pair) == "--target n1::2"  # GPU 3 is not named
    assert Placement.parse(["n1"], gpus_per_job=2).why_not(pair) is None
    assert Placement(gpus_per_job=2).describe() == "--gpus-per-job 2"
