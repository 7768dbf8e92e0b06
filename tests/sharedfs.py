"""A real shared filesystem for tests: one GlusterFS volume on this machine, mounted twice through FUSE.

Two FUSE mounts of one volume behave like two client machines: a write through one mount
raises no inotify event on the other, attributes are cached per mount, and POSIX locks
taken through one mount exclude the other. The fixtures start a private ``glusterd`` (state,
sockets and logs under a tmp folder) in a private network namespace, so that its fixed port
24007 clashes with no other glusterd or test session on this host, make single-brick volumes
under the same tmp folder, mount them (the FUSE clients run in that namespace, the mounts are
visible to everyone) and undo all of it at the end. Without network namespaces it runs on the
host's network and skips if port 24007 is taken.

- ``gluster_fast``: client caches off and FUSE timeouts 0: a change made through one mount is
  visible through the other within milliseconds (fast tests).
- ``gluster_default``: default options: about 1 s before one mount sees the other's changes,
  the kind of delay NFS attribute caching gives (3-60 s there).

Needs root, /dev/fuse and the Debian packages glusterfs-server and glusterfs-client. Where any
is missing the tests skip with the reason (pytest -ra prints it); with
GPUPOOL_REQUIRE_SHAREDFS=1 they fail instead, so that a CI run cannot pass without them.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

GLUSTERD_PORT = 24007
FAST_VOLUME_OPTIONS = {  # no client-side caching: cross-mount visibility in milliseconds
    "performance.md-cache-timeout": "0", "performance.stat-prefetch": "off", "performance.quick-read": "off",
    "performance.io-cache": "off", "performance.read-ahead": "off", "performance.readdir-ahead": "off",
}
FAST_MOUNT_OPTIONS = "attribute-timeout=0,entry-timeout=0,negative-timeout=0"


def unavailable(reason: str) -> None:
    """Skip loudly (or fail, when the environment says shared-filesystem tests must run)."""
    msg = f"shared-filesystem test bed unavailable: {reason}"
    if os.environ.get("GPUPOOL_REQUIRE_SHAREDFS") == "1":
        pytest.fail(msg + " (GPUPOOL_REQUIRE_SHAREDFS=1)", pytrace=False)
    pytest.skip(msg)


def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _port_open(port: int) -> bool:
    with contextlib.closing(socket.socket()) as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _tail(path: Path, n: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no {path.name})"


@dataclass
class Volume:
    name: str
    a: Path  # mount A: the "master host"
    b: Path  # mount B: the "other host"
    fast: bool


class Gluster:
    """A glusterd for the test session and the volumes and mounts made through it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = socket.gethostname()
        self.proc: subprocess.Popen | None = None
        self.netns: subprocess.Popen | None = None  # holds the private network namespace
        self.enter: list[str] = []  # command prefix that runs a program in that namespace
        self.sock: Path | None = None  # None: the host's own glusterd (its default socket)
        self.volumes: list[str] = []
        self.mounts: list[Path] = []

    # setup ---------------------------------------------------------------------------------
    def check_prerequisites(self) -> None:
        if os.geteuid() != 0:
            unavailable("needs root (glusterd, FUSE mounts)")
        missing = [b for b in ("glusterd", "gluster", "mount.glusterfs") if shutil.which(b) is None]
        if missing:
            unavailable(f"{', '.join(missing)} not found: apt-get install glusterfs-server glusterfs-client "
                        "(listed in .ci/apt-packages.txt)")
        if not os.path.exists("/dev/fuse"):
            unavailable("no /dev/fuse on this machine (FUSE is needed to mount the volume)")
        try:
            socket.gethostbyname(self.host)
        except OSError:
            unavailable(f"this host's name {self.host!r} does not resolve; glusterd names bricks by host name")

    def _private_network(self) -> None:
        """A network namespace with loopback up and this host's address on it (best effort)."""
        if shutil.which("unshare") is None or shutil.which("nsenter") is None or shutil.which("ip") is None:
            return
        addr = socket.gethostbyname(self.host)
        extra = "" if addr.startswith("127.") else f" && ip addr add {addr}/32 dev lo"
        ready = self.root / "netns.ready"
        self.netns = subprocess.Popen(["unshare", "-n", "sh", "-c", f"ip link set lo up{extra} && touch {ready} "
                                       "&& exec sleep 100000"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while not ready.exists() and self.netns.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if ready.exists():
            self.enter = ["nsenter", f"--net=/proc/{self.netns.pid}/ns/net"]
        else:
            self._end_netns()  # not permitted here: use the host's network

    def _end_netns(self) -> None:
        if self.netns is not None and self.netns.poll() is None:
            self.netns.kill()
            self.netns.wait(timeout=10)

    def start(self) -> None:
        self.check_prerequisites()
        self.root.mkdir(parents=True, exist_ok=True)
        self._private_network()
        if not self.enter and _port_open(GLUSTERD_PORT):
            # a glusterd already runs here (e.g. started by the package on a systemd host): use it
            if self.cli("volume", "list", check=False).returncode != 0:
                unavailable(f"port {GLUSTERD_PORT} is taken by something that is not a usable glusterd")
            return
        work, run, logs = (self.root / d for d in ("work", "run", "log"))
        for d in (work, run, logs):
            d.mkdir(parents=True, exist_ok=True)
        self.sock = run / "glusterd.socket"
        vol = self.root / "glusterd.vol"
        vol.write_text(
            "volume management\n    type mgmt/glusterd\n"
            f"    option working-directory {work}\n    option run-directory {run}\n"
            f"    option glusterd-sockfile {self.sock}\n    option transport-type socket\n"
            f"    option transport.socket.listen-port {GLUSTERD_PORT}\n    option ping-timeout 0\n"
            "    option event-threads 1\n    option max-port 60999\nend-volume\n")
        self.proc = subprocess.Popen([*self.enter, "glusterd", "-N", "-f", str(vol), "-p", str(run / "glusterd.pid"),
                                      "-l", str(logs / "glusterd.log")], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                unavailable(f"glusterd exited with {self.proc.returncode}:\n{_tail(logs / 'glusterd.log')}")
            if self.sock.exists() and self.cli("volume", "list", check=False).returncode == 0:
                return
            time.sleep(0.1)
        unavailable(f"glusterd did not answer within 30 s:\n{_tail(logs / 'glusterd.log')}")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = ["gluster", "--mode=script"] + ([f"--glusterd-sock={self.sock}"] if self.sock else []) + list(args)
        r = _run(cmd, timeout=120)
        if check and r.returncode != 0:
            unavailable(f"{' '.join(cmd)} failed: {(r.stdout + r.stderr).strip()}")
        return r

    def volume(self, kind: str, fast: bool) -> Volume:
        """Create, start and mount twice a single-brick volume ``gp<kind><pid>``."""
        name = f"gp{kind}{os.getpid()}"
        brick = self.root / "bricks" / name
        brick.parent.mkdir(parents=True, exist_ok=True)
        self.cli("volume", "create", name, f"{self.host}:{brick}", "force")
        self.volumes.append(name)
        if fast:
            for key, value in FAST_VOLUME_OPTIONS.items():
                self.cli("volume", "set", name, key, value)
        self.cli("volume", "start", name)
        a, b = (self.mount(name, side, fast) for side in ("a", "b"))
        return Volume(name, a, b, fast)

    def mount(self, name: str, side: str, fast: bool) -> Path:
        point = self.root / "mnt" / f"{name}-{side}"
        point.mkdir(parents=True, exist_ok=True)
        log = self.root / "log" / f"mount-{name}-{side}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        opts = f"log-file={log}" + (f",{FAST_MOUNT_OPTIONS}" if fast else "")
        deadline = time.monotonic() + 30
        while True:  # the brick may need a moment after "volume start" before a client can attach
            r = _run([*self.enter, "mount", "-t", "glusterfs", "-o", opts, f"{self.host}:/{name}", str(point)])
            if r.returncode == 0 and os.path.ismount(point):
                break
            if time.monotonic() > deadline:
                unavailable(f"FUSE mount of {name} failed: {(r.stdout + r.stderr).strip()}\n{_tail(log)}")
            time.sleep(0.5)
        self.mounts.append(point)
        return point

    # teardown ------------------------------------------------------------------------------
    def close(self) -> None:
        for point in reversed(self.mounts):
            if _run(["umount", str(point)]).returncode != 0:
                _run(["umount", "-l", str(point)])  # something still holds it open: detach now
        for name in self.volumes:
            self.cli("volume", "stop", name, "force", check=False)
            self.cli("volume", "delete", name, check=False)
        self._kill_bricks()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._end_netns()

    def _kill_bricks(self) -> None:
        """Brick daemons whose pid files live in our run folder (normally gone after 'volume stop')."""
        if self.sock is None:
            return
        for pidfile in (self.sock.parent / "vols").glob("*/*.pid"):
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)


@pytest.fixture(scope="session")
def gluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gluster]:
    g = Gluster(tmp_path_factory.mktemp("gluster"))
    try:
        g.start()
        yield g
    finally:
        g.close()


@pytest.fixture(scope="session")
def gluster_fast(gluster: Gluster) -> Volume:
    """A volume with client caches off, mounted twice with FUSE timeouts 0."""
    return gluster.volume("fast", fast=True)


@pytest.fixture(scope="session")
def gluster_default(gluster: Gluster) -> Volume:
    """A volume with default options, mounted twice with default mount options (~1 s cache)."""
    return gluster.volume("default", fast=False)


_counter = iter(range(1_000_000))


def shared_dir(vol: Volume, label: str) -> tuple[Path, Path]:
    """A fresh folder on the volume, as seen through mount A and through mount B."""
    name = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', label)[:60]}-{next(_counter)}"
    a = vol.a / name
    a.mkdir()
    b = vol.b / name
    deadline = time.monotonic() + 10
    while not b.is_dir():
        if time.monotonic() > deadline:
            raise AssertionError(f"{b} did not appear through mount B within 10 s")
        time.sleep(0.02)
    return a, b


def profile_fops(gluster: Gluster, volume: str) -> dict[str, int]:
    """FOP counts at the brick since the previous call (``gluster volume profile ... incremental``)."""
    out = gluster.cli("volume", "profile", volume, "info", "incremental").stdout
    counts: dict[str, int] = {}
    for m in re.finditer(r"^\s*[\d.]+\s+[\d.]+ \w+\s+[\d.]+ \w+\s+[\d.]+ \w+\s+(\d+)\s+([A-Z]+)\s*$", out, re.M):
        counts[m.group(2)] = counts.get(m.group(2), 0) + int(m.group(1))
    return counts
