"""Task functions for tests/test_remote_errors.py (the agents import them by name), each raising an
exception that is hard to describe, send back or rebuild."""
from __future__ import annotations

import socket
import threading
import urllib.request


def load_url(url, timeout):  # the concurrent.futures documentation's ThreadPoolExecutor example
    with urllib.request.urlopen(url, timeout=timeout) as conn:
        return conn.read()


class NeedsTwo(Exception):
    """Its ``__init__`` takes other arguments than its ``args``."""

    def __init__(self, path, code):
        super().__init__(f"{path} failed with code {code}")
        self.path, self.code = path, code


class KeywordOnly(Exception):
    """No ``args`` at all, a keyword-only ``__init__``, its own ``__str__``."""

    def __init__(self, *, key):
        super().__init__()
        self.key = key

    def __str__(self):
        return f"bad key {self.key!r}"


class BadStr(Exception):
    """Its ``__str__`` raises (a half-made instance, as URLError's without ``reason``)."""

    def __str__(self):
        raise AttributeError("BadStr has no text")


class HoldsALock(Exception):
    """An attribute that cannot travel (a lock), beside one that can."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()
        self.count = 3


class _Unreadable:
    def __get__(self, obj, cls=None):
        raise RuntimeError("args cannot be read")


class BadArgs(Exception):
    """Its ``args`` cannot be read."""

    args = _Unreadable()


class BadNotes(Exception):
    """Its ``__notes__`` is no list of notes: ``traceback.format_exc()`` fails on it (Python 3.11)."""

    @property
    def __notes__(self):
        raise RuntimeError("no notes here")


def raise_needs_two(path, code):
    raise NeedsTwo(path, code)


def raise_keyword_only(key):
    raise KeywordOnly(key=key)


def raise_bad_str():
    raise BadStr("never shown")


class HoldsASocket(Exception):
    """A socket as an attribute: it cannot travel."""

    def __init__(self, message, sock):
        super().__init__(message)
        self.sock = sock


class _BadRepr:
    def __repr__(self):
        raise RuntimeError("no repr")


class BadDict(Exception):
    """Its ``__dict__`` cannot be read."""

    @property
    def __dict__(self):
        raise RuntimeError("no __dict__ here")


def raise_holding_a_lock(message, count):
    e = HoldsALock(message)
    e.count = count  # set after __init__: only the attribute sent back tells the caller
    raise e


def raise_holding_a_socket(message):
    with socket.socket() as sock:
        raise HoldsASocket(message, sock)


def raise_with_a_set_that_cannot_be_sorted(message):
    e = ValueError(message)
    e.members = {_BadRepr()}  # encoding it raises RuntimeError, not CodecError
    e.tag = "kept"
    raise e


def raise_bad_dict():
    raise BadDict("dict unreadable")


def raise_bad_args():
    raise BadArgs("hidden")


def raise_bad_notes():
    raise BadNotes("notes broken")
