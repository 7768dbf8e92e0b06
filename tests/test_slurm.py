"""The Slurm recipe, for real: a one-node Slurm cluster on this machine runs examples/slurm/agents.sbatch.

The test starts its own munged (as the munge user, with a fresh key) and its own slurmctld and
slurmd (as root, on free ports, config, state and logs in a tmp folder, found by clients through
$SLURM_CONF), so it touches no system configuration. It needs root and the Debian packages
slurm-wlm and munge; without them it skips with the reason (or fails with
GPUPOOL_REQUIRE_SLURM=1).
"""
from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from gpupool.jobs.paths import Spool
from tests.helpers import FAST, REPO, results, run_main, wait_for

SBATCH = REPO / "examples" / "slurm" / "agents.sbatch"
BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "srun", "scancel", "squeue", "sinfo", "scontrol",
            "runuser")


def unavailable(reason: str) -> None:
    msg = f"Slurm test bed unavailable: {reason}"
    if os.environ.get("GPUPOOL_REQUIRE_SLURM") == "1":
        pytest.fail(msg + " (GPUPOOL_REQUIRE_SLURM=1)", pytrace=False)
    pytest.skip(msg)


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no {path})"


SLURM_CONF = """\
ClusterName=gpupooltest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/slurmd
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
KillWait=30
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class Slurm:
    """munged + slurmctld + slurmd for this test module, all under one tmp folder."""

    def __init__(self) -> None:
        self.host = socket.gethostname().split(".")[0]
        self.dir: Path | None = None
        self.daemons: list[subprocess.Popen] = []
        self.munged_pid: Path | None = None
        self.env: dict[str, str] = {}

    def start(self) -> None:
        if os.geteuid() != 0:
            unavailable("needs root (slurmctld/slurmd as SlurmUser=root, munged as the munge user)")
        missing = [b for b in BINARIES if shutil.which(b) is None]
        if missing:
            unavailable(f"{', '.join(missing)} not found: apt-get install slurm-wlm munge "
                        "(listed in .ci/apt-packages.txt)")
        try:
            munge_user = pwd.getpwnam("munge")
        except KeyError:
            unavailable("no 'munge' user (the munge package creates it)")
        # Not under pytest's tmp root: that is private to root, and munged runs as the munge user.
        self.dir = Path(tempfile.mkdtemp(prefix="gpupool-slurm-"))
        self.dir.chmod(0o755)
        for sub in ("state", "slurmd", "log"):
            (self.dir / sub).mkdir()
        self._start_munged(munge_user)
        conf = self.dir / "slurm.conf"
        conf.write_text(SLURM_CONF.format(host=self.host, ctld_port=free_port(), d_port=free_port(), dir=self.dir,
                                          munge_socket=self.dir / "munge" / "munge.sock", cpus=os.cpu_count() or 2))
        self.env = {**os.environ, "SLURM_CONF": str(conf)}
        for daemon in ("slurmctld", "slurmd"):
            self.daemons.append(subprocess.Popen([daemon, "-D", "-f", str(conf)], env=self.env,
                                                 stdout=open(self.dir / "log" / f"{daemon}.out", "wb"),
                                                 stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for d in self.daemons:
                if d.poll() is not None:
                    unavailable(f"{d.args[0]} exited with {d.returncode}:\n{tail(self.dir / 'log' / (d.args[0] + '.log'))}"
                                f"\n{tail(self.dir / 'log' / (d.args[0] + '.out'))}")
            r = self.cli("sinfo", "-h", "-o", "%T", check=False)
            if r.returncode == 0 and r.stdout.strip() in ("idle", "mixed"):
                return
            time.sleep(0.2)
        unavailable(f"the node did not become idle within 60 s:\n{tail(self.dir / 'log' / 'slurmctld.log')}")

    def _start_munged(self, user: pwd.struct_passwd) -> None:
        mdir = self.dir / "munge"
        mdir.mkdir(mode=0o711)
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for p in (mdir, key):
            os.chown(p, user.pw_uid, user.pw_gid)
        mdir.chmod(0o711)  # munged insists: its socket folder must be reachable by everyone
        self.munged_pid = mdir / "munged.pid"
        r = subprocess.run(["runuser", "-u", "munge", "--", "munged", f"--key-file={key}",
                            f"--socket={mdir / 'munge.sock'}", f"--pid-file={self.munged_pid}",
                            f"--log-file={mdir / 'munged.log'}", f"--seed-file={mdir / 'munged.seed'}"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            unavailable(f"munged did not start: {(r.stdout + r.stderr).strip()}")

    def cli(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), env=kw.pop("env", self.env), capture_output=True, text=True, timeout=60, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stdout}{r.stderr}")
        return r

    def job_state(self, job: str) -> str:
        out = self.cli("scontrol", "show", "job", job, check=False).stdout
        return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "GONE")

    def stop(self) -> None:
        if self.env:
            self.cli("scancel", "--full", "--user", "root", check=False)  # every job of this private cluster
            with contextlib.suppress(AssertionError):
                wait_for(lambda: not self.cli("squeue", "-h", check=False).stdout.strip(), 60, "jobs to end")
        for d in reversed(self.daemons):
            if d.poll() is None:
                d.terminate()
                try:
                    d.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    d.kill()
                    d.wait(timeout=10)
        if self.munged_pid is not None:
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(self.munged_pid.read_text().strip()), signal.SIGTERM)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm() -> Iterator[Slurm]:
    s = Slurm()
    try:
        s.start()
        yield s
    finally:
        s.stop()


def heartbeat(spool: Spool, ident: str) -> dict:
    try:
        return json.loads(spool.heartbeat(ident).read_text())
    except (OSError, ValueError):
        return {}


@pytest.mark.timeout(300)
def test_sbatch_recipe_runs_agents_fed_from_outside_and_scancel_stops_them_cleanly(slurm: Slurm,
                                                                                    tmp_path: Path) -> None:
    spool = Spool(tmp_path / "base")
    env = {**slurm.env, "PYTHONPATH": str(REPO), "PYTHON": sys.executable, "GPUPOOL_CPU_AGENTS": "2",
           "GPUPOOL_LOCK_DIR": str(tmp_path / "gpulocks"), "GPUPOOL_LOG_LEVEL": "INFO"}
    for var in ("CUDA_VISIBLE_DEVICES", "GPUPOOL_HOST_ID", "GPUPOOL_FAKE_GPUS"):
        env.pop(var, None)
    out = tmp_path / "job.out"
    # submitted from the checkout, as the recipe says; agents get fast test intervals
    job = slurm.cli("sbatch", "--parsable", "--time=10", f"--output={out}", str(SBATCH), str(spool.base), *FAST,
                    env=env, cwd=REPO).stdout.strip().split(";")[0]
    ids = [f"{slurm.host}-cpu0", f"{slurm.host}-cpu1"]  # default host id: the node's own name
    try:
        wait_for(lambda: all(heartbeat(spool, i).get("state") == "idle" for i in ids), 120,
                 f"two agents started by the sbatch job\n{tail(out)}")
        assert slurm.job_state(job) == "RUNNING"
        assert f"started 2 CPU agent(s)" in out.read_text()
        # each knows its job's end (agent.lifetime, from squeue): no chunk started that would not end before it
        wait_for(lambda: out.read_text().count(f"(Slurm job {job}'s time limit): no chunk started") == 2, 30,
                 f"both agents saying their job's end\n{tail(out)}")

        # fed from outside the allocation: this test process is not part of the job
        r = run_main(["--base", str(spool.base), "--task", "examples.noop:sleepy", "--chunks", "40",
                      "--kwargs", '{"seconds": 0.05}', "--run", "first", "--no-progress"], env)
        assert r.returncode == 0, r.stdout + r.stderr
        done = results(spool.base, "first")
        assert sorted(done) == list(range(40)) and all(v["status"] == "ok" for v in done.values())
        assert {v["agent"] for v in done.values()} == set(ids)

        # scancel while both agents are busy: each finishes its chunk and exits; nothing is lost
        master = subprocess.Popen([sys.executable, "main.py", "--base", str(spool.base), "--task",
                                   "examples.noop:sleepy", "--chunks", "6", "--kwargs", '{"seconds": 2.0}',
                                   "--run", "second", "--depth", "3", "--no-progress"], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            def both_busy() -> list[dict] | None:
                cur = [heartbeat(spool, i).get("current") or {} for i in ids]
                return cur if all(c.get("run") == "second" for c in cur) else None
            running = {c["chunk_id"] for c in wait_for(both_busy, 60, "both agents busy with the second run")}
            slurm.cli("scancel", job)
            wait_for(lambda: all(heartbeat(spool, i).get("state") == "stopped" for i in ids), 60,
                     f"agents stopped after scancel\n{tail(out)}")
            wait_for(lambda: slurm.job_state(job) not in ("RUNNING", "COMPLETING"), 60, "the job to end")
            log = out.read_text()
            assert "all 2 agent(s) exited (status 0)" in log, log
            assert "interrupted by a stop" not in log, log  # one SIGTERM each: no immediate stop
            # no job lost: the master, still waiting, hands every unfinished chunk to whatever agent comes
            # next: the same agents started again (outside Slurm) with their old mailboxes
            assert master.poll() is None, master.communicate()
            again = [subprocess.Popen([sys.executable, "-m", "agent", "--base", str(spool.base), "--cpu", "--gpu",
                                       str(n), *FAST], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True) for n in (0, 1)]
            try:
                mout, merr = master.communicate(timeout=120)
                assert master.returncode == 0, mout + merr
            finally:
                for p in again:
                    p.send_signal(signal.SIGTERM)
                for p in again:
                    p.wait(timeout=60)
        finally:
            master.kill()
        final = results(spool.base, "second")
        assert sorted(final) == list(range(6)) and all(v["status"] == "ok" for v in final.values())
        # the chunks running at scancel time should have finished there: no failed attempt on record
        lost = sorted(c for c in running if (spool.result_dir("second") / f"{c:06d}.a1.json").exists())
        assert not lost, (f"chunk(s) {lost} running at scancel failed their first attempt: Slurm signals every "
                          "process of the step and the worker must outlive SIGTERM until the agent stops it")
    finally:
        slurm.cli("scancel", job, check=False)


STAND_IN_SSH = """#!/usr/bin/env bash
# Stands in for ssh: runs the remote command here, as host $1 (its agents get that host id).
host=$1; shift
GPUPOOL_HOST_ID=$host exec bash -c "$*"
"""


@pytest.mark.timeout(180)
def test_ssh_loop_starts_and_stops_agents_on_each_host(tmp_path: Path) -> None:
    """examples/ssh_agents.sh with a stand-in for the ssh transport (no sshd here)."""
    ssh = tmp_path / "ssh"
    ssh.write_text(STAND_IN_SSH)
    ssh.chmod(0o755)
    base = tmp_path / "base"
    env = {**os.environ, "SSH": str(ssh), "PYTHON": sys.executable, "PYTHONPATH": str(REPO),
           "GPUPOOL_LOCK_DIR": str(tmp_path / "gpulocks")}
    for var in ("GPUPOOL_HOST_ID", "GPUPOOL_FAKE_GPUS", "CUDA_VISIBLE_DEVICES"):
        env.pop(var, None)
    script = str(REPO / "examples" / "ssh_agents.sh")
    start = subprocess.run([script, "1", str(base), "node1", "node2", "--", "--cpu", "--", *FAST], env=env,
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        assert "node1: node1-cpu0" in start.stdout and "node2: node2-cpu0" in start.stdout, start.stdout
        r = run_main(["--base", str(base), "--task", "examples.noop:square", "--chunks", "20", "--run", "ssh",
                      "--no-progress"], env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert {v["agent"] for v in results(base, "ssh").values()} <= {"node1-cpu0", "node2-cpu0"}
    finally:
        stop = subprocess.run([script, "stop", str(base), "node1", "node2"], env=env, capture_output=True,
                              text=True, timeout=120)
    assert stop.returncode == 0 and "node1: stopped 1 agent: node1-cpu0" in stop.stdout, stop.stdout + stop.stderr
    for ident in ("node1-cpu0", "node2-cpu0"):
        assert json.loads((base / "agents" / f"{ident}.json").read_text())["state"] == "stopped"
    bad = subprocess.run([script, "x", str(base), "node1"], env=env, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "N must be a number" in bad.stderr


@pytest.mark.timeout(300)
def test_two_gpu_jobs_on_one_node_each_seeing_its_gpu_as_0_both_serve_the_pool(slurm: Slurm, tmp_path: Path) -> None:
    """Issue 13: inside a job's device cgroup its GPU is number 0 to NVML and CUDA, and Slurm sets
    CUDA_VISIBLE_DEVICES=0; the second job's agent used to be refused as 'already held'. The
    cgroup is modelled by the stand-in NVML (tests/fake_nvml, $FAKE_NVML_CGROUP), the rest is
    the recipe under a real Slurm: two jobs of agents.sbatch on one node."""
    from tests.test_nvml import FAKE_NVML, TWO, uuids

    spool = Spool(tmp_path / "base")
    env = {**slurm.env, "PYTHONPATH": os.pathsep.join([str(REPO), str(FAKE_NVML)]), "PYTHON": sys.executable,
           "FAKE_NVML": json.dumps(TWO), "GPUPOOL_LOCK_DIR": str(tmp_path / "gpulocks"), "GPUPOOL_LOG_LEVEL": "INFO"}
    for var in ("GPUPOOL_HOST_ID", "GPUPOOL_FAKE_GPUS"):
        env.pop(var, None)
    gpus = uuids(tmp_path, TWO)
    jobs = []
    try:
        for n, uuid in enumerate(gpus):
            jobs.append(slurm.cli("sbatch", "--parsable", "--time=10", f"--output={tmp_path}/job{n}.out", str(SBATCH),
                                  str(spool.base), *FAST, env={**env, "FAKE_NVML_CGROUP": uuid,
                                                               "CUDA_VISIBLE_DEVICES": "0"},
                                  cwd=REPO).stdout.strip().split(";")[0])
        ids = [f"{slurm.host}-gpu0", f"{slurm.host}-gpu1"]  # by minor number: the host's, in every cgroup
        wait_for(lambda: all(heartbeat(spool, i).get("state") == "idle" for i in ids), 120,
                 "an agent from each job\n" + "\n".join(tail(tmp_path / f"job{n}.out") for n in range(2)))
        assert [heartbeat(spool, i)["gpu_uuid"] for i in ids] == gpus
        r = run_main(["--base", str(spool.base), "--task", "examples.noop:env_probe", "--chunks", "8", "--run",
                      "two-jobs", "--no-progress"], env)
        assert r.returncode == 0, r.stdout + r.stderr
        seen = {(v["agent"], v["value"]["CUDA_VISIBLE_DEVICES"]) for v in results(spool.base, "two-jobs").values()}
        assert seen == set(zip(ids, gpus)), seen
    finally:
        for job in jobs:
            slurm.cli("scancel", job, check=False)
        for job in jobs:
            wait_for(lambda j=job: slurm.job_state(j) not in ("PENDING", "RUNNING", "COMPLETING"), 60, "the jobs to end")


def alloc_env(slurm: Slurm, tmp_path: Path, cpu_agents: int) -> dict[str, str]:
    env = {**slurm.env, "PYTHONPATH": str(REPO), "PYTHON": sys.executable, "GPUPOOL_CPU_AGENTS": str(cpu_agents),
           "GPUPOOL_LOCK_DIR": str(tmp_path / "gpulocks"), "GPUPOOL_LOG_LEVEL": "INFO"}
    for var in ("CUDA_VISIBLE_DEVICES", "GPUPOOL_HOST_ID", "GPUPOOL_FAKE_GPUS", "GPUPOOL_BASE"):
        env.pop(var, None)
    return env


def allocator(spool: Spool, env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "master", "alloc", "slurm", "--base", str(spool.base), "--poll",
                             "0.5", f"--agent-args={' '.join(FAST)}", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _end_all(slurm: Slurm, *procs: subprocess.Popen | None) -> None:
    """Kill the test's masters and allocators, and cancel every job the cluster still has."""
    for proc in procs:
        if proc is not None:
            proc.kill()
    for job in slurm.cli("squeue", "-h", "-o", "%i").stdout.split():
        slurm.cli("scancel", job, check=False)


def slurm_outputs(spool: Spool) -> str:
    return "\n".join(f"{p.name}:\n{tail(p, 30)}" for p in sorted((spool.logs_dir / "alloc").glob("slurm-*.out")))


@pytest.mark.timeout(300)
def test_allocator_starts_agents_for_a_waiting_run_and_they_give_the_allocation_back(slurm: Slurm,
                                                                                       tmp_path: Path) -> None:
    """Issue 26: an empty pool, a run waiting for agents, the allocator submits one job of agents;
    the run completes, the agents end when idle, the job ends and the allocator exits 0."""
    from gpupool.master.alloc import job_name

    spool = Spool(tmp_path / "base")
    env = alloc_env(slurm, tmp_path, 2)
    master = subprocess.Popen([sys.executable, "main.py", "--base", str(spool.base), "--new-spool", "--task",
                               "examples.noop:sleepy", "--chunks", "20", "--kwargs", '{"seconds": 0.05}', "--run",
                               "auto", "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    alloc = None
    try:
        wait_for(lambda: spool.run_spec("auto").exists(), 60, "the run recorded")
        assert not spool.agent_ids()  # nobody serves the pool yet
        alloc = allocator(spool, env, "--max-jobs", "1", "--time", "10", "--idle-timeout", "5")
        out, _ = master.communicate(timeout=180)
        assert master.returncode == 0, out + slurm_outputs(spool)
        done = results(spool.base, "auto")
        assert sorted(done) == list(range(20)) and all(v["status"] == "ok" for v in done.values())
        ids = {f"{slurm.host}-cpu0", f"{slurm.host}-cpu1"}
        assert {v["agent"] for v in done.values()} <= ids

        # the agents end once idle for 5 s, the job with them, and then the allocator
        aout, _ = alloc.communicate(timeout=180)
        assert alloc.returncode == 0, aout + slurm_outputs(spool)
        assert not slurm.cli("squeue", "-h", "--name", job_name(spool)).stdout.strip()
        records = [json.loads(p.read_text()) for p in sorted(spool.alloc_dir.glob("*.json"))]
        assert len(records) == 1, records  # --max-jobs 1: one job served the whole run
        job = records[0]
        assert job["state"] == "COMPLETED" and set(job["agents"]) == ids, job
        assert f"submitted job {job['job']}" in aout and "done: no work left" in aout, aout
        for ident in ids:  # each names its job: that is how the allocator knew them
            assert heartbeat(spool, ident).get("state") == "stopped"
            assert heartbeat(spool, ident).get("slurm_job") == job["job"]
        assert slurm_outputs(spool).count("stops: no job for 5 seconds (--idle-exit)") == 2, slurm_outputs(spool)

        # status shows the allocation with its agents
        st = subprocess.run([sys.executable, "-m", "master", "status", "--base", str(spool.base), "--json"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=60)
        assert st.returncode == 0, st.stderr
        shown = json.loads(st.stdout)["allocations"]
        assert [(a["job"], sorted(a["agents"])) for a in shown] == [(job["job"], sorted(ids))]
        text = subprocess.run([sys.executable, "-m", "master", "status", "--base", str(spool.base)], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=60).stdout
        assert "SLURM JOB" in text and job["job"] in text, text
    finally:
        _end_all(slurm, master, alloc)


@pytest.mark.timeout(120)
def test_a_second_allocator_of_the_spool_is_refused(slurm: Slurm, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "base")
    spool.ensure()
    env = alloc_env(slurm, tmp_path, 1)
    first = allocator(spool, env, "--max-jobs", "1", "--time", "10", "--idle-timeout", "60")
    try:
        from gpupool.jobs.locks import HolderLock
        wait_for(lambda: HolderLock(spool.alloc_lock()).holder().get("pid") == first.pid, 60, "the first allocator")
        second = allocator(spool, env, "--max-jobs", "1", "--time", "10", "--idle-timeout", "60")
        out, _ = second.communicate(timeout=60)
        assert second.returncode == 3 and "another allocator serves" in out and str(first.pid) in out, out
    finally:
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=60)
    assert first.returncode == 0, out


@pytest.mark.timeout(300)
def test_an_allocation_too_short_for_the_run_s_chunks_gets_none_of_them(slurm: Slurm, tmp_path: Path) -> None:
    """Issue 26: a run whose chunks take 600 s (--chunk-time) and allocations of 2 minutes: the
    allocator submits none for it, saying why; and the agents of such a job submitted by hand know
    their job's end and start none of its chunks: each stops, no chunk cut by the time limit."""
    from gpupool.master.alloc import job_name

    spool = Spool(tmp_path / "base")
    env = alloc_env(slurm, tmp_path, 1)
    master = subprocess.Popen([sys.executable, "main.py", "--base", str(spool.base), "--new-spool", "--task",
                               "examples.noop:pause", "--kwargs", '{"seconds": 1}', "--chunks", "2", "--chunk-time",
                               "600", "--run", "long", "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    alloc = None
    try:
        wait_for(lambda: spool.run_spec("long").exists(), 60, "the run recorded")
        alloc = allocator(spool, env, "--max-jobs", "1", "--time", "2", "--idle-timeout", "5")
        lines: list[str] = []

        def refused() -> bool:
            line = alloc.stdout.readline()
            lines.append(line)
            return "run long: its chunks take 600 s (--chunk-time), more than an allocation of --time 2" in line
        wait_for(refused, 120, "the allocator to say it submits nothing for the run")
        assert not slurm.cli("squeue", "-h", "--name", job_name(spool)).stdout.strip(), lines
        alloc.kill()
        alloc = None

        out = tmp_path / "job.out"  # the same recipe by hand, 2 minutes, agents stopping 5 s before the end
        slurm.cli("sbatch", "--parsable", "--time=2", f"--output={out}", str(SBATCH), str(spool.base), *FAST,
                  "--end-margin", "5", env=env, cwd=REPO)
        wait_for(lambda: "long's chunks take about 600 s" in tail(out, 200), 180,
                 f"the job's agent to refuse the run's chunks\n{tail(out)}")
        assert "Slurm job" in tail(out, 200)  # its end came from its job's time limit
        assert not list(spool.result_dir("long").glob("*.json"))  # no chunk ran, none was cut
        assert master.poll() is None  # the run waits on, for agents with time enough
    finally:
        _end_all(slurm, master, alloc)
