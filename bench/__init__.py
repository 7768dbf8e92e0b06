"""The benchmark suite: ``python bench/run.py [--quick]`` (see bench/run.py)."""
