#!/usr/bin/env python3
"""Feed chunk jobs to a GPU agent pool.  `python main.py` alone runs the self-contained demo."""
import sys

from gpupool.master.cli.run_cli import main

if __name__ == "__main__":
    sys.exit(main())
