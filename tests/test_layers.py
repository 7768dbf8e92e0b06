"""The house's layers (docs/architecture.md), read from every module's imports, the ones inside
functions too: jobs/ imports neither agent/ nor master/; agent/ never imports master/; within
master/, spec/ <- core/ <- report/ <- the top (the API, the Executor, control, follow) <- cli/,
each importing only what lies below it."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

# what each part of the pool may import (besides itself and outside libraries); master.errors is
# the errors every part reports
MAY_IMPORT = {
    "jobs": {"jobs"},
    "agent": {"jobs", "agent"},
    "master.errors": {"jobs", "master.errors"},
    "master.spec": {"jobs", "master.errors", "master.spec"},
    "master.core": {"jobs", "master.errors", "master.spec", "master.core"},
    "master.report": {"jobs", "master.errors", "master.spec", "master.core", "master.report"},
    "master": {"jobs", "agent", "master.errors", "master.spec", "master.core", "master.report", "master"},
    "master.cli": {"jobs", "agent", "master.errors", "master.spec", "master.core", "master.report", "master",
                   "master.cli"},
}


def part(module: str) -> str:
    """The part ``module`` lies in: ``master.core.feeder`` -> ``master.core``, ``master.api`` -> ``master``."""
    parts = module.split(".")
    if parts[0] == "master" and len(parts) > 1 and (parts[1] == "errors" or (REPO / "master" / parts[1]).is_dir()):
        return ".".join(parts[:2])
    return parts[0]


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        for name in names:
            if name.startswith("gpupool."):
                module = name[len("gpupool."):]
                if isinstance(node, ast.ImportFrom):  # from gpupool.master import control: the module itself
                    found |= {f"{module}.{a.name}" for a in node.names
                              if (REPO / module.replace(".", "/") / f"{a.name}.py").exists()}
                found.add(module)
    return found


def allowed(target: str, may: set[str]) -> bool:
    """``target`` lies in one of ``may`` (the package ``master`` itself is only the path to its modules)."""
    return part(target) in may or target == "master"


def test_every_module_imports_only_what_lies_below_it() -> None:
    wrong = []
    for top in ("jobs", "agent", "master"):
        for path in sorted((REPO / top).rglob("*.py")):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            if module in ("master.__main__", "master.run_cli"):  # entry points: python -m master, and where
                continue  # gpupool-run's console script written by an earlier install finds main.py's main
            may = MAY_IMPORT[part(module)]
            wrong += [f"{module} imports {t}" for t in sorted(imports(path)) if not allowed(t, may)]
    assert not wrong, "\n".join(wrong)
