"""The command-job arguments of a run (``--cmd``, ``--commands``, ``--prefix``, ``--success-codes``,
``--fail-on-output``, ``--result-file``), checked at submit: every template's placeholders must be
known (``jobs.template``), so that no chunk fails for a typo. Used by ``master.spec.runspec.build``
(which imports it when it needs it)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from gpupool.jobs.template import BUILTIN_PLACEHOLDERS, TemplateError, fields
from gpupool.jobs.words import plural
from gpupool.master.spec.inputs import read_text
from gpupool.master.errors import UsageError

HOOK_FIELDS = ("run", "status", "ok", "failed", "results")  # --on-done's placeholders (master.hooks)
COMMANDS_FILE_LIMIT = 512 * 1024  # bytes of a --commands file (its lines live in run.json, at most 1 MB)


def check_template(template: str, what: str, known: set[str], partial: set[str] = frozenset()) -> str:
    """``template`` if all its placeholders are in ``known``; else the error names the unknown
    ones and lists the known ones (``partial``: sweep parameters only some sets have)."""
    try:
        names = fields(template)
    except TemplateError as e:
        raise UsageError(f"{what} {template!r}: {e}") from None
    if some := [n for n in names if n in partial]:
        raise UsageError(f"{what} {template!r}: placeholder(s) {_braced(some)} are parameters of only some of "
                                f"the sweep's sets; give every set a value for them")
    if unknown := [n for n in names if n not in known]:
        raise UsageError(f"{what} {template!r}: unknown placeholder(s) {_braced(unknown)}; known: "
                                f"{_braced(sorted(known, key=_order))} (write {{{{ and }}}} for literal braces)")
    return template


def _braced(names: list[str]) -> str:
    return ", ".join(f"{{{n}}}" for n in names)


def _order(name: str) -> tuple[int, str]:
    return (BUILTIN_PLACEHOLDERS.index(name), "") if name in BUILTIN_PLACEHOLDERS else (len(BUILTIN_PLACEHOLDERS), name)


def read_commands(path_text: str, workdir: str) -> tuple[str, list[str]]:
    """(absolute path, its command lines): blank lines and ``#`` comments are skipped."""
    path = Path(workdir, path_text).resolve()
    text = read_text(path, f"--commands {path}", COMMANDS_FILE_LIMIT)
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise UsageError(f"--commands {path}: no command in it (blank lines and # comments are skipped)")
    return str(path), lines


def check_chunks(chunks: int | None, count: int, what: str) -> int:
    """The run's chunk count when ``what`` (a sweep, a commands file) makes ``count`` chunks."""
    if chunks is not None and chunks != count:
        raise UsageError(f"--chunks {chunks}: {what} makes {plural(count, 'chunk')}; leave --chunks out or make it {count}")
    return count


def parse_codes(text: str | None) -> list[int] | None:
    """``--success-codes 0,2`` as a list; None when not given."""
    if text is None:
        return None
    try:
        codes = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        codes = []
    if not codes or any(not 0 <= c <= 255 for c in codes):
        raise UsageError(f"--success-codes {text!r}: give exit codes from 0 to 255, comma-separated (e.g. 0,2)")
    return codes


def options(*, prefix: str | None, success_codes: str | list[int] | None, fail_on_output: str | None,
            result_file: str | None, known: set[str], partial: set[str]) -> dict[str, Any] | None:
    """The checked options of a command run (``Job.options``), or None if none is given."""
    opts: dict[str, Any] = {}
    if prefix is not None:
        opts["prefix"] = check_template(prefix, "--prefix", known, partial)
    if success_codes is not None:
        codes = parse_codes(success_codes) if isinstance(success_codes, str) else \
            parse_codes(",".join(map(str, success_codes)))
        if codes != [0]:
            opts["success_codes"] = codes
    if fail_on_output is not None:
        try:
            re.compile(fail_on_output)
        except re.error as e:
            raise UsageError(f"--fail-on-output {fail_on_output!r}: not a valid regular expression ({e})") \
                from None
        opts["fail_on_output"] = fail_on_output
    if result_file is not None:
        opts["result_file"] = check_template(result_file, "--result-file", known, partial)
    return opts or None
