"""A run's ``--on-done`` hook (issue 26): a shell command run once when the run ends, by the master
that fed it to its end (``api.Run.wait``, under the run's master lock), with the placeholders
``{run}``, ``{status}`` (done, failed, cancelled), ``{ok}``, ``{failed}`` (chunk counts) and
``{results}`` (the run's results folder), as a command job's template (``jobs.template``:
``{results!q}`` shell-quoted).

Once: the master claims the hook before it starts it, by making ``runs/<run>/on_done.json``
exclusively (``Spool.on_done_record``); a master killed while the hook runs leaves the claim, and
the same command run again finds the run over and the hook claimed, so it never runs twice. The
claim goes with the run's seal (``jobs.results.unseal``: a ``retry`` gives the run work again),
so a run sealed anew runs its hook anew. Its output goes to ``logs/<run>/on_done.log``; the record
gets its exit code when it ends (``jobs.results.read_hook``), and ``status`` shows it.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from typing import Any

from gpupool.jobs.atomic import write_exclusive, write_replace
from gpupool.jobs.logsetup import logger
from gpupool.jobs.paths import Spool
from gpupool.jobs.template import expand
from gpupool.master.core.feeder import Summary
from gpupool.master.spec.runspec import RunSpec


def run_state_word(summary: Summary) -> str:
    """``{status}``: done (every chunk ok), cancelled, or failed (some chunk failed, or stopped early)."""
    return "cancelled" if summary.cancelled else "done" if summary.all_ok else "failed"


def run_hook(spool: Spool, spec: RunSpec, summary: Summary) -> str | None:
    """Run ``spec.on_done`` for a run that ended (``summary``), unless its hook was claimed already;
    returns the line to print (None where there is no hook, or the run did not end)."""
    ended = summary.cancelled or summary.halted is not None or len(summary.outcomes) >= summary.chunks
    if spec.on_done is None or not ended:  # interrupted (Ctrl-C): the run goes on when fed again
        return None
    status = run_state_word(summary)
    values = {"run": spec.name, "status": status, "ok": summary.ok, "failed": len(summary.failed),
              "results": str(spool.result_dir(spec.name))}
    command = expand(spec.on_done, values)
    record: dict[str, Any] = {"command": command, "status": status, "by": f"{socket.gethostname()}:{os.getpid()}",
                              "started_at": time.time()}
    path = spool.on_done_record(spec.name)
    try:
        if not write_exclusive(path, json.dumps(record).encode()):
            return None  # run once already (a master killed while it ran leaves its claim: never twice)
    except OSError as e:
        return f"run {spec.name}: --on-done not run: cannot claim it ({path}: {e.strerror or e})"
    log = spool.on_done_log(spec.name)
    try:
        with spool.open_log(log) as out:
            out.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}: {command}\n".encode())
            out.flush()
            code = subprocess.run(["/bin/sh", "-c", command], cwd=spec.workdir or None, stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=subprocess.STDOUT).returncode
    except OSError as e:
        code, record["error"] = None, f"{e.strerror or e}"
    record.update(exit_code=code, ended_at=time.time())
    try:
        write_replace(path, json.dumps(record).encode())
    except OSError as e:
        logger.warning("run {}: cannot record its --on-done hook's exit code ({})", spec.name, e)
    if code is None:
        return f"run {spec.name}: --on-done could not start: {record['error']}"
    return f"run {spec.name}: --on-done exited with code {code} (its output: {log})"

