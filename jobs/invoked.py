"""How the user reached the pool's commands, and how to spell each of them back (issue 25).

The same code runs as a checkout's files (``python main.py``, ``python -m master``,
``./start_agents.sh``, ``python -m agent``) and as installed commands (``gpupool-run``,
``gpupool``, ``gpupool-agents``, ``gpupool-agent``: pyproject's ``[project.scripts]``). Every
command names itself as it was typed (``prog``: its usage line and the prefix of its errors), and
its help and hints name the other commands as this user has them: installed, the commands on
``PATH``; from a checkout, its files, by a path that works from the current folder. The checkout's
own spellings are written once in the texts (help epilogs, hints) and ``respell`` turns them into
these.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

# The folder holding agent/, jobs/ and master/: a checkout's root, or site-packages/gpupool.
ROOT = Path(__file__).resolve().parents[1]

# role: (the checkout's spelling, the installed command)
ROLES = {"run": ("python main.py", "gpupool-run"), "master": ("python -m master", "gpupool"),
         "agents": ("./start_agents.sh", "gpupool-agents"), "agent": ("python -m agent", "gpupool-agent")}
_SCRIPTS = {installed for _, installed in ROLES.values()}


def is_checkout() -> bool:
    """Whether this code is a checkout's files (main.py and start_agents.sh beside its folders)."""
    return (ROOT / "main.py").is_file() and (ROOT / "start_agents.sh").is_file()


def installed() -> bool:
    """Whether the user runs the installed commands: a console script, ``python -m gpupool.X``,
    or code that is no checkout; a checkout's ``python main.py`` or ``python -m master`` is not."""
    if Path(sys.argv[0]).name in _SCRIPTS or _main_module().startswith("gpupool."):
        return True
    return not is_checkout()


def _main_module() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) or ""


def prog(role: str) -> str:
    """This command's name as the user typed it: ``gpupool-run``, ``python main.py``,
    ``python -m gpupool.master``, ``./start_agents.sh``, ..."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if Path(argv0).name in _SCRIPTS:
        return Path(argv0).name
    module = _main_module().removesuffix(".__main__")
    if module in ("master", "agent", "gpupool.master", "gpupool.agent"):
        return f"python -m {module}"
    if Path(argv0).name == "main.py":
        return f"python {argv0}"
    if Path(argv0).name == "start_agents.sh":
        return argv0
    return spell(role)


def spell(role: str) -> str:
    """How this user runs the command of ``role`` (run, master, agents, agent) from the current
    folder: installed, its command on PATH; from a checkout, the checkout's spelling when the
    checkout is the current folder, else its command on PATH where there is one (``pip install -e``
    put it there), else the checkout's file by its path from here."""
    checkout, script = ROLES[role]
    if installed():
        return script
    try:
        here = Path.cwd().resolve() == ROOT
    except OSError:
        here = False
    if here:
        return checkout
    if shutil.which(script):
        return script
    rel = os.path.relpath(ROOT)
    rel = str(ROOT) if rel.startswith("..") else rel  # below here: short; elsewhere: the whole path
    return {"run": f"python {rel}/main.py", "agents": f"{rel}/start_agents.sh",
            "master": f"PYTHONPATH={rel} python -m gpupool.master",
            "agent": f"PYTHONPATH={rel} python -m gpupool.agent"}[role]


def doc(page: str) -> str:
    """A page of the docs, as this user can find it: the checkout's file, or for an installed
    pool its name in the source's docs/ folder (the README's "Read on" table lists them)."""
    if not installed():
        path = ROOT / "docs" / page.split("#")[0]
        try:
            return os.path.relpath(path) if Path.cwd().resolve() == ROOT else str(path)
        except OSError:
            return str(path)
    return f"docs/{page} of gpupool's source"


_SPELLED = re.compile(r"python main\.py|python -m master|\./start_agents\.sh|start_agents\.sh|python -m agent"
                      r"|\bdocs/([\w.-]+\.md)|(?<![\w/.-])main\.py\b")


def prefix(role: str) -> str:
    """The prefix of a command's own messages and errors: ``main.py``, ``gpupool-run``, as typed."""
    return Path(prog(role).split()[-1]).name


def respell(text: str, self_role: str | None = None) -> str:
    """``text`` written with the checkout's spellings (``python main.py``, ``python -m master``,
    ``./start_agents.sh``, ``python -m agent``, ``docs/PAGE.md``), as this user runs them;
    ``self_role``'s own name as typed (``prog``)."""
    names = {checkout: (prog(role) if role == self_role else spell(role)) for role, (checkout, _) in ROLES.items()}

    def one(m: re.Match) -> str:
        s = m.group(0)
        if m.group(1):
            return doc(m.group(1))
        if s == "main.py":
            return names["python main.py"]
        if s == "start_agents.sh":
            return names["./start_agents.sh"]
        return names[s]

    if not installed() and (self_role is None or prog(self_role) == ROLES[self_role][0]) and \
            Path.cwd().resolve() == ROOT:
        return text  # a checkout's command run in the checkout: the texts are right as written
    return _SPELLED.sub(one, text)


def respell_parser(parser, self_role: str) -> None:
    """Respell a parser's usage, description, epilog and every option's help, its subcommands'
    too (its ``prog``, which subcommands copy when they are added, is the caller's: ``prog``)."""
    for name in ("usage", "description", "epilog"):
        if getattr(parser, name, None):
            setattr(parser, name, respell(getattr(parser, name), self_role))
    for action in parser._actions:
        if isinstance(action.help, str):
            action.help = respell(action.help, self_role)
        if hasattr(action, "_name_parser_map"):  # subcommands
            for sub in set(action._name_parser_map.values()):
                respell_parser(sub, self_role)
            for choice in getattr(action, "_choices_actions", ()):
                choice.help = respell(choice.help, self_role) if isinstance(choice.help, str) else choice.help
