"""The demo behind a bare ``python main.py``: a spool, local agents, the matmul workload, a summary."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from gpupool.agent import launcher
from gpupool.agent.gpu import make_probe, visible_gpus
from gpupool.master.matmul import SIZE, chunk_input, shared_matrix
from gpupool.jobs.errors import SpoolError
from gpupool.jobs.invoked import prog, respell, spell
from gpupool.jobs.npzio import load_npz
from gpupool.jobs.paths import Spool
from gpupool.jobs.words import plural
from gpupool.master.api import Pool
from gpupool.master.report.progress import format_summary

CHUNKS = 32


def _inputs(spool: Spool) -> tuple[Path, Path]:
    """The shared matrix and one input .npz per chunk, as a user would prepare them."""
    shared, data = spool.demo_input_dir() / "shared.npz", spool.demo_input_dir() / "chunks"
    data.mkdir(parents=True, exist_ok=True)
    np.savez(shared, W=shared_matrix(SIZE))
    for c in range(CHUNKS):
        np.savez(data / f"{c}.npz", X=chunk_input(c, size=SIZE))
    return shared, data


def run_demo(demo_dir: str, progress: bool = True) -> int:
    base = Path(demo_dir).resolve()
    try:
        spool = Spool(base).ensure()
        gpus = visible_gpus(make_probe())
    except SpoolError as e:  # a bad CUDA_VISIBLE_DEVICES too
        print(f"{Path(prog('run').split()[-1]).name}: {e}", file=sys.stderr)
        return 2
    n = len(gpus) or 2
    print(f"demo: spool {base}; starting {plural(n, ('GPU' if gpus else 'CPU') + ' agent')}"
          f"{'' if gpus else ' (no GPU found)'}")
    shared, data = _inputs(spool)
    started = launcher.start(str(base), n, cpu=not gpus, agent_args=["--heartbeat", "0.5"], partial=True)
    for s in started:
        print(f"  agent {s.agent_id} pid {s.pid}{'' if s.new else ' (already running)'}, log {s.log}")
    try:
        run = Pool(base).submit(task="gpupool.master.matmul:multiply", chunks=CHUNKS, shared=str(shared), data=str(data),
                                run="demo", fresh=True)
        summary = run.wait(progress=progress)
        print(respell(format_summary(summary, spool.base)))
        bad = _check(run)
    finally:
        ours = [s.agent_id for s in started if s.new]
        launcher.stop(str(base), only=ours)
        print(f"demo: stopped the {plural(len(ours), 'agent')} it started")
    if bad or summary.failed:
        print(f"demo: FAILED ({plural(len(summary.failed), 'failed chunk')}, {plural(bad, 'wrong result')})", file=sys.stderr)
        return 1
    # as this user types them: gpupool-agents and gpupool-run installed, the checkout's files in one (issue 25)
    print(f"demo: all {CHUNKS} results checked against numpy. Next: {spell('agents')} 2 /tmp/b && "
          f"{spell('run')} --base /tmp/b --task gpupool.master.matmul:multiply --chunks 100")
    return 0


def _check(run) -> int:
    w = shared_matrix(SIZE)
    bad = 0
    for res in run.results():
        y = load_npz(res.npz)["Y"] if res.npz else None
        if y is None or not np.allclose(y, chunk_input(res.chunk_id, size=SIZE) @ w, rtol=1e-3, atol=1e-3):
            bad += 1
    return bad
