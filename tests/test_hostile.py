"""The spool is shared, so every file in it is untrusted: a corpus of broken and hostile files."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from jobs.descriptor import Job, JobKind
from jobs.locks import FileLock
from jobs.paths import Spool
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
    "newer job schema": {**GOOD, "schema": 2},
    "unknown field": {**GOOD, "evil": True},
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
    r = run_main(["--base", str(spool.base), "--task", "examples.matmul:multiply", "--chunks", "4", "--data",
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
    job = {**GOOD, "run": "vanish", "target": "examples.matmul:multiply", "shared": str(shared), "total_chunks": 3}
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
