"""A call's remote failure as an exception of the caller, as Ray's task errors are.

The worker records the exception's class (``module``, ``qualname``), its ``args`` (encoded by
``jobs.codec``) and its traceback. ``remote_exception`` raises it again as an instance of that
same class where the caller has it (``builtins``, or a module the caller has already imported:
a name read from a result is never imported, so no module runs because an agent said so), so
``except ZeroDivisionError`` catches a remote division by zero. The instance is also a
``RemoteError`` (a subclass of both, with the original's name), so code that catches
``RemoteError`` keeps working; ``str()`` is the original's, and the remote traceback, the agent
and the call are in a note (``add_note``) shown under the local traceback. Where the class
cannot be found or made again (not imported here, not an ``Exception``, a constructor that
refuses its ``args``), the caller gets a plain ``RemoteError``.
"""
from __future__ import annotations

import sys
from typing import Any

from gpupool.jobs.codec import CodecError, decode


class RemoteError(Exception):
    """The call raised on the agent. ``type``, ``message``, ``remote_traceback``, ``agent``, ``chunk``, ``attempt``."""

    def __init__(self, error: dict[str, Any] | None, agent: str | None, chunk: int, attempt: int) -> None:
        _describe(self, error, agent, chunk, attempt)
        super().__init__(f"{self.type}: {self.message} (on {agent}, call {chunk}, attempt {attempt})")

    def __str__(self) -> str:
        tb = f"\n\nRemote traceback:\n{self.remote_traceback.rstrip()}" if self.remote_traceback else ""
        return super().__str__() + tb


class _AsOriginal(RemoteError):
    """Between the original class and RemoteError in a rebuilt exception's MRO: the original's
    own ``__init__`` and ``__str__`` (and their ``super()`` calls) reach Exception's, not
    RemoteError's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        Exception.__init__(self, *args)

    __str__ = Exception.__str__


def _describe(exc: BaseException, error: dict[str, Any] | None, agent: str | None, chunk: int, attempt: int) -> None:
    error = error or {}
    exc.type, exc.message = str(error.get("type")), str(error.get("message"))
    exc.remote_traceback, exc.agent, exc.chunk, exc.attempt = error.get("traceback") or "", agent, chunk, attempt


_DUALS: dict[type, type] = {}


def remote_exception(error: dict[str, Any] | None, agent: str | None, chunk: int, attempt: int) -> Exception:
    """The exception ``future.result()`` raises for a failed call (see the module)."""
    cls = _local_class(error or {})
    exc = _rebuild(cls, error or {}) if cls is not None else None
    if exc is None:
        return RemoteError(error, agent, chunk, attempt)
    _describe(exc, error, agent, chunk, attempt)
    tb = exc.remote_traceback.rstrip()
    if not isinstance(getattr(exc, "__notes__", []), list):
        del exc.__notes__  # a class's own odd attribute of that name: add_note would refuse it
    exc.add_note(f"(raised on agent {agent}, call {chunk}, attempt {attempt}" +
                 (f"; remote traceback:)\n{tb}" if tb else ")"))
    return exc


def _local_class(error: dict[str, Any]) -> type | None:
    module, qualname = error.get("module"), error.get("qualname") or error.get("type")
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, type) or not issubclass(obj, Exception) or issubclass(obj, RemoteError) \
            or obj.__name__ != error.get("type"):
        return None
    return obj


def _dual(cls: type) -> type | None:
    """The subclass of ``cls`` and RemoteError with ``cls``'s name, made once per class."""
    if cls not in _DUALS:
        try:
            _DUALS[cls] = type(cls.__name__, (cls, _AsOriginal), {"__module__": cls.__module__,
                                                                 "__qualname__": cls.__qualname__})
        except TypeError:  # a final class, or one whose layout cannot be combined
            _DUALS[cls] = None  # type: ignore[assignment]
    return _DUALS[cls]


def _rebuild(cls: type, error: dict[str, Any]) -> Exception | None:
    """An instance of ``cls``'s dual with the remote one's ``args`` and attributes: made by its
    constructor where that says what the remote one said, else without it (a constructor that
    formats its argument), as pickle keeps an exception (``args``, then ``__dict__``)."""
    try:
        args = decode(error["args"]) if isinstance(error.get("args"), list) else [str(error.get("message"))]
        attrs = decode(error["attrs"]) if isinstance(error.get("attrs"), dict) else {}
        attrs = {k: v for k, v in attrs.items() if isinstance(k, str) and not k.startswith("__")}  # untrusted
    except CodecError:
        args, attrs = [str(error.get("message"))], {}
    dual = _dual(cls)
    if dual is None:
        return None
    made = []
    for make in (lambda: dual(*args), lambda: _bare(dual, args)):
        try:
            exc = make()
            exc.__dict__.update(attrs)
        except Exception:  # a constructor that wants other arguments
            continue
        if str(exc) == error.get("message"):
            return exc
        made.append(exc)
    return made[0] if made else None


def _bare(dual: type, args: list[Any]) -> Exception:
    """An instance made without its class's ``__init__``, holding ``args`` as they were."""
    exc = dual.__new__(dual, *args)
    exc.args = tuple(args)
    return exc
