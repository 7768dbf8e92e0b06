"""What feeds and collects: the run spec, the feeder loop, status, and the Python API."""

from gpupool.jobs.logsetup import quiet_by_default as _quiet

_quiet(__name__)
