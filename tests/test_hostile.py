"""The spool is shared, so every file in it is untrusted: a corpus of broken and hostile files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpupool.jobs.descriptor import SCHEMA, Job, JobKind
from gpupool.jobs.locks import FileLock
from gpupool.jobs.paths import Spool
from tests.helpers import REPO, results, run_main, wait_for

GOOD = Job(run="hostile", chunk_id=0, total_chunks=3, kind=JobKind.CALLABLE, target="examples.noop:square",
           workdir=str(REPO)).to_dict()

# Whole mailboxes an agent must refuse (moved to rejected/ with a reason), then carry on.
MAILBOXES = {
    "empty": b"",
    "truncated": json.dumps({"schema": 1, "jobs": [GOOD]}).encode()[:40],
    "binary": bytes(range(256)) * 4,
    "array": b"[1, 2, 3]",
    "wrong shape": b'{"schema": 1, "jobs": {"a": 1}}',
    "newer schema": json.dumps({"schema": 99, "jobs": []}).encode(),
    "huge": b'{"schema": 1, "jobs": [' + b" " * (17 * 1024 * 1024) + b"]}",
    "not utf-8 json": b'{"schema": 1, "jobs": ["\xff\xfe"]}',
}

# Single descriptors inside a valid mailbox: each is refused alone.
DESCRIPTORS = {
    "run escapes": {**GOOD, "run": "../../outside"},
    "absolute run": {**GOOD, "run": "/etc"},
    "NUL in run": {**GOOD, "run": "a\x00b"},
    "chunk as string": {**GOOD, "chunk_id": "1"},
    "negative chunk": {**GOOD, "chunk_id": -1},
    "chunk past total": {**GOOD, "chunk_id": 3},
    "newer job schema": {**GOOD, "schema": SCHEMA + 1},
    "pickle kind": {**GOOD, "kind": "pickle"},
    "kwargs list": {**GOOD, "kwargs": [1]},
    "attempt zero": {**GOOD, "attempt": 0},
    "timeout text": {**GOOD, "timeout": "soon"},
    "target number": {**GOOD, "target": 42},
    "not an object": "just a string",
}


def _drop(path: Path, data: bytes) -> None:
    """Publish ``data`` at ``path`` as a (hostile) writer following the protocol would."""
    tmp = path.with_name("." + path.name + ".tmp-test")
    tmp.write_bytes(data)
    lock = path.with_suffix(".lock") if path.suffix == ".POOL" else None
    if lock is None:
        os.replace(tmp, path)
        return
    with FileLock(lock):
        os.replace(tmp, path)


def _rejections(spool: Spool) -> int:
    return len(list(spool.rejected_dir.glob("*.why")))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.timeout(120)
def test_corpus_of_broken_spool_files_is_rejected_and_nothing_escapes(spool: Spool, agents, env, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.json").write_text(json.dumps({"schema": 1, "agent": "x", "jobs": [GOOD]}))
    before = _snapshot(outside)
    [agent] = agents(1)
    mailbox = spool.mailbox(agent.id)
    seen = _rejections(spool)
    for what, data in MAILBOXES.items():
        _drop(mailbox, data)
        wait_for(lambda: _rejections(spool) > seen, what=f"rejection of the {what} mailbox")
        seen = _rejections(spool)
    # a mailbox that is a symlink out of BASE is not followed, and the link is replaced, not its target
    link = mailbox.with_name(".link")
    link.symlink_to(outside / "victim.json")
    with FileLock(spool.mailbox_lock(agent.id)):
        os.replace(link, mailbox)
    wait_for(lambda: _rejections(spool) > seen, what="rejection of the symlinked mailbox")
    seen = _rejections(spool)
    wait_for(lambda: not mailbox.is_symlink(), what="the agent's own mailbox back")
    # bad descriptors next to a good one: each bad one rejected alone, the good one runs
    spool.result_dir("hostile").mkdir(parents=True, exist_ok=True)
    _drop(mailbox, json.dumps({"schema": 1, "agent": agent.id, "jobs": list(DESCRIPTORS.values()) + [GOOD]}).encode())
    wait_for(lambda: spool.result_json("hostile", 0).exists(), what="the good job's result")
    wait_for(lambda: _rejections(spool) >= seen + len(DESCRIPTORS), what="every bad descriptor rejected")
    whys = [json.loads(p.read_text())["why"] for p in spool.rejected_dir.glob("*.why")]
    assert len(whys) == len(MAILBOXES) + 1 + len(DESCRIPTORS) >= 20
    assert all(w for w in whys)
    assert any("newer" in w for w in whys) and any("not allowed" in w for w in whys) and any("symlink" in w for w in whys)
    assert agent.proc.poll() is None  # still alive, still serving
    assert _snapshot(outside) == before and not (tmp_path / "etc").exists()
    assert not any(p.name == "outside" for p in spool.results_dir.iterdir())


@pytest.mark.timeout(90)
def test_invalid_and_symlinked_results_are_rejected_and_rerun(spool: Spool, agents, env, tmp_path: Path) -> None:
    agents(1)
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"status": "ok", "chunk_id": 1, "attempt": 1}))
    rdir = spool.result_dir("res")
    rdir.mkdir(parents=True)
    (rdir / "000000.json").write_bytes(b"\x00garbage")
    (rdir / "000001.json").symlink_to(secret)
    (rdir / "000002.json").write_text('{"status": "ok"}')
    r = run_main(["--base", str(spool.base), "--task", "examples.noop:square", "--chunks", "4", "--run", "res",
                  "--no-progress"], env)
    assert r.returncode == 0, r.stderr
    res = results(spool.base, "res")
    assert all(res[c]["status"] == "ok" and res[c]["value"]["square"] == c * c for c in range(4))
    assert _rejections(spool) == 3
    assert json.loads(secret.read_text())["chunk_id"] == 1 and not (rdir / "000001.json").is_symlink()


@pytest.mark.timeout(90)
def test_symlinked_run_folder_is_never_written_through(spool: Spool, agents, env, tmp_path: Path) -> None:
    [agent] = agents(1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (spool.results_dir / "linked").symlink_to(elsewhere)
    job = {**GOOD, "run": "linked"}
    _drop(spool.mailbox(agent.id), json.dumps({"schema": 1, "agent": agent.id, "jobs": [job]}).encode())
    wait_for(lambda: _rejections(spool) == 1, what="rejection")
    assert "symlink" in json.loads(next(spool.rejected_dir.glob("*.why")).read_text())["why"]
    assert list(elsewhere.iterdir()) == []


@pytest.mark.timeout(90)
def test_bad_chunk_data_fails_clearly_and_agent_lives_on(spool: Spool, agents, env, tmp_path: Path) -> None:
    [agent] = agents(1)
    data = tmp_path / "data"
    data.mkdir()
    for c in range(4):
        np.savez(data / f"{c}.npz", X=np.ones((2, 128), np.float32))
    (data / "1.npz").write_bytes(b"PK not really")  # submit checks only the first and last files
    np.savez(data / "2.npz", X=np.array([object()], dtype=object))
    r = run_main(["--base", str(spool.base), "--task", "gpupool.master.matmul:multiply", "--chunks", "4", "--data",
                  str(data), "--retries", "0", "--run", "bad-data", "--no-progress"], env)
    assert r.returncode == 1
    res = results(spool.base, "bad-data")
    assert res[0]["status"] == res[3]["status"] == "ok"
    assert res[1]["error"]["type"] == "BadNpz" and "not an .npz" in res[1]["error"]["message"]
    assert res[2]["error"]["type"] == "BadNpz" and "object arrays" in res[2]["error"]["message"]
    assert agent.proc.poll() is None


@pytest.mark.timeout(90)
def test_shared_file_vanishing_mid_run(spool: Spool, agents, env, tmp_path: Path) -> None:
    [agent] = agents(1)
    shared = tmp_path / "shared.npz"
    np.savez(shared, W=np.eye(128, dtype=np.float32))
    spool.run_dirs("vanish")
    job = {**GOOD, "run": "vanish", "target": "gpupool.master.matmul:multiply", "shared": str(shared), "total_chunks": 3}
    _drop(spool.mailbox(agent.id), json.dumps({"schema": 1, "jobs": [job]}).encode())
    wait_for(lambda: spool.result_json("vanish", 0).exists(), what="first result")
    shared.unlink()  # the agent keeps its loaded copy
    _drop(spool.mailbox(agent.id), json.dumps({"schema": 1, "jobs": [{**job, "chunk_id": 1}]}).encode())
    wait_for(lambda: spool.result_json("vanish", 1).exists(), what="second result")
    assert json.loads(spool.result_json("vanish", 1).read_text())["status"] == "ok"
    # a file that was never loaded and is gone: a clear failure naming it
    other = {**job, "chunk_id": 2, "shared": str(tmp_path / "never.npz"), "max_attempts": 1}
    _drop(spool.mailbox(agent.id), json.dumps({"schema": 1, "jobs": [other]}).encode())
    wait_for(lambda: spool.result_json("vanish", 2).exists(), what="third result")
    err = json.loads(spool.result_json("vanish", 2).read_text())["error"]
    assert err["type"] == "BadNpz" and "never.npz" in err["message"] and "does not exist" in err["message"]
    assert agent.proc.poll() is None


# Issue 12: nothing a spool file holds stops a master, status, cancel or an agent ------------------
def _cli(spool: Spool, env: dict, *args: str, timeout: float = 60) -> "subprocess.CompletedProcess":
    return subprocess.run([sys.executable, "-m", "master", *args, "--base", str(spool.base)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _status_json(spool: Spool, env: dict) -> dict:
    st = _cli(spool, env, "status", "--json")
    assert st.returncode == 0 and "Traceback" not in st.stderr, st.stderr
    def strict(c: str) -> None:
        raise AssertionError(f"status --json printed {c}, which no browser parses")
    return json.loads(st.stdout, parse_constant=strict)


def _square_run(spool: Spool, env: dict, run: str, chunks: int = 3, *extra: str) -> "subprocess.CompletedProcess":
    return run_main(["--base", str(spool.base), "--task", "examples.noop:square", "--chunks", str(chunks), "--run",
                     run, "--no-progress", *extra], env)


def _all_squares(spool: Spool, run: str, chunks: int) -> bool:
    res = results(spool.base, run)
    return sorted(res) == list(range(chunks)) and all(res[c]["value"]["square"] == c * c for c in range(chunks))


@pytest.mark.timeout(120)
def test_descriptor_with_a_list_for_its_run_is_rejected_alone_and_nothing_stops(spool: Spool, agents, env) -> None:
    [agent] = agents(1)
    spool.result_dir("hostile").mkdir(parents=True, exist_ok=True)
    bad = [{**GOOD, "run": ["a", "list"]}, {**GOOD, "chunk_id": {"a": 1}}, {**GOOD, "attempt": [1]},
           {**GOOD, "submitted_at": [1.0]}, {**GOOD, "attempt": 10**40}]
    _drop(spool.mailbox(agent.id), json.dumps({"schema": 1, "agent": agent.id, "jobs": bad + [GOOD]}).encode())
    wait_for(lambda: spool.result_json("hostile", 0).exists(), what="the good job's result")  # not wedged
    wait_for(lambda: _rejections(spool) >= len(bad), what="each bad descriptor rejected")
    whys = [json.loads(p.read_text())["why"] for p in spool.rejected_dir.glob("*.why")]
    assert any("run name ['a', 'list'] is not allowed" in w for w in whys)
    assert any("'attempt' must be an integer from 1 to 1000000" in w for w in whys)
    _drop(spool.mailbox(agent.id), json.dumps({"schema": 1, "agent": agent.id, "jobs": bad}).encode())
    r = _square_run(spool, env, "after-list")  # the master reads (and repairs) that mailbox too
    assert r.returncode == 0 and _all_squares(spool, "after-list", 3), r.stderr
    assert [a["id"] for a in _status_json(spool, env)["agents"]] == [agent.id]
    _drop(spool.mailbox(agent.id), json.dumps({"schema": 1, "agent": agent.id, "jobs": bad}).encode())
    c = _cli(spool, env, "cancel", "--run", "after-list")
    assert c.returncode == 0 and "cancelled run after-list" in c.stdout, c.stderr
    assert agent.proc.poll() is None


@pytest.mark.timeout(120)
def test_deep_nesting_in_mailbox_heartbeat_and_result_is_rejected(spool: Spool, agents, env) -> None:
    [agent] = agents(1)
    deep = b"[" * 100_000
    _drop(spool.mailbox(agent.id), deep)
    wait_for(lambda: _rejections(spool) == 1, what="the deep mailbox rejected")
    assert "nested" in json.loads(next(spool.rejected_dir.glob("*.why")).read_text())["why"]
    (spool.agents_dir / "testhost-cpu7.json").write_bytes(deep)  # an agent nobody runs
    (spool.agents_dir / "testhost-cpu8.json").write_bytes(b'{"agent": "x", "seq": 1, "state": "idle", "gpu": '
                                                          + b"[" * 70 + b"]" * 70 + b"}")
    rdir = spool.result_dir("deep")
    rdir.mkdir(parents=True)
    (rdir / "000001.json").write_bytes(b'{"status": "ok", "chunk_id": 1, "attempt": 1, "value": ' + deep)
    (rdir / "000002.a1.json").write_bytes(deep)  # a history file
    r = _square_run(spool, env, "deep")
    assert r.returncode == 0 and _all_squares(spool, "deep", 3), r.stderr
    assert "RecursionError" not in r.stderr
    data = _status_json(spool, env)
    assert [a["id"] for a in data["agents"]] == [agent.id]
    assert data["runs"][0]["ok"] == 3
    c = _cli(spool, env, "cancel", "--run", "deep")
    assert c.returncode == 0, c.stderr
    assert agent.proc.poll() is None


@pytest.mark.timeout(120)
def test_a_folder_where_a_result_belongs_fails_that_chunk_at_resume_too(spool: Spool, agents, env, tmp_path) -> None:
    agents(1)
    rdir = spool.result_dir("folder")
    (rdir / "000001.json").mkdir(parents=True)
    (rdir / "000001.json" / "inside").write_text("kept")
    os.mkfifo(rdir / "000002.json")  # a FIFO: never opened for a blocking read
    r = _square_run(spool, env, "folder", 4, "--retries", "0")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "000001.json is not a readable result file (is a directory" in r.stdout
    assert "000002.json is not a readable result file (is a FIFO" in r.stdout
    ok = [json.loads(spool.result_json("folder", c).read_text())["status"] for c in (0, 3)]
    assert ok == ["ok", "ok"]  # (a glob of results/ would open the FIFO: read by name)
    part = _cli(spool, env, "collect", "--run", "folder", "--out", str(tmp_path / "out.jsonl"), "--partial")
    assert part.returncode == 0, part.stderr
    assert [json.loads(line)["chunk_id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()] == [0, 3]
    again = _cli(spool, env, "retry", "--run", "folder", "--no-progress")
    assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr
    assert (rdir / "000001.json" / "inside").read_text() == "kept"  # nothing lost


@pytest.mark.timeout(120)
def test_folder_fifo_and_link_loop_as_mailbox_or_lock_are_moved_aside(spool: Spool, agents, env) -> None:
    [agent] = agents(1)
    mailbox, lock = spool.mailbox(agent.id), spool.mailbox_lock(agent.id)

    def replace_with(make) -> None:
        aside = mailbox.with_name(".aside")
        make(aside)
        with FileLock(lock):
            os.replace(aside, mailbox) if not aside.is_dir() or not mailbox.exists() else None
            if aside.exists() or aside.is_symlink():  # a folder cannot be renamed over a file
                os.unlink(mailbox)
                os.rename(aside, mailbox)

    seen = _rejections(spool)
    for what, make in (("folder", lambda p: (p.mkdir(), (p / "x").write_text("x"))), ("FIFO", os.mkfifo),
                       ("link loop", lambda p: p.symlink_to(p.name))):
        replace_with(make)
        wait_for(lambda: _rejections(spool) > seen, what=f"the {what} mailbox rejected")
        seen = _rejections(spool)
        wait_for(lambda: mailbox.is_file() and not mailbox.is_symlink(), what=f"a fresh mailbox after the {what}")
    kept = [p for p in spool.rejected_dir.iterdir() if p.name.endswith(".POOL") and p.is_dir()]
    assert [list(p.iterdir()) for p in kept] == [[kept[0] / "x"]]  # the folder itself, moved in whole
    for make in (lambda p: p.mkdir(), os.mkfifo):  # the mailbox lock, replaced while nobody holds it
        os.unlink(lock)
        make(lock)
        r = _square_run(spool, env, f"lock-{seen}")
        assert r.returncode == 0 and _all_squares(spool, f"lock-{seen}", 3), r.stderr
        assert lock.is_file()
        wait_for(lambda: _rejections(spool) > seen, what="the broken lock rejected")
        seen = _rejections(spool)
    hb = agent.heartbeat()
    assert agent.proc.poll() is None and hb["state"] == "idle"


@pytest.mark.timeout(120)
def test_a_file_in_agents_with_a_bad_name_is_skipped(spool: Spool, agents, env) -> None:
    [agent] = agents(1)
    (spool.agents_dir / "bad name.json").write_text("{}")
    (spool.agents_dir / "..json").write_text("{}")
    (spool.runs_dir / "bad run name").mkdir()
    r = _square_run(spool, env, "names")
    assert r.returncode == 0 and _all_squares(spool, "names", 3), r.stderr
    data = _status_json(spool, env)
    assert [a["id"] for a in data["agents"]] == [agent.id] and [x["run"] for x in data["runs"]] == ["names"]
    st = _cli(spool, env, "status")
    assert st.returncode == 0 and "bad name.json: skipped: agent id 'bad name' is not allowed" in st.stderr
    assert st.stderr.count("bad name.json") == 1  # one warning, not one per look
    c = _cli(spool, env, "cancel", "--run", "names")
    assert c.returncode == 0, c.stderr


@pytest.mark.timeout(120)
def test_rejected_folder_replaced_by_a_link_is_never_written_through(spool: Spool, agents, env, tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    [agent] = agents(1)
    spool.rejected_dir.rmdir()
    spool.rejected_dir.symlink_to(outside)
    mailbox = spool.mailbox(agent.id)
    _drop(mailbox, b"\x00 not json")
    wait_for(lambda: b"not json" not in mailbox.read_bytes(), what="the agent's fresh mailbox")
    wait_for(lambda: "nothing is written through it" in agent.output(), what="the warning")
    (spool.result_dir("linked-rej") / "000000.json").parent.mkdir(parents=True)
    (spool.result_dir("linked-rej") / "000000.json").write_bytes(b"garbage")
    r = _square_run(spool, env, "linked-rej")
    assert r.returncode == 0 and _all_squares(spool, "linked-rej", 3), r.stderr
    assert list(outside.iterdir()) == [] and spool.rejected_dir.is_symlink()
    assert agent.proc.poll() is None


WRONG_TYPES = {"pid": "x", "gpu": [], "current": 5, "ahead": {"run": 3}, "updated_at": None, "host": 7,
               "hostname": {}, "gpu_id": "0", "gpu_index": 1.5, "jobs_done": "many", "jobs_failed": [],
               "started_at": 1e300, "mailbox_lag_s": float("nan"), "log": 3, "device": None, "worker_pid": True}


@pytest.mark.timeout(120)
def test_heartbeats_run_specs_and_notes_of_the_wrong_types_are_survived(spool: Spool, agents, env) -> None:
    [agent] = agents(1)
    for i, (k, v) in enumerate(WRONG_TYPES.items()):  # live-looking agents that take no jobs (draining)
        hb = {"agent": f"testhost-cpu{20 + i}", "seq": 1, "state": "draining", k: v}
        (spool.agents_dir / f"testhost-cpu{20 + i}.json").write_text(json.dumps(hb))
    (spool.agents_dir / "testhost-cpu40.json").write_text(json.dumps({"agent": "y", "seq": 1, "state": "draining",
                                                                       **WRONG_TYPES}))
    (spool.agents_dir / "testhost-cpu41.json").write_text(json.dumps(
        {"agent": "z", "seq": 1, "state": "draining", "current": {"run": "r", "chunk_id": 1, "since": "x", "n": 1e999},
         "gpu": {"name": 5, "util": "hot", "mem_used": [], "mem_total": 1e999, "temp": None}}))
    for name, spec in {"spec-list": [1], "spec-kind": {"name": "spec-kind", "kind": [], "target": "x", "chunks": 1},
                       "spec-chunks": {"name": "spec-chunks", "kind": "callable", "target": "x", "chunks": "9"},
                       "spec-name": {"name": ["x"], "kind": "callable", "target": "x", "chunks": 1},
                       "spec-share": {"name": "spec-share", "kind": "callable", "target": "x", "chunks": 2,
                                      "share": float("nan")}}.items():
        spool.run_dir(name).mkdir(parents=True)
        spool.run_spec(name).write_text(json.dumps(spec))
    spool.run_dir("spec-dir").mkdir()
    spool.run_spec("spec-dir").mkdir()
    r = _square_run(spool, env, "types")
    assert r.returncode == 0 and _all_squares(spool, "types", 3), r.stderr
    for run, note in (("types", b"[" * 4000), ("spec-list", b"\xff\xfe")):  # cancel notes the agents read
        spool.cancel_flag(run).write_bytes(note)
    spool.run_epoch("types").write_bytes(b"{" * 100)
    data = _status_json(spool, env)
    rows = {a["id"]: a for a in data["agents"]}
    assert len(rows) == len(WRONG_TYPES) + 3 and rows["testhost-cpu40"]["pid"] is None
    assert rows["testhost-cpu41"]["current"] == {"run": "r", "chunk_id": 1, "attempt": None, "since": None}
    assert [x["run"] for x in data["runs"]] == ["types"]
    table = _cli(spool, env, "status")
    assert table.returncode == 0 and "testhost-cpu41" in table.stdout, table.stderr
    for run in ("types", "spec-list", "spec-dir"):
        c = _cli(spool, env, "cancel", "--run", run, "--timeout", "1")
        assert "Traceback" not in c.stderr, c.stderr
        assert c.returncode == 0 if run == "types" else (c.returncode == 2 and "run spec" in c.stderr), c.stderr
    spool.cancel_flag("types").unlink()
    spool.cancel_flag("types").mkdir()  # a folder as the flag: cancel moves it aside and writes its note
    c = _cli(spool, env, "cancel", "--run", "types", "--timeout", "1")
    assert c.returncode == 0 and spool.cancel_flag("types").is_file(), c.stderr
    assert agent.proc.poll() is None


def test_a_run_spec_that_is_a_link_is_refused_not_replaced(spool: Spool, env, tmp_path: Path) -> None:
    """Found by the fuzzer: a link loop (or any link) at runs/<run>/run.json was taken for no spec
    and silently replaced by a new one; it is refused, naming the file, and left as it was."""
    spec = spool.run_spec("linked")
    spec.parent.mkdir(parents=True)
    os.symlink(spec, spec)  # a loop
    r = run_main(["--base", str(spool.base), "--task", "examples.noop:square", "--chunks", "2", "--run", "linked",
                  "--no-progress"], env, timeout=60)
    assert r.returncode == 2 and "run.json" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert spec.is_symlink()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("target", ["dangling", "outside-file"])
def test_a_link_where_a_result_belongs_is_refused_and_the_run_still_ends(spool: Spool, agents, env,
                                                                         tmp_path: Path, target: str) -> None:
    """Found by the fuzzer: a link at results/<run>/000002.json (dangling, or to a file out of
    BASE) made the run never end: the agent's commit found the name taken, the master saw no
    result through the link. Now the link is refused (moved aside) and the chunk runs again."""
    agents(1)
    outside = tmp_path / "outside"
    outside.mkdir()
    if target == "outside-file":
        (outside / "nothing-here").write_text('{"status": "ok"}')
    rdir = spool.result_dir("linked")
    rdir.mkdir(parents=True)
    os.symlink(outside / "nothing-here", rdir / "000002.json")
    before = _snapshot(outside)
    r = run_main(["--base", str(spool.base), "--task", "examples.noop:square", "--chunks", "4", "--run", "linked",
                  "--no-progress", "--dead-after", "5"], env, timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    res = results(spool.base, "linked")
    assert sorted(res) == [0, 1, 2, 3] and res[2]["value"]["square"] == 4
    assert not (rdir / "000002.json").is_symlink() and _snapshot(outside) == before
