"""A remote exception never escapes its future (issue 22, item 6): whatever a call raises, even an
exception that cannot be described, sent back or rebuilt, the caller gets that exception's class
where it can be rebuilt faithfully, else a RemoteError naming the remote type, message and
traceback; the worker, the other futures and the Executor are unaffected, and so are the run
summary, ``status`` and ``logs``."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
import urllib.error
from pathlib import Path

import pytest

from gpupool.jobs.paths import Spool
from gpupool.master.executor import Executor, RemoteError
from gpupool.master.remote import remote_exception
from tests import remote_tasks as rt
from tests.helpers import REPO, wait_for


def remote_name(exc: BaseException) -> str:
    """The remote type an exception from ``future.result()`` says it is."""
    return exc.type if isinstance(exc, RemoteError) else type(exc).__name__


def master(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "master", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)


def worker_pid(agent) -> int | None:
    return (agent.heartbeat() or {}).get("worker_pid")


def serving_worker(agent) -> int:
    """The pid of the agent's worker once its heartbeat shows one."""
    return wait_for(lambda: worker_pid(agent), 20, f"agent {agent.id}'s worker in its heartbeat")


def alive(pid: int) -> bool:
    """The process runs (not gone, not a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# the documentation's example, one URL missing -----------------------------------------------------
@pytest.mark.timeout(120)
def test_a_missing_url_fails_its_own_future_only(spool: Spool, agents, env, tmp_path: Path) -> None:
    agents(2)
    pages = {}
    for i in range(3):
        (tmp_path / f"page{i}.html").write_bytes(b"<html>%d</html>" % i)
        pages[(tmp_path / f"page{i}.html").as_uri()] = b"<html>%d</html>" % i
    missing = (tmp_path / "missing.html").as_uri()
    with Executor(spool.base, keep=True) as ex:  # its run is read below
        urls = {ex.submit(rt.load_url, url, 60): url for url in [*pages, missing]}
        naps = [ex.submit(time.sleep, 0.3) for _ in range(4)]
        power = ex.submit(pow, 3, 7)
        for f, url in urls.items():
            if url == missing:
                with pytest.raises((urllib.error.URLError, RemoteError)) as e:
                    f.result(timeout=60)
                assert remote_name(e.value) == "URLError" and "No such file or directory" in str(e.value)
                assert isinstance(e.value, RemoteError) and "in load_url" in e.value.remote_traceback
                bad = f.chunk
            else:
                assert f.result(timeout=60) == pages[url]
        assert [n.result(timeout=60) for n in naps] == [None] * 4 and power.result(timeout=60) == 2187
        assert ex.submit(pow, 2, 10).result(timeout=60) == 1024  # the Executor still takes calls
        run = ex.run
    st = master(["status", "--base", str(spool.base), "--run", run], env)
    assert st.returncode == 0 and "URLError: <urlopen error" in st.stdout, st.stderr
    lg = master(["logs", "--base", str(spool.base), "--run", run, "--chunk", str(bad)], env)
    assert lg.returncode == 0 and "URLError" in lg.stdout and "in load_url" in lg.stdout, lg.stderr


# exceptions hard to rebuild, send back or describe ---------------------------------------------------
@pytest.mark.timeout(120)
def test_exceptions_hard_to_rebuild_reach_the_caller_and_spare_the_worker(spool: Spool, agents) -> None:
    [agent] = agents(1)
    with Executor(spool.base) as ex:
        assert ex.submit(pow, 2, 3).result(timeout=60) == 8
        pid = serving_worker(agent)
        calls = {
            "two": ex.submit(rt.raise_needs_two, "/data/x", 3),
            "keyword": ex.submit(rt.raise_keyword_only, "k1"),
            "lock": ex.submit(rt.raise_holding_a_lock, "locked", 7),
            "socket": ex.submit(rt.raise_holding_a_socket, "no peer"),
            "set": ex.submit(rt.raise_with_a_set_that_cannot_be_sorted, "odd set"),
            "args": ex.submit(rt.raise_bad_args),
            "dict": ex.submit(rt.raise_bad_dict),
            "notes": ex.submit(rt.raise_bad_notes),
        }
        after = ex.submit(pow, 5, 2)
        got = {}
        for name, f in calls.items():
            with pytest.raises(Exception) as e:
                f.result(timeout=60)
            got[name] = e.value
            assert isinstance(e.value, RemoteError), (name, e.value)
        assert after.result(timeout=60) == 25
        assert alive(pid) and serving_worker(agent) == pid  # the worker lived through them all

        two = got["two"]  # __init__ takes other arguments: made without it, as pickle would
        assert type(two).__name__ == "NeedsTwo" and isinstance(two, rt.NeedsTwo)
        assert str(two) == "/data/x failed with code 3" and (two.path, two.code) == ("/data/x", 3)
        kw = got["keyword"]
        assert isinstance(kw, rt.KeywordOnly) and kw.key == "k1" and str(kw) == "bad key 'k1'"
        lock = got["lock"]  # the lock cannot travel; the attribute beside it does
        assert isinstance(lock, rt.HoldsALock) and str(lock) == "locked" and lock.count == 7
        sock = got["socket"]
        assert isinstance(sock, rt.HoldsASocket) and str(sock) == "no peer" and not hasattr(sock, "sock")
        odd = got["set"]
        assert isinstance(odd, ValueError) and str(odd) == "odd set" and odd.tag == "kept"
        for name, cls, message in (("args", "BadArgs", "hidden"), ("dict", "BadDict", "dict unreadable"),
                                   ("notes", "BadNotes", "notes broken")):
            assert remote_name(got[name]) == cls and got[name].message == message, name
        assert "in raise_bad_args" in got["args"].remote_traceback
        assert "in raise_bad_notes" in got["notes"].remote_traceback  # format_exc() failed: the frames still
        assert ex.submit(pow, 2, 5).result(timeout=60) == 32


@pytest.mark.timeout(120)
def test_an_exception_whose_str_fails_reaches_the_caller_and_spares_the_worker(spool: Spool, agents) -> None:
    [agent] = agents(1)
    with Executor(spool.base) as ex:
        assert ex.submit(pow, 2, 3).result(timeout=60) == 8
        pid = serving_worker(agent)
        bad, after = ex.submit(rt.raise_bad_str), ex.submit(pow, 5, 2)
        with pytest.raises(Exception) as e:
            bad.result(timeout=60)
        assert isinstance(e.value, RemoteError) and remote_name(e.value) == "BadStr", e.value
        assert e.value.message == "<str() failed: AttributeError: BadStr has no text>"
        assert "in raise_bad_str" in e.value.remote_traceback
        assert after.result(timeout=60) == 25 and ex.submit(pow, 2, 5).result(timeout=60) == 32
        assert alive(pid) and serving_worker(agent) == pid


# the worker's side, in this process ---------------------------------------------------------------
@pytest.mark.parametrize("raiser, kind, message", [
    (rt.raise_bad_str, "BadStr", "<str() failed: AttributeError: BadStr has no text>"),
    (rt.raise_bad_args, "BadArgs", "hidden"),
    (rt.raise_bad_dict, "BadDict", "dict unreadable"),
    (rt.raise_bad_notes, "BadNotes", "notes broken"),
    (lambda: rt.raise_with_a_set_that_cannot_be_sorted("odd"), "ValueError", "odd"),
])
def test_the_worker_describes_any_exception(raiser, kind: str, message: str) -> None:
    from gpupool.agent.worker_process import error_of

    try:
        raiser()
    except BaseException as e:
        try:
            err = error_of(e)
        except Exception as failure:  # reported outside the except blocks: pytest would show BadNotes too
            err = f"error_of raised {type(failure).__name__}: {failure}"
    assert isinstance(err, dict), err
    json.dumps(err)  # it crosses the pipe as JSON
    assert err["type"] == kind and err["message"] == message
    assert isinstance(err["traceback"], str) and "remote_tasks.py" in err["traceback"]
    assert all(isinstance(err[k], str) for k in ("type", "message", "traceback", "module", "qualname"))


# the caller's side: any error record --------------------------------------------------------------
class InitSubclassRefuses(Exception):
    def __init_subclass__(cls, **kwargs):
        raise RuntimeError("no subclasses")


class ExitsInInit(Exception):
    def __init__(self, *args):
        raise SystemExit(3)


class StrNeedsAttribute(Exception):
    def __str__(self):
        return f"{self.detail}!"


def _local(cls: type, **fields) -> dict:
    return {"type": cls.__name__, "module": cls.__module__, "qualname": cls.__qualname__, **fields}


MALFORMED = [
    None, {}, [], "ValueError", 5, {"message": None}, {"type": None, "message": None, "traceback": None},
    {"type": 5, "message": ["a", 1], "traceback": {"x": 1}, "module": 3, "qualname": ["ValueError"]},
    {"type": "ValueError", "module": "builtins", "qualname": "ValueError", "message": None},
    {"type": "ValueError", "module": "builtins", "qualname": "ValueError", "message": "x", "args": "not a list"},
    {"type": "ValueError", "module": "builtins", "qualname": "ValueError", "message": "x",
     "args": [{"__gpupool__": "tuple", "items": "x"}], "attrs": {"__gpupool__": "dict", "items": [[1, 2]]}},
    {"type": "ValueError", "module": "builtins", "qualname": "ValueError", "message": "x", "args": ["x"],
     "attrs": {"": 1, "__class__": "int", "5": 3, "type": 7, "remote_traceback": 9, "agent": [], "args": 4,
               "__notes__": "n", "add_note": 1}},
    {"type": "KeyError", "module": "builtins", "qualname": "KeyError", "message": "'k'", "args": [["un", "hashable"]]},
    {"type": "URLError", "module": "urllib.error", "qualname": "URLError",
     "message": "<urlopen error [Errno 2] No such file or directory: '/x'>", "traceback": "Traceback ...\n"},
    _local(InitSubclassRefuses, message="m", args=["m"]),
    _local(ExitsInInit, message="m", args=["m"]),
    _local(StrNeedsAttribute, message="deep!", args=[]),
    _local(StrNeedsAttribute, message="deep!", args=[], attrs={"detail": "deep"}),
    _local(rt.BadStr, message="<str() failed: AttributeError: BadStr has no text>", args=["never shown"]),
    _local(rt.BadNotes, message="notes broken", args=["notes broken"]),
    _local(rt.NeedsTwo, message="p failed with code 1", args=["p failed with code 1"], attrs={"path": "p", "code": 1}),
]


@pytest.mark.parametrize("error", MALFORMED, ids=range(len(MALFORMED)))
def test_any_error_record_makes_an_exception_and_never_raises(error) -> None:
    try:
        exc = remote_exception(error, "a0", 3, 1)
    except BaseException as e:
        exc = f"remote_exception raised {type(e).__name__}: {e}"
    assert isinstance(exc, Exception), exc
    assert isinstance(exc, RemoteError) and isinstance(exc.type, str) and isinstance(exc.message, str)
    assert isinstance(exc.remote_traceback, str) and (exc.agent, exc.chunk, exc.attempt) == ("a0", 3, 1)
    if type(exc) is RemoteError:  # a plain one always shows itself
        assert "(on a0, call 3, attempt 1)" in str(exc) and repr(exc)
    else:  # a rebuilt one is faithful
        assert str(exc) == error["message"] if exc.type != "BadStr" else exc.message == error["message"]
    "".join(traceback.format_exception(exc))  # never raises (a str() that fails is shown as failing)


def test_rebuilds_are_faithful_or_plain() -> None:
    url = remote_exception(MALFORMED[13], "a0", 1, 1)
    assert type(url) is RemoteError and url.type == "URLError" and "No such file" in str(url)
    deep = remote_exception(_local(StrNeedsAttribute, message="deep!", args=[], attrs={"detail": "deep"}), "a0", 1, 1)
    assert isinstance(deep, StrNeedsAttribute) and str(deep) == "deep!"
    assert type(remote_exception(_local(StrNeedsAttribute, message="deep!", args=[]), "a0", 1, 1)) is RemoteError
    assert type(remote_exception(_local(ExitsInInit, message="m", args=["m"]), "a0", 1, 1)).__name__ == "ExitsInInit"
    bad = remote_exception(MALFORMED[18], "a0", 1, 1)
    assert isinstance(bad, rt.BadStr)  # its str() fails here as it did there: the same exception
    two = remote_exception(MALFORMED[20], "a0", 1, 1)
    assert isinstance(two, rt.NeedsTwo) and two.code == 1 and "raised on agent a0" in two.__notes__[0]
    plain = remote_exception({"type": "Weird", "message": "m", "traceback": "Traceback: here\n"}, "a0", 1, 1)
    assert str(plain) == "Weird: m (on a0, call 1, attempt 1)\n\nRemote traceback:\nTraceback: here"


# the run summary, status and logs on odd error records ----------------------------------------------
ODD_ERRORS = [
    {"type": 5, "message": ["x", {"y": 1}], "traceback": {"tb": 1}, "args": "zz", "attrs": [1], "errno": "e"},
    {"type": None, "message": None},
    {"message": "\n\n", "type": ""},
    ["not", "a", "dict"],
    "just text",
    {"type": "T", "message": "line one\nline two", "traceback": 12, "module": {}, "qualname": None},
]


@pytest.mark.timeout(60)
def test_summary_status_and_logs_cope_with_odd_error_records(spool: Spool, env) -> None:
    from gpupool.jobs.descriptor import JobKind
    from gpupool.jobs.results import read_result
    from gpupool.master.core.dispatcher import summarize
    from gpupool.master.core.feeder import Summary
    from gpupool.master.report.progress import Progress, format_summary
    from gpupool.master.spec.runspec import RunSpec

    run = "odd"
    spool.run_dir(run).mkdir(parents=True, exist_ok=True)
    spool.run_dirs(run)
    spec = RunSpec(run, JobKind.CALLABLE, "tests.remote_tasks:raise_bad_str", len(ODD_ERRORS), {}, retries=1)
    spool.run_spec(run).write_bytes(spec.to_json())
    outcomes = {}
    for c, err in enumerate(ODD_ERRORS):
        for attempt, path in ((1, spool.history_json(run, c, 1)), (2, spool.result_json(run, c))):
            path.write_text(json.dumps({"run": run, "chunk_id": c, "total_chunks": len(ODD_ERRORS), "status": "failed",
                                        "attempt": attempt, "max_attempts": 2, "agent": "h-cpu0", "error": err}))
        outcomes[c] = summarize(read_result(spool.result_json(run, c)))
    summary = Summary(run, len(ODD_ERRORS), outcomes, 1.0, spool.result_dir(run))
    text = format_summary(summary, spool.base)
    assert text.count("FAILED chunk") == len(ODD_ERRORS)
    progress = Progress(spec, enabled=False, base=spool.base, out=open("/dev/null", "w"))
    for c, out in outcomes.items():
        progress.event("failed", {"chunk": c, "outcome": out})
        progress.event("retry", {"chunk": c, "outcome": out, "delay": 1.0})
    for args in (["status", "--run", run], ["status", "--run", run, "--json"], ["status"], ["status", "--json"],
                 *(["logs", "--run", run, "--chunk", str(c)] for c in range(len(ODD_ERRORS))),
                 *(["logs", "--run", run, "--chunk", str(c), "--json"] for c in range(len(ODD_ERRORS))),
                 ["logs", "--run", run]):
        r = master([args[0], "--base", str(spool.base), *args[1:]], env)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (args, r.stdout, r.stderr)
    assert "line one" in master(["status", "--base", str(spool.base), "--run", run], env).stdout
