"""``python -m master dashboard``: its JSON, and its page in a real headless Chromium."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import urllib.request
import zlib
from pathlib import Path

import pytest

from jobs.paths import Spool
from tests.helpers import REPO, run_main, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# No background traffic (this machine's network is closed), a fresh profile per run.
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage"]


@pytest.fixture
def dashboard(spool: Spool, env):
    """A real ``python -m master dashboard`` on a free port; yields its URL."""
    p = subprocess.Popen([sys.executable, "-m", "master", "dashboard", "--base", str(spool.base), "--port", "0",
                          "--refresh", "1"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        line = p.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, line + p.stderr.read() if p.poll() is not None else line
        yield f"http://127.0.0.1:{m.group(1)}/"
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read().decode()


def chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={tmp}", *args], capture_output=True,
                          text=True, timeout=90)


def png_pixels(path: Path) -> tuple[int, int, bytes]:
    """(width, height, decompressed scanlines) of a PNG, with the standard library only."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, zlib.decompress(idat)


@pytest.mark.timeout(120)
def test_api_status_is_the_status_json(spool: Spool, agents, env, dashboard: str) -> None:
    agents(2)
    assert run_main(["--base", str(spool.base), "--task", "examples.noop:square", "--chunks", "6", "--run", "web",
                     "--no-progress"], env).returncode == 0
    code, body = get(dashboard + "api/status")
    data = json.loads(body)
    assert code == 200 and {a["id"] for a in data["agents"]} == {"testhost-cpu0", "testhost-cpu1"}
    assert data["runs"][0]["run"] == "web" and data["runs"][0]["ok"] == 6 and data["run_progress"]["web"]["done"]
    code, page = get(dashboard)
    assert code == 200 and "testhost-cpu0" in page and ">web<" in page and "<script>" in page
    assert "http://" not in page.replace(dashboard, "") and "https://" not in page  # no CDN, nothing external
    with pytest.raises(urllib.error.HTTPError) as e:
        get(dashboard + "nothing-here")
    assert e.value.code == 404


@pytest.mark.timeout(150)
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package 'chromium', listed in "
                    ".ci/apt-packages.txt): the dashboard's browser test cannot run")
def test_page_in_headless_chromium_shows_agents_and_run(spool: Spool, agents, env, dashboard: str,
                                                        tmp_path: Path) -> None:
    agents(2)
    assert run_main(["--base", str(spool.base), "--task", "examples.matmul:multiply", "--chunks", "4", "--run",
                     "shown-run", "--no-progress"], env).returncode == 0
    # --dump-dom after the page's script has fetched /api/status and redrawn (data-live="1")
    dom = wait_for(lambda: (r := chromium(["--virtual-time-budget=5000", "--dump-dom", dashboard], tmp_path / "p1"))
                   and 'data-live="1"' in r.stdout and r.stdout, timeout=60, what="page drawn by its script")
    assert 'data-agents="2"' in dom and "testhost-cpu0" in dom and "testhost-cpu1" in dom
    assert re.search(r'class="l run">shown-run<', dom) and 'id="err" class="bad"></span>' in dom
    shot = tmp_path / "dash.png"
    r = chromium(["--virtual-time-budget=3000", "--window-size=1200,700", f"--screenshot={shot}", dashboard],
                 tmp_path / "p2")
    assert shot.exists(), r.stderr[-2000:]
    width, height, pixels = png_pixels(shot)
    assert (width, height) == (1200, 700) and shot.stat().st_size > 5000
    assert len(set(pixels)) > 20  # text, tables and bars, not a blank page
    if os.environ.get("GPUPOOL_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["GPUPOOL_KEEP_SCREENSHOT"])
