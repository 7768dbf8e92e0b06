"""Batches at the agent (issue 27, ``jobs.batches``): a batch job, put in a real agent's mailbox by
hand as a master would, runs all its chunks in one request to its worker and commits one slot
``results/<run>/<first>+<count>.json``; the chunks are read back through ``jobs.results`` as
single chunks' results are."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gpupool.agent.agent import Agent, AgentConfig
from gpupool.agent.gpu import NoGpu
from gpupool.agent.slot import Slot
from gpupool.agent.worker_control import Worker
from gpupool.jobs.batches import read_slot
from gpupool.jobs.descriptor import Job, JobKind
from gpupool.jobs.mailbox import Mailbox
from gpupool.jobs.npzio import load_npz
from gpupool.jobs.paths import Spool
from gpupool.jobs.results import attempt_record, chunk_result, read_result
from tests.helpers import REPO, base_env, wait_for

RUN = "b"


def bjob(first: int, count: int, target: str, run: str = RUN, total: int | None = None, **kw: Any) -> Job:
    """A batch of chunks ``first`` .. ``first + count - 1``, as a master queues one."""
    return Job(run=run, chunk_id=first, total_chunks=total or first + count, kind=JobKind.CALLABLE,
               target=target, workdir=str(REPO), batch=count, submitted_at=1.0, **kw)


def single(chunk: int, total: int, target: str = "examples.noop:sleepy", run: str = RUN, **kw: Any) -> Job:
    return Job(run=run, chunk_id=chunk, total_chunks=total, kind=JobKind.CALLABLE, target=target,
               workdir=str(REPO), kwargs=kw or {"seconds": 0}, submitted_at=1.0)


def put(spool: Spool, agent: str, *jobs: Job) -> None:
    Mailbox(spool, agent).update(lambda js: js + list(jobs))


def slot_of(spool: Spool, job: Job, timeout: float = 60.0) -> Any:
    """The batch's slot once committed (with its record)."""
    path = spool.batch_json(job.run, job.chunk_id, job.batch)
    wait_for(path.exists, timeout, f"the slot of {job.run} {job.chunk_id}+{job.batch}")
    return read_slot(path)


def result_files(spool: Spool, run: str = RUN) -> list[str]:
    return sorted(p.name for p in spool.result_dir(run).iterdir())


def test_a_batch_of_no_op_chunks_commits_one_slot_with_every_value_in_order(spool: Spool, agents) -> None:
    a = agents(1)[0]
    job = bjob(0, 1000, "examples.noop:sleepy", kwargs={"seconds": 0})
    put(spool, a.id, job)
    slot = slot_of(spool, job)
    assert slot.codes == "o" * 1000 and slot.attempt == 1 and slot.fenced is None
    assert slot.rec["values"] == list(range(1000))
    assert len(slot.rec["durations"]) == 1000 and all(d >= 0 for d in slot.rec["durations"])
    assert result_files(spool) == ["000000+1000.json"]  # nothing per chunk
    assert not any(spool.run_log_dir(RUN).iterdir())  # silent chunks: no log at all
    for c in (0, 1, 517, 999):
        rec = chunk_result(spool, RUN, c)
        assert rec["status"] == "ok" and rec["value"] == c and rec["chunk_id"] == c and rec["batch"] == [0, 1000]
        assert rec["agent"] == a.id and rec["host"] == "testhost" and rec["pid"] == a.proc.pid
        assert rec["device"] == "cpu" and rec["gpu_id"] == 0
        assert rec["started_at"] <= rec["finished_at"]


@pytest.mark.parametrize("max_attempts, code", [(1, "f"), (2, "h")])
def test_a_chunk_that_raises_fails_alone_and_the_rest_of_the_batch_is_ok(spool: Spool, agents, max_attempts: int,
                                                                          code: str) -> None:
    a = agents(1)[0]
    job = bjob(10, 6, "examples.noop:fail_on", total=20, kwargs={"bad": [12]}, max_attempts=max_attempts)
    exits = bjob(0, 3, "tests.batch_tasks:exits_on", total=20, kwargs={"bad": 1}, max_attempts=max_attempts)
    put(spool, a.id, job, exits)
    slot = slot_of(spool, job)
    assert slot.codes == "oo" + code + "ooo"
    assert slot.rec["values"] == [10, 11, None, 13, 14, 15]
    failed = attempt_record(spool, RUN, 12, 1)
    assert failed["status"] == "failed" and failed["error"]["type"] == "ValueError"
    assert "chunk 12 is on the bad list" in failed["error"]["message"]
    if code == "f":
        assert chunk_result(spool, RUN, 12)["error"]["type"] == "ValueError"  # its final result
    else:
        with pytest.raises(FileNotFoundError):  # history only: its next attempt runs as a single chunk
            chunk_result(spool, RUN, 12)
    assert [chunk_result(spool, RUN, c)["value"] for c in (10, 11, 13, 14, 15)] == [10, 11, 13, 14, 15]
    # SystemExit in a task fails its chunk, never the worker (and so never the batch)
    assert slot_of(spool, exits).codes == "o" + code + "o"
    assert attempt_record(spool, RUN, 1, 1)["error"]["type"] == "SystemExit"
    assert a.proc.poll() is None


@pytest.mark.parametrize("target, kwargs", [("tests.batch_tasks:dies_on", {"bad": 2}),
                                            ("tests.no_such_module:f", {})])
def test_a_batch_that_does_not_end_well_as_a_whole_hands_every_chunk_back(spool: Spool, agents, target: str,
                                                                        kwargs: dict) -> None:
    """Its worker died (or the task cannot be imported): every chunk handed back (``b``), to run
    again one by one; the agent lives on and serves its next job."""
    a = agents(1)[0]
    job = bjob(0, 5, target, total=6, kwargs=kwargs)
    put(spool, a.id, job, single(5, 6))
    slot = slot_of(spool, job)
    assert slot.codes == "bbbbb" and slot.fenced is None
    for c in range(5):
        with pytest.raises(FileNotFoundError):
            chunk_result(spool, RUN, c)
        assert attempt_record(spool, RUN, c, 1) is None  # no attempt of theirs counted
    wait_for(spool.result_json(RUN, 5).exists, 60, "the job after the batch")
    assert read_result(spool.result_json(RUN, 5))["status"] == "ok" and a.proc.poll() is None
    if "dies_on" in target:  # what it printed before it died is in the batch's log
        assert "chunk 2 is about to kill its worker" in spool.batch_log(RUN, 0, 5).read_text()


def test_a_gpu_fault_fails_its_chunk_hands_the_rest_back_and_the_worker_is_replaced(spool: Spool, agents) -> None:
    a = agents(1)[0]
    job = bjob(0, 5, "tests.batch_tasks:cuda_fault_on", total=7, kwargs={"bad": 2})
    after = bjob(5, 2, "examples.noop:sleepy", total=7, kwargs={"seconds": 0})
    put(spool, a.id, job, after)
    slot = slot_of(spool, job)
    assert slot.codes == "oofbb"
    err = chunk_result(spool, RUN, 2)["error"]
    assert "device-side assert" in err["message"] and err["gpu_error"] == "kernel" and err["poisoned"]
    assert slot_of(spool, after).codes == "oo"  # run by a fresh worker
    assert "CUDA context unusable" in spool.agent_log(a.id).read_text()


def test_chunks_returning_arrays_have_their_npz_named_in_the_slot(spool: Spool, agents) -> None:
    a = agents(1)[0]
    job = bjob(0, 7, "tests.batch_tasks:arrays_on", kwargs={"every": 3})
    put(spool, a.id, job)
    slot = slot_of(spool, job)
    assert slot.codes == "o" * 7
    assert sorted(slot.rec["arrays"]) == ["0", "1", "3", "4", "6"]
    assert sorted(n for n in result_files(spool) if n.endswith(".npz")) == [
        f"{c:06d}.a1.npz" for c in (0, 1, 3, 4, 6)]
    for c in (0, 3, 6):
        rec = chunk_result(spool, RUN, c)
        arrays = load_npz(spool.arrays_of(RUN, rec))
        assert arrays["x"].tolist() == list(range(c + 1)) and arrays["y"].tolist() == [float(c)] * 2
        assert rec["arrays_bytes"] == spool.arrays_of(RUN, rec).stat().st_size and "arrays_form" not in rec
    for c in (1, 4):
        rec = chunk_result(spool, RUN, c)
        assert rec["arrays_form"] == "tuple"
        assert load_npz(spool.arrays_of(RUN, rec))["arr_0"].tolist() == [0, c, 2 * c]
    assert [chunk_result(spool, RUN, c)["value"] for c in (2, 5)] == [20, 50]
    assert chunk_result(spool, RUN, 2).get("arrays") is None


def test_what_the_chunks_print_goes_to_the_batch_log_alone(spool: Spool, agents) -> None:
    a = agents(1)[0]
    job = bjob(3, 4, "tests.batch_tasks:chatty", total=7)
    put(spool, a.id, job)
    slot_of(spool, job)
    logs = sorted(p.name for p in spool.run_log_dir(RUN).iterdir())
    assert logs == ["000003+4.log"]
    text = spool.batch_log(RUN, 3, 4).read_text()
    header, *lines = text.splitlines()
    assert header.startswith("# attempt 1 at ") and "chunks 3..6" in header
    assert lines == [f"{kind} of chunk {c}" for c in range(3, 7) for kind in ("out", "err")]


def test_a_batch_of_a_sweep_passes_each_chunk_its_own_parameters(spool: Spool, agents) -> None:
    a = agents(1)[0]
    params = [{"lr": 0.1 * (i + 1), "depth": i} for i in range(4)]
    job = bjob(0, 4, "tests.batch_tasks:echo", kwargs={"base": "x", "depth": -1}, batch_params=params)
    grows = bjob(4, 3, "tests.batch_tasks:grows", total=7, kwargs={"seen": [99], "opts": {"k": 1}})
    put(spool, a.id, job, grows)
    slot = slot_of(spool, job)
    assert slot.codes == "oooo"
    for c in range(4):
        rec = chunk_result(spool, RUN, c)
        assert rec["value"] == {"chunk": c, "base": "x", **params[c]} and rec["params"] == params[c]
    # a list or a dict among the run's kwargs is each chunk's own, as a single chunk's is
    slot = slot_of(spool, grows)
    assert slot.rec["values"] == [[[99, c], [str(c), "k"]] for c in (4, 5, 6)]


def test_a_batch_gets_the_arguments_a_single_chunk_gets(spool: Spool, agents) -> None:
    a = agents(1)[0]
    job = bjob(0, 2, "examples.noop:square", total=3, kwargs={"extra": 1})
    put(spool, a.id, job, single(2, 3, "examples.noop:square", extra=1))
    slot_of(spool, job)
    wait_for(spool.result_json(RUN, 2).exists, 60, "the single chunk")
    alone = read_result(spool.result_json(RUN, 2))["value"]["builtins"]
    assert "extra" in alone and "device" in alone  # square(chunk_id, **kwargs): every built-in, and the kwarg
    assert [chunk_result(spool, RUN, c)["value"] for c in (0, 1)] == [{"square": c * c, "builtins": alone}
                                                                      for c in (0, 1)]


def test_a_batch_whose_slot_exists_is_dropped_unrun(spool: Spool, agents) -> None:
    a = agents(1)[0]
    job = bjob(0, 3, "tests.batch_tasks:chatty", total=4)
    spool.result_dir(RUN).mkdir(parents=True, exist_ok=True)
    fenced = {"schema": 1, "run": RUN, "first": 0, "count": 3, "attempt": 1, "fenced": "taken back"}
    spool.batch_json(RUN, 0, 3).write_text(json.dumps(fenced))
    put(spool, a.id, job, single(3, 4))
    wait_for(spool.result_json(RUN, 3).exists, 60, "the job after the batch")
    assert json.loads(spool.batch_json(RUN, 0, 3).read_text()) == fenced
    assert result_files(spool) == ["000000+3.json", "000003.json"]
    assert not spool.batch_log(RUN, 0, 3).exists()  # never run
    assert "dropped: the batch already has its results" in spool.agent_log(a.id).read_text()


def test_a_batch_times_out_after_its_chunks_time_outs_together(spool: Spool, agents) -> None:
    """``timeout`` is each chunk's: a batch of four 0.3 s chunks passes a 1 s one; a chunk that
    hangs is found after its own time-out (the batch says which chunk it starts), and every
    chunk of its batch is handed back."""
    a = agents(1)[0]
    fits = bjob(0, 4, "tests.batch_tasks:naps", total=8, kwargs={"seconds": 0.3}, timeout=1.0)
    hangs = bjob(4, 4, "tests.batch_tasks:naps", total=8, kwargs={"seconds": 0.0, "forever": 5}, timeout=1.0)
    put(spool, a.id, fits, hangs)
    assert slot_of(spool, fits).codes == "oooo"
    assert slot_of(spool, hangs, timeout=90).codes == "bbbb"
    assert "a chunk of the batch from chunk 4 on ran past its timeout of 1 s" in spool.agent_log(a.id).read_text()


def test_a_chunk_that_hangs_in_a_long_batch_is_found_after_its_own_time_out(spool: Spool, agents) -> None:
    """A batch of 400 instant chunks with a 2 s time-out each, chunk 3 hanging: the batch is
    handed back after about 2 s, not after 400 x 2 s (the whole batch's allowance)."""
    a = agents(1)[0]
    hangs = bjob(0, 400, "tests.batch_tasks:naps", total=400, kwargs={"seconds": 0.0, "forever": 3}, timeout=2.0)
    put(spool, a.id, hangs)
    assert slot_of(spool, hangs, timeout=60).codes == "b" * 400
    assert "a chunk of the batch from chunk 0 on ran past its timeout of 2 s" in spool.agent_log(a.id).read_text()


def test_the_heartbeat_names_a_running_batch_by_its_first_chunk_and_count(spool: Spool, agents) -> None:
    a = agents(1)[0]
    job = bjob(2, 10, "tests.batch_tasks:naps", total=12, kwargs={"seconds": 0.3})
    put(spool, a.id, job)

    def running() -> Any:
        cur = (a.heartbeat() or {}).get("current")
        return cur if cur and cur.get("batch") else None
    cur = wait_for(running, 30, "a heartbeat naming the batch")
    assert (cur["run"], cur["chunk_id"], cur["attempt"], cur["batch"]) == (RUN, 2, 1, 10)
    slot_of(spool, job)


def step_agent(spool: Spool, tmp_path: Path) -> tuple[Agent, list[Worker]]:
    """An agent stepped by the test, its workers real processes: (it, the workers made so far)."""
    made: list[Worker] = []

    def make(env: dict[str, str], preload: tuple[str, ...]) -> Worker:
        made.append(Worker({**env, **base_env(tmp_path)}, spool.worker_log("t-cpu0"), cwd=str(REPO), preload=preload))
        return made[-1]
    agent = Agent(spool, Slot("t-cpu0", 0, None, []), NoGpu(), "t",
                  AgentConfig(watch="poll", prune_quiet=0.0, spare_worker=False), make_worker=make)
    agent.mailbox.ensure()
    return agent, made


def test_a_batch_is_sent_ahead_to_the_worker_and_sends_the_next_one_ahead(spool: Spool, tmp_path: Path) -> None:
    """Pipelining: the next batch of the run waits in the worker's pipe while this one runs and is
    committed; the heartbeat names it ``ahead``, with its chunk count."""
    agent, made = step_agent(spool, tmp_path)
    jobs = [bjob(5 * k, 5, "examples.noop:sleepy", total=15, kwargs={"seconds": 0}) for k in range(3)]
    put(spool, agent.id, *jobs)
    agent._durations[RUN] = 0.01  # short jobs: the next one is sent ahead
    try:
        assert agent.step()
        assert agent.runner.ahead == jobs[1]
        assert agent._heartbeat(1).ahead.to_dict() == {"run": RUN, "chunk_id": 5, "attempt": 1, "since": None,
                                                        "batch": 5}
        assert agent.step() and agent.runner.ahead == jobs[2]
        assert agent.step() and agent.runner.ahead is None
        assert [read_slot(spool.batch_json(RUN, j.chunk_id, 5)).codes for j in jobs] == ["ooooo"] * 3
        assert len(made) == 1 and made[0].sent == 3  # each batch sent once, all to one worker
    finally:
        agent.runner.workers.stop_all()


def test_a_chunk_out_of_gpu_memory_beside_another_runs_worker_is_handed_back_once_that_one_stops(
        spool: Spool, tmp_path: Path) -> None:
    agent, made = step_agent(spool, tmp_path)
    put(spool, agent.id, single(0, 1, run="other"))
    try:
        assert agent.step() and len(agent.runner.workers.live) == 1  # the other run's worker stays warm
        first = bjob(0, 4, "tests.batch_tasks:oom_on", total=8, kwargs={"bad": 1})
        put(spool, agent.id, first)
        assert agent.step()
        assert read_slot(spool.batch_json(RUN, 0, 4)).codes == "obbb"  # it runs again alone, the memory back
        assert [key[0] for key in agent.runner.workers.live] == [RUN]
        again = bjob(4, 4, "tests.batch_tasks:oom_on", total=8, kwargs={"bad": 5})
        put(spool, agent.id, again)
        assert agent.step()
        assert read_slot(spool.batch_json(RUN, 4, 4)).codes == "ofbb"  # nobody else to blame: its failure
    finally:
        agent.runner.workers.stop_all()


def test_a_child_forked_by_a_chunk_of_a_batch_runs_no_chunk_after_it(spool: Spool, agents, tmp_path: Path) -> None:
    from gpupool.agent.worker_control import pid_alive

    a = agents(1)[0]
    marks = tmp_path / "marks"
    job = bjob(0, 4, "tests.batch_tasks:forks_on", kwargs={"bad": 1, "marks": str(marks)})
    put(spool, a.id, job)
    slot = slot_of(spool, job)
    assert slot.codes == "oooo" and slot.rec["values"] == ["parent"] * 4
    child = int(wait_for(lambda: [ln for ln in marks.read_text().splitlines() if ln.startswith("child")], 30,
                         "the child's mark")[0].split()[1])
    wait_for(lambda: not pid_alive(child), 30, "the forked child's end")
    ran = [ln.split() for ln in marks.read_text().splitlines() if not ln.startswith("child")]
    assert [int(c) for c, _ in ran] == [0, 1, 2, 3] and len({pid for _, pid in ran}) == 1
