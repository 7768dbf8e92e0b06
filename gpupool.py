"""The pool's one import name, ``gpupool``, for a checkout: with this folder on ``sys.path``
(``python main.py``, ``python -m master``, tests, ``PYTHONPATH=<checkout>``) this module is
the package ``gpupool`` whose subpackages are the folders beside it (``gpupool.agent``,
``gpupool.master``, ``gpupool.jobs``). ``pip install .`` installs the same three folders under
``gpupool/``, so the code imports itself as ``gpupool.*`` wherever it runs and never takes a
name such as ``agent`` or ``jobs`` from its users (issue 22)."""
import os

__path__ = [os.path.dirname(os.path.abspath(__file__))]
