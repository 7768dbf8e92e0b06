"""What kind of filesystem holds a path: to choose inotify or polling, and to refuse
filesystems whose file locks are local to one client.

Everything is read from ``/proc/self/mountinfo`` (see proc(5)): field 5 is the mount
point, field 6 the per-mount options; after the ``-`` separator come the fs type, the
source and the superblock options. NFS lists its own options (``nolock``,
``local_lock=...``) among the superblock options, so both option fields are searched.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gpupool.jobs.errors import SpoolError

# Filesystems where another client's writes raise no inotify event on this host.
NETWORK_FS = {
    "nfs", "nfs4", "lustre", "gpfs", "ceph", "fuse.ceph", "fuse.glusterfs", "glusterfs",
    "fuse.sshfs", "sshfs", "cifs", "smb3", "smbfs", "beegfs", "fuse.beegfs", "9p",
    "fuse.s3fs", "fuse.gcsfuse", "afs", "orangefs", "panfs", "fuse.juicefs", "fuse.weka",
}

# Filesystems whose locks never leave the client (sshfs has no lock protocol at all).
LOCAL_LOCK_FS = {"fuse.sshfs", "sshfs"}

ALLOW_ENV = "GPUPOOL_ALLOW_LOCAL_LOCKS"
MOUNTINFO = "/proc/self/mountinfo"  # tests point this at a fake mount table


@dataclass(frozen=True)
class Mount:
    point: str = ""
    fs_type: str = ""  # '' if unknown
    mount_opts: str = ""
    super_opts: str = ""

    def options(self) -> list[str]:
        """Per-mount and superblock options together, in that order."""
        return [o for o in f"{self.mount_opts},{self.super_opts}".split(",") if o]


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def find_mount(path: str | os.PathLike, mountinfo: str | None = None) -> Mount:
    """The mount holding ``path`` (the deepest, latest-mounted one); ``Mount()`` if unknown."""
    target = os.path.realpath(path)
    best = Mount()
    try:
        with open(mountinfo or MOUNTINFO) as f:
            lines = f.read().splitlines()
    except OSError:
        return best
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5:
            continue
        point = _unescape(fields[4])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best.point):
            rparts = right.split()
            best = Mount(point, rparts[0] if rparts else "", fields[5] if len(fields) > 5 else "",
                         rparts[2] if len(rparts) > 2 else "")
    return best


def mount_of(path: str | os.PathLike, mountinfo: str | None = None) -> tuple[str, str, str]:
    """(mount point, fs type, super options) of the mount holding ``path``; fs type '' if unknown."""
    m = find_mount(path, mountinfo)
    return m.point, m.fs_type, m.super_opts


def is_network_fs(path: str | os.PathLike) -> bool:
    return mount_of(path)[1] in NETWORK_FS


class NameRefresh:
    """Makes a network filesystem's client see a folder's names afresh, by listing it.

    A client caches what a name points to and its attributes (GlusterFS's FUSE client: 1 s by
    default; NFS: its attribute cache), so a file another client replaced by a rename reads as
    the old one for that long, however often it is stat'ed. A listing (readdirplus) brings the
    names and attributes of the whole folder up to date: through two GlusterFS mounts, a mailbox
    replaced on one was seen on the other 1.0 s later by stat alone, and within 0.01-0.3 s after
    a listing. A listing costs one call per few hundred names, so it is done only while the
    folder holds at most ``limit`` entries; on a local disk never (nothing to refresh)."""

    def __init__(self, folder: str | os.PathLike, limit: int = 512) -> None:
        self.folder, self.limit = Path(folder), limit
        self.enabled: bool | None = None  # known at the first call (reading the mount table costs)

    def __call__(self) -> bool:
        """List the folder where that is worth it; True if it was listed."""
        if self.enabled is None:
            self.enabled = is_network_fs(self.folder)
        if not self.enabled:
            return False
        try:
            with os.scandir(self.folder) as entries:
                n = sum(1 for _ in entries)
        except OSError:
            return False
        if n > self.limit:  # a pool of hundreds of agents: each listing would cost more than it saves
            self.enabled = False
        return True


def fs_type(path: str | os.PathLike) -> str:
    return mount_of(Path(path))[1] or "unknown"


def local_lock_option(m: Mount) -> str | None:
    """The fs type or mount option that makes file locks on ``m`` local to this client, or None.

    - sshfs: no lock protocol; every lock is local.
    - NFS: ``nolock`` (no lockd) and ``local_lock=flock|posix|all`` keep locks on the client.
      Any ``local_lock`` other than ``none`` is refused, whichever lock call the lock library uses.
    - CIFS/SMB: ``nobrl`` sends no byte-range lock to the server.
    - Lustre: ``localflock`` makes flock client-local.
    """
    if m.fs_type in LOCAL_LOCK_FS:
        return m.fs_type
    opts = m.options()
    if m.fs_type.startswith("nfs"):
        for o in opts:
            if o == "nolock" or (o.startswith("local_lock=") and o != "local_lock=none"):
                return o
    if m.fs_type in ("cifs", "smb3", "smbfs") and "nobrl" in opts:
        return "nobrl"
    if m.fs_type == "lustre" and "localflock" in opts:
        return "localflock"
    return None


def allowed_by_env() -> bool:
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def local_locks_problem(path: str | os.PathLike, mountinfo: str | None = None) -> str | None:
    """A message explaining why ``path`` is unsafe for a pool spanning machines, or None if it is fine."""
    m = find_mount(path, mountinfo)
    why = local_lock_option(m)
    if why is None:
        return None
    how = "(sshfs has no lock protocol)" if why == m.fs_type else f"is mounted with '{why}'"
    return (f"{path}: the {m.fs_type} mount {m.point} {how}: file locks there are local to this client, "
            f"so agents and masters on other machines would not exclude each other (a mailbox rewritten "
            f"under another host's feet, two masters feeding one run). Remount it with locks that reach "
            f"the server (NFS: without nolock or local_lock), or, if every agent and master of this spool "
            f"runs on this one machine, pass --allow-local-locks (or set {ALLOW_ENV}=1)")


def check_locks(path: str | os.PathLike, allow: bool = False, mountinfo: str | None = None) -> str | None:
    """Raise SpoolError if locks under ``path`` are client-local and no override was given.

    Returns a one-line warning when the override let an unsafe filesystem through, else None.
    """
    problem = local_locks_problem(path, mountinfo)
    if problem is None:
        return None
    if allow or allowed_by_env():
        m = find_mount(path, mountinfo)
        return (f"{path}: file locks on {m.point} ({m.fs_type}, {local_lock_option(m)}) are local to this "
                f"client; going on because local locks were explicitly allowed")
    raise SpoolError(problem)
