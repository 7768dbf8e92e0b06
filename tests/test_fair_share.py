"""Fair share between runs: which run's job an agent takes next (agent.fairshare), and two real
masters sharing real agents."""
from __future__ import annotations

import threading

from gpupool.agent.fairshare import FairShare
from gpupool.jobs.descriptor import Job, JobKind
from gpupool.jobs.paths import Spool
from tests.helpers import results, run_main, wait_for


def job(run: str, c: int, share: float = 1.0) -> Job:
    return Job(run=run, chunk_id=c, total_chunks=100, kind=JobKind.CALLABLE, target="x:y", share=share)


def serve(fs: FairShare, jobs: list[Job], n: int, seconds: float = 1.0) -> list[str]:
    """Let one agent pick ``n`` times from a mailbox that keeps jobs of every run (a master refills it)."""
    picked = []
    for _ in range(n):
        j = fs.choose(jobs)
        fs.served(j, seconds)
        picked.append(j.run)
    return picked


def test_one_run_is_taken_in_mailbox_order() -> None:
    jobs = [job("a", 3), job("a", 1)]
    assert FairShare().choose(jobs) is jobs[0] and FairShare().choose([]) is None


def test_equal_runs_take_turns_and_a_newcomer_goes_next() -> None:
    fs = FairShare()
    assert serve(fs, [job("a", 0)], 5) == ["a"] * 5  # a alone for a while: it banks no priority over b
    jobs = [job("a", 1), job("a", 2), job("b", 0)]
    assert fs.choose(jobs).key == ("b", 0, 1)  # b starts at a's virtual time and wins the tie
    assert serve(fs, jobs, 6) == ["b", "a", "b", "a", "b", "a"]


def test_weights_set_the_shares_of_the_agents_time() -> None:
    fs = FairShare()
    picked = serve(fs, [job("a", 0), job("b", 0, share=3.0)], 40)
    assert picked.count("b") == 30 and picked.count("a") == 10
    fs = FairShare()
    picked = serve(fs, [job("a", 0), job("b", 0)], 1, seconds=9.0) + serve(fs, [job("a", 0), job("b", 0)], 9)
    assert picked == ["a"] + ["b"] * 9  # time, not job counts: a's one 9 s chunk is worth nine of b's 1 s


def test_a_run_absent_for_a_while_gets_no_credit() -> None:
    fs = FairShare()
    serve(fs, [job("a", 0), job("b", 0)], 4)
    serve(fs, [job("a", 0)], 10)  # b had nothing queued here
    assert serve(fs, [job("a", 0), job("b", 0)], 4).count("b") == 2  # turns again, not 10 b's in a row


def test_the_job_still_running_counts_when_the_next_one_is_chosen_early() -> None:
    fs = FairShare()
    jobs = [job("a", 0), job("b", 0)]
    fs.served(job("a", 9), 1.0)
    fs.served(job("b", 9), 1.0)
    assert fs.choose(jobs, running=job("a", 9), expected=1.0).run == "b"
    assert fs.choose(jobs, running=job("b", 9), expected=1.0).run == "a"
    assert fs.choose(jobs, skip={jobs[1].uid}).run == "a" and fs.choose(jobs, running=jobs[0]).run == "b"


def test_two_runs_on_one_pool_share_it(spool: Spool, agents, env) -> None:
    """Run a fills 4 agents with 100 ms chunks; run b, started later, gets agents as they free
    up instead of waiting for a's last job to start."""
    agents(4)
    base = str(spool.base)
    out: dict[str, object] = {}

    def feed(name: str, chunks: int) -> None:
        out[name] = run_main(["--base", base, "--task", "examples.noop:sleepy", "--chunks", str(chunks),
                              "--kwargs", '{"seconds": 0.1}', "--run", name, "--no-progress"], env, timeout=170)

    a = threading.Thread(target=feed, args=("a", 240))
    a.start()
    wait_for(lambda: len(results(spool.base, "a")) >= 8, 60, "run a under way")
    feed("b", 24)
    a.join(timeout=170)
    assert out["a"].returncode == 0 and out["b"].returncode == 0, (out["a"].stderr, out["b"].stderr)
    a_done = results(spool.base, "a")
    b_last = max(r["finished_at"] for r in results(spool.base, "b").values())
    after_b = [c for c, r in a_done.items() if r["started_at"] > b_last]
    assert len(results(spool.base, "b")) == 24 and after_b, "b waited for a to run dry"
