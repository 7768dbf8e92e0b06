"""The Slurm allocator one step at a time (``master.alloc.Allocator.step``), with a fake Slurm, a
fake view of the spool and a fake clock: how many jobs it submits for the chunks that wait, the
agents it counts, its back-off after failed allocations, jobs it gives back, when it stops.
The real thing on a real Slurm: tests/test_slurm.py."""
from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from gpupool.jobs.heartbeat import Heartbeat
from gpupool.jobs.paths import Spool
from gpupool.master.alloc import AllocConfig, AllocError, Allocator, SlurmJob
from gpupool.master.core.allocs import RunDemand, load_all, plan, waiting
from tests.helpers import REPO


@pytest.mark.parametrize("wait, starting, serving, max_jobs, backlog, expected", [
    (0, 0, 0, 4, 1, 0),  # no chunk waits: nothing
    (10, 0, 0, 4, 1, 1),  # chunks wait: one job, the backlog
    (10, 0, 0, 4, 3, 3),  # a deeper backlog
    (10, 1, 0, 4, 3, 2),  # one already starting counts in the backlog
    (2, 0, 0, 4, 3, 2),  # no more jobs than waiting chunks
    (2, 1, 0, 4, 3, 1),  # ... a starting job counted as taking one of them
    (10, 0, 3, 4, 3, 1),  # serving jobs count in --max-jobs
    (10, 0, 4, 4, 3, 0),  # --max-jobs reached
    (10, 3, 0, 4, 3, 0),  # the backlog full
])
def test_plan(wait: int, starting: int, serving: int, max_jobs: int, backlog: int, expected: int) -> None:
    assert plan(wait, starting, serving, max_jobs, backlog) == expected


def hb(host: str, state: str = "idle", **kw) -> Heartbeat:
    return Heartbeat(agent=f"{host}-gpu0", seq=1, state=state, host=host, hostname=host, **kw)


def test_waiting_counts_pending_chunks_less_the_idle_agents_each_run_may_use() -> None:
    a, b = hb("a"), hb("b")
    assert waiting([], [a]) == 0
    assert waiting([RunDemand("r", 5)], []) == 5
    assert waiting([RunDemand("r", 5)], [a, b]) == 3
    assert waiting([RunDemand("r", 1)], [a, b]) == 0
    only_a = lambda h: h.host == "a"  # noqa: E731 (a run placed on host a)
    assert waiting([RunDemand("r", 5, only_a)], [b]) == 5  # an idle agent the run may not use takes nothing
    assert waiting([RunDemand("r", 5, only_a), RunDemand("s", 2)], [a, b]) == 4 + 0


class FakeSlurm:
    def __init__(self) -> None:
        self.listed: dict[str, SlurmJob] = {}
        self.submitted: list[list[str]] = []
        self.cancelled: list[str] = []
        self.refuse: str | None = None

    def submit(self, args: list[str], env: dict[str, str]) -> str:
        if self.refuse:
            raise AllocError(self.refuse)
        self.submitted.append(args)
        job = str(100 + len(self.submitted))
        self.listed[job] = SlurmJob("PENDING", "", None)
        return job

    def jobs(self, name: str) -> dict[str, SlurmJob]:
        return dict(self.listed)

    def hostnames(self, nodes: str) -> list[str]:
        return nodes.split(",")

    def cancel(self, job: str) -> None:
        self.cancelled.append(job)
        self.listed[job] = SlurmJob("CANCELLED", "", None)


class Pool:
    """What the allocator reads of the spool: runs (name, state, pending) and agents' heartbeats."""

    def __init__(self) -> None:
        self.runs: list[dict] = []
        self.agents: dict[str, Heartbeat] = {}
        self.liveness = SimpleNamespace(views={})

    def gather(self) -> dict:
        self.liveness.views = {i: SimpleNamespace(status=h) for i, h in self.agents.items()}
        rows = [{"id": i, "alive": h.state != "stopped", "state": h.state, "queued": 0, "current": None,
                 "drain_flag": False} for i, h in self.agents.items()]
        return {"runs": self.runs, "agents": rows}


@pytest.fixture
def setup(tmp_path):
    clock = [1000.0]
    spool = Spool(tmp_path / "base")
    spool.ensure()
    slurm, pool = FakeSlurm(), Pool()
    cfg = AllocConfig(max_jobs=2, time="10:00", idle_timeout=30.0, backlog=1, sbatch_args=["--partition=gpu"],
                      script=tmp_path / "agents.sbatch", max_failures=3)
    out = io.StringIO()
    al = Allocator(spool, cfg, slurm, out, clock=lambda: clock[0])
    al.reader = pool
    return SimpleNamespace(al=al, slurm=slurm, pool=pool, clock=clock, spool=spool, out=out)


def start(s, job: str, node: str, at: float = 50.0) -> None:
    s.slurm.listed[job] = SlurmJob("RUNNING", node, at)


def test_a_waiting_run_gets_a_job_then_another_once_the_first_serves_up_to_max_jobs(setup) -> None:
    s = setup
    s.pool.runs = [{"run": "r", "state": "waiting", "pending": 100}]
    assert s.al.step() is None
    assert len(s.slurm.submitted) == 1
    args = s.slurm.submitted[0]
    assert args[:3] == ["--job-name=" + s.al.name, "--time=10:00", args[2]] and "--partition=gpu" in args
    assert args[-2:] == ["--idle-exit", "30"] and args[-3] == str(s.spool.base.resolve())
    assert [(a.job, a.state) for a in load_all(s.spool)] == [("101", "PENDING")]
    s.al.step()
    assert len(s.slurm.submitted) == 1  # the backlog (1) is full: it waits for that one
    start(s, "101", "n1")
    s.al.step()
    assert len(s.slurm.submitted) == 1  # running, but no agent seen from it yet: still starting
    s.pool.agents["n1-gpu0"] = hb("n1", started_at=60.0, state="busy")
    s.al.step()
    assert load_all(s.spool)[0].agents == ["n1-gpu0"]
    assert len(s.slurm.submitted) == 2  # the first serves, chunks still wait: the second
    start(s, "102", "n2")
    s.pool.agents["n2-gpu0"] = hb("n2", started_at=61.0, state="busy")
    s.al.step()
    assert len(s.slurm.submitted) == 2  # --max-jobs 2


def test_idle_agents_take_the_waiting_chunks_first(setup) -> None:
    s = setup
    s.pool.runs = [{"run": "r", "state": "feeding", "pending": 2}]
    s.pool.agents = {"a-gpu0": hb("a"), "b-gpu0": hb("b")}
    s.al.step()
    assert not s.slurm.submitted
    s.pool.runs = [{"run": "r", "state": "interrupted", "pending": 50}]  # no master feeds it: no allocation
    s.pool.agents = {}
    s.al.step()
    assert not s.slurm.submitted


def test_failed_allocations_back_off_and_stop_the_allocator_after_max_failures(setup) -> None:
    s = setup
    s.pool.runs = [{"run": "r", "state": "waiting", "pending": 10}]
    s.slurm.refuse = "sbatch: error: invalid partition specified: gpu"
    assert s.al.step() is None
    assert "next allocation in 10 s" in s.out.getvalue() and "invalid partition" in s.out.getvalue()
    s.slurm.refuse = None
    s.al.step()
    assert not s.slurm.submitted  # backing off
    s.clock[0] += 10
    s.al.step()
    assert len(s.slurm.submitted) == 1
    s.slurm.listed["101"] = SlurmJob("FAILED", "n1", 50.0)  # ended with no agent seen: a failure too
    s.al.step()
    assert "job 101 ended (FAILED) with no agent seen" in s.out.getvalue()
    assert "next allocation in 20 s" in s.out.getvalue()
    assert load_all(s.spool)[0].state == "FAILED"
    s.clock[0] += 20
    s.slurm.refuse = "sbatch: error: Batch job submission failed"
    assert s.al.step() == 1  # three in a row: it stops, exit 1


def test_a_job_that_has_not_started_is_given_back_when_no_chunk_waits_and_the_allocator_stops(setup) -> None:
    s = setup
    s.pool.runs = [{"run": "r", "state": "waiting", "pending": 3}]
    s.al.step()
    s.pool.runs = [{"run": "r", "state": "done", "pending": 0}]
    assert s.al.step() is None
    assert s.slurm.cancelled == ["101"]
    a = load_all(s.spool)[0]
    assert a.cancelled and not a.failed
    s.al.step()  # it ended (cancelled by us): no failure, no back-off
    assert "failed" not in s.out.getvalue()
    assert s.al.step() is None  # no work and nothing left: it waits the idle timeout first
    s.clock[0] += 30
    assert s.al.step() == 0


def test_a_job_of_this_spool_that_has_no_record_is_taken_over(setup) -> None:
    s = setup
    s.slurm.listed["77"] = SlurmJob("RUNNING", "n9", 10.0)  # an allocator stopped before writing its record
    s.pool.agents["n9-gpu0"] = hb("n9", started_at=11.0)
    s.al.step()
    assert [(a.job, a.nodes, a.agents) for a in load_all(s.spool)] == [("77", ["n9"], ["n9-gpu0"])]
    s.pool.agents["n9-gpu1"] = hb("n9", started_at=5.0)  # started before the job: not one of its agents
    s.al.step()
    assert load_all(s.spool)[0].agents == ["n9-gpu0"]


def test_a_time_limit_that_leaves_the_agents_no_time_before_their_end_margin_is_refused() -> None:
    from gpupool.master.alloc import AllocConfig
    from gpupool.master.errors import UsageError

    with pytest.raises(UsageError, match=r"--time 1: the agents stop --end-margin 60 s before their job's end"):
        AllocConfig(1, "1", 5.0).check()  # one minute, and agents stop 60 s before its end
    AllocConfig(1, "1", 5.0, agent_args=["--end-margin", "10"]).check()  # they stop 10 s before it: fine
    AllocConfig(1, "0-00:02:00", 5.0).check()
    with pytest.raises(UsageError, match="--end-margin 90 s"):
        AllocConfig(1, "1:30", 5.0, agent_args=["--end-margin=90"]).check()


def test_a_run_whose_chunks_an_allocation_is_too_short_for_gets_none(setup) -> None:
    from gpupool.master.spec.runspec import build, save_or_check

    s = setup  # --time 10:00 (600 s), the agents' default --end-margin 60: 540 s for a chunk
    for run, chunk_time in (("long", 541.0), ("fits", 540.0)):
        save_or_check(s.spool, build(task="examples.noop:noop", chunks=4, run=run, chunk_time=chunk_time,
                                     workdir=str(REPO)), fresh=True)
    s.pool.runs = [{"run": "long", "state": "waiting", "pending": 4}]
    s.al.step()
    s.al.step()
    assert not s.slurm.submitted
    assert s.out.getvalue().count("run long: its chunks take 541 s (--chunk-time), more than an allocation of "
                                  "--time 10:00 leaves its agents (540 s before their --end-margin)") == 1
    s.pool.runs = [{"run": "fits", "state": "waiting", "pending": 4}]
    s.al.step()
    assert len(s.slurm.submitted) == 1
