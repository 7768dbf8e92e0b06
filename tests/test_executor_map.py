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
from tests.helpers import wait_for


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


def mark(folder: str, i: int) -> int:
    """Leaves the file ``folder/i`` (the call ran), then ``i * i``; call 150 raises after it."""
    Path(folder, str(i)).touch()
    if i == 150:
        raise KeyError(f"call {i}")
    return i * i


def hold(folder: str, door: str, i: int) -> int:
    """Leaves the file ``folder/i``, then (but call 0) waits for the file ``door``."""
    Path(folder, str(i)).touch()
    return i if i == 0 else gate(door, i)


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
            theirs = list(pp.map(pair, xs, ys, zs, chunksize=k))
            assert list(ours) == theirs == [(x, y, z) for x, y, z in zip(xs, ys, zs)]
            assert chunks_of(ex) - before <= -(-20 // k)  # a chunk holds whole groups of k calls (several if short)
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


def doubled(text: str) -> str:
    return text * 2


@pytest.mark.timeout(120)
def test_calls_of_64_kb_each_way_sent_ahead_to_the_worker_do_not_block_it(spool: Spool, agents) -> None:
    """A job's request to its worker (its 64 KB of arguments and more) sent ahead while the
    worker wrote a reply of over 64 KB: each side waited for the other to read its pipe, and the
    agent hung (a pipe holds 64 KB)."""
    agents(1)
    words = ["%06d" % i + "x" * 65_400 for i in range(8)]  # each call a job of its own (64 KB at most)
    with Executor(spool.base) as ex:
        assert list(ex.map(doubled, words, timeout=30)) == [w * 2 for w in words]


@pytest.mark.timeout(180)
def test_short_calls_of_chunksize_1_travel_together_and_each_runs_as_process_pool_runs_it(spool: Spool, agents,
                                                                                        tmp_path: Path) -> None:
    """With chunksize 1, measured short calls go several to a job; every call runs whether an
    earlier one of its job raised or not (as ProcessPoolExecutor runs each), the exception is
    raised at its call, after the values before it."""
    agents(1)
    folder = tmp_path / "ran"
    folder.mkdir()
    (tmp_path / "theirs").mkdir()
    with ProcessPoolExecutor(2) as pp:
        want, theirs = [], None
        try:
            for v in pp.map(mark, [str(tmp_path / "theirs")] * 400, range(400)):
                want.append(v)
        except KeyError as e:
            theirs = e
    with Executor(spool.base) as ex:
        results = ex.map(mark, [str(folder)] * 400, range(400), timeout=60)
        wait_for(lambda: len(os.listdir(folder)) == 400, 60, "every call to run, those after call 150 too")
        got = []
        with pytest.raises(KeyError) as ours:
            for v in results:
                got.append(v)
        assert chunks_of(ex) < 400  # calls went together
    assert got == want == [i * i for i in range(150)]
    assert isinstance(ours.value, RemoteError) and str(ours.value) == str(theirs)


@pytest.mark.timeout(180)
def test_map_of_many_short_calls_gives_what_process_pool_map_gives(spool: Spool, agents) -> None:
    """Ranges, lists of one value (sent as such), tuples, generators, a partial, chunksize 1 and more:
    the values of ProcessPoolExecutor's map, in order."""
    agents(2)
    n = 3000
    cases = [(pow, (range(n), [2] * n)), (pair, (range(5, n + 5, 3), [7] * n, ["z"] * n)),
             (pair, (tuple(range(n)), (x % 3 == 0 for x in range(n)), [None] * (n - 1) + ["end"])),
             (functools.partial(add, y=5), (range(-n, n),)), (div, (range(1, n), [True] * n))]
    with Executor(spool.base) as ex, ProcessPoolExecutor(2) as pp:
        for fn, iterables in cases:
            for k in (1, 7):
                mine = [list(i) if inspect.isgenerator(i) else i for i in iterables]
                want = list(pp.map(fn, *mine, chunksize=k))
                assert list(ex.map(fn, *mine, chunksize=k, timeout=120)) == want, (fn, k)
        assert chunks_of(ex) < 1000  # calls went together (one a chunk: 17,000)


@pytest.mark.timeout(120)
def test_a_map_closed_early_cancels_its_calls_not_started(spool: Spool, agents, tmp_path: Path) -> None:
    """As ProcessPoolExecutor's: closing map's iterator cancels what has not started (the call
    running ends); calls not queued yet never are."""
    agents(1)
    door, folder = tmp_path / "door", tmp_path / "ran"
    folder.mkdir()
    with Executor(spool.base) as ex:
        results = ex.map(hold, [str(folder)] * 60, [str(door)] * 60, range(60), timeout=60)
        assert next(results) == 0
        wait_for(lambda: (folder / "1").exists(), 30, "call 1 to start")
        results.close()
        door.touch()
    assert (folder / "1").exists() and len(os.listdir(folder)) <= 4  # 0, 1, and one sent ahead to the worker
    assert chunks_of(ex) < 60 and any(c.future.cancelled() for c in ex._calls.values())


@pytest.mark.timeout(120)
def test_buffersize_reads_the_iterables_as_results_are_taken(spool: Spool, agents, monkeypatch) -> None:
    """Python 3.14's map(buffersize=B): B groups of calls read ahead of the results taken (tried
    here on any Python: the executor takes it where the running Python's map does)."""
    monkeypatch.setattr(executor_module, "MAP_BUFFERSIZE", True)
    agents(1)
    read: list[int] = []

    def inputs():
        for i in range(20):
            read.append(i)
            yield i

    with Executor(spool.base) as ex:
        results = ex.map(add, inputs(), chunksize=2, buffersize=3, timeout=60)
        assert len(read) == 6  # 3 groups of 2
        assert next(results) == 0 and len(read) == 8  # a group more, read before its result was waited for
        assert list(results) == list(range(1, 20))
        with pytest.raises(ValueError, match="buffersize must be None or > 0"):
            ex.map(add, [1], buffersize=0)
        with pytest.raises(TypeError, match="buffersize must be an integer or None"):
            ex.map(add, [1], buffersize=1.5)
