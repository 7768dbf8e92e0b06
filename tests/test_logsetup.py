"""Imported as a library the pool logs nothing; one call routes its logs (and only its logs)."""
from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO

PROBE = """
import io, sys
from loguru import logger
logger.remove()
app = io.StringIO()
logger.add(app, level="DEBUG", format="{name}: {message}")  # the application's own sink
from gpupool.jobs.paths import Spool
from gpupool.master.api import pool_logs
Spool(sys.argv[1]).agent_ids()   # the spool's agents folder has a bad name in it: the pool warns
logger.info("the app's own line")
silent = app.getvalue()
pool = io.StringIO()
pool_logs("WARNING", sink=pool, fmt="{name}: {message}")
Spool(sys.argv[2]).agent_ids()
logger.info("another line of the app's")
print(repr(silent)); print(repr(pool.getvalue())); print(repr(app.getvalue()))
"""


def test_the_pool_is_quiet_as_a_library_until_pool_logs_routes_its_lines(tmp_path) -> None:
    from gpupool.jobs.paths import Spool

    bases = []
    for name in ("a", "b"):
        spool = Spool(tmp_path / name).ensure()
        (spool.agents_dir / "bad name.json").write_text("{}")
        bases.append(str(spool.base))
    r = subprocess.run([sys.executable, "-c", PROBE, *bases], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    silent, pool, app = (eval(line) for line in r.stdout.splitlines()[-3:])
    assert silent == "__main__: the app's own line\n"  # nothing of the pool's by default
    assert "jobs.paths:" in pool and "bad name" in pool and "the app's" not in pool  # only the pool's lines
    assert "another line of the app's" in app


def test_a_package_imported_after_the_command_configured_logs_keeps_logging() -> None:
    """main.py configures its logs first and imports agent.watcher (say) later: its lines still show."""
    code = ("from gpupool.jobs.logsetup import command_logs\ncommand_logs('WARNING')\n"
            "from watchdog.events import FileSystemEventHandler\nfrom gpupool.jobs.watching import watch_folder\n"
            "assert watch_folder('/no/such/folder', FileSystemEventHandler(), 'a test') is None\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "a test: cannot watch /no/such/folder" in r.stderr, r.stderr
