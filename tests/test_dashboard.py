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
from typing import Any

import pytest

from gpupool.jobs.paths import Spool
from gpupool.master.report.gpuhistory import GpuHistory, sparkline
from tests.helpers import REPO, base_env, run_main, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# No background traffic (this machine's network is closed), a fresh profile per run.
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage"]


@pytest.fixture
def dashboard(spool: Spool, env):
    """A real ``python -m master dashboard`` on a free port; yields its URL."""
    p = subprocess.Popen([sys.executable, "-m", "master", "dashboard", "--base", str(spool.base), "--port", "0",
                          "--refresh", "1", "--sample", "0.2"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
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


def json_or_none(url: str) -> Any:
    """The JSON at ``url``, or None while it is a 404 (a run whose master has not written run.json yet)."""
    try:
        return json.loads(get(url)[1])
    except urllib.error.HTTPError as e:
        if e.code != 404:
            raise
        return None


def chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={tmp}", *args], capture_output=True,
                          text=True, timeout=90)


def png_rgb(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of an 8-bit RGB or RGBA PNG (scanline filters undone)."""
    width, height, raw = png_pixels(path)
    bpp = (len(raw) // height - 1) // width
    assert bpp in (3, 4), f"not 8-bit RGB(A): {bpp} bytes per pixel"
    stride, prev, rows = width * bpp, bytearray(width * bpp), []
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line) if bpp == 3 else bytes(v for j, v in enumerate(line) if j % 4 != 3))
        prev = line
    return width, height, rows


def count_color(rows: list[bytes], rgb: tuple[int, int, int], tolerance: int = 12) -> int:
    """Pixels within ``tolerance`` of ``rgb`` on each channel."""
    n = 0
    for row in rows:
        for i in range(0, len(row), 3):
            if all(abs(row[i + k] - rgb[k]) <= tolerance for k in range(3)):
                n += 1
    return n


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
    assert run_main(["--base", str(spool.base), "--task", "gpupool.master.matmul:multiply", "--chunks", "4", "--run",
                     "shown-run", "--no-progress"], env).returncode == 0
    # --dump-dom after the page's script has fetched /api/status and redrawn (data-live="1")
    dom = wait_for(lambda: (r := chromium(["--virtual-time-budget=5000", "--dump-dom", dashboard], tmp_path / "p1"))
                   and 'data-live="1"' in r.stdout and r.stdout, timeout=60, what="page drawn by its script")
    assert 'data-agents="2"' in dom and "testhost-cpu0" in dom and "testhost-cpu1" in dom
    assert re.search(r'class="l run"><a href="/run/shown-run">shown-run</a><', dom)
    assert 'id="err" class="bad"></span>' in dom
    shot = tmp_path / "dash.png"
    r = chromium(["--virtual-time-budget=3000", "--window-size=1200,700", f"--screenshot={shot}", dashboard],
                 tmp_path / "p2")
    assert shot.exists(), r.stderr[-2000:]
    width, height, pixels = png_pixels(shot)
    assert (width, height) == (1200, 700) and shot.stat().st_size > 5000
    assert len(set(pixels)) > 20  # text, tables and bars, not a blank page
    if os.environ.get("GPUPOOL_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["GPUPOOL_KEEP_SCREENSHOT"])


# the run page -----------------------------------------------------------------------------------
RED, GREEN = (0xE5, 0x39, 0x35), (0x43, 0xA0, 0x47)  # master.report.timeline.COLORS: failed, ok


def failing_run(spool: Spool, env, run: str, seconds: float = 0.0) -> None:
    """6 chunks on the agents there are, chunk 2 failing on both of its 2 attempts."""
    r = run_main(["--base", str(spool.base), "--task", "tests.faulty:slow_fail", "--chunks", "6", "--run", run,
                  "--kwargs", json.dumps({"seconds": seconds, "bad": [2]}), "--retries", "1", "--no-progress"], env)
    assert r.returncode != 0 and "FAILED chunk 2" in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.mark.timeout(120)
def test_run_page_has_a_bar_per_attempt_the_failure_marked_and_its_traceback(spool: Spool, agents, env,
                                                                             dashboard: str) -> None:
    agents(2)
    failing_run(spool, env, "tl")
    code, body = get(dashboard + "api/run/tl")
    data = json.loads(body)
    assert code == 200 and data["done"] and data["counts"] == {"ok": 5, "failed": 1, "running": 0, "queued": 0,
                                                               "pending": 0}
    # one bar per attempt: chunk 2's two failures (its last one is both history and the final), one ok each else
    got = sorted((b["chunk"], b["attempt"], b["status"]) for b in data["bars"])
    assert got == [(0, 1, "ok"), (1, 1, "ok"), (2, 1, "failed"), (2, 2, "failed"), (3, 1, "ok"), (4, 1, "ok"),
                   (5, 1, "ok")]
    assert all(b["agent"] in ("testhost-cpu0", "testhost-cpu1") and b["end"] >= b["start"] for b in data["bars"])
    assert [r["chunk"] for r in data["rows"] if r["state"] == "failed"] == [2]  # status --run's rows
    code, page = get(dashboard + "run/tl")
    assert code == 200 and page.count('<rect class="attempt ') == 7
    assert len(re.findall(r'<rect class="attempt failed" data-chunk="2"[^>]*fill="#e53935"', page)) == 2
    assert len(re.findall(r'<rect class="attempt ok" data-chunk="(\d)"', page)) == 5
    tb = re.search(r'<details id="tb2"><summary>ValueError: chunk 2 is on the bad list</summary><pre>(.*?)</pre>',
                   page, re.S)
    assert tb and "Traceback (most recent call last)" in tb.group(1) and "slow_fail" in tb.group(1)
    assert page.count("<details") == 1 and 'href="/run/tl/chunk/2"' in page
    assert "http://" not in page and "https://" not in page and "<script src" not in page  # nothing external
    code, chunk = get(dashboard + "run/tl/chunk/2")
    assert code == 200 and chunk.count("Traceback (most recent call last)") == 2  # both attempts
    assert "FAILED on attempt 2/2" in chunk and f"logs --base {spool.base} --run tl --chunk 2" in chunk
    assert json.loads(get(dashboard + "api/run/tl/chunk/2")[1])["status"] == "failed"
    assert 'href="/run/tl">tl</a>' in get(dashboard)[1]  # linked from the runs table


@pytest.mark.timeout(60)
def test_run_page_of_hostile_results_escapes_them_and_draws_what_it_can(spool: Spool, agents, env,
                                                                        dashboard: str) -> None:
    agents(1)
    assert run_main(["--base", str(spool.base), "--task", "examples.noop:noop", "--chunks", "4", "--run", "odd",
                     "--no-progress"], env).returncode == 0
    res = spool.result_dir("odd")
    (res / "000000.json").write_text("{")  # torn
    rec = json.loads((res / "000001.json").read_text())
    (res / "000001.json").write_text(json.dumps({**rec, "agent": "<img src=x onerror=alert(1)>"}))
    # no duration of the wrong type, nor times to take one from: no bar
    (res / "000002.json").write_text(json.dumps({**rec, "chunk_id": 2, "duration_s": "soon", "started_at": "soon"}))
    # an agent's clock stepped back: its times say nothing (the bar is its duration, up to the file's mtime)
    (res / "000003.json").write_text(json.dumps({**rec, "chunk_id": 3, "finished_at": rec["started_at"] - 5}))
    data = json.loads(get(dashboard + "api/run/odd")[1])
    assert sorted(b["chunk"] for b in data["bars"]) == [1, 3] and all(b["end"] >= b["start"] for b in data["bars"])
    code, page = get(dashboard + "run/odd")
    assert code == 200 and "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


@pytest.mark.timeout(60)
@pytest.mark.parametrize("url, says", [
    ("run/nope", "no run 'nope' in"),
    ("run/..%2F..%2Fetc", "run name '../../etc' is not allowed"),
    ("run/..", "run name '..' is not allowed"),
    ("api/run/%00x", "is not allowed"),
    ("run/ok/chunk/6", "run ok: chunk id 6 is outside 0..5"),
    ("run/ok/chunk/-1", "chunk id '-1' is not a chunk number"),
    ("run/ok/chunk/..%2F..%2Fx", "is not a chunk number"),
    ("run/ok/other", "a run's pages are /run/<run>"),
])
def test_a_bad_run_or_chunk_in_the_url_is_a_404_saying_why(spool: Spool, agents, env, dashboard: str, url: str,
                                                           says: str) -> None:
    if "ok" in url:
        agents(1)
        assert run_main(["--base", str(spool.base), "--task", "examples.noop:noop", "--chunks", "6", "--run", "ok",
                         "--no-progress"], env).returncode == 0
    with pytest.raises(urllib.error.HTTPError) as e:
        get(dashboard + url)
    text = e.value.read().decode()
    assert e.value.code == 404 and text.startswith("not found: ") and says in text, text


@pytest.mark.timeout(150)
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package 'chromium', listed in "
                    ".ci/apt-packages.txt): the run page's browser test cannot run")
def test_run_page_in_headless_chromium_shows_the_timeline(spool: Spool, agents, env, dashboard: str,
                                                          tmp_path: Path) -> None:
    agents(2)
    failing_run(spool, env, "drawn", seconds=0.4)
    shot = tmp_path / "run.png"
    r = chromium(["--virtual-time-budget=3000", "--window-size=1100,320", f"--screenshot={shot}",
                  dashboard + "run/drawn"], tmp_path / "p")
    assert shot.exists(), r.stderr[-2000:]
    width, height, rows = png_rgb(shot)
    assert (width, height) == (1100, 320)
    # what the bars should cover: the chart's 788 px wide plot spans the first start to the last end
    bars = json.loads(get(dashboard + "api/run/drawn")[1])["bars"]
    t0, t1 = min(b["start"] for b in bars), max(b["end"] for b in bars)
    want = {s: sum(max(1.0, (b["end"] - b["start"]) / (t1 - t0) * 788 - 0.5) * 14 for b in bars if b["status"] == s)
            for s in ("ok", "failed")}
    red, green = count_color(rows, RED), count_color(rows, GREEN)
    assert want["failed"] > 500 and red >= 0.8 * want["failed"], f"{red} red pixels, {want['failed']:.0f} expected"
    assert want["ok"] > 1000 and green >= 0.8 * want["ok"], f"{green} green pixels, {want['ok']:.0f} expected"
    if os.environ.get("GPUPOOL_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["GPUPOOL_KEEP_SCREENSHOT"] + ".run.png")


@pytest.mark.timeout(120)
def test_a_running_chunk_is_drawn_up_to_now_and_the_page_stops_refreshing_when_done(
        spool: Spool, agents, env, dashboard: str, tmp_path: Path) -> None:
    agents(3)  # two chunks, held running by a gate: the third agent is idle, and shown as such
    gate = tmp_path / "gate"
    p = subprocess.Popen([sys.executable, "main.py", "--base", str(spool.base), "--task", "tests.faulty:gated_array",
                          "--chunks", "2", "--run", "live", "--kwargs", json.dumps({"gate": str(gate), "mb": 0.01}),
                          "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        live = wait_for(lambda: (d := json_or_none(dashboard + "api/run/live"))
                        and sum(b["status"] == "running" for b in d["bars"]) == 2 and d, timeout=60,
                        what="both chunks running")
        assert all(b["start"] <= b["end"] == live["time"] for b in live["bars"]) and not live["done"]
        (idle,) = {"testhost-cpu0", "testhost-cpu1", "testhost-cpu2"} - {b["agent"] for b in live["bars"]}
        assert live["idle_agents"] == [idle]
        page = get(dashboard + "run/live")[1]
        assert '<body data-done="0">' in page and page.count('class="attempt running"') == 2
        assert 'stroke-dasharray' in page and f">{idle}<tspan" in page  # a row of its own, with no bar
        gate.touch()
        assert p.wait(timeout=60) == 0
        frag = get(dashboard + "run/live/fragment")[1]
        assert frag.startswith('<div data-done="1">') and frag.count('class="attempt ok"') == 2
        assert f">{idle}<tspan" not in frag  # a finished run shows the agents that ran it
        assert "running" not in re.sub(r"<div class=\"legend.*?</div>", "", frag)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.timeout(150)
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package 'chromium', listed in "
                    ".ci/apt-packages.txt): the run page's browser test cannot run")
def test_run_page_script_redraws_a_live_run_in_headless_chromium(spool: Spool, agents, env, dashboard: str,
                                                                  tmp_path: Path) -> None:
    agents(1)
    gate = tmp_path / "gate"
    p = subprocess.Popen([sys.executable, "main.py", "--base", str(spool.base), "--task", "tests.faulty:gated_array",
                          "--chunks", "2", "--run", "redrawn", "--kwargs", json.dumps({"gate": str(gate), "mb": 0.01}),
                          "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: (d := json_or_none(dashboard + "api/run/redrawn")) and d["counts"]["running"],
                 timeout=60, what="chunk 0 running")
        # --dump-dom once the script has fetched the fragment and drawn it (data-live="1" on the body)
        dom = wait_for(lambda: (r := chromium(["--virtual-time-budget=4000", "--dump-dom", dashboard + "run/redrawn"],
                                              tmp_path / "p")) and 'data-live="1"' in r.stdout and r.stdout,
                       timeout=60, what="the run page redrawn by its script")
        assert 'class="attempt running"' in dom and 'data-done="0"' in dom and 'id="err" class="bad"></span>' in dom
    finally:
        gate.touch()
        p.wait(timeout=60)


# GPU sparklines -----------------------------------------------------------------------------------
def test_gpu_history_ring_is_bounded_in_points_time_and_agents() -> None:
    h = GpuHistory(window=60, every=10, max_agents=3)
    assert h.points == 7
    for t in range(1000):  # a sample a second, ten times as often as planned: still at most 7 points
        h.add("a", float(t), {"util": t % 100, "mem_used": 1, "mem_total": 2})
    assert len(h.series(999.0)["a"]) == 7 and h.series(999.0)["a"][-1] == (999.0, 99, 1, 2)
    for i, agent in enumerate("bcd"):
        h.add(agent, 1000.0 + i, {"util": "bad", "mem_used": None})  # a wrong type is a missing value
    assert sorted(h.series(1002.0)) == ["b", "c", "d"]  # "a" was heard from last longest ago
    assert h.series(1002.0)["b"] == [(1000.0, None, None, None)]
    assert h.series(1061.5) == {"d": [(1002.0, None, None, None)]}  # older than the window: gone
    assert h.series(2000.0) == {}


def test_sparkline_breaks_where_an_agent_was_silent() -> None:
    pts = [(0, 10), (1, 20), (2, 30), (30, 40), (31, 50), (32, None), (33, 60)]
    svg = sparkline(pts, 0, 33, 100, "#000", gap=5)
    assert svg.count("<polyline") == 2 and svg.count("<circle") == 1  # 0-2, 30-31, then 33 alone


@pytest.mark.timeout(120)
def test_main_page_shows_each_gpus_sampled_utilisation_and_memory(spool: Spool, agents, tmp_path: Path,
                                                                   dashboard: str) -> None:
    gpus = [{"name": "Fake H100", "mem_total_gb": 80, "mem_used_gb": 20, "util": 71}] * 2
    agents(2, env_=base_env(tmp_path, GPUPOOL_FAKE_GPUS=json.dumps(gpus)), cpu=False)
    data = wait_for(lambda: (d := json.loads(get(dashboard + "api/gpus")[1]))
                    and len(d["agents"]) == 2 and all(len(s) >= 3 for s in d["agents"].values()) and d,
                    timeout=30, what="three samples of each agent's GPU")
    assert data["points"] == 3600 / 0.2 + 1
    for samples in data["agents"].values():
        assert {(u, used, total) for _, u, used, total in samples} == {(71, 20 * 1024**3, 80 * 1024**3)}
    code, page = get(dashboard)
    gpus_table = re.search(r'<table id="gpus">(.*?)</table>', page, re.S)
    assert code == 200 and gpus_table, page
    assert gpus_table.group(1).count('<svg class="spark"') == 4 and gpus_table.group(1).count("<polyline") >= 4
    assert "71%" in gpus_table.group(1) and "20.0 / 80.0 GB" in gpus_table.group(1)
