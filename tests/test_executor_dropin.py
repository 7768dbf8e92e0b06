"""master.executor.Executor as a drop-in for concurrent.futures (issue 15): the documentation's
examples give ThreadPoolExecutor's results, values beyond JSON travel both ways, builtins and
methods are called by name, remote exceptions keep their class, an unguarded script fails
clearly, max_workers, cancel, exit, and what a future tells about its call. Real agents."""
from __future__ import annotations

import datetime as dt
import functools
import math
import operator
import re
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pytest

from gpupool.jobs.paths import Spool
from gpupool.master.executor import Executor, NestedExecutor, RemoteError
from tests.helpers import REPO, results, wait_for


# the documentation's examples (docs.python.org/3/library/concurrent.futures.html) ------------------
def load_url(url, timeout):
    with urllib.request.urlopen(url, timeout=timeout) as conn:
        return conn.read()


PRIMES = [112272535095293, 112582705942171, 112272535095293, 115280095190773, 115797848077099, 1099726899285419]


def is_prime(n):
    if n < 2:
        return False
    if n == 2:
        return True
    if n % 2 == 0:
        return False
    sqrt_n = int(math.floor(math.sqrt(n)))
    for i in range(3, sqrt_n + 1, 2):
        if n % i == 0:
            return False
    return True


# more functions the agents find by name --------------------------------------------------------------
def echo(x):
    return x


def scale(x, factor=1):
    return x * factor


class Model:
    factor = 3

    @staticmethod
    def double(x):
        return 2 * x

    @classmethod
    def scaled(cls, x):
        return cls.factor * x


class Oops(Exception):
    def __init__(self, code):
        super().__init__(f"oops {code}")
        self.code = code


def fail_oops(code):
    raise Oops(code)


def chatty(n):
    print(f"line {n} of the call")
    print("to stderr too", file=sys.stderr)
    return n


def nap(seconds, tag=0):
    time.sleep(seconds)
    return tag


VALUES = [(1, 2), {1: "a", (2, 3): "b"}, b"\x00\xffbytes", {1, 2, 3}, frozenset({"x"}), dt.datetime(2026, 12, 1, 14, 5),
          dt.date(2026, 12, 1), 3 + 4j, [(1, b"z"), {"k": {2.5}}], float("inf"), {"__gpupool__": "tuple"}]


def both(fn, calls, ex):
    """What ThreadPoolExecutor and our Executor return for the same calls (args tuples)."""
    with ThreadPoolExecutor() as tp:
        want = [tp.submit(fn, *a).result() for a in calls]
    got = [f.result(timeout=60) for f in [ex.submit(fn, *a) for a in calls]]
    return want, got


@pytest.mark.timeout(120)
def test_the_documentation_examples_give_thread_pool_results(spool: Spool, agents, tmp_path: Path) -> None:
    agents(2)
    pages = []
    for i in range(3):
        (tmp_path / f"page{i}.html").write_bytes(b"<html>%d</html>\x00\xfe" % i)
        pages.append((tmp_path / f"page{i}.html").as_uri())
    with Executor(spool.base) as ex:
        assert ex.submit(pow, 323, 1235).result(timeout=60) == pow(323, 1235)
        with ThreadPoolExecutor(max_workers=5) as tp:
            want = {url: tp.submit(load_url, url, 60).result() for url in pages}
        futs = {ex.submit(load_url, url, 60): url for url in pages}
        got = {futs[f]: f.result() for f in as_completed(futs, timeout=60)}
        assert got == want and all(isinstance(v, bytes) for v in got.values())
        assert list(ex.map(is_prime, PRIMES, timeout=90)) == list(map(is_prime, PRIMES))
        for fn, calls in ((operator.truediv, [(1, 4), (7, 2)]), (math.factorial, [(20,)]), (time.sleep, [(0.01,)]),
                          (echo, [(v,) for v in VALUES]), (Model.double, [(4,)]), (Model.scaled, [(4,)]),
                          (functools.partial(pow, 2), [(10,)]), (functools.partial(scale, factor=(1, 2)), [(2,)]),
                          (np.sqrt, [(16.0,)])):
            want, got = both(fn, calls, ex)
            assert got == want and [type(g) for g in got] == [type(w) for w in want], fn
        arr = np.arange(12, dtype=np.int16).reshape(3, 4)
        back = ex.submit(echo, arr).result(timeout=60)
        assert back.dtype == arr.dtype and np.array_equal(back, arr)


@pytest.mark.timeout(120)
def test_remote_exceptions_keep_their_class_and_traceback(spool: Spool, agents) -> None:
    agents(1)
    with Executor(spool.base) as ex:
        with pytest.raises(ZeroDivisionError) as e:
            ex.submit(operator.truediv, 1, 0).result(timeout=60)
        assert str(e.value) == "division by zero" and isinstance(e.value, RemoteError)
        assert "ZeroDivisionError" in e.value.remote_traceback and "raised on agent" in e.value.__notes__[0]
        try:
            ex.submit(fail_oops, 7).result(timeout=60)
        except Oops as oops:  # a class of the caller's own module, with its attributes
            assert oops.code == 7 and str(oops) == "oops 7" and "in fail_oops" in oops.__notes__[0]
        with pytest.raises(KeyError) as k:
            ex.submit(operator.getitem, {}, "missing").result(timeout=60)
        assert k.value.args == ("missing",)
        with pytest.raises(TypeError, match="cannot travel"):
            ex.submit(echo, object())
        with pytest.raises(TypeError, match="bound to an instance"):
            ex.submit("abc".upper)


UNGUARDED = """
import sys
from gpupool.master.executor import Executor

def triple(x):
    return 3 * x

with Executor(sys.argv[1]) as ex:          # no if __name__ == "__main__": guard (as submitit's README)
    print(ex.submit(triple, 2).result(timeout=60))
"""


@pytest.mark.timeout(120)
def test_a_script_without_a_main_guard_fails_clearly_instead_of_deadlocking(spool: Spool, agents, env,
                                                                              tmp_path: Path) -> None:
    agents(1)
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED)
    r = subprocess.run([sys.executable, str(script), str(spool.base)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=100)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "NestedExecutor: an Executor was created inside a pool worker while it imported" in r.stderr
    assert f"{script}" in r.stderr and "if __name__ == \"__main__\":' in unguarded.py" in r.stderr
    assert issubclass(NestedExecutor, RuntimeError)


@pytest.mark.timeout(120)
def test_max_workers_limits_the_calls_running_at_once(spool: Spool, agents) -> None:
    agents(3)
    with Executor(spool.base, max_workers=2, keep=True) as ex:  # its results are read below
        futs = [ex.submit(nap, 0.3, tag=i) for i in range(6)]
        assert [f.result(timeout=60) for f in futs] == list(range(6))
    spans = sorted((r["started_at"], r["finished_at"]) for r in results(spool.base, ex.run).values())
    most = max(sum(s <= start < e for s, e in spans) for start, _ in spans)  # running when each one started
    assert len(spans) == 6 and most <= 2, spans
    with pytest.raises(ValueError, match="max_workers must be None or 1 or more"):
        Executor(spool.base, max_workers=0)
    with pytest.raises(ValueError, match=r"base must be the spool folder, not 4 \(the number of calls at once"):
        Executor(4)  # ProcessPoolExecutor(4)'s habit


@pytest.mark.timeout(120)
def test_a_queued_call_can_be_cancelled_and_never_runs(spool: Spool, agents) -> None:
    agents(1)
    with Executor(spool.base, depth=4, keep=True) as ex:  # its results are read below
        first = ex.submit(nap, 2.0, tag=0)
        queued = [ex.submit(nap, 0.1, tag=i) for i in range(1, 4)]
        wait_for(lambda: first.running(), 30, "the first call running")
        assert not any(f.running() for f in queued)
        assert [f.cancel() for f in queued] == [True, True, True]
        assert not first.cancel() and first.result(timeout=60) == 0
    assert set(results(spool.base, ex.run)) == {0}  # the cancelled calls left the mailbox unrun


@pytest.mark.timeout(120)
def test_a_future_tells_its_job_id_attempts_and_output(spool: Spool, agents, env) -> None:
    (agent,) = agents(1)
    with Executor(spool.base, retries=1, keep=True) as ex:  # its logs are read below
        fut = ex.submit(chatty, 5)
        assert fut.result(timeout=60) == 5
        assert fut.job_id == f"{ex.run}/0" and fut.agent() == agent.id
        assert fut.log_path() == spool.chunk_log(ex.run, 0)  # the call's own log, as a script's
        assert [(a["attempt"], a["status"]) for a in fut.attempts] == [(1, "ok")]
        wait_for(lambda: "to stderr too" in (fut.stdout() or ""), 10, "the call's output in its log")
        assert fut.stdout() == "line 5 of the call\nto stderr too\n"
        bad = ex.submit(fail_oops, 1)
        with pytest.raises(Oops):
            bad.result(timeout=60)
        assert [(a["attempt"], a["status"]) for a in bad.attempts] == [(1, "failed"), (2, "failed")]
        assert ex.submit(chatty, 6).result(timeout=60) == 6 and fut.stdout() == "line 5 of the call\nto stderr too\n"
    r = subprocess.run([sys.executable, "-m", "master", "logs", "--base", str(spool.base), "--run", ex.run, "--chunk",
                        "0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and re.search(r"\(\S+000000\.log\) ---\n# attempt 1 at [^\n]+\nline 5 of the call\n"
                                           r"to stderr too\n", r.stdout), r.stdout
    assert "to stderr too" not in spool.worker_log(agent.id).read_text()  # the worker log keeps the pool's lines only


AT_EXIT = """
import sys
from gpupool.master.executor import Executor
from tests.test_executor_dropin import nap

ex = Executor(sys.argv[1])
f = ex.submit(nap, float(sys.argv[2]), tag=42)
f.add_done_callback(lambda f: print("done", f.result(), flush=True))
if sys.argv[3] == "nowait":
    ex.shutdown(wait=False)
print("end of script", flush=True)
"""


@pytest.mark.timeout(120)
def test_outstanding_calls_are_awaited_at_exit_unless_shutdown_without_wait(spool: Spool, agents, env,
                                                                           tmp_path: Path) -> None:
    agents(1)
    script = tmp_path / "at_exit.py"
    script.write_text(AT_EXIT)
    r = subprocess.run([sys.executable, str(script), str(spool.base), "0.5", "wait"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["end of script", "done 42"]
    assert "gpupool: waiting for 1 outstanding call(s) of run executor-at_exit-" in r.stderr
    r = subprocess.run([sys.executable, str(script), str(spool.base), "60", "nowait"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=50)  # does not wait the minute the call takes
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "end of script"



@pytest.mark.timeout(120)
def test_calls_no_live_agent_can_read_fail_naming_the_agents(spool: Spool, env) -> None:
    """Executor calls need the descriptor schema that brought their fields: an agent of the version
    before (which reads one schema less) is passed over, and with only such agents the calls fail at
    once instead of waiting for ever."""
    from gpupool.jobs.descriptor import MUST_UNDERSTAND
    from tests.helpers import FAST, HOST

    need = MUST_UNDERSTAND["encoded"]
    old = (f"import gpupool.jobs.descriptor as d; d.SCHEMA = {need - 1}; import runpy; "
           "runpy.run_module('gpupool.agent', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", old, "--base", str(spool.base), "--gpu", "0", "--cpu", *FAST],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (spool.agents_dir / f"{HOST}-cpu0.json").exists(), 30, "the old agent's heartbeat")
        with Executor(spool.base) as ex:
            with pytest.raises(Exception, match=f"reads job descriptors up to schema {need - 1}, this run's need {need}"):
                ex.submit(echo, 1).result(timeout=60)
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.parametrize("error, kind", [
    ({"type": "system", "module": "os", "qualname": "system", "message": "x"}, RemoteError),  # not an exception class
    ({"type": "Nope", "module": "not_imported_here", "qualname": "Nope", "message": "x"}, RemoteError),  # never imported
    ({"type": "ValueError", "module": "builtins", "qualname": "KeyError", "message": "x"}, RemoteError),  # names differ
    ({"type": "ValueError", "module": "builtins", "qualname": "ValueError", "message": "x",
      "args": {"__gpupool__": "pickle"}, "attrs": {"__notes__": 5, "__class__": "int", "code": 3}}, ValueError),
    ({"type": "SystemExit", "module": "builtins", "qualname": "SystemExit", "message": "1"}, RemoteError),  # not raised
])
def test_a_hostile_error_record_makes_data_only(error: dict, kind: type) -> None:
    """An error record is written by job code on some agent: the class it names is only looked up in
    modules the caller has imported, must be an Exception, and its attributes cannot change what it is."""
    from gpupool.master.remote import remote_exception

    exc = remote_exception(error, "a0", 1, 1)
    assert type(exc) is kind if kind is RemoteError else (isinstance(exc, kind) and isinstance(exc, RemoteError))
    assert "not_imported_here" not in sys.modules


def test_the_spool_comes_from_gpupool_base_as_for_main(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("GPUPOOL_BASE", raising=False)
    with pytest.raises(ValueError, match=r"base \(the spool folder the agents serve\) is not given and \$GPUPOOL_BASE"):
        Executor(max_workers=2)
    monkeypatch.setenv("GPUPOOL_BASE", str(tmp_path / "b"))
    ex = Executor(max_workers=2)
    ex.shutdown()
    assert Path(ex.spool.base) == tmp_path / "b"


@pytest.mark.timeout(60)
def test_calls_with_no_live_agent_say_so(spool: Spool, env, tmp_path: Path) -> None:
    script = tmp_path / "alone.py"
    script.write_text("import sys\nfrom gpupool.master.executor import Executor\nfrom tests.test_executor_dropin import echo\n"
                      "ex = Executor(sys.argv[1])\nf = ex.submit(echo, 1)\nex.shutdown(wait=False)\n"
                      "import time; time.sleep(2)\n")
    r = subprocess.run([sys.executable, str(script), str(spool.base)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=50)
    assert r.returncode == 0 and f"no live agents in {spool.base}; the calls wait for some" in r.stderr, r.stderr
