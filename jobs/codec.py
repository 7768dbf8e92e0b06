"""The one encoding of Python values beyond JSON, for an Executor call's arguments and results.

Plain JSON values (None, bool, int, float, str, lists, dicts with string keys) are written as
they are, so a run's results and ``collect``'s output are what they always were. Every other
value becomes a tagged object ``{"__gpupool__": TAG, ...}``:

==============  ==================================================================
``tuple``       ``"items": [...]``
``set``         ``"items": [...]`` (``frozenset`` the same, tag ``frozenset``)
``dict``        ``"items": [[key, value], ...]``: a dict with a key that is not a
                string, or whose keys include ``__gpupool__`` itself
``bytes``       ``"b64": "..."`` (``bytearray`` the same, tag ``bytearray``)
``ndarray``     ``"dtype"``, ``"shape"``, ``"b64"`` (C order; never object arrays);
                a numpy scalar the same, tag ``numpy``
``datetime``    ``"iso"`` (``date``, ``time`` the same); ``timedelta``: ``"days"``, ``"s"``, ``"us"``
``complex``     ``"re"``, ``"im"``
``float``       ``"repr"``: ``nan``, ``inf`` or ``-inf`` (not strict JSON)
==============  ==================================================================

Never pickle: a result is written by job code on some agent, so ``decode`` reads it as untrusted
input. It makes data only (no import, no call of anything the text names), checks every field
and raises ``CodecError`` naming what is wrong. Depth is bounded in both directions
(``MAX_DEPTH`` levels of JSON, under the spool's own limit ``jobs.jsonio.MAX_DEPTH``; a tagged
tuple takes two levels where a list takes one); size is bounded by whoever writes the text (64
KB for call arguments, 8 MB for a result record).
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import math
from typing import Any

TAG = "__gpupool__"
MAX_DEPTH = 58  # JSON levels an encoded value may nest: under jobs.jsonio.MAX_DEPTH (64), with room for the
# record (a result) or the mailbox (a job descriptor) around it
_PLAIN = (str, int, float, bool, type(None))
_SCALARS = frozenset((str, int, bool, type(None)))  # of these exact types an item of a list is itself as JSON
_NUMBERS = frozenset((int, float, bool))
_TIMES = {"datetime": dt.datetime, "date": dt.date, "time": dt.time}


class CodecError(ValueError):
    """A value that cannot be encoded, or a text that is no valid encoding (``decode``)."""


class TooDeep(CodecError):
    """A value that would nest deeper than ``MAX_DEPTH`` as JSON (or that refers to itself)."""


def encode(value: Any, what: str = "value") -> Any:
    """``value`` as JSON-ready data: itself where it is plain JSON, tagged where not; CodecError
    naming the first part that cannot travel (``what[key]``: an object of another class, a cycle,
    too deep)."""
    return _enc(value, 0, what)


def _enc(v: Any, depth: int, where: str) -> Any:
    if depth > MAX_DEPTH:
        raise TooDeep(f"{where} is nested more than {MAX_DEPTH} levels deep as JSON (or refers to itself)")
    kind = type(v)
    if kind.__module__ == "numpy":  # before the plain types: numpy.float64 is a float
        return _enc_numpy(v, depth, where)
    if isinstance(v, float) and not math.isfinite(v):
        return {TAG: "float", "repr": repr(float(v))}
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, list):  # subclasses too, as json.dumps takes them
        if depth < MAX_DEPTH:  # the items' own depth is allowed: plain ones (most of a long list) as they are
            kinds = set(map(type, v))  # a list of plain items only (numbers, strings) copied at C speed
            if kinds <= _SCALARS or (kinds <= _NUMBERS and _finite(v)):
                return list(v)
            return [x if type(x) in _SCALARS or (type(x) is float and x - x == 0.0)
                    else _enc(x, depth + 1, f"{where}[{i}]") for i, x in enumerate(v)]
        return [_enc(x, depth + 1, f"{where}[{i}]") for i, x in enumerate(v)]
    if isinstance(v, dict):
        if all(isinstance(k, str) for k in v) and TAG not in v:
            return {k: _enc(x, depth + 1, f"{where}[{k!r}]") for k, x in v.items()}
        return {TAG: "dict", "items": [[_enc(k, depth + 3, f"a key of {where}"), _enc(x, depth + 3, f"{where}[{k!r}]")]
                                       for k, x in v.items()]}
    return _enc_other(v, depth, where)


def _finite(numbers: list) -> bool:
    """Whether no item of a list of numbers is nan or infinite (an int too large for a float is finite)."""
    try:
        return all(map(math.isfinite, numbers))
    except OverflowError:
        return False


def _enc_other(v: Any, depth: int, where: str) -> Any:
    kind = type(v)
    for base in (tuple, frozenset, set):  # a namedtuple travels as a tuple
        if isinstance(v, base):
            items = v if base is tuple else sorted(v, key=repr)  # a set's order: the same text for equal sets
            return {TAG: base.__name__, "items": [_enc(x, depth + 2, f"{where}[{i}]") for i, x in enumerate(items)]}
    if isinstance(v, (bytes, bytearray)):
        return {TAG: "bytearray" if isinstance(v, bytearray) else "bytes", "b64": base64.b64encode(v).decode()}
    if kind is complex:
        return {TAG: "complex", "re": _enc(v.real, depth + 1, where), "im": _enc(v.imag, depth + 1, where)}
    if kind is dt.timedelta:  # exact: total_seconds() as a float loses microseconds past some 300 years
        return {TAG: "timedelta", "days": v.days, "s": v.seconds, "us": v.microseconds}
    for tag, cls in _TIMES.items():
        if kind is cls:
            return {TAG: tag, "iso": v.isoformat()}
    if kind.__module__ == "numpy":
        return _enc_numpy(v, depth, where)
    raise CodecError(f"{where} is a {kind.__module__}.{kind.__qualname__}, which cannot travel to or from an agent "
                     "(JSON values, tuples, sets, bytes, dicts with any such keys, numpy arrays, datetimes and "
                     "complex numbers can); pass or return its parts, or a file's path")


def _enc_numpy(v: Any, depth: int, where: str) -> Any:
    import numpy as np

    if isinstance(v, (np.ndarray, np.generic)) and not isinstance(v, np.void):
        if v.dtype.hasobject or v.dtype.fields is not None:
            raise CodecError(f"{where} is a numpy array of dtype {v.dtype}; only plain numeric, bool, string and "
                             "bytes arrays can travel")
        data = np.asarray(v)  # (ascontiguousarray would make a 0-d array 1-d)
        data = data if data.flags.c_contiguous else np.ascontiguousarray(data)
        return {TAG: "ndarray" if isinstance(v, np.ndarray) else "numpy", "dtype": data.dtype.str,
                "shape": list(data.shape), "b64": base64.b64encode(data.tobytes()).decode()}
    raise CodecError(f"{where} is a numpy {type(v).__name__}, which cannot travel to or from an agent")


def decode(data: Any) -> Any:
    """The value ``encode`` made ``data`` from; ``data`` is untrusted (already parsed JSON)."""
    return _dec(data, 0)


def _dec(d: Any, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise TooDeep(f"encoded value is nested more than {MAX_DEPTH} levels deep")
    if isinstance(d, list):
        if depth < MAX_DEPTH:  # plain items (most of a long list) as they are
            kinds = set(map(type, d))
            if list not in kinds and dict not in kinds:  # JSON scalars only: copied at C speed
                return list(d)
            return [x if type(x) in _SCALARS or type(x) is float else _dec(x, depth + 1) for x in d]
        return [_dec(x, depth + 1) for x in d]
    if not isinstance(d, dict):
        return d
    if TAG not in d:
        return {k: _dec(x, depth + 1) for k, x in d.items()}
    tag = d[TAG]
    try:
        return _DECODERS[tag](d, depth)
    except CodecError:
        raise
    except KeyError as e:
        if not isinstance(tag, str) or tag not in _DECODERS:
            raise CodecError(f"encoded value has an unknown tag {str(tag)[:40]!r}") from None
        raise CodecError(f"encoded {tag} lacks its field {e}") from None
    except (TypeError, ValueError, OverflowError, binascii.Error) as e:
        raise CodecError(f"encoded {tag} is malformed: {str(e)[:200]}") from None


def _items(d: dict, depth: int) -> list:
    items = d["items"]
    if not isinstance(items, list):
        raise CodecError(f"encoded {d[TAG]}'s items are not a list")
    return [_dec(x, depth + 1) for x in items]


def _pairs(d: dict, depth: int) -> dict:
    out = {}
    for pair in _items(d, depth):
        if not isinstance(pair, list) or len(pair) != 2:
            raise CodecError("encoded dict's items must be [key, value] pairs")
        out[_hashable(pair[0])] = pair[1]
    return out


def _hashable(v: Any) -> Any:
    try:
        hash(v)
    except TypeError:
        raise CodecError(f"encoded key or set member {type(v).__name__} is not hashable") from None
    return v


def _b64(d: dict) -> bytes:
    text = d["b64"]
    if not isinstance(text, str):
        raise CodecError(f"encoded {d[TAG]}'s b64 is not a string")
    return base64.b64decode(text, validate=True)


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise CodecError(f"encoded {what} is not a number")
    return v


def _int(v: Any) -> int:
    if type(v) is not int:
        raise CodecError("encoded timedelta's days, s and us must be integers")
    return v


def _float(d: dict, depth: int) -> float:
    if d["repr"] not in ("nan", "inf", "-inf"):
        raise CodecError("encoded float must be nan, inf or -inf")
    return float(d["repr"])


def _time(d: dict, depth: int) -> Any:
    if not isinstance(d["iso"], str):
        raise CodecError(f"encoded {d[TAG]} is not an ISO 8601 string")
    return _TIMES[d[TAG]].fromisoformat(d["iso"])


def _ndarray(d: dict, depth: int) -> Any:
    import numpy as np

    dtype, shape = np.dtype(str(d["dtype"])), d["shape"]
    if dtype.hasobject or dtype.fields is not None:
        raise CodecError(f"encoded ndarray has dtype {dtype}, which is never decoded")
    if not isinstance(shape, list) or len(shape) > 32 or not all(type(n) is int and n >= 0 for n in shape):
        raise CodecError("encoded ndarray's shape must be a list of at most 32 sizes")
    raw = _b64(d)
    if math.prod(shape) * dtype.itemsize != len(raw):
        raise CodecError(f"encoded ndarray holds {len(raw)} bytes, not the {math.prod(shape) * dtype.itemsize} "
                         f"of shape {tuple(shape)} and dtype {dtype}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()  # writable, like the array that was sent


_DECODERS = {
    "tuple": lambda d, depth: tuple(_items(d, depth)),
    "set": lambda d, depth: {_hashable(x) for x in _items(d, depth)},
    "frozenset": lambda d, depth: frozenset(_hashable(x) for x in _items(d, depth)),
    "dict": _pairs,
    "bytes": lambda d, depth: _b64(d),
    "bytearray": lambda d, depth: bytearray(_b64(d)),
    "complex": lambda d, depth: complex(_number(_dec(d["re"], depth + 1), "complex"),
                                        _number(_dec(d["im"], depth + 1), "complex")),
    "timedelta": lambda d, depth: dt.timedelta(days=_int(d["days"]), seconds=_int(d["s"]), microseconds=_int(d["us"])),
    "datetime": _time, "date": _time, "time": _time,
    "float": _float,
    "ndarray": _ndarray,
    "numpy": lambda d, depth: _ndarray(d, depth)[()],  # a numpy scalar (numpy.float32(1.5))
}


_JSON_SCALARS = frozenset((type(None), str, int, float, bool))  # JSON's scalars: nothing in them to make plain


def plain(data: Any) -> Any:
    """Encoded ``data`` as the plain JSON it would have been before this encoding existed (what
    ``json.dumps`` made of it): tuples and sets as lists, dict keys as strings, bytes as base64
    text, arrays as nested lists, datetimes as ISO text, complex numbers as [re, im]. For
    displays and tables (``collect``), whose output stays as it was. A list or dict of plain
    scalars is returned as it is (not a copy)."""
    if isinstance(data, list):
        return data if _JSON_SCALARS.issuperset(map(type, data)) else [plain(x) for x in data]
    if not isinstance(data, dict):
        return data
    if TAG not in data:
        return data if _JSON_SCALARS.issuperset(map(type, data.values())) else {k: plain(x) for k, x in data.items()}
    try:
        return _plain_of(decode(data))
    except CodecError:
        return {k: plain(x) for k, x in data.items() if k != TAG}


def _plain_of(v: Any) -> Any:
    if isinstance(v, (tuple, list, set, frozenset)):
        return [_plain_of(x) for x in (sorted(v, key=repr) if isinstance(v, (set, frozenset)) else v)]
    if isinstance(v, dict):
        return {(k if isinstance(k, str) else json.dumps(k) if isinstance(k, (int, float, bool)) or k is None
                 else repr(k)): _plain_of(x) for k, x in v.items()}  # the keys json.dumps makes
    if isinstance(v, (bytes, bytearray)):
        return base64.b64encode(v).decode()
    if isinstance(v, complex):
        return [v.real, v.imag]
    if isinstance(v, (dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, dt.timedelta):
        return v.total_seconds()
    if type(v).__module__ == "numpy":
        return v.tolist()
    return v
