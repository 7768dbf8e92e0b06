"""The benchmark suite's smoke form (``python bench/run.py --smoke``): our pool and the floor
only, tiny sizes, real agents. Keeps the bench code from rotting; no peer needs installing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(170)
def test_bench_smoke_runs_every_scenario_and_writes_sane_results(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = {**os.environ, "TMPDIR": str(tmp_path), "GPUPOOL_LOCK_DIR": str(tmp_path / "gpulocks"),
           "PYTHONPATH": str(REPO)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    p = subprocess.run([sys.executable, "bench/run.py", "--smoke", "--out", str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=150)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    [js] = list(out.glob("*-smoke.json"))
    assert js.with_suffix(".md").is_file()
    doc = json.loads(js.read_text())
    meta, raw = doc["meta"], doc["raw"]

    # every run's chunks were committed exactly once, and the check did run
    assert meta["exactly_once_ok"] and len(meta["checks"]) >= 10
    assert all(c["ok"] for c in meta["checks"])

    tiny = raw["1_tiny"]
    for k, rates in tiny["ours"].items():
        assert rates and all(0 < r < 1e6 for r in rates), (k, rates)
    assert tiny["gaps"]["2"]["n"] > 0 and 0 <= tiny["gaps"]["2"]["p50_ms"] < 5000

    small = raw["2_small"]
    assert 0 < small["floor"][0] < small["ours_callable"][0] < 10
    assert 0 < small["ours_script"][0] < 60 and 0 < small["by_hand"][0] < 60

    lat = raw["3_latency"]
    for mode in ("inotify", "poll"):
        assert 0 < lat[mode]["submit_to_start"]["p50_ms"] < 10_000
        assert 0 <= lat[mode]["finish_to_collected"]["p50_ms"] < 10_000

    sh = raw["5_shared"]
    for m in sh["shared"]:  # read once per agent at most (0 where the spool is not on a block device)
        assert 0 <= sum(m["read_bytes"]) <= 1.05 * sh["agents"] * sh["file_bytes"]
        assert sum(m["rchar"]) < 0.5 * sh["file_bytes"] * sh["chunks"]  # memory-mapped, not copied

    scale = raw["6_scale"]["ours"]
    for n, pt in scale.items():
        assert 0 < pt["setup_s"] < 30 and 0 < pt["maxrss_mb"] < 1000 and 0 < pt["status_s"] < 60, (n, pt)

    idle = raw["7_idle"]
    for mode in ("inotify", "poll"):
        assert 0 <= idle[mode]["cpu_core_pct"] < 100

    for case in raw["12_map"]["cases"]:  # Executor.map beside ProcessPoolExecutor.map, values checked in the child
        assert case["ours_s"] and all(0 < t < 60 for t in case["ours_s"] + case["ppe_s"]), case

    batch = raw["13_batch"]  # issue 27: no-op throughput, and a whole main.py run's files, memory, status, collect
    assert batch["ours"] and all(0 < r < 1e6 for r in batch["ours"]), batch
    [(n, big)] = batch["big"].items()
    check = next(c for c in meta["checks"] if c.get("run") == f"big-{n}")
    assert check["committed"] == int(n) and 0 < check["files"] <= int(n) and check["bytes"] > 0, check
    assert big["files"] == check["files"] and 0 < big["maxrss_mb"] < 1000, big
    assert 0 < big["wall_s"] < 60 and 0 < big["status_s"] < 60 and 0 < big["collect_s"] < 60, big

    targets = doc["targets"]
    assert targets and all(t["pass"] is None for t in targets)  # smoke sizes are never judged
    md = js.with_suffix(".md").read_text()
    assert "| target |" in md and "| scenario |" in md
    png = js.with_suffix(".png")
    if png.exists():
        assert png.stat().st_size > 1000


def test_exactly_once_check_reads_chunks_committed_in_batch_slots(tmp_path: Path) -> None:
    """The bench's check reads results as every reader does (issue 27): chunks committed in a
    batch's slot count once, a chunk that is also in a file of its own twice, a failed one as bad."""
    from bench.common import check_exactly_once
    from gpupool.jobs import batches, results
    from gpupool.jobs.descriptor import Job, JobKind, JobState
    from gpupool.jobs.paths import Spool

    spool = Spool(tmp_path).ensure()
    spool.mkdir(spool.result_dir("r"))
    job = lambda c, batch=None: Job(run="r", chunk_id=c, total_chunks=7, kind=JobKind.CALLABLE,  # noqa: E731
                                    target="bench.tasks:noop", batch=batch)
    slot = job(0, batch=4)
    rec = batches.batch_record(slot, "oooo", values=[None] * 4, durations=[0.001] * 4, errors={}, agent="a0",
                               host="h", started_at=1.0, finished_at=1.004)
    assert batches.commit_batch(spool, slot, rec)
    for c in (4, 5):
        assert results.commit(spool, job(c), results.record(job(c), JobState.OK, agent="a1", value=None))

    got = check_exactly_once(tmp_path, "r", 6)
    assert got["ok"] and got["committed"] == 6 and got["slots"] == 1, got
    assert got["files"] == 3 and got["bytes"] == sum(f.stat().st_size for f in spool.result_dir("r").iterdir())

    assert results.commit(spool, job(2), results.record(job(2), JobState.OK, agent="a1", value=None))
    fails = batches.batch_record(job(6, batch=1), "f", values=[None], durations=[0.001],
                                 errors={6: {"type": "ValueError", "message": "no"}}, agent="a0", host="h")
    assert batches.commit_batch(spool, job(6, batch=1), fails)
    got = check_exactly_once(tmp_path, "r", 7)
    assert not got["ok"] and got["duplicates"] == [2] and got["bad"] == [6] and got["missing"] == [], got
