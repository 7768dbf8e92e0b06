"""Command templates: ``python train.py --lr {lr} --out out/{chunk_id}.csv``.

One syntax, that of Python's ``str.format`` restricted to plain names: ``{name}`` is replaced by
the value of ``name``, ``{{`` and ``}}`` are literal braces, ``{name:.3f}`` applies a format spec,
and ``{name!q}`` shell-quotes the value (``shlex.quote``). Attribute and index lookups
(``{a.b}``, ``{a[0]}``) and empty ``{}`` are refused. Strings and numbers are inserted as their
text (unquoted, as Slurm and octopus insert theirs); other values (lists, true/false, null) as JSON.

The master checks every template at submit (``fields``, ``unknown``); the agent expands it
(``expand``) with the chunk's own values. Both sides use this one module.
"""
from __future__ import annotations

import json
import shlex
import string
from typing import Any, Iterable, Mapping

# What every command job may use, whatever its parameters are.
BUILTIN_PLACEHOLDERS = ("chunk_id", "total_chunks", "gpu_id", "device")


class TemplateError(ValueError):
    """A template that cannot be parsed; the message says where and why."""


def fields(template: str) -> list[str]:
    """The placeholder names ``template`` uses, in order (each once); raises TemplateError."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:  # a single '{' or '}'
        raise TemplateError(f"{e} (write {{{{ and }}}} for literal braces)") from None
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise TemplateError(f"placeholder {{{name}}} is not a plain name (use {{name}}; "
                                "{{ and }} for literal braces)")
        if conv not in (None, "q", "s", "r"):
            raise TemplateError(f"placeholder {{{name}!{conv}}}: the only conversion is !q (shell-quoted)")
        if spec and ("{" in spec or "}" in spec):
            raise TemplateError(f"placeholder {{{name}:{spec}}}: a format spec may not hold placeholders")
        if name not in names:
            names.append(name)
    return names


def unknown(template: str, known: Iterable[str]) -> list[str]:
    """The placeholders of ``template`` that are not in ``known``."""
    allowed = set(known)
    return [n for n in fields(template) if n not in allowed]


def expand(template: str, values: Mapping[str, Any]) -> str:
    """``template`` with every placeholder replaced; raises TemplateError for a name not in
    ``values`` or a format spec that does not fit the value."""
    try:
        return _Formatter().vformat(template, (), values)
    except KeyError as e:
        raise TemplateError(f"no value for placeholder {{{e.args[0]}}}") from None
    except (ValueError, TypeError) as e:
        raise TemplateError(f"cannot expand {template!r}: {e}") from None


def text(value: Any) -> str:
    """How a value is written into a command."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value, sort_keys=True)


class _Formatter(string.Formatter):
    def get_field(self, field_name: str, args: Any, kwargs: Any) -> tuple[Any, str]:
        if not field_name.isidentifier():
            raise ValueError(f"placeholder {{{field_name}}} is not a plain name")
        return kwargs[field_name], field_name

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion == "q":
            return shlex.quote(text(value))
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> str:
        if not format_spec:
            return text(value)
        return format(value, format_spec)
