"""Executor.map against ProcessPoolExecutor.map (issue 27): chunksize (K calls as one chunk), results
and order, several iterables, exceptions, timeout, refused arguments, laziness, real agents."""
from __future__ import annotations

import functools
import inspect
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from gpupool.jobs.paths import Spool
from gpupool.master import executor as executor_module
from gpupool.master.executor import Executor, RemoteError


# the functions the agents import (module-level, by name) ------------------------------------------
def add(x: int, y: int = 0) -> int:
    return x + y


def pair(x: int, y: int, z: str) -> tuple:
    return (x, y, z)


def div(a: int, b: int) -> float:
    return a / b


def where(tag: str, device: str = "?", scale: int = 1) -> tuple:
    return tag * scale, device


def gate(path: str, value: int) -> int:
    """``value`` once the file ``path`` exists (the test creates it when it wants the call to end)."""
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


def chunks_of(ex: Executor) -> int:
    """How many chunks (calls, or groups of map's calls) the executor has queued."""
    with ex._mutex:
        return len(ex._calls)


# ------------------------------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_map_gives_what_process_pool_map_gives(spool: Spool, agents) -> None:
    agents(2)
    xs, ys, zs = list(range(20)), list(range(100, 131)), ["a", "b"] * 15  # 20, 31, 30 items: zip stops at 20
    with Executor(spool.base) as ex, ProcessPoolExecutor(2) as pp:
        for k in (1, 3, 7, 20, 50):  # 20 % 3 and 20 % 7 leave a shorter last group; 50 is more than the input
            before = chunks_of(ex)
            ours = ex.map(pair, xs, ys, zs, chunksize=k, timeout=60)
            assert chunks_of(ex) - before == -(-20 // k)  # one chunk per group of k calls
            theirs = list(pp.map(pair, xs, ys, zs, chunksize=k))
            assert list(ours) == theirs == [(x, y, z) for x, y, z in zip(xs, ys, zs)]
        assert list(ex.map(add, [], chunksize=4)) == list(pp.map(add, [], chunksize=4)) == []
        # a builtin, a partial with its own arguments, the agent's built-in 'device' where the function takes it
        assert list(ex.map(pow, range(10), [3] * 10, chunksize=4, timeout=60)) == [i ** 3 for i in range(10)]
        assert list(ex.map(functools.partial(add, y=5), range(6), chunksize=4, timeout=60)) == list(range(5, 11))
        assert list(ex.map(functools.partial(where, scale=2), "ab", chunksize=2, timeout=60)) == \
            [("aa", "cpu"), ("bb", "cpu")]


@pytest.mark.timeout(180)
def test_an_exception_is_raised_at_its_call_after_the_values_before_it(spool: Spool, agents) -> None:
    agents(2)
    a, b = [1] * 8, [1, 2, 4, 5, 0, 8, 10, 0]  # call 4 raises (and call 7)
    with ProcessPoolExecutor(2) as pp:
        want = []
        with pytest.raises(ZeroDivisionError) as theirs:  # chunksize 1: every value before call 4, then its error
            for v in pp.map(div, a, b):
                want.append(v)
    assert want == [1.0, 0.5, 0.25, 0.2]
    with Executor(spool.base) as ex:
        for k in (1, 2, 3, 5, 8):  # call 4 first, middle or last of its group
            got = []
            with pytest.raises(ZeroDivisionError) as ours:
                for v in ex.map(div, a, b, chunksize=k, timeout=60):
                    got.append(v)
            assert got == want, k  # ProcessPoolExecutor with chunksize k loses the values of call 4's group
            assert isinstance(ours.value, RemoteError) and str(ours.value) == str(theirs.value)
            assert "in div" in ours.value.remote_traceback


@pytest.mark.timeout(180)
def test_map_is_lazy_and_reads_its_iterables_at_once(spool: Spool, agents, tmp_path: Path) -> None:
    agents(2)
    door = tmp_path / "door"
    with Executor(spool.base) as ex:
        inputs = (i for i in range(6))
        results = ex.map(gate, [str(tmp_path / "open")] * 2 + [str(door)] * 4, inputs, chunksize=2, timeout=60)
        assert next(inputs, None) is None  # read at once, as ProcessPoolExecutor.map reads it (below)
        (tmp_path / "open").touch()
        # the first group's values come while the calls after it wait for the door: map is lazy
        assert inspect.isgenerator(results) and next(results) == 0 and next(results) == 1
        door.touch()
        assert list(results) == [2, 3, 4, 5]
    with ProcessPoolExecutor(1) as pp:
        inputs = (i for i in range(6))
        assert list(pp.map(add, inputs, chunksize=2)) == list(range(6))
        inputs = (i for i in range(6))
        pp.map(add, inputs, chunksize=2)
        assert next(inputs, None) is None


@pytest.mark.timeout(120)
def test_timeout_counts_from_the_map_call(spool: Spool, agents, tmp_path: Path) -> None:
    agents(2)
    door, got = tmp_path / "door", []
    with Executor(spool.base) as ex:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):  # concurrent.futures.TimeoutError, as ProcessPoolExecutor raises it
            for v in ex.map(gate, [str(tmp_path)] * 2 + [str(door)] * 2, range(4), chunksize=2, timeout=5):
                got.append(v)
        assert got == [0, 1] and time.monotonic() - t0 >= 5
        door.touch()  # the call that timed out ends, and the executor closes


def test_map_refuses_what_process_pool_map_refuses(tmp_path: Path) -> None:
    with Executor(tmp_path / "b") as ex, ProcessPoolExecutor(1) as pp:
        for k in (0, -1):
            for pool in (ex, pp):
                with pytest.raises(ValueError, match=r"chunksize must be >= 1\."):
                    pool.map(add, [1, 2], chunksize=k)
        assert chunks_of(ex) == 0
        if "buffersize" not in inspect.signature(ProcessPoolExecutor.map).parameters:  # before Python 3.14
            errors = []
            for pool in (ex, pp):
                with pytest.raises(TypeError) as e:
                    pool.map(add, [1, 2], chunksize=2, buffersize=1)
                errors.append(str(e.value).rpartition("map() ")[2])
            assert errors[0] == errors[1] == "got an unexpected keyword argument 'buffersize'"
            assert not executor_module.MAP_BUFFERSIZE
        with pytest.raises(TypeError, match="cannot travel"):  # as submit: the call that cannot travel named
            ex.map(add, [1, object()], chunksize=2)
        with pytest.raises(TypeError, match="module-level function"):
            ex.map(lambda x: x, [1, 2], chunksize=2)
        assert chunks_of(ex) == 0


@pytest.mark.timeout(120)
def test_a_group_whose_arguments_pass_64_kb_is_cut(spool: Spool, agents) -> None:
    agents(1)
    words = [f"{i:04d}" + "x" * 996 for i in range(150)]  # 150 KB of arguments in one group of 150
    with Executor(spool.base) as ex:
        assert list(ex.map(add, words, [""] * 150, chunksize=150, timeout=60)) == words
        assert chunks_of(ex) >= 3
        with pytest.raises(ValueError, match="64 KB"):
            ex.map(add, ["y" * 70_000], [""], chunksize=2)
