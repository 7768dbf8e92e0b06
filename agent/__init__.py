"""What runs on a GPU machine: one long-lived agent per GPU (``python -m agent``)."""

from gpupool.jobs.logsetup import quiet_by_default as _quiet

_quiet(__name__)
