"""A master in its own process, so that its peak memory is its own:
``python -m bench.child --base B --run R --chunks N --task T`` prints one JSON line.
``python -m bench.child main ARGS...`` runs ``python main.py ARGS...`` in this process instead
(``runpy``: the same interpreter start and imports as the command itself) and prints, as the last
line of its output, one JSON line: its exit code and ``maxrss_mb``.

submit_s: ``Pool.submit`` (checks, run name); setup_s: from then until the first job descriptor
is made (run lock, run.json, the recovery scan, the first liveness read); wall_s: until the run
is done; maxrss_mb: the process's peak resident memory (VmHWM of /proc/self/status: getrusage's
ru_maxrss would carry over the parent's peak across fork + exec)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def vm_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def main_py(argv: list[str]) -> int:
    """``python main.py ARGV`` run here, then its peak memory (VmHWM) and exit code on stdout."""
    import runpy

    main = Path(__file__).resolve().parents[1] / "main.py"
    sys.argv = [str(main), *argv]
    try:
        runpy.run_path(str(main), run_name="__main__")
        rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    sys.stdout.flush()
    print(json.dumps({"rc": rc, "maxrss_mb": vm_kb("VmHWM") / 1024}), flush=True)
    return rc


def main() -> None:
    if sys.argv[1:2] == ["main"]:
        sys.exit(main_py(sys.argv[2:]))
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--chunks", type=int, required=True)
    p.add_argument("--task", default="bench.tasks:noop")
    a = p.parse_args()
    from gpupool.jobs.logsetup import command_logs

    command_logs("WARNING")  # as main.py does: warnings only
    from gpupool.master.core import feeder
    from gpupool.master.api import Pool

    first: list[float] = []
    orig = feeder.Feeder._job

    def _job(self, c):  # type: ignore[no-untyped-def]
        if not first:
            first.append(time.perf_counter())
        return orig(self, c)

    feeder.Feeder._job = _job
    rss0 = vm_kb("VmRSS")
    t0 = time.perf_counter()
    run = Pool(a.base).submit(task=a.task, chunks=a.chunks, run=a.run, workdir=str(Path(__file__).resolve().parents[1]))
    t1 = time.perf_counter()
    s = run.wait(progress=False)
    t2 = time.perf_counter()
    print(json.dumps({"submit_s": t1 - t0, "setup_s": (first[0] - t0) if first else None, "wall_s": t2 - t0,
                      "ok": s.ok, "maxrss_mb": vm_kb("VmHWM") / 1024,
                      "rss_at_start_mb": rss0 / 1024}))


if __name__ == "__main__":
    main()
