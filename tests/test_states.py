"""One answer to "what state is this chunk in" and "what state is this run in" (issue 24,
``master.core.states``): the two functions on their own, then real runs read by ``status``, ``status
--json`` and ``runs``: a run stopped early by --max-failures and a run whose master was killed or
interrupted mid-run read so, with no ETA."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from gpupool.jobs.descriptor import JobState
from gpupool.jobs.paths import Spool
from gpupool.jobs.results import Seal, read_seal, seal, sealed, unseal
from gpupool.master.report.dashboard import tables
from gpupool.master.core.states import Marks, RunState, chunk_state, count_states, read_marks, run_state
from gpupool.master.report.status import StatusReader
from tests.helpers import REPO, results, run_main, wait_for


def test_a_chunks_state_goes_by_its_result_then_agents_then_its_runs_cancel_flag() -> None:
    assert chunk_state("ok", True, True) is JobState.OK  # a result is what counts, whatever a heartbeat says
    assert chunk_state("failed", False, True, cancelled=True) is JobState.FAILED
    assert chunk_state(None, True, True) is JobState.RUNNING
    assert chunk_state(None, False, True, cancelled=True) is JobState.QUEUED
    assert chunk_state(None, False, False, cancelled=True) is JobState.CANCELLED
    assert chunk_state(None, False, False) is JobState.PENDING
    assert JobState.OK == "ok" and JobState.CANCELLED == "cancelled"  # the words status shows and results hold


@pytest.mark.parametrize("cancelled", [False, True])
def test_counting_states_is_chunk_state_of_every_chunk(cancelled: bool) -> None:
    results_ = {0: "ok", 1: "failed", 2: "ok", 9: "ok"}  # 9: beyond the run's chunks (a shrunk sweep)
    running, queued = {1, 3, 4}, {3, 5, 6, 12}
    by_chunk = Counter(chunk_state(results_.get(c), c in running, c in queued, cancelled) for c in range(8))
    counts = count_states(8, results_, running, queued, cancelled)
    assert {s: n for s, n in counts.items() if n} == dict(by_chunk)
    assert counts[JobState.RUNNING] == 2 and counts[JobState.QUEUED] == 2  # 3 runs, 1 is final


def _state(chunks: int, fed: bool = False, marks: Marks = Marks(), **n: int) -> RunState:
    counts = Counter({JobState(k): v for k, v in n.items()})
    asked = []
    got = run_state(chunks, counts, marks, lambda: asked.append(1) or fed)
    assert not asked or got in (RunState.FEEDING, RunState.WAITING, RunState.INTERRUPTED)  # the lock: only if needed
    return got


def test_a_runs_state() -> None:
    assert _state(4, ok=4) is RunState.DONE and _state(4, ok=3, failed=1) is RunState.FAILED
    assert _state(4, fed=True, ok=1, running=1, pending=2) is RunState.FEEDING
    assert _state(4, fed=True, ok=1, pending=3) is RunState.WAITING  # nothing at agents: waits for them
    assert _state(4, fed=False, ok=1, queued=2, pending=1) is RunState.INTERRUPTED  # queued, but nothing feeds it
    assert _state(4, fed=True, marks=Marks(cancelled=True), ok=1, pending=3) is RunState.CANCELLED
    assert _state(4, marks=Marks(seal=Seal("3 failed attempts in a row")), pending=4) is RunState.STOPPED_EARLY
    assert _state(4, marks=Marks(seal=Seal()), ok=4) is RunState.DONE
    assert [s for s in RunState if s.fed] == [RunState.FEEDING, RunState.WAITING]
    assert RunState.STOPPED_EARLY.label == "stopped early"


def test_a_run_after_runs_not_over_reads_after_fed_or_not_until_a_chunk_is_at_an_agent(spool: Spool) -> None:
    after = Marks(after=("prep",))
    for fed in (True, False):
        assert _state(4, fed=fed, marks=after, pending=4) is RunState.AFTER
    assert _state(4, fed=True, marks=after, running=1, pending=3) is RunState.FEEDING  # started before: as it is
    assert _state(4, marks=Marks(cancelled=True, after=("prep",)), pending=4) is RunState.CANCELLED
    assert _state(4, marks=after, ok=4) is RunState.DONE
    # what it waits for: runs neither sealed nor cancelled nor gone
    for run in ("prep", "done", "cancelled"):
        spool.mkdir(spool.run_dir(run))
        spool.run_dirs(run)
        spool.run_spec(run).write_text("{}")
    seal(spool, "done")
    spool.cancel_flag("cancelled").write_text("{}")
    assert read_marks(spool, "train", ["prep", "done", "cancelled", "gone"]).after == ("prep",)


def test_a_seal_says_whether_the_run_stopped_early_and_an_empty_one_reads_as_before(spool: Spool) -> None:
    assert read_seal(spool, "r") is None and not sealed(spool, "r")
    spool.run_dirs("r")
    seal(spool, "r")
    assert spool.sealed_flag("r").read_bytes() == b"" and read_seal(spool, "r") == Seal() and sealed(spool, "r")
    seal(spool, "r", "2 chunks failed alike")
    assert read_seal(spool, "r") == Seal("2 chunks failed alike")
    assert not sealed(spool, "r")  # chunks running when it stopped commit after it: their names are not trusted
    spool.sealed_flag("r").write_bytes(b"\x00 not json")
    assert read_seal(spool, "r") == Seal()  # a broken note: a seal all the same, as older readers see it
    unseal(spool, "r")
    assert read_seal(spool, "r") is None


# real runs --------------------------------------------------------------------------------------
def master(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "master", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)


def status(spool: Spool, env: dict[str, str]) -> tuple[dict, dict, str]:
    """(the runs of status --json by name, their progress, the text table)."""
    r = master(["status", "--base", str(spool.base), "--json"], env)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    text = master(["status", "--base", str(spool.base)], env).stdout
    return {x["run"]: x for x in data["runs"]}, data["run_progress"], text


def run_line(text: str, run: str) -> str:
    [line] = [ln for ln in text.splitlines() if ln.startswith(run + " ")]
    return line


@pytest.mark.timeout(150)
def test_a_run_stopped_by_max_failures_reads_as_stopped_early_with_no_eta(spool: Spool, agents, env,
                                                                        tmp_path: Path) -> None:
    agents(2)
    r = run_main(["--base", str(spool.base), "--task", "tests.repeating:fails", "--chunks", "30", "--run", "path",
                  "--kwargs", json.dumps({"marks": str(tmp_path / "marks"), "how": "path", "pause": 0.2}),
                  "--retry-delay", "60", "--no-progress"], env)
    assert r.returncode == 1 and "STOPPED run path:" in r.stdout, r.stdout + r.stderr
    assert read_seal(spool, "path").halted.startswith("3 failed attempts in a row")
    runs, progress, text = status(spool, env)
    assert runs["path"]["state"] == "stopped_early" and progress["path"]["eta_s"] is None, runs
    assert run_line(text, "path").endswith("stopped early"), text
    listed = {x["run"]: x for x in json.loads(master(["runs", "--base", str(spool.base), "--json"], env).stdout)}
    assert listed["path"]["state"] == "stopped_early"
    row = re.search(r'<a href="/run/path">.*?</tr>', tables(StatusReader(spool).gather()))  # the dashboard's row
    assert row and row.group(0).count("stopped early") == 2, row  # by its progress bar, and for an ETA
    # started again, fixed: no longer stopped early
    again = run_main(["--base", str(spool.base), "--task", "tests.repeating:fails", "--chunks", "30", "--run", "path",
                      "--kwargs", json.dumps({"marks": str(tmp_path / "marks"), "how": "path", "pause": 0.0,
                                              "ok": list(range(30))}), "--fresh", "--no-progress"], env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert status(spool, env)[0]["path"]["state"] == "done" and read_seal(spool, "path") == Seal()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_a_run_whose_master_is_gone_reads_as_interrupted_with_no_eta(spool: Spool, agents, env, tmp_path: Path,
                                                                    sig: signal.Signals) -> None:
    agents(2)
    gate = tmp_path / "gate"  # chunks 4.. wait for it: the run is surely under way while the test looks
    feeder = subprocess.Popen([sys.executable, "main.py", "--base", str(spool.base), "--task", "tests.faulty:held_after",
                               "--chunks", "16", "--kwargs", json.dumps({"gate": str(gate), "free": 4}), "--run", "cut",
                               "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        wait_for(lambda: len(results(spool.base, "cut")) >= 4, 60, "the first results")
        runs, progress = wait_for(lambda: (s := status(spool, env)) and s[0]["cut"]["running"] >= 1 and s[:2], 30,
                                  "held chunks running")
        assert runs["cut"]["state"] == "feeding" and progress["cut"]["eta_s"] is not None, (runs, progress)
        feeder.send_signal(sig)
        feeder.communicate(timeout=30)
        runs, progress, text = status(spool, env)
        # its held chunks still run at the agents, with nothing to feed the rest: no ETA
        assert runs["cut"]["running"] >= 1 and runs["cut"]["state"] == "interrupted", runs
        assert progress["cut"]["eta_s"] is None and run_line(text, "cut").endswith("interrupted"), text
    finally:
        gate.touch()
        feeder.kill()
