"""``python -m master COMMAND``: status, logs, collect, retry, cancel, drain, undrain, dashboard.

``python -m master --help`` lists them; ``python -m master COMMAND --help`` shows examples.
"""
from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from loguru import logger

    from master.commands import main as run_command

    logging.getLogger("watchdog").setLevel(logging.CRITICAL)  # a benign error when an observer stops mid-event
    logger.remove()  # the feeder (retry) and the executor warn; nothing chattier reaches the terminal
    logger.add(sys.stderr, level="WARNING", format="{time:HH:mm:ss} {level}: {message}")
    return run_command(argv)


if __name__ == "__main__":
    sys.exit(main())
