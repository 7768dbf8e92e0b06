"""Filesystem detection from a mount table: network filesystems (polling) and client-local locks (refused)."""
from __future__ import annotations

from pathlib import Path

import pytest

import gpupool.jobs.fsinfo as fsinfo
from gpupool.jobs.errors import SpoolError
from gpupool.jobs.fsinfo import check_locks, find_mount, is_network_fs, local_lock_option, local_locks_problem

# Lines as the kernel writes them in /proc/self/mountinfo (NFS lists nolock/local_lock among
# the superblock options, after the " - " separator).
MOUNTS = {
    "root": "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro",
    "nfs3_nolock": "45 22 0:45 / /mnt/nfs3 rw,relatime shared:30 - nfs srv:/export rw,vers=3,rsize=1048576,"
                   "wsize=1048576,namlen=255,hard,nolock,proto=tcp,timeo=600,retrans=2,sec=sys,mountaddr=10.0.0.1,"
                   "mountvers=3,mountport=20048,mountproto=udp,local_lock=all,addr=10.0.0.1",
    "nfs3_lockd": "46 22 0:46 / /mnt/nfs3ok rw,relatime shared:31 - nfs srv:/export rw,vers=3,hard,proto=tcp,"
                  "timeo=600,retrans=2,sec=sys,mountaddr=10.0.0.1,mountvers=3,local_lock=none,addr=10.0.0.1",
    "nfs4": "47 22 0:47 / /shared rw,relatime shared:32 - nfs4 srv:/ rw,vers=4.2,rsize=1048576,wsize=1048576,"
            "namlen=255,hard,proto=tcp,timeo=600,retrans=2,sec=sys,clientaddr=10.0.0.2,local_lock=none,addr=10.0.0.1",
    "nfs4_flock": "48 22 0:48 / /mnt/nfs4flock rw,relatime - nfs4 srv:/ rw,vers=4.1,hard,proto=tcp,sec=sys,"
                  "clientaddr=10.0.0.2,local_lock=flock,addr=10.0.0.1",
    "local_under_nfs": "49 45 0:49 / /mnt/nfs3/scratch rw,relatime - ext4 /dev/vdb rw",
    "sshfs": "50 22 0:50 / /mnt/ssh\\040data rw,nosuid,nodev,relatime shared:33 - fuse.sshfs me@host:/data "
             "rw,user_id=1000,group_id=1000",
    "gluster": "51 22 0:51 / /mnt/gv rw,relatime shared:34 - fuse.glusterfs host:/gv "
               "rw,user_id=0,group_id=0,default_permissions,allow_other,max_read=131072",
    "cifs_nobrl": "52 22 0:52 / /mnt/smb rw,relatime - cifs //srv/share rw,vers=3.1.1,cache=strict,nobrl,uid=0",
    "lustre_local": "53 22 0:53 / /lustre rw,relatime - lustre 10.0.0.1@tcp:/fs rw,localflock,lazystatfs",
    "lustre_flock": "54 22 0:54 / /lustre2 rw,relatime - lustre 10.0.0.1@tcp:/fs rw,flock,lazystatfs",
}


@pytest.fixture
def table(tmp_path: Path) -> str:
    p = tmp_path / "mountinfo"
    p.write_text("\n".join(MOUNTS.values()) + "\n")
    return str(p)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("path, option", [
    ("/mnt/nfs3/base", "nolock"),
    ("/mnt/nfs4flock/base", "local_lock=flock"),
    ("/mnt/ssh data/base", "fuse.sshfs"),
    ("/mnt/smb/base", "nobrl"),
    ("/lustre/base", "localflock"),
])
def test_client_local_locks_are_detected(table: str, path: str, option: str) -> None:
    assert local_lock_option(find_mount(path, table)) == option
    msg = local_locks_problem(path, table)
    assert msg is not None and option in msg and find_mount(path, table).point in msg
    assert "--allow-local-locks" in msg and "GPUPOOL_ALLOW_LOCAL_LOCKS=1" in msg


@pytest.mark.timeout(10)
@pytest.mark.parametrize("path", ["/home/me/base", "/mnt/nfs3ok/base", "/shared/base", "/mnt/gv/base",
                                  "/mnt/nfs3/scratch/base", "/lustre2/base"])
def test_filesystems_with_server_side_locks_pass(table: str, path: str) -> None:
    assert local_locks_problem(path, table) is None
    assert check_locks(path, mountinfo=table) is None


@pytest.mark.timeout(10)
def test_mount_fields_are_read_from_both_option_lists(table: str) -> None:
    m = find_mount("/mnt/nfs3/base/agent_pool", table)
    assert (m.point, m.fs_type) == ("/mnt/nfs3", "nfs")
    assert m.mount_opts == "rw,relatime" and "local_lock=all" in m.super_opts
    assert find_mount("/mnt/ssh data", table).fs_type == "fuse.sshfs"  # \040 unescaped
    assert find_mount("/mnt/sshdata", table).fs_type == "ext4"  # a prefix of a name is not inside it
    assert find_mount("/x", str(Path(table).with_name("missing"))) == fsinfo.Mount()


@pytest.mark.timeout(10)
def test_check_locks_refuses_unless_overridden(table: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fsinfo.ALLOW_ENV, raising=False)
    with pytest.raises(SpoolError, match=r"/mnt/nfs3 .*nolock.*local to this client"):
        check_locks("/mnt/nfs3/base", mountinfo=table)
    warning = check_locks("/mnt/nfs3/base", allow=True, mountinfo=table)
    assert warning and "nolock" in warning and "explicitly allowed" in warning
    monkeypatch.setenv(fsinfo.ALLOW_ENV, "1")
    assert "explicitly allowed" in check_locks("/mnt/ssh data/base", mountinfo=table)
    monkeypatch.setenv(fsinfo.ALLOW_ENV, "0")
    with pytest.raises(SpoolError):
        check_locks("/mnt/ssh data/base", mountinfo=table)


@pytest.mark.timeout(10)
def test_network_filesystems_are_polled() -> None:
    for fs in ("nfs", "nfs4", "fuse.glusterfs", "lustre", "gpfs", "ceph", "fuse.sshfs", "cifs", "beegfs"):
        assert fs in fsinfo.NETWORK_FS
    assert not is_network_fs("/proc")


@pytest.fixture
def in_process_cli():
    """The CLIs configure loguru for themselves; give the next tests loguru's default back."""
    yield
    import sys

    from loguru import logger
    logger.remove()
    logger.add(sys.stderr)


def _table_with_base_on_sshfs(tmp_path: Path) -> tuple[Path, str]:
    base = tmp_path / "base"
    table = tmp_path / "mountinfo"
    table.write_text(MOUNTS["root"] + f"\n60 22 0:60 / {tmp_path} rw,relatime - fuse.sshfs me@host:/x rw,user_id=0\n")
    return base, str(table)


@pytest.mark.timeout(30)
def test_agent_and_master_refuse_such_a_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys,
                                            in_process_cli) -> None:
    from gpupool.agent.__main__ import main as agent_main
    from gpupool.master.cli.run_cli import main as master_main

    base, table = _table_with_base_on_sshfs(tmp_path)
    monkeypatch.setattr(fsinfo, "MOUNTINFO", table)
    monkeypatch.delenv(fsinfo.ALLOW_ENV, raising=False)
    monkeypatch.setenv("GPUPOOL_LOCK_DIR", str(tmp_path / "locks"))
    assert agent_main(["--base", str(base), "--cpu", "--gpu", "0"]) == 2
    err = capsys.readouterr().err
    assert "agent:" in err and "fuse.sshfs" in err and str(tmp_path) in err and "--allow-local-locks" in err
    assert not base.exists()  # refused before anything was written
    assert master_main(["--base", str(base), "--task", "examples.noop:noop", "--chunks", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "main.py:" in err and "fuse.sshfs" in err and "--allow-local-locks" in err
    assert not base.exists()


@pytest.mark.timeout(30)
def test_the_override_lets_them_through_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys, in_process_cli) -> None:
    from gpupool.agent.__main__ import main as agent_main
    from gpupool.master.cli.run_cli import main as master_main

    base, table = _table_with_base_on_sshfs(tmp_path)
    monkeypatch.setattr(fsinfo, "MOUNTINFO", table)
    monkeypatch.delenv(fsinfo.ALLOW_ENV, raising=False)
    monkeypatch.setenv("GPUPOOL_LOCK_DIR", str(tmp_path / "locks"))
    # past the lock check, each stops at the next error (a bad --gpu; a chunk count of 0)
    assert agent_main(["--base", str(base), "--cpu", "--gpu", "x", "--allow-local-locks"]) == 2
    err = capsys.readouterr().err
    assert "explicitly allowed" in err and "--gpu must be a number" in err
    monkeypatch.setenv(fsinfo.ALLOW_ENV, "1")
    assert master_main(["--base", str(base), "--task", "examples.noop:noop", "--chunks", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "explicitly allowed" in err and "fuse.sshfs" in err
    assert "chunks" in err.split("explicitly allowed")[1]


@pytest.mark.timeout(30)
def test_a_folder_is_listed_afresh_only_on_a_network_filesystem_and_while_small(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``NameRefresh`` lists a folder so that a network filesystem's client sees names replaced by
    another client (its cache would show the old file for a while); never on a local disk, and
    not once the folder has grown past its limit (a listing per poll would cost more than it saves)."""
    import os

    folder = tmp_path / "agent_pool"
    folder.mkdir()
    assert fsinfo.NameRefresh(folder)() is False  # a local disk: nothing to refresh
    table = tmp_path / "mountinfo"
    table.write_text(MOUNTS["root"] + f"\n60 22 0:60 / {tmp_path} rw,relatime - fuse.glusterfs host:/gv rw\n")
    monkeypatch.setattr(fsinfo, "MOUNTINFO", str(table))
    listed: list[str] = []
    real = os.scandir
    monkeypatch.setattr(fsinfo.os, "scandir", lambda p: listed.append(str(p)) or real(p))
    refresh = fsinfo.NameRefresh(folder, limit=3)
    for name in ("a.POOL", "a.lock"):
        (folder / name).write_bytes(b"")
    assert refresh() is True and refresh() is True and listed == [str(folder)] * 2
    for name in ("b.POOL", "b.lock"):
        (folder / name).write_bytes(b"")
    assert refresh() is True  # listed once more, and found past its limit of 3 entries
    assert refresh() is False and refresh.enabled is False and len(listed) == 3
