"""jobs.codec: every value it takes comes back equal and of the same type through JSON text; plain
JSON stays as it was; any JSON a hostile agent writes decodes to data or raises CodecError, nothing
else (derandomized, as tests/test_fuzz.py's CI budget)."""
from __future__ import annotations

import datetime as dt
import json
import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpupool.jobs.codec import MAX_DEPTH, TAG, CodecError, TooDeep, decode, encode, plain

EXPLORE = "GPUPOOL_FUZZ_EXAMPLES" in os.environ
SETTINGS = settings(max_examples=200, deadline=None, derandomize=not EXPLORE)

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8),
                    st.binary(max_size=8), st.complex_numbers(allow_nan=False), st.datetimes(), st.dates(),
                    st.timedeltas(), st.just(math.inf))
hashable = st.recursive(scalars, lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3), max_leaves=6)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.tuples(inner, inner), st.sets(hashable, max_size=3),
    st.dictionaries(st.text(max_size=4), inner, max_size=3), st.dictionaries(hashable, inner, max_size=3)),
    max_leaves=12)


def same(a: object, b: object) -> bool:
    """Equal, and of the same type all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@SETTINGS
@given(values)
def test_every_value_comes_back_equal_and_of_its_type(value: object) -> None:
    text = json.dumps(encode(value), allow_nan=False)  # strict JSON: nan and inf are tagged
    assert same(decode(json.loads(text)), value)
    json.dumps(plain(json.loads(text)))  # and a display of it never fails


@SETTINGS
@given(st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False,
                                                                                  allow_infinity=False),
                              st.text(max_size=8)),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=12))
def test_plain_json_stays_as_it_is(value: object) -> None:
    assert encode(value) == value and decode(value) == value and plain(value) == value


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6),
                                     st.sampled_from(["tuple", "set", "dict", "bytes", "ndarray", "numpy", "datetime",
                                                      "complex", "float", "<f8", "O", "AAAA", "nan"])),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                               st.sampled_from([TAG, "items", "b64", "dtype", "shape", "iso", "re", "im", "s", "repr",
                                                "x"]), inner, max_size=5), max_leaves=10)


@SETTINGS
@given(json_values)
def test_hostile_json_decodes_to_data_or_codec_error(data: object) -> None:
    try:
        decode(data)
    except CodecError:
        pass


def test_what_cannot_travel_is_named() -> None:
    with pytest.raises(CodecError, match=r"value\[1\]\['k'\] is a builtins.object"):
        encode([1, {"k": object()}])
    with pytest.raises(CodecError, match="dtype object"):
        encode(np.array([1, "a"], dtype=object))
    loop: list = []
    loop.append(loop)
    with pytest.raises(TooDeep, match=f"more than {MAX_DEPTH} levels"):
        encode(loop)
    for bad, why in (({TAG: "ndarray", "dtype": "|O", "shape": [1], "b64": ""}, "never decoded"),
                     ({TAG: "ndarray", "dtype": "<f8", "shape": [2], "b64": "AAAA"}, "holds 3 bytes, not the 16"),
                     ({TAG: "pickle"}, "unknown tag 'pickle'"), ({TAG: "set", "items": [[1]]}, "not hashable"),
                     ({TAG: "datetime", "iso": "yesterday"}, "malformed")):
        with pytest.raises(CodecError, match=why):
            decode(bad)


def test_arrays_and_numpy_scalars_keep_dtype_shape_and_order() -> None:
    for value in (np.arange(12, dtype=">i2").reshape(3, 4).T, np.zeros((0, 3)), np.array("text"), np.float32(1.5),
                  np.int8(-3), np.bool_(True), np.array([dt.date(2026, 1, 1)], dtype="datetime64[D]")):
        back = decode(json.loads(json.dumps(encode(value))))
        assert type(back) is type(value) and back.dtype == value.dtype and np.array_equal(back, value)
        assert np.shape(back) == np.shape(value)


def test_long_lists_of_plain_items_take_the_quick_way_with_the_same_result() -> None:
    """A list of plain items is copied whole (Executor.map's columns and values): what is not plain
    in it (nan, inf, a tuple, a numpy float) is still tagged, an int too large for a float stays an
    int, and the depth limit holds for plain items too."""
    mixed = [1, 2.5, 10 ** 400, True, None, "x"]
    assert encode(mixed) == mixed and decode(encode(mixed)) == mixed
    for odd in (math.inf, -math.inf, math.nan, (1,), np.float64(0.5)):
        out = encode([1, 2.5, 10 ** 400, odd])
        assert isinstance(out[3], dict) and out[3][TAG] in ("float", "tuple", "numpy")
        back = decode(json.loads(json.dumps(out)))
        assert type(back[3]) is type(odd) and back[:3] == [1, 2.5, 10 ** 400]
    deep = 7
    for _ in range(MAX_DEPTH + 1):  # an int inside MAX_DEPTH + 1 lists: one level too deep
        deep = [deep]
    with pytest.raises(TooDeep):
        encode(deep)
    with pytest.raises(TooDeep):
        decode(deep)
    assert decode(deep[0]) == deep[0] and encode(deep[0]) == deep[0]
