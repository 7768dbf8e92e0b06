"""Where ``gpupool-run`` found its ``main`` before master/ was split in parts: the console script
an earlier ``pip install`` wrote imports ``gpupool.master.run_cli:main``, so that a checkout
updated without installing again still runs. The command line itself is ``master.cli.run_cli``."""
from gpupool.master.cli.run_cli import main

__all__ = ["main"]
