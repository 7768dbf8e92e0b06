"""A call's remote failure as an exception of the caller, as Ray's task errors are.

The worker records the exception's class (``module``, ``qualname``), its ``args`` and attributes
(encoded by ``jobs.codec``, each left out where it cannot travel), its message (``str()``, or
``<str() failed: ...>`` where that raised) and its traceback. ``remote_exception`` raises it again
as an instance of that same class where the caller has it (``builtins``, or a module the caller
has already imported: a name read from a result is never imported, so no module runs because an
agent said so), so ``except ZeroDivisionError`` catches a remote division by zero. The instance
is also a ``RemoteError`` (a subclass of both, with the original's name), so code that catches
``RemoteError`` keeps working; ``str()`` is the original's, and the remote traceback, the agent
and the call are in a note (``add_note``) shown under the local traceback.

A rebuilt instance is kept only when it is faithful: its ``str()`` is the remote message. Where
the class cannot be found or made again (not imported here, not an ``Exception``, a class that
cannot be subclassed, a constructor, attribute or note that it refuses, a ``str()`` that differs), the
caller gets a plain ``RemoteError`` naming the remote type, message and traceback. The record is
written by job code on some agent, so it is untrusted: ``remote_exception`` never raises,
whatever the record holds and whatever the class's own code does while it is rebuilt.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from gpupool.jobs.codec import decode

FIELD_LIMIT = 64 * 1024  # characters of a record's odd (non-string) field shown


class RemoteError(Exception):
    """The call raised on the agent. ``type``, ``message``, ``remote_traceback``, ``agent``, ``chunk``, ``attempt``."""

    def __init__(self, error: dict[str, Any] | None, agent: str | None, chunk: int, attempt: int) -> None:
        _describe(self, error, agent, chunk, attempt)
        super().__init__(f"{self.type}: {self.message} (on {_shown(agent)}, call {_shown(chunk)}, "
                         f"attempt {_shown(attempt)})")

    def __str__(self) -> str:
        tb = self.remote_traceback if isinstance(self.remote_traceback, str) else ""
        return super().__str__() + (f"\n\nRemote traceback:\n{tb.rstrip()}" if tb else "")


class _AsOriginal(RemoteError):
    """Between the original class and RemoteError in a rebuilt exception's MRO: the original's
    own ``__init__`` and ``__str__`` (and their ``super()`` calls) reach Exception's, not
    RemoteError's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        Exception.__init__(self, *args)

    __str__ = Exception.__str__


def _guarded(step: Callable[[], Any]) -> tuple[bool, Any]:
    """(True, what ``step`` returned), or (False, None) whatever it raised: the steps of a rebuild
    run a class's own code (its metaclass, ``__init_subclass__``, ``__init__``, ``__str__``...),
    which may raise anything, SystemExit included, on the caller's dispatcher thread."""
    try:
        return True, step()
    except KeyboardInterrupt:
        raise
    except BaseException:  # never the future's loss, nor the dispatcher's
        return False, None


def text_of(exc: BaseException) -> str:
    """``str(exc)``, or ``<str() failed: TYPE: MESSAGE>`` where that raises (as the worker
    records such an exception's message: ``agent.worker_process.error_of``)."""
    try:
        return _plain(str(exc))
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        try:
            why = _plain(str(e))
        except KeyboardInterrupt:
            raise
        except BaseException:
            why = "?"
        return f"<str() failed: {type(e).__name__}: {why}>"


def _plain(text: str) -> str:
    """A str subclass (whose methods may be anything) as a plain str."""
    return text if type(text) is str else str.__str__(text)


def _shown(value: Any) -> str:
    """A value of a record (or an argument) as text, whatever it is."""
    if isinstance(value, str):
        return _plain(value)
    ok, text = _guarded(lambda: repr(value))
    text = text if ok and isinstance(text, str) else f"<a {type(value).__name__}>"
    return text if len(text) <= FIELD_LIMIT else text[:FIELD_LIMIT] + "..."


def _field(error: dict[str, Any], key: str, default: str) -> str:
    """A text field of the record: itself, ``default`` where it is missing or null, else shown."""
    value = error.get(key)
    return default if value is None else _shown(value)


def _describe(exc: BaseException, error: Any, agent: Any, chunk: Any, attempt: Any) -> None:
    error = error if isinstance(error, dict) else {}
    exc.type = _field(error, "type", "(unknown type)")
    exc.message = _field(error, "message", "")
    exc.remote_traceback = error.get("traceback") if isinstance(error.get("traceback"), str) else ""
    exc.agent, exc.chunk, exc.attempt = agent, chunk, attempt


_DUALS: dict[type, type | None] = {}
_OWN_DICT = BaseException.__dict__["__dict__"]  # an exception's own attributes, past a class's override (as pickle)


def remote_exception(error: dict[str, Any] | None, agent: str | None, chunk: int, attempt: int) -> Exception:
    """The exception ``future.result()`` raises for a failed call (see the module); never raises."""
    error = error if isinstance(error, dict) else {}
    ok, exc = _guarded(lambda: _rebuilt(error, agent, chunk, attempt))
    if ok and exc is not None:
        return exc
    return RemoteError(error, agent, chunk, attempt)


def _rebuilt(error: dict[str, Any], agent: str | None, chunk: int, attempt: int) -> Exception | None:
    """The remote exception as an instance of its own class's dual, or None where no faithful one
    can be made: made by its constructor where that says what the remote one said, else without
    it (a constructor that formats its argument, or takes others), as pickle keeps an exception
    (``args``, then ``__dict__``)."""
    message = error.get("message")
    if not isinstance(message, str):
        return None  # nothing to be faithful to
    cls = _local_class(error)
    dual = _dual(cls) if cls is not None else None
    if dual is None:
        return None
    args, attrs = _state(error)
    for make in (lambda: dual(*args), lambda: _bare(dual, args)):
        ok, exc = _guarded(make)
        if not ok or not isinstance(exc, dual):
            continue
        ok, _ = _guarded(lambda: (_OWN_DICT.__get__(exc).update(attrs), _describe(exc, error, agent, chunk, attempt)))
        if ok and text_of(exc) == message and _note(exc, agent, chunk, attempt) and text_of(exc) == message:
            return exc  # (str() once more: a __str__ that shows the notes)
    return None


def _state(error: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """The remote exception's ``args`` (its message where they did not travel) and attributes;
    each decoded as untrusted data, and dropped where it is no valid encoding."""
    ok, args = _guarded(lambda: decode(error["args"]))
    if not ok or not isinstance(error.get("args"), list) or not isinstance(args, list):
        args = [error.get("message")]
    ok, attrs = _guarded(lambda: decode(error["attrs"]))
    if not ok or not isinstance(error.get("attrs"), dict) or not isinstance(attrs, dict):
        attrs = {}
    return args, {k: v for k, v in attrs.items() if type(k) is str and k and not k.startswith("__")}


def _note(exc: BaseException, agent: str | None, chunk: int, attempt: int) -> bool:
    """Where the remote traceback shows under the local one; False where the class refuses it."""
    def add() -> None:
        tb = exc.remote_traceback.rstrip()
        if not isinstance(getattr(exc, "__notes__", []), list):
            del exc.__notes__  # a class's own odd attribute of that name: add_note would refuse it
        exc.add_note(f"(raised on agent {_shown(agent)}, call {_shown(chunk)}, attempt {_shown(attempt)}" +
                     (f"; remote traceback:)\n{tb}" if tb else ")"))
    return _guarded(add)[0]


def _local_class(error: dict[str, Any]) -> type | None:
    module, qualname = error.get("module"), error.get("qualname") or error.get("type")
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return None

    def find() -> type | None:
        obj: Any = sys.modules.get(module)
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
        if not isinstance(obj, type) or not issubclass(obj, Exception) or issubclass(obj, RemoteError) \
                or obj.__name__ != error.get("type"):
            return None
        return obj
    ok, cls = _guarded(find)
    return cls if ok else None


def _dual(cls: type) -> type | None:
    """The subclass of ``cls`` and RemoteError with ``cls``'s name, made once per class; None
    where it cannot be made (a final class, a layout that cannot be combined, a metaclass or
    ``__init_subclass__`` that refuses)."""
    ok, known = _guarded(lambda: (cls in _DUALS, _DUALS.get(cls)))
    if not ok:
        return None
    if known[0]:
        return known[1]
    ok, dual = _guarded(lambda: type(cls.__name__, (cls, _AsOriginal), {"__module__": cls.__module__,
                                                                       "__qualname__": cls.__qualname__}))
    dual = dual if ok and isinstance(dual, type) else None
    _DUALS[cls] = dual
    return dual


def _bare(dual: type, args: list[Any]) -> Exception:
    """An instance made without its class's ``__init__``, holding ``args`` as they were."""
    exc = dual.__new__(dual, *args)
    exc.args = tuple(args)
    return exc
