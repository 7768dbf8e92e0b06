"""Shared pieces of the benchmark: statistics, /proc readers, real agents on a tmp spool,
feeding a run through the real API, and the exactly-once check of every run's results."""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
BENCH_HOST = "bench"  # agent ids bench-cpu0, bench-gpu0 ...


# statistics ----------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def spread(values: list[float]) -> dict[str, Any]:
    """min/median/max over repeats (and the raw values)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"min": None, "median": None, "max": None, "n": 0, "values": []}
    return {"min": min(vals), "median": percentile(vals, 50), "max": max(vals), "n": len(vals),
            "values": [round(v, 6) for v in vals]}


def ratios(num: list[float], den: list[float]) -> dict[str, Any]:
    """Per-repeat ratios num[i] / den[i] (repeats are interleaved, so pairs share the noise)."""
    return spread([a / b for a, b in zip(num, den) if a is not None and b not in (None, 0)])


# /proc ---------------------------------------------------------------------------------------
def proc_io(pid: int) -> dict[str, int]:
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            k, _, v = line.partition(":")
            out[k.strip()] = int(v)
    return out


def proc_cpu_s(pid: int) -> float:
    """utime + stime of the process (all its threads), seconds; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_gb = round(int(Path("/proc/meminfo").read_text().split()[1]) / 1024**2, 1)
    from gpupool.jobs.fsinfo import mount_of

    versions = {}
    for mod in ("numpy", "ray", "octorun", "matplotlib", "watchdog", "torch"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[mod] = version(mod)
    rev = os.environ.get("GPUPOOL_BENCH_COMMIT", "")  # when run from an exported tree
    with contextlib.suppress(Exception):
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout.strip() or rev
    return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(), "mem_gb": mem_gb,
            "kernel": platform.release(), "python": platform.python_version(), "versions": versions,
            "tmp_fs": mount_of(os.environ.get("TMPDIR", "/tmp"))[1], "commit": rev}


# our pool: real agent processes and the real master API --------------------------------------
@dataclass
class Agents:
    """Agents started with ``agent.launcher.start`` (real ``python -m agent`` processes)."""

    base: Path
    ids: list[str]
    pids: list[int]

    def spares(self, since: float) -> list[int] | None:
        """Each agent's spare worker (what the next run takes), once a heartbeat written after
        ``since`` names it and no worker of a run that is over; None until then."""
        out = []
        for ident in self.ids:
            try:
                hb = json.loads((self.base / "agents" / f"{ident}.json").read_text())
            except (OSError, ValueError):
                return None
            if hb.get("updated_at", 0) <= since or hb.get("workers") or not hb.get("spare_pid"):
                return None
            out.append(int(hb["spare_pid"]))
        return out

    def worker_pids(self) -> list[int]:
        """Every process the agents started and that runs now (their workers and spares)."""
        return [p for pid in self.pids for p in descendants(pid)]


@contextlib.contextmanager
def agents(base: Path, n: int, args: list[str] | None = None, gpu: bool = False) -> Iterator[Agents]:
    from gpupool.agent import launcher

    started = launcher.start(str(base), n, cpu=not gpu, host=BENCH_HOST, agent_args=list(args or []), timeout=120)
    try:
        yield Agents(base, [s.agent_id for s in started], [s.pid for s in started])
    finally:
        launcher.stop(str(base), host=BENCH_HOST, timeout=60)


def wait_workers(ag: Agents, timeout: float = 60.0) -> list[int]:
    """Wait until the runs fed so far are over at every agent (their workers gone) and each agent
    has the spare the next run takes (every run has workers of its own: agent.workers); then
    every process the agents run."""
    since, deadline = time.time(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ag.spares(since) is not None:
            return ag.worker_pids()
        time.sleep(0.05)
    raise RuntimeError(f"the spare workers of {ag.ids} did not appear within {timeout} s")


def descendants(root: int) -> list[int]:
    """The processes under ``root`` (children, their children...)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def main_command(base: Path, run: str, chunks: int, *args: str) -> tuple[float, subprocess.CompletedProcess]:
    """``python main.py --base BASE --chunks N --run RUN ARGS...``, timed from start to exit (what a
    user feels: interpreter start, imports, recovery and the final sync included)."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "main.py", "--base", str(base), "--chunks", str(chunks), "--run", run,
                        "--no-progress", *args], cwd=REPO, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"main.py failed ({r.returncode}): {r.stderr[-2000:]}")
    return wall, r


def master_command(*args: str, timeout: float = 600) -> tuple[float, subprocess.CompletedProcess]:
    """``python -m master ARGS...`` as a fresh process, timed from start to exit."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "master", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=timeout)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"python -m master {' '.join(args)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return wall, r


@dataclass
class PoolRun:
    run: str
    chunks: int
    wall_s: float
    ok: int
    per_agent: dict[str, int]
    submitted: dict[int, float] = field(default_factory=dict)  # chunk -> job.submitted_at (master)
    collected: dict[int, float] = field(default_factory=dict)  # chunk -> time the master saw the result


class Probe:
    """Timestamps taken inside the master without changing it: the descriptor's
    ``submitted_at`` as each job is made, and the moment each result is collected.

    The result record has no ``submitted_at`` and ``Run.wait`` takes no event callback, so the
    bench wraps ``Feeder._job`` and ``Progress.event`` for the duration of one run."""

    def __init__(self) -> None:
        self.submitted: dict[int, float] = {}
        self.collected: dict[int, float] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator["Probe"]:
        from gpupool.master.core import feeder
        from gpupool.master.report import progress

        orig_job, orig_event = feeder.Feeder._job, progress.Progress.event
        probe = self

        def _job(self: Any, c: int) -> Any:
            job = orig_job(self, c)
            probe.submitted[c] = job.submitted_at
            return job

        def event(self: Any, kind: str, info: dict[str, Any]) -> None:
            if kind in ("ok", "failed"):
                probe.collected[info["chunk"]] = time.time()
            orig_event(self, kind, info)

        feeder.Feeder._job, progress.Progress.event = _job, event
        try:
            yield self
        finally:
            feeder.Feeder._job, progress.Progress.event = orig_job, orig_event


def feed(base: Path, run: str, chunks: int, task: str | None = None, script: str | None = None,
         kwargs: dict[str, Any] | None = None, shared: str | None = None, depth: int | None = None,
         probe: bool = False, workdir: str | None = None, batch: int | None = None) -> PoolRun:
    """Submit a run with ``master.api.Pool`` and be its master until it is done (wall time).
    ``batch``: chunks per batch (1: none); None leaves the pool's default (automatic)."""
    from gpupool.master.api import Pool
    from gpupool.master.core.feeder import FeedConfig

    cfg = FeedConfig(depth=depth) if depth else None
    pr = Probe()
    with pr.installed() if probe else contextlib.nullcontext():
        t0 = time.perf_counter()
        r = Pool(base).submit(task=task, script=script, chunks=chunks, kwargs=kwargs, shared=shared, run=run,
                              fresh=True, workdir=workdir or str(REPO), **({} if batch is None else {"batch": batch}))
        s = r.wait(progress=False, cfg=cfg)
        wall = time.perf_counter() - t0
    return PoolRun(run, chunks, wall, s.ok, dict(s.per_agent), pr.submitted, pr.collected)


def results(base: Path, run: str) -> list[dict[str, Any]]:
    """Every committed result of ``run``, by chunk, as every reader reads them (a chunk's own
    file or its batch's slot: ``jobs.results.scan_run`` and ``chunk_result``)."""
    from gpupool.jobs.paths import Spool
    from gpupool.jobs.results import chunk_result, scan_run

    spool = Spool(base)
    scan = scan_run(spool, run)
    return [chunk_result(spool, run, c, scan) for c in sorted(scan.finals)]


def check_exactly_once(base: Path, run: str, chunks: int) -> dict[str, Any]:
    """Every chunk 0..N-1 has exactly one committed ok result (and nothing else is there), read
    through the one results reader (``jobs.results.scan_run``, ``chunk_result``), so that a chunk
    committed in its batch's slot (``results/<run>/<first>+<count>.json``) counts as one in a file
    of its own; and what the run left in its results folder (files, bytes).

    A commit is a ``link()`` to one final name (the chunk's own or its batch's slot), so two
    commits of one name cannot both exist; what can go wrong is a chunk claimed both by a slot and
    by a file of its own (or by two slots), a missing, foreign, unreadable or failed result, or a
    temp file left behind."""
    from gpupool.jobs import batches
    from gpupool.jobs.atomic import is_temp_name
    from gpupool.jobs.errors import BadFile
    from gpupool.jobs.paths import Spool
    from gpupool.jobs.results import chunk_result, scan_run

    spool, rdir = Spool(base), base / "results" / run
    scan = scan_run(spool, run)
    claims = Counter(scan.singles)
    for slot in scan.slots.values():
        claims.update(c for c in slot.chunks if slot.code(c) in batches.CLAIMED)
    bad = sorted(scan.odd)
    for c in sorted(claims):
        if c < chunks and claims[c] == 1:
            try:
                rec = chunk_result(spool, run, c, scan)
            except (OSError, BadFile):
                bad.append(c)
                continue
            if rec.get("chunk_id") != c or rec.get("run") != run or rec.get("status") != "ok":
                bad.append(c)
    files, size, disk, temps = 0, 0, 0, []
    for folder, _, names in os.walk(rdir):
        for name in names:
            with contextlib.suppress(FileNotFoundError):  # a temp file gone meanwhile
                st = os.lstat(os.path.join(folder, name))
                files, size, disk = files + 1, size + st.st_size, disk + st.st_blocks * 512
                if is_temp_name(name):
                    temps.append(name)
    # The agent links its temp file to the final name, then unlinks the temp: the master (and so
    # this check) can see the final result in between. Only a temp file that stays is left over.
    deadline = time.monotonic() + 2.0
    while temps and time.monotonic() < deadline:
        time.sleep(0.02)
        temps = [t for t in temps if (rdir / t).exists()]
    missing = [c for c in range(chunks) if c not in claims]
    extra = [c for c in claims if c >= chunks]
    dup = [c for c, k in claims.items() if k != 1]
    ok = not (missing or extra or dup or bad or temps)
    return {"run": run, "chunks": chunks, "committed": len(claims), "missing": missing[:10], "extra": extra[:10],
            "duplicates": dup[:10], "bad": bad[:10], "temp_files": temps[:10],
            "failed_attempts": sum(len(a) for a in scan.history.values()), "slots": len(scan.slots),
            "files": files, "bytes": size, "disk_bytes": disk, "ok": ok}


def idle_gaps(recs: list[dict[str, Any]]) -> list[float]:
    """Per agent, in start order: next ``started_at`` minus previous ``finished_at``."""
    by_agent: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        by_agent.setdefault(r["agent"], []).append(r)
    gaps = []
    for rs in by_agent.values():
        rs.sort(key=lambda r: r["started_at"])
        gaps += [b["started_at"] - a["finished_at"] for a, b in zip(rs, rs[1:])]
    return gaps


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
