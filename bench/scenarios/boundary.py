"""11. Run boundary (issue 22): a run right after a run of another task module, both importing a
library that takes 1.5 s to import, on a pool idle for a few seconds.

Every run has worker processes of its own (``agent.workers``), so a run boundary means a fresh
worker. With the spare (the default), the agent has one ready that imported the library already
(it learnt the name from the first run's worker); without it (``--no-spare-worker``), the fresh
worker starts the interpreter and imports the library when the next run's first chunk comes.
Measured: this host's ``time.time()`` just before ``Pool.submit`` to the moment the first chunk of
the second run begins to compute (its task returns ``time.time()`` from its first line, after its
module and the library were imported), whole runs fed by ``master.api``.

The library is a package in a folder named ``site-packages`` on the agents' ``PYTHONPATH``, as an
installed library is found (``agent.sources`` tells libraries from the user's code by where they
are)."""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Iterator

from bench.common import agents, feed, log, results, spread
from bench.context import Ctx

IMPORT_S = 1.5  # how long the library takes to import
IDLE_S = 4.0  # the pool idles this long between the two runs


def _layout(root: Path) -> tuple[Path, Path]:
    """(the site-packages folder holding the slow library, the user's folder holding the two tasks)."""
    lib = root / "site-packages" / "slowlib"
    lib.mkdir(parents=True, exist_ok=True)
    (lib / "__init__.py").write_text(f"import time\ntime.sleep({IMPORT_S})\nVALUE = 7\n")
    tasks = root / "proj"
    tasks.mkdir(exist_ok=True)
    for name in ("first", "second"):
        (tasks / f"{name}.py").write_text(f"import time\n\nimport slowlib\n\n\ndef {name}(chunk_id):\n"
                                          "    return [slowlib.VALUE, time.time()]\n")
    return lib.parent, tasks


@contextlib.contextmanager
def _pythonpath(folder: Path) -> Iterator[None]:
    """The agents started meanwhile (they take this process's environment) find the library."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), old]))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def run(ctx: Ctx) -> dict[str, Any]:
    site, tasks = _layout(ctx.tmp / "boundary-lib")
    out: dict[str, Any] = {"import_s": IMPORT_S, "idle_s": IDLE_S}
    for mode, args in (("spare", []), ("no_spare", ["--no-spare-worker"])):
        base = ctx.dir(f"boundary-{mode}")
        firsts: list[float] = []
        with _pythonpath(site), agents(base, 2, args):
            for i in range(ctx.sizes.repeats):
                feed(base, f"first-{i}", 4, task="first.py:first", workdir=str(tasks))
                ctx.check(base, f"first-{i}", 4)
                time.sleep(IDLE_S)
                t0 = time.time()
                feed(base, f"second-{i}", 2, task="second.py:second", workdir=str(tasks))
                ctx.check(base, f"second-{i}", 2)
                firsts.append(min(r["value"][1] for r in results(base, f"second-{i}")) - t0)
        out[mode] = firsts
        log(f"11. run boundary, {mode}: submit to the second run's first chunk {spread(firsts)}")
    return out
