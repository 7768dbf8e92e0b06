"""What kind of filesystem holds a path (to choose inotify or polling)."""
from __future__ import annotations

import os
from pathlib import Path

# Filesystems where another client's writes raise no inotify event on this host.
NETWORK_FS = {
    "nfs", "nfs4", "lustre", "gpfs", "ceph", "fuse.ceph", "fuse.glusterfs", "glusterfs",
    "fuse.sshfs", "sshfs", "cifs", "smb3", "smbfs", "beegfs", "fuse.beegfs", "9p",
    "fuse.s3fs", "fuse.gcsfuse", "afs", "orangefs", "panfs", "fuse.juicefs", "fuse.weka",
}


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mount_of(path: str | os.PathLike, mountinfo: str = "/proc/self/mountinfo") -> tuple[str, str, str]:
    """(mount point, fs type, super options) of the mount holding ``path``; fs type '' if unknown."""
    target = os.path.realpath(path)
    best = ("", "", "")
    try:
        with open(mountinfo) as f:
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
        if inside and len(point) >= len(best[0]):
            rparts = right.split()
            best = (point, rparts[0] if rparts else "", rparts[2] if len(rparts) > 2 else "")
    return best


def is_network_fs(path: str | os.PathLike) -> bool:
    return mount_of(path)[1] in NETWORK_FS


def fs_type(path: str | os.PathLike) -> str:
    return mount_of(Path(path))[1] or "unknown"
