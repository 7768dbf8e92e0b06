"""What feeds and collects: the run spec, the feeder loop, status, and the Python API."""
