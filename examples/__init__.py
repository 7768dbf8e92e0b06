"""Example workloads for the pool, in a checkout only (``pip install .`` does not install them):
``--task examples.noop:square`` is found when ``main.py`` is run from the checkout's root."""
