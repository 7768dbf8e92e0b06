"""Owners (issue 23): a run records who submitted it, an agent the user it runs as, and the
commands that act on another user's run or agent refuse, naming the owner, unless --force.

The first tests fake another uid in this process; the last one acts as another uid for real
(root only: it starts commands as a uid with no passwd entry, which also checks the fallback
to the uid as the user's name)."""
from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from gpupool.jobs.descriptor import JobKind
from gpupool.jobs.heartbeat import read_status, write_status
from gpupool.jobs.owners import NotOwner, Owner, agent_owner, check_run, claim_run, me, run_owner, user_name
from gpupool.jobs.paths import Spool
from gpupool.master.cli import pool_cli
from gpupool.master.spec.runspec import RunSpec, save_or_check
from tests.helpers import REPO, AgentProc, base_env, run_main

OTHER = 4242  # the uid faked in-process (os.geteuid patched)


def _run(spool: Spool, name: str, chunks: int = 2) -> RunSpec:
    """A run on record, as its master leaves it (spec and owner), fed by nobody."""
    spec = RunSpec(name, JobKind.CALLABLE, "examples.noop:noop", chunks, workdir=str(REPO))
    save_or_check(spool, spec, fresh=False)
    claim_run(spool, name)
    return spec


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    code = pool_cli.main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


# in this process, another uid faked ------------------------------------------------------------
def test_a_run_is_recorded_as_its_submitters_and_another_uid_is_refused_naming_it(spool: Spool, monkeypatch) -> None:
    _run(spool, "r1")
    rec = json.loads(spool.owner_file("r1").read_text())
    assert rec == {"uid": os.geteuid(), "user": user_name(os.geteuid())}
    assert run_owner(spool, "r1") == me()
    check_run(spool, "r1", False, "cancel it")  # ours: no refusal
    monkeypatch.setattr(os, "geteuid", lambda: OTHER)
    with pytest.raises(NotOwner) as e:
        check_run(spool, "r1", False, "cancel it")
    assert f"run r1 belongs to {user_name(rec['uid'])} (uid {rec['uid']}); pass --force to cancel it anyway" in str(e.value)
    check_run(spool, "r1", True, "cancel it")  # --force


def test_the_owner_is_no_part_of_a_runs_identity_and_stays_through_a_resume_and_fresh(spool: Spool) -> None:
    spec = _run(spool, "r2")
    before = spool.owner_file("r2").read_bytes()
    assert "owner" not in json.loads(spool.run_spec("r2").read_text())  # run.json as earlier releases read it
    save_or_check(spool, spec, fresh=False)  # the same run again: resumed, not "a different owner"
    save_or_check(spool, spec, fresh=True)
    assert claim_run(spool, "r2") == me() and spool.owner_file("r2").read_bytes() == before


def test_a_run_of_an_earlier_release_belongs_to_the_owner_of_its_folder(spool: Spool, monkeypatch) -> None:
    spec = RunSpec("old", JobKind.CALLABLE, "examples.noop:noop", 1, workdir=str(REPO))
    spool.run_dir("old").mkdir(parents=True)
    save_or_check(spool, spec, fresh=False)  # no owner file: written by a release before owners
    folder_uid = os.stat(spool.run_dir("old")).st_uid
    assert run_owner(spool, "old") == Owner(folder_uid, user_name(folder_uid))
    assert run_owner(spool, "no-such-run") == Owner(None, None)  # unknown: anyone may act
    check_run(spool, "no-such-run", False, "cancel it")
    monkeypatch.setattr(os, "geteuid", lambda: OTHER)
    with pytest.raises(NotOwner):
        check_run(spool, "old", False, "resume it")
    claim_run(spool, "old")  # its master (forced) records the folder's owner, not itself
    assert json.loads(spool.owner_file("old").read_text())["uid"] == os.stat(spool.run_dir("old")).st_uid
    # an owner file that cannot be read counts for nothing: the folder's owner again
    spool.owner_file("old").write_text("{not json")
    assert run_owner(spool, "old").uid == os.stat(spool.run_dir("old")).st_uid


def test_an_agents_heartbeat_names_its_user_and_an_older_one_is_unknown(spool: Spool) -> None:
    base = {"agent": "h-cpu0", "seq": 1, "state": "idle"}
    write_status(spool, "h-cpu0", {**base, "uid": 1234, "user": "alice"})
    assert agent_owner(read_status(spool.heartbeat("h-cpu0"))) == Owner(1234, "alice")
    write_status(spool, "h-cpu0", base)  # an agent of an earlier release
    assert agent_owner(read_status(spool.heartbeat("h-cpu0"))) == Owner(None, None)
    write_status(spool, "h-cpu0", {**base, "uid": 1234, "user": "\x1b[2Jalice"})  # not shown as it is: the uid
    assert agent_owner(read_status(spool.heartbeat("h-cpu0"))) == Owner(1234, "1234")
    write_status(spool, "h-cpu0", {**base, "uid": -1, "user": "x"})  # dropped for its type: unknown
    assert agent_owner(read_status(spool.heartbeat("h-cpu0"))) == Owner(None, None)


def test_the_commands_refuse_another_uids_run_and_agent_in_one_line_and_do_it_with_force(
        spool: Spool, monkeypatch, capsys) -> None:
    _run(spool, "theirs")
    write_status(spool, "h-cpu0", {"agent": "h-cpu0", "seq": 1, "state": "stopped", "uid": os.geteuid(),
                                   "user": user_name(os.geteuid())})
    mine = os.geteuid()
    owner = f"{user_name(mine)} (uid {mine})"
    monkeypatch.setattr(os, "geteuid", lambda: OTHER)
    b = ["--base", str(spool.base)]
    for argv, doing in ((["cancel", "--run", "theirs"], "cancel it"), (["retry", "--run", "theirs"], "retry it"),
                        (["rm", "--run", "theirs"], "remove it")):
        code, text = _cli(argv + b, capsys)
        assert code == 2, text
        assert text.strip().splitlines() == [
            f"python -m master {argv[0]}: run theirs belongs to {owner}; pass --force to {doing} anyway"]
    for cmd in ("drain", "undrain"):
        code, text = _cli([cmd, "h-cpu0"] + b, capsys)
        assert code == 2 and f"agent h-cpu0 belongs to {owner}; pass --force to {cmd} it anyway" in text, text
    assert not spool.cancel_flag("theirs").exists() and not spool.drain_flag("h-cpu0").exists()
    assert spool.run_spec("theirs").exists()
    code, text = _cli(["cancel", "--run", "theirs", "--force", "--timeout", "0"] + b, capsys)
    assert code == 0 and spool.cancel_flag("theirs").exists(), text
    code, text = _cli(["drain", "h-cpu0", "--force", "--timeout", "0"] + b, capsys)
    assert code == 0 and spool.drain_flag("h-cpu0").exists(), text
    code, text = _cli(["undrain", "h-cpu0", "--force", "--timeout", "0"] + b, capsys)
    assert code == 0 and not spool.drain_flag("h-cpu0").exists(), text
    code, text = _cli(["runs", "--json"] + b, capsys)
    assert [(r["run"], r["owner"], r["owner_uid"]) for r in json.loads(text)] == [("theirs", user_name(mine), mine)]
    code, text = _cli(["rm", "--run", "theirs", "--force", "--yes"] + b, capsys)
    assert code == 0 and not spool.run_dir("theirs").exists(), text


def test_an_executor_run_gets_an_owner_and_refuses_another_users_run_by_name(spool: Spool, monkeypatch) -> None:
    from gpupool.master.executor import Executor

    ex = Executor(spool.base, run="ex-own")
    ex.shutdown()
    assert json.loads(spool.owner_file("ex-own").read_text())["uid"] == os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: OTHER)
    with pytest.raises(NotOwner, match="run ex-own belongs to .*; name a run of your own"):
        Executor(spool.base, run="ex-own")


# as another uid, for real ----------------------------------------------------------------------
def _free_uid() -> int:
    """A uid with no passwd entry (so its user name falls back to the uid as text)."""
    uid = 54321
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


def _launcher(uid: int, env: dict[str, str]) -> list[str]:
    """How to start this interpreter as ``uid``: as it is where that uid may run it (CI's system
    Python), else through ``setpriv`` with CAP_DAC_READ_SEARCH alone kept (an interpreter under a
    private home: the process may read and search any folder, and writes only as ``uid`` may)."""
    probe = [sys.executable, "-c", "import os, portalocker, loguru; print(os.geteuid())"]
    for prefix in ([], ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                        "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]):
        if prefix and shutil.which("setpriv") is None:
            break
        try:
            got = subprocess.run(prefix + probe, cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
                                 **({} if prefix else {"user": uid, "group": uid, "extra_groups": []}))
        except PermissionError:
            continue
        if got.returncode == 0 and got.stdout.strip() == str(uid):
            return prefix
    pytest.skip(f"cannot start {sys.executable} as uid {uid} (not readable by it, and no setpriv): "
                "the real-process owner test needs it")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: acts as another uid (the in-process tests above fake one)")
@pytest.mark.timeout(300)
def test_another_uid_is_refused_naming_the_owner_and_passes_with_force_real_processes() -> None:
    uid = _free_uid()
    top = Path(tempfile.mkdtemp(prefix="gpupool-owners-"))  # not under pytest's tmp root: private to root
    agent = None
    try:
        top.chmod(0o755)
        base = top / "base"
        env = base_env(top, HOME=str(top))
        prefix = _launcher(uid, env)
        extra = {} if prefix else {"user": uid, "group": uid, "extra_groups": []}

        def other(args: list[str], main: bool = False) -> subprocess.CompletedProcess:
            cmd = [sys.executable, "main.py", *args, "--no-progress"] if main else [sys.executable, "-m", "master", *args]
            return subprocess.run(prefix + cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, **extra)

        def master(args: list[str]) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "master", *args], cwd=REPO, env=env, capture_output=True,
                                  text=True, timeout=120)

        agent = AgentProc(base, 0, env).wait_ready()  # root's agent, on a BASE no other user may write
        b = ["--base", str(base)]
        feed = b + ["--task", "examples.noop:fail_on", "--chunks", "4", "--kwargs", '{"bad": [1]}', "--run", "mine",
                    "--retries", "0"]
        r = run_main(feed + ["--no-progress"], env)
        assert r.returncode == 1, r.stdout + r.stderr  # chunk 1 failed: something to retry
        hb = agent.heartbeat()
        assert (hb["uid"], hb["user"]) == (0, "root")
        # The other user may write the spool (the group recipe's job, done here by hand); the agent
        # goes on as root.
        for root, dirs, files in os.walk(base):
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                with contextlib.suppress(FileNotFoundError):
                    os.chown(name, uid, uid, follow_symlinks=False)

        st = other(["status", "--json"] + b)
        assert st.returncode == 0, st.stderr
        data = json.loads(st.stdout)
        assert [(x["run"], x["owner"], x["owner_uid"]) for x in data["runs"]] == [("mine", "root", 0)]
        assert [(a["id"], a["user"], a["uid"]) for a in data["agents"]] == [(agent.id, "root", 0)]
        text = other(["status"] + b).stdout
        assert "OWNER" in text and "agents by user: root 1" in text

        for args, doing in ((["cancel", "--run", "mine"], "cancel it"), (["retry", "--run", "mine"], "retry it"),
                            (["rm", "--run", "mine"], "remove it"), (["drain", agent.id], "drain it"),
                            (["undrain", agent.id], "undrain it")):
            got = other(args + b)
            what = f"agent {agent.id}" if args[0].endswith("drain") else "run mine"
            assert got.returncode == 2, got.stdout + got.stderr
            assert got.stderr.strip() == (f"python -m master {args[0]}: {what} belongs to root (uid 0); "
                                          f"pass --force to {doing} anyway"), got.stderr
        got = other(feed, main=True)  # the same main.py command: another user's run is not resumed
        assert got.returncode == 2 and got.stderr.strip() == (
            "main.py: run mine belongs to root (uid 0); pass --force to resume it anyway"), got.stderr
        assert not (base / "runs" / "mine" / "cancel").exists() and not (base / "agents" / f"{agent.id}.drain").exists()

        got = other(["retry", "--run", "mine", "--force", "--no-progress"] + b)
        assert got.returncode == 1 and "re-queuing 1 failed chunk [1]" in got.stdout, got.stdout + got.stderr
        got = other(["drain", agent.id, "--force"] + b)
        assert got.returncode == 0 and (base / "agents" / f"{agent.id}.drain").exists(), got.stdout + got.stderr
        got = other(["undrain", agent.id, "--force"] + b)
        assert got.returncode == 0, got.stdout + got.stderr
        got = other(["cancel", "--run", "mine", "--force"] + b)
        assert got.returncode == 0 and (base / "runs" / "mine" / "cancel").exists(), got.stdout + got.stderr
        assert json.loads((base / "runs" / "mine" / "owner").read_text()) == {"uid": 0, "user": "root"}  # still
        got = other(["rm", "--run", "mine", "--force", "-y"] + b)
        assert got.returncode == 0 and not (base / "runs" / "mine").exists(), got.stdout + got.stderr

        # The other user's own run: its name falls back to the uid; it resumes it, also afresh; root is
        # refused like anyone else.
        theirs = b + ["--task", "examples.noop:noop", "--chunks", "2", "--run", "theirs"]
        for extra_args in ([], [], ["--fresh"]):
            got = other(theirs + extra_args, main=True)
            assert got.returncode == 0, got.stdout + got.stderr
            assert json.loads((base / "runs" / "theirs" / "owner").read_text()) == {"uid": uid, "user": str(uid)}
        got = master(["cancel", "--run", "theirs"] + b)
        assert got.returncode == 2 and f"run theirs belongs to uid {uid}; pass --force to cancel it anyway (root too" \
            in got.stderr, got.stderr
        rows = json.loads(master(["status", "--json"] + b).stdout)["runs"]
        assert [(x["run"], x["owner"], x["owner_uid"]) for x in rows] == [("theirs", str(uid), uid)]
        got = master(["cancel", "--run", "theirs", "--force"] + b)
        assert got.returncode == 0, got.stdout + got.stderr
    finally:
        if agent is not None:
            agent.kill()
        shutil.rmtree(top, ignore_errors=True)
