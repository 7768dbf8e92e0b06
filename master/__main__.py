"""``python -m master COMMAND`` (installed: ``gpupool COMMAND``): look at and steer a pool.

The commands are those of ``master.cli.pool_cli`` (``python -m master --help`` lists them, docs/cli.md
describes each); ``python -m master COMMAND --help`` shows examples.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from gpupool.jobs.logsetup import command_logs

    from gpupool.master.cli.pool_cli import main as run_command

    command_logs("WARNING")  # the feeder (retry) and the executor warn; nothing chattier reaches the terminal
    return run_command(argv)


if __name__ == "__main__":
    sys.exit(main())
