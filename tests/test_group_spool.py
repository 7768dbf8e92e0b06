"""A spool a group shares (issue 23): two real Unix users of one group, agents run by one, runs
fed by the other; and a results folder the agents may not write.

Root only (it makes the users and runs processes as them); elsewhere these tests skip, saying so.
The users and the group are made once (``useradd``/``groupadd``) and left for the next run."""
from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from gpupool.jobs.paths import Spool
from tests.faulty import tally
from tests.helpers import REPO, AgentProc, base_env, results, wait_for

GROUP, USER_A, USER_B = "gpupool-lab", "gpupool-a", "gpupool-b"


def _ensure_user(name: str, gid: int) -> pwd.struct_passwd:
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--gid", str(gid), name],
                       check=True, capture_output=True)
        user = pwd.getpwnam(name)
    if gid not in os.getgrouplist(name, user.pw_gid):
        subprocess.run(["usermod", "-a", "-G", GROUP, name], check=True, capture_output=True)
    return user


@pytest.fixture(scope="module")
def members() -> dict[str, Any]:
    """Two members of one group: {"gid", "a": passwd, "b": passwd, "as": {name: Popen kwargs}}."""
    if os.geteuid() != 0:
        pytest.skip("GROUP-SPOOL TESTS SKIPPED: they need root, to make two users and run processes as them")
    if not shutil.which("useradd"):
        pytest.skip("GROUP-SPOOL TESTS SKIPPED: no useradd here")
    try:
        gid = grp.getgrnam(GROUP).gr_gid
    except KeyError:
        subprocess.run(["groupadd", GROUP], check=True, capture_output=True)
        gid = grp.getgrnam(GROUP).gr_gid
    users = {"a": _ensure_user(USER_A, gid), "b": _ensure_user(USER_B, gid)}
    kw = {k: {"user": u.pw_uid, "group": gid, "extra_groups": [gid], "umask": 0o022} for k, u in users.items()}
    probe = subprocess.run([sys.executable, "-c", "import numpy, portalocker, watchdog, loguru"], cwd=REPO,
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, **kw["a"])
    if probe.returncode != 0:
        pytest.skip(f"GROUP-SPOOL TESTS SKIPPED: another user cannot run this interpreter ({sys.executable}: "
                    f"{probe.stderr.strip()[-300:]}); .ci/run makes the folders above it traversable")
    return {"gid": gid, **users, "as": kw}


@pytest.fixture
def shared(members: dict[str, Any]):
    """A BASE as the recipe makes it (its group the lab's, ``chmod 2770``), and a folder every
    user may write for the tests' marks and GPU locks; both outside pytest's private tmp folder."""
    top = Path(tempfile.mkdtemp(prefix="gpupool-group-"))
    os.chmod(top, 0o755)
    base = top / "base"
    base.mkdir()
    os.chown(base, 0, members["gid"])
    os.chmod(base, 0o2770)
    scratch = top / "scratch"
    scratch.mkdir()
    os.chmod(scratch, 0o1777)
    yield base, scratch
    shutil.rmtree(top, ignore_errors=True)


def _env(scratch: Path) -> dict[str, str]:
    return {**base_env(scratch), "HOME": str(scratch), "GPUPOOL_LOCK_DIR": str(scratch / "gpulocks")}


def _main(args: list[str], env: dict[str, str], **as_user: Any) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "main.py", "--no-progress", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180, **as_user)


def _modes(base: Path) -> list[str]:
    """Every folder or file of the spool that its group may not write (what broke sharing)."""
    bad = []
    for root, dirs, files in os.walk(base):
        for name in dirs + files:
            p = Path(root) / name
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode) or name.startswith(".") or name.endswith((".log", ".out")):
                continue  # logs are read by the group, written by their agent only
            want = stat.S_IWGRP | (stat.S_ISGID if stat.S_ISDIR(st.st_mode) else 0)
            if st.st_mode & want != want:
                bad.append(f"{oct(stat.S_IMODE(st.st_mode))} {p.relative_to(base)}")
    return bad


@pytest.mark.timeout(300)
def test_a_member_runs_on_another_members_agents_and_cannot_remove_their_run(members, shared) -> None:
    base, scratch = shared
    env = _env(scratch)
    agents = [AgentProc(base, n, env, out_dir=scratch, **members["as"]["a"]) for n in range(2)]
    try:
        for a in agents:
            a.wait_ready()
        marks = scratch / "marks"
        kwargs = f'{{"marks": "{marks}"}}'
        mine = _main(["--base", str(base), "--task", "tests.faulty:counted", "--chunks", "6", "--kwargs", kwargs,
                      "--run", "a-run"], env, **members["as"]["a"])
        assert mine.returncode == 0, mine.stderr[-2000:]
        # B feeds a run of its own to A's agents: B makes its run's folders, A's agents write into them
        # (in batches of 3: A's agents commit B's batches' results, one file for each, in B's folder)
        theirs = _main(["--base", str(base), "--task", "tests.faulty:counted", "--chunks", "6", "--kwargs", kwargs,
                        "--run", "b-run", "--batch", "3"], env, **members["as"]["b"])
        assert theirs.returncode == 0, theirs.stderr[-2000:]
        assert sorted(p.name for p in Spool(base).result_dir("b-run").glob("*+3.json")) == ["000000+3.json",
                                                                                           "000003+3.json"]
        res = results(base, "b-run")
        assert sorted(res) == list(range(6)) and all(r["status"] == "ok" for r in res.values()), res
        assert {r["agent"] for r in res.values()} <= {a.id for a in agents}
        assert os.stat(Spool(base).result_dir("b-run")).st_uid == members["b"].pw_uid
        assert _modes(base) == []  # everything the group must write, it may: umask 022 notwithstanding
        # B may not remove A's run, and is told whose it is; the run is untouched
        rm = subprocess.run([sys.executable, "-m", "master", "rm", "--base", str(base), "--run", "a-run"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=60, **members["as"]["b"])
        assert rm.returncode == 2 and USER_A in rm.stderr + rm.stdout and "--force" in rm.stderr + rm.stdout, rm
        assert sorted(results(base, "a-run")) == list(range(6))
        assert all(a.proc.poll() is None for a in agents)
    finally:
        for a in agents:
            a.kill()


@pytest.mark.timeout(300)
def test_a_results_folder_the_agents_may_not_write_fails_the_run_once_with_the_reason(members, shared) -> None:
    """Agents run as A; the run's results folder is not writable by A's group (made so by hand, as
    an older master of another member made it). Each attempt fails, naming the path and the error,
    and counts against --retries: the run ends, failed, instead of running its chunks for ever."""
    base, scratch = shared
    env = _env(scratch)
    spool = Spool(base)
    agent = AgentProc(base, 0, env, out_dir=scratch, **members["as"]["a"]).wait_ready()
    try:
        folder = spool.result_dir("locked")
        folder.mkdir(mode=0o755)
        os.chmod(folder, 0o755)  # root's, not the group's to write
        marks = scratch / "marks-locked"
        done = _main(["--base", str(base), "--task", "tests.faulty:counted", "--chunks", "3",
                      "--kwargs", f'{{"marks": "{marks}"}}', "--run", "locked", "--retries", "1",
                      "--retry-delay", "0.05"], env)
        assert done.returncode != 0, done.stdout[-2000:]
        text = done.stdout + done.stderr
        assert "Permission denied" in text and str(folder) in text, text[-3000:]
        starts, _ = tally(str(marks))
        assert sorted(starts) == [0, 1, 2] and max(starts.values()) <= 2, starts  # 1 + --retries, no more
        res = results(base, "locked")
        assert sorted(res) == [0, 1, 2] and all(r["status"] == "failed" for r in res.values()), res
        assert all(r["error"]["type"] == "CommitFailed" for r in res.values())
        wait_for(lambda: "Permission denied" in ((agent.heartbeat() or {}).get("last_error") or ""),
                 what="the agent's heartbeat naming the error")
        assert agent.proc.poll() is None
    finally:
        agent.kill()
