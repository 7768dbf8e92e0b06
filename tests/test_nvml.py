"""The GPU probe through its real code path (issue 13): ``agent.gpu.NvmlProbe`` over the stand-in
``pynvml`` of tests/fake_nvml (UUIDs, bus ids, MIG devices, NVML errors, cgroup-local numbering),
in this process and in real agents (the stand-in first on their PYTHONPATH, the host it describes
in $FAKE_NVML)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from gpupool.agent.gpu import GpuConfigError, NoGpu, NvmlProbe, make_probe, visible_gpus
from gpupool.jobs.paths import Spool
from tests.helpers import FAST, REPO, base_env, results, run_main, wait_for

FAKE_NVML = REPO / "tests" / "fake_nvml"
UUID = re.compile(r"^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def load_fake_nvml() -> Any:
    """The stand-in, under a name of its own: the real pynvml of this process is left alone."""
    spec = importlib.util.spec_from_file_location("fake_pynvml", FAKE_NVML / "pynvml.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fake_pynvml"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch):
    """``nvml(spec, cgroup=None)``: an NvmlProbe over the stand-in describing ``spec``."""
    fake = load_fake_nvml()

    def probe(spec: dict[str, Any], cgroup: str | None = None) -> NvmlProbe:
        monkeypatch.setenv("FAKE_NVML", json.dumps(spec))
        if cgroup is None:
            monkeypatch.delenv("FAKE_NVML_CGROUP", raising=False)
        else:
            monkeypatch.setenv("FAKE_NVML_CGROUP", cgroup)
        return NvmlProbe(fake)
    probe.module = fake
    return probe


def nvml_env(tmp_path: Path, spec: dict[str, Any], **extra: str) -> dict[str, str]:
    """A real process's environment: the stand-in pynvml first on its path, describing ``spec``."""
    env = base_env(tmp_path, FAKE_NVML=json.dumps(spec), **extra)
    env.pop("GPUPOOL_FAKE_GPUS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(FAKE_NVML)])
    return env


TWO = {"gpus": [{"name": "NVIDIA H100 80GB HBM3"}, {"name": "NVIDIA H100 80GB HBM3"}]}
MIXED = {"gpus": [{}, {"mig": [{}, {}]}]}  # GPU 0 plain, GPU 1 in MIG mode with two MIG devices


# the probe, in this process ---------------------------------------------------------------------------
def test_the_probe_describes_each_gpu_by_uuid_bus_id_and_minor_number(nvml) -> None:
    gpus = nvml(TWO).devices()
    assert [g.label for g in gpus] == ["gpu0", "gpu1"] and all(UUID.match(g.uuid) for g in gpus)
    assert all(g.token == g.uuid for g in gpus)  # CUDA_VISIBLE_DEVICES by UUID, never by index
    assert len({g.uuid for g in gpus}) == 2 and re.match(r"^[0-9A-F]{8}:[0-9A-F]{2}:00\.0$", gpus[1].pci)
    m = nvml(TWO).metrics(gpus[1])
    assert m["name"] == "NVIDIA H100 80GB HBM3" and m["mem_total"] == 40 * 2**30 and m["util"] == 0


def test_mig_devices_are_devices_of_their_own_and_their_gpu_is_not(nvml) -> None:
    probe = nvml(MIXED)
    gpus = probe.devices()
    assert [g.label for g in gpus] == ["gpu0", "gpu1-mig1", "gpu1-mig2"]
    mig = gpus[1]
    assert mig.uuid.startswith("MIG-") and mig.token == mig.uuid and mig.parent_uuid.startswith("GPU-")
    m = probe.metrics(mig)  # NVML has no utilisation or temperature for a MIG device: '-', not a failure
    assert m["util"] is None and m["temp"] is None and m["mem_total"] == 20 * 2**30


def test_a_gpu_in_mig_mode_without_mig_devices_keeps_its_place_and_says_why(nvml) -> None:
    gpus = nvml({"gpus": [{"mig": []}, {}]}).devices()
    assert len(gpus) == 2 and "MIG mode with no MIG device" in gpus[0].error and gpus[1].error is None


@pytest.mark.parametrize("error, text", [("NO_PERMISSION", "Insufficient Permissions"), ("GPU_IS_LOST", "GPU is lost")])
def test_a_gpu_nvml_cannot_describe_is_kept_in_its_place_with_nvmls_error(nvml, error: str, text: str) -> None:
    gpus = nvml({"gpus": [{}, {"error": error}, {}]}).devices()
    assert [g.error is None for g in gpus] == [True, False, True]
    assert text in gpus[1].error and gpus[1].error.startswith("NVMLError_")
    assert gpus[2].label == "gpu2"


def test_a_gpu_lost_at_run_time_raises_nvmls_error_from_metrics(nvml, tmp_path: Path) -> None:
    flag = tmp_path / "lost"
    probe = nvml({"gpus": [{"lost_if": str(flag)}]})
    gpu = probe.devices()[0]
    assert probe.metrics(gpu)["mem_total"]
    flag.touch()
    with pytest.raises(nvml.module.NVMLError_GpuIsLost, match="GPU is lost"):
        probe.metrics(gpu)


@pytest.mark.parametrize("driver, text", [("not_loaded", "Driver Not Loaded"),
                                          ("no_library", "NVML Shared Library Not Found")])
def test_no_driver_or_library_gives_the_cpu_probe_naming_nvmls_error(nvml, monkeypatch, driver: str, text: str) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", nvml.module)
    monkeypatch.delenv("GPUPOOL_FAKE_GPUS", raising=False)
    monkeypatch.setenv("FAKE_NVML", json.dumps({"driver": driver}))
    probe = make_probe()
    assert type(probe) is NoGpu and text in probe.why


def test_compute_processes_come_with_their_memory(nvml) -> None:
    probe = nvml({"gpus": [{"processes": [{"pid": 4242, "mem_mb": 3072}, {"pid": 7, "mem_mb": None}]}]})
    assert probe.processes(probe.devices()[0]) == [(4242, 3 * 2**30), (7, None)]


def test_inside_a_cgroup_nvml_numbers_the_jobs_gpus_from_0_and_the_minor_number_stays(nvml) -> None:
    host = nvml(TWO).devices()
    job = nvml(TWO, cgroup=host[1].uuid).devices()
    assert len(job) == 1 and job[0].index == 0 and job[0].uuid == host[1].uuid and job[0].label == "gpu1"


# CUDA_VISIBLE_DEVICES, read as CUDA reads it ---------------------------------------------------------
def test_cuda_visible_devices_names_gpus_as_cuda_does(nvml) -> None:
    probe = nvml(MIXED)
    plain, mig1, mig2 = probe.devices()

    def labels(cvd: str) -> list[str]:
        return [g.label for g in visible_gpus(probe, {"CUDA_VISIBLE_DEVICES": cvd})]

    assert labels(plain.uuid) == ["gpu0"]
    assert labels(plain.uuid[:12]) == ["gpu0"]  # a unique prefix, "GPU-" included, as CUDA allows
    assert labels(f"{mig2.uuid},{mig1.uuid[:10]}") == ["gpu1-mig2", "gpu1-mig1"]  # in the order given
    assert labels(f"MIG-{mig1.parent_uuid}/2/0") == ["gpu1-mig2"]  # the form of drivers before R470
    assert labels("1") == ["gpu1-mig1", "gpu1-mig2"]  # a GPU in MIG mode: its MIG devices
    assert labels(mig1.parent_uuid) == ["gpu1-mig1", "gpu1-mig2"]
    assert labels("1,0") == ["gpu1-mig1", "gpu1-mig2", "gpu0"]
    assert labels("0,-1,1") == ["gpu0"]  # CUDA's end of the list
    assert labels("") == [] and labels("-1") == [] and labels("NoDevFiles") == []  # "no GPU", said on purpose


@pytest.mark.parametrize("cvd, text", [
    ("2", "'2', an NVML index, names no device"),
    ("GPU-ffffffff", "'GPU-ffffffff', a GPU or MIG UUID, names no device"),
    ("MIG-ffff", "'MIG-ffff', a GPU or MIG UUID, names no device"),
    ("0,cuda1", "'cuda1' is neither a GPU index nor a GPU-/MIG- UUID"),
    ("GPU-", "is the start of 2 UUIDs"),
    ("MIG-", "is the start of 2 UUIDs"),
    ("0,0", "a second time"),
])
def test_an_entry_that_names_no_single_new_device_is_refused_loudly(nvml, cvd: str, text: str) -> None:
    with pytest.raises(GpuConfigError) as e:
        visible_gpus(nvml(MIXED), {"CUDA_VISIBLE_DEVICES": cvd})
    assert text in str(e.value) and "CUDA_VISIBLE_DEVICES" in str(e.value)


def test_cuda_visible_devices_on_a_host_without_nvml_is_refused_not_run_on_the_cpu() -> None:
    probe = NoGpu()
    probe.why = "NVML unavailable (NVMLError_DriverNotLoaded: Driver Not Loaded)"
    with pytest.raises(GpuConfigError, match="Driver Not Loaded.*--cpu"):
        visible_gpus(probe, {"CUDA_VISIBLE_DEVICES": "GPU-8932f937"})
    assert visible_gpus(probe, {}) == []


# real agents ------------------------------------------------------------------------------------------
def start_agents(n: int, base: Path, env: dict[str, str], *agent_args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "start_agents.sh"), str(n), str(base), "--timeout", "60", "--", *FAST,
                           *agent_args], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def stop_all(spool: Spool, tmp_path: Path):
    """Stops every agent of the test's spool at its end (they run detached, started by start_agents.sh)."""
    yield
    subprocess.run([str(REPO / "start_agents.sh"), "stop", str(spool.base), "--now", "--timeout", "30"],
                   env=base_env(tmp_path), capture_output=True, timeout=60)


def uuids(tmp_path: Path, spec: dict[str, Any]) -> list[str]:
    """The UUIDs the stand-in gives the GPUs of ``spec`` (asked through a real process)."""
    code = "import pynvml as n; n.nvmlInit(); print(' '.join(n.nvmlDeviceGetUUID(n.nvmlDeviceGetHandleByIndex(i)) " \
           "for i in range(n.nvmlDeviceGetCount())))"
    out = subprocess.run([sys.executable, "-c", code], env=nvml_env(tmp_path, spec), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def probe_run(spool: Spool, env: dict[str, str], run: str, chunks: int) -> dict[int, dict[str, Any]]:
    r = run_main(["--base", str(spool.base), "--task", "examples.noop:env_probe", "--chunks", str(chunks),
                  "--no-progress", "--run", run], env)
    assert r.returncode == 0, r.stderr
    return results(spool.base, run)


@pytest.mark.timeout(180)
def test_two_slurm_jobs_on_one_node_each_seeing_its_gpu_as_0_both_join_the_pool(spool: Spool, tmp_path: Path,
                                                                                 stop_all) -> None:
    """Inside a job's device cgroup NVML and CUDA number its GPU 0, and Slurm sets
    CUDA_VISIBLE_DEVICES=0: agent ids from NVML's index collided (the second job's agent was
    'already running'). The minor number is the host's, whatever the cgroup."""
    first, second = uuids(tmp_path, TWO)
    for uuid in (first, second):
        job = nvml_env(tmp_path, TWO, FAKE_NVML_CGROUP=uuid, CUDA_VISIBLE_DEVICES="0")
        r = start_agents(1, spool.base, job)
        assert r.returncode == 0 and " started " in r.stdout, r.stdout + r.stderr
    hbs = {p.stem: json.loads(p.read_text()) for p in (spool.base / "agents").glob("*.json")}
    assert set(hbs) == {"testhost-gpu0", "testhost-gpu1"}
    assert {h["gpu_uuid"] for h in hbs.values()} == {first, second}
    assert all(h["gpu_index"] == 0 for h in hbs.values())  # each job's own numbering
    done = probe_run(spool, base_env(tmp_path), "slurm", 8)
    seen = {(r["agent"], r["value"]["CUDA_VISIBLE_DEVICES"]) for r in done.values()}
    assert seen == {("testhost-gpu0", first), ("testhost-gpu1", second)}, seen  # both worked, each on its GPU


@pytest.mark.timeout(180)
def test_one_agent_per_mig_device_named_by_mig_uuid_prefixes(spool: Spool, tmp_path: Path, stop_all) -> None:
    probe_env = nvml_env(tmp_path, MIXED)
    code = ("from gpupool.agent.gpu import make_probe; import json; "
            "print(json.dumps([g.uuid for g in make_probe().devices()]))")
    out = subprocess.run([sys.executable, "-c", code], env=probe_env, capture_output=True, text=True, cwd=REPO)
    _, mig1, mig2 = json.loads(out.stdout)
    env = nvml_env(tmp_path, MIXED, CUDA_VISIBLE_DEVICES=f"{mig1[:12]},{mig2[:12]}")
    r = start_agents(2, spool.base, env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "testhost-gpu1-mig1" in r.stdout and "testhost-gpu1-mig2" in r.stdout
    done = probe_run(spool, base_env(tmp_path), "mig", 6)
    seen = {(r["agent"], r["value"]["CUDA_VISIBLE_DEVICES"], r["value"]["device"]) for r in done.values()}
    assert seen == {("testhost-gpu1-mig1", mig1, "cuda:0"), ("testhost-gpu1-mig2", mig2, "cuda:0")}, seen


def test_an_agent_for_a_device_that_cuda_visible_devices_does_not_name_is_refused(spool: Spool,
                                                                                   tmp_path: Path) -> None:
    """Before: a MIG UUID matched no GPU and the agent silently ran its jobs on the CPU."""
    env = nvml_env(tmp_path, MIXED, CUDA_VISIBLE_DEVICES="MIG-ffffffff")
    r = subprocess.run([sys.executable, "-m", "agent", "--base", str(spool.base), "--gpu", "0"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "CUDA_VISIBLE_DEVICES='MIG-ffffffff'" in r.stderr and "names no device" in r.stderr
    assert "Traceback" not in r.stderr and not list((spool.base / "agents").glob("*.json"))
    s = start_agents(1, spool.base, env)
    assert s.returncode == 1 and "CUDA_VISIBLE_DEVICES='MIG-ffffffff'" in s.stderr and "Traceback" not in s.stderr


def test_a_gpu_that_other_processes_compute_on_is_refused_unless_shared_on_purpose(spool: Spool,
                                                                                    tmp_path: Path) -> None:
    spec = {"gpus": [{"processes": [{"pid": 4000000, "mem_mb": 3072}]}, {}]}  # a pid of another container
    env = nvml_env(tmp_path, spec)
    agent = [sys.executable, "-m", "agent", "--base", str(spool.base), *FAST]
    r = subprocess.run(agent + ["--gpu", "0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "already runs 1 compute process(es)" in r.stderr, r.stderr
    assert "pid 4000000 using 3.0 GB" in r.stderr and "--allow-shared-gpu" in r.stderr
    procs = [subprocess.Popen(agent + args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True)
             for args in (["--gpu", "auto"], ["--gpu", "0", "--allow-shared-gpu"])]
    try:
        def ready(ident: str) -> bool:
            try:
                return json.loads((spool.base / "agents" / f"{ident}.json").read_text())["state"] == "idle"
            except (OSError, ValueError):
                return False
        wait_for(lambda: ready("testhost-gpu1"), 60, "--gpu auto to skip the busy GPU 0")
        wait_for(lambda: ready("testhost-gpu0"), 60, "--allow-shared-gpu to take GPU 0")
    finally:
        for p in procs:
            os.killpg(p.pid, 9)
            p.wait()


def test_a_process_that_leaves_the_gpu_within_the_grace_does_not_make_it_busy(spool: Spool, tmp_path: Path) -> None:
    """NVML may list a process that just ended (the job before, a killed agent's worker) a moment longer."""
    procs = tmp_path / "procs.json"
    procs.write_text(json.dumps([{"pid": 4000000, "mem_mb": 10}]))
    env = nvml_env(tmp_path, {"gpus": [{"processes_file": str(procs)}]})
    p = subprocess.Popen([sys.executable, "-m", "agent", "--base", str(spool.base), "--gpu", "0", *FAST], cwd=REPO,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: any((tmp_path / "gpulocks").glob("gpu-*.lock")), 30, "the agent to take the GPU lock")
        procs.write_text("[]")  # gone
        wait_for(lambda: (spool.base / "agents" / "testhost-gpu0.json").exists() or p.poll() is not None, 30,
                 "the agent to start, or exit")
        assert p.poll() is None, p.stdout.read().decode()
    finally:
        os.killpg(p.pid, 9)
        p.wait()


def test_a_former_agents_leftover_on_its_gpu_does_not_make_it_busy(tmp_path: Path) -> None:
    """What the busy check (``agent.slot._refuse_busy``) leaves out: processes with the agent's marks."""
    from gpupool.agent.worker_control import agent_marks, has_marks
    marks = agent_marks("testhost-gpu0", str(tmp_path))
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env={**os.environ, **marks})
    try:
        wait_for(lambda: has_marks(p.pid, marks), 10, "the marks in its environment")
        assert not has_marks(p.pid, agent_marks("testhost-gpu1", str(tmp_path)))
        assert not has_marks(os.getpid(), marks)
    finally:
        p.kill()
        p.wait()


@pytest.mark.timeout(120)
def test_a_gpu_nvml_loses_at_run_time_drains_its_agent_through_the_real_probe(spool: Spool, tmp_path: Path,
                                                                              stop_all) -> None:
    lost = tmp_path / "gpu0.lost"
    env = nvml_env(tmp_path, {"gpus": [{"lost_if": str(lost)}, {}]})
    assert start_agents(2, spool.base, env).returncode == 0
    hb = lambda: json.loads((spool.base / "agents" / "testhost-gpu0.json").read_text())  # noqa: E731
    lost.touch()
    sick = wait_for(lambda: (h := hb())["state"] == "draining" and h, 60, "the agent to drain")
    assert sick["gpu"]["error"] == "NVMLError_GpuIsLost: GPU is lost" and "its GPU does not answer" in sick["last_error"]
    done = probe_run(spool, base_env(tmp_path), "after-lost", 4)
    assert {r["agent"] for r in done.values()} == {"testhost-gpu1"}


# GPU locks every user of the host can take ------------------------------------------------------------
def in_child(fn, uid: int | None = None, umask: int | None = None) -> tuple[int, str]:
    """Run ``fn()`` in a forked child (as ``uid``, with ``umask``): (exit code, what it printed or raised)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code, text = 0, ""
        try:
            os.close(r)
            if umask is not None:
                os.umask(umask)
            if uid is not None:
                os.setgid(uid)
                os.setuid(uid)
            text = str(fn())
        except BaseException as e:
            code, text = 1, f"{type(e).__name__}: {e}"
        os.write(w, text.encode())
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        text = f.read().decode()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to act as two users")
def test_a_gpu_lock_made_by_one_user_under_umask_077_is_taken_by_another(monkeypatch) -> None:
    """Before: lock files were created 0644 (0600 under umask 077) in the 1777 folder, and another
    user's agent on the then free GPU died of a PermissionError traceback."""
    from gpupool.agent.gpu import FakeProbe
    from gpupool.agent.slot import claim

    nobody = 65534
    top = Path(tempfile.mkdtemp(prefix="gpupool-locks-test-"))  # not under pytest's tmp root: private to root
    try:
        top.chmod(0o755)
        monkeypatch.setenv("GPUPOOL_LOCK_DIR", str(top / "locks"))
        probe = FakeProbe([{}, {}])
        spools = {}
        for who, uid in (("root", 0), ("nobody", nobody)):
            spools[who] = top / who
            spools[who].mkdir()
            os.chown(spools[who], uid, uid)

        def take(who: str, gpu: str):
            def fn() -> str:
                slot = claim(Spool(spools[who]).ensure(), probe, "h", gpu, False, 0.0)
                slot.release()
                return slot.agent_id
            return fn

        assert in_child(take("root", "0"), umask=0o077) == (0, "h-gpu0")
        lock = top / "locks" / "gpu-GPU-fake-0.lock"
        assert oct(lock.stat().st_mode & 0o777) == oct(0o666)
        assert in_child(take("nobody", "0"), uid=nobody, umask=0o077) == (0, "h-gpu0")
        # a lock file another user made private (an older version, by hand): one clear line, no traceback
        old = top / "locks" / "gpu-GPU-fake-1.lock"
        os.close(os.open(old, os.O_CREAT | os.O_WRONLY, 0o644))
        old.chmod(0o644)
        code, text = in_child(take("nobody", "1"), uid=nobody)
        assert code == 1 and text.startswith("SpoolError") and "belongs to root" in text and "chmod 666" in text
        assert "GPUPOOL_LOCK_DIR" in text
    finally:
        subprocess.run(["rm", "-rf", str(top)])


# workers named for ps and nvidia-smi ------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_each_worker_is_named_after_its_agent_and_the_chunk_it_runs(spool: Spool, agents, tmp_path: Path) -> None:
    """Before: every worker was ``python -m agent.worker_process 11 14 <pid>``, shown as ``python``. The kernel
    name (comm) is set in any case; the command line through setproctitle, here its stand-in,
    which logs the titles it is given."""
    titles = tmp_path / "titles"
    env = base_env(tmp_path, FAKE_SETPROCTITLE_LOG=str(titles))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests" / "fake_setproctitle")])
    a = agents(1, env_=env)[0]
    pid = a.heartbeat()["spare_pid"]  # ready before any run; the first run takes it
    # ps, top (comm, set as the worker starts, perhaps just after the agent's first heartbeat); ps -f
    wait_for(lambda: Path(f"/proc/{pid}/comm").read_text().strip() == "w:testhost-cpu0", 30, "the worker's name")
    assert b"testhost-cpu0" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    gate = tmp_path / "gate"
    feeder = subprocess.Popen([sys.executable, "main.py", "--base", str(spool.base), "--task", "tests.faulty:gated_array",
                               "--chunks", "1", "--kwargs", json.dumps({"gate": str(gate), "mb": 0.01}), "--run",
                               "named", "--no-progress"], cwd=REPO, env=env)
    try:
        def last_title() -> str | None:  # the agent's other workers (its next spare) log their titles here too
            mine = [line for line in titles.read_text().splitlines() if line.startswith(f"{pid} ")]
            return mine[-1] if mine else None

        wait_for(lambda: last_title() == f"{pid} gpupool-worker testhost-cpu0 named chunk 0", 60,
                 "the worker titled after the chunk it runs")
        gate.touch()
        assert feeder.wait(timeout=60) == 0
        wait_for(lambda: last_title() == f"{pid} gpupool-worker testhost-cpu0 idle", 30, "the worker titled idle again")
    finally:
        gate.touch()
        feeder.kill()


@pytest.mark.timeout(120)
def test_status_shows_the_gpu_memory_each_worker_holds(spool: Spool, tmp_path: Path, stop_all) -> None:
    procs = tmp_path / "procs.json"
    env = nvml_env(tmp_path, {"gpus": [{"processes_file": str(procs)}]})
    assert start_agents(1, spool.base, env).returncode == 0
    hb = lambda: json.loads((spool.base / "agents" / "testhost-gpu0.json").read_text())  # noqa: E731
    assert hb()["gpu"]["worker_mem"] == 0  # NVML lists no process: the worker holds nothing yet
    procs.write_text(json.dumps([{"pid": hb()["spare_pid"], "mem_mb": 1536}, {"pid": os.getpid(), "mem_mb": 512}]))
    wait_for(lambda: hb()["gpu"]["worker_mem"] == 1536 * 2**20, 30, "the worker's own figure in the heartbeat")
    master = [sys.executable, "-m", "master", "status", "--base", str(spool.base)]
    data = json.loads(subprocess.run(master + ["--json"], cwd=REPO, env=env, capture_output=True, text=True).stdout)
    assert data["agents"][0]["gpu_worker_mem"] == 1536 * 2**20
    table = subprocess.run(master, cwd=REPO, env=env, capture_output=True, text=True).stdout
    assert "WRK GB" in table and re.search(r"testhost-gpu0 .* 1\.5\s*$", table, re.M), table
    procs.write_text(json.dumps([{"pid": 4000000, "mem_mb": 100}]))  # a pid not in our pid namespace
    wait_for(lambda: hb()["gpu"]["worker_mem"] is None, 30, "'cannot say' where NVML's pids are not ours")


# the GPU benchmark's utilisation sampler ---------------------------------------------------------------
def test_the_benchmarks_sampler_reads_the_drivers_samples_and_says_why_on_a_mig_device(nvml) -> None:
    from bench.scenarios.gpu import Sampler
    probe = nvml({"gpus": [{"util": 80}, {"util": 40}, {"mig": [{}]}]})
    plain = [g.uuid for g in probe.devices() if g.mig is None]
    smp = Sampler(plain, nv=nvml.module)
    for _ in range(3):
        smp.read()
    assert [len(s) for s in smp.samples] == [3, 3] and smp.steady_mean() == 60 and smp.error is None
    mig = Sampler([probe.devices()[2].uuid], nv=nvml.module)
    mig.read()  # before: the sampling thread died silently on a MIG device, and the mean was None
    assert mig.error == "NVMLError_NotSupported: Not Supported" and mig.steady_mean() is None
