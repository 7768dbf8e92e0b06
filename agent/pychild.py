"""How the pool starts a Python process that runs one of its own modules (an agent, a worker).

The child imports the pool as ``gpupool`` from the very folder this process imports it from
(installed, or a checkout: the same code on both sides), and none of the pool's folders goes on
its ``sys.path`` or ``PYTHONPATH``: a worker's path is the user's, so that a user's own
``agent.py``, ``jobs.py`` or ``examples/`` is what ``import agent`` finds there, and command jobs
inherit nothing of the pool's (issue 22). ``python -c`` puts the current folder first on the
path; the boot code takes it off.
"""
from __future__ import annotations

import sys
from pathlib import Path

# The folder holding agent/, jobs/ and master/: the package gpupool's one search location.
POOL_ROOT = str(Path(__file__).resolve().parents[1])

_BOOT = ("import sys,runpy,importlib.machinery as m,importlib.util as u\n"
         "if sys.path[:1]==['']: del sys.path[0]\n"
         "s=m.ModuleSpec('gpupool',None,is_package=True); s.submodule_search_locations=[sys.argv.pop(1)]\n"
         "sys.modules['gpupool']=u.module_from_spec(s)\n"
         "sys.argv[0]=sys.argv.pop(1); runpy.run_module(sys.argv[0],run_name='__main__',alter_sys=True)")


def python_argv(module: str, *args: str) -> list[str]:
    """The command line that runs ``gpupool.<module>`` as ``__main__`` with ``args``."""
    return [sys.executable, "-c", _BOOT, POOL_ROOT, f"gpupool.{module}", *args]


def is_agent_argv(argv: list[bytes]) -> bool:
    """Whether a process's command line (``/proc/<pid>/cmdline``, split) is an agent's: started by
    ``python_argv("agent")`` or as ``python -m agent`` from a checkout."""
    return b"gpupool.agent" in argv or b"agent" in argv
