"""The PNG chart of a benchmark run (matplotlib, from bench/requirements.txt); None without it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import spread

OURS, PEER, FLOOR = "#1f77b4", "#d62728", "#7f7f7f"


def _bars(ax: Any, items: list[tuple[str, list[float], str]], scale: float, ylabel: str, title: str,
          log: bool = True) -> None:
    items = [(n, v, c) for n, v, c in items if v]
    if not items:
        ax.set_visible(False)
        return
    sps = [spread([x * scale for x in v]) for _, v, _ in items]
    med = [s["median"] for s in sps]
    err = [[m - s["min"] for m, s in zip(med, sps)], [s["max"] - m for m, s in zip(med, sps)]]
    ax.bar(range(len(items)), med, yerr=err, color=[c for _, _, c in items], capsize=3)
    ax.set_xticks(range(len(items)), [n for n, _, _ in items], rotation=30, ha="right", fontsize=7)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="y", labelsize=7)


def draw(r: dict[str, Any], path: Path, meta: dict[str, Any]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    t = r.get("1_tiny") or {}
    items = []
    for k in sorted(t.get("ours", {})):
        items.append((f"ours {k}a", t["ours"][k], OURS))
        for key, label in (("ray_tasks", "Ray tasks"), ("ray_actors", "Ray actors"), ("octorun", "OctoRun")):
            if (t.get(key) or {}).get(k):
                items.append((f"{label} {k}w", t[key][k], PEER))
    _bars(axes[0, 0], items, 1, "chunks/s", "1. no-op throughput (a = agents, w = workers)")
    s = r.get("2_small") or {}
    _bars(axes[0, 1], [("floor", s.get("floor"), FLOOR), ("ours callable", s.get("ours_callable"), OURS),
                       ("Ray actors", s.get("ray_actors"), PEER), ("Ray tasks", s.get("ray_tasks"), PEER),
                       ("ours script", s.get("ours_script"), OURS), ("by hand", s.get("by_hand"), FLOOR),
                       ("OctoRun", s.get("octorun"), PEER)], 1000, "ms per chunk", "2. 64x64 matmul, 2 workers")
    lat, items = r.get("3_latency") or {}, []
    for mode in ("inotify", "poll"):
        if mode in lat:
            for q in ("p50", "p99"):
                items.append((f"start {q} {mode}", [lat[mode]["submit_to_start"][f"{q}_ms"]], OURS))
    if (lat.get("ray_tasks") or {}).get("submit_to_start"):
        for q in ("p50", "p99"):
            items.append((f"Ray start {q}", [lat["ray_tasks"]["submit_to_start"][f"{q}_ms"]], PEER))
    for k, g in sorted((t.get("gaps") or {}).items()):
        for q in ("p50", "p99"):
            items.append((f"gap {q} {k}a", [g[f"{q}_ms"]], FLOOR))
    _bars(axes[0, 2], items, 1, "ms", "3./4. submit-to-start latency, idle gap")
    sh = r.get("5_shared") or {}
    if sh:
        gb = lambda ms, key: [sum(m[key]) / 1e9 for m in ms]  # noqa: E731
        _bars(axes[1, 0], [("ours: storage", gb(sh["shared"], "read_bytes"), OURS),
                           ("ours: read() copies", gb(sh["shared"], "rchar"), OURS),
                           ("reload: storage", gb(sh["reload"], "read_bytes"), PEER),
                           ("reload: read() copies", gb(sh["reload"], "rchar"), PEER),
                           ("OctoRun: storage", gb(sh.get("octorun", []), "read_bytes"), PEER)],
              1, "GB", f"5. shared {sh['file_bytes'] / 2**20:.0f} MiB file, {sh['chunks']} chunks", log=False)
    else:
        axes[1, 0].set_visible(False)
    sc = r.get("6_scale") or {}
    ax = axes[1, 1]
    if sc:
        ns = sorted(int(n) for n in sc["ours"])
        pts = {int(n): v for n, v in sc["ours"].items()}
        for key, label in (("setup_s", "submit → first job (s)"), ("status_s", "status (s)"),
                           ("resume_s", "resume (s)"), ("wall_s", "run wall (s)")):
            ax.plot(ns, [pts[n][key] for n in ns], marker="o", label=label)
        ray = {int(n): v for n, v in (sc.get("ray_tasks") or {}).items()}
        if ray:
            rn = sorted(ray)
            ax.plot(rn, [ray[n]["submit_s"] for n in rn], marker="x", color=PEER, ls="--", label="Ray submit (s)")
        ax2 = ax.twinx()
        ax2.plot(ns, [pts[n]["maxrss_mb"] for n in ns], marker="s", color="k", ls=":", label="master peak MB")
        ax2.set_ylabel("MB", fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("chunks", fontsize=8)
        ax.set_title("6. scale (no-op chunks, 2 agents)", fontsize=9)
        ax.legend(fontsize=6, loc="upper left")
        ax2.legend(fontsize=6, loc="lower right")
    else:
        ax.set_visible(False)
    idle = r.get("7_idle") or {}
    items = []
    for mode in ("inotify", "poll"):
        if mode in idle:
            items.append((f"fs ops/s {mode}", [idle[mode].get("fs_ops_per_s") or 0], OURS))
            items.append((f"% core {mode}", [idle[mode]["cpu_core_pct"]], OURS))
    if idle.get("ray_idle"):
        items.append(("% core Ray idle", [idle["ray_idle"]["cpu_core_pct"]], PEER))
    _bars(axes[1, 2], items, 1, "", "7. idle agent cost", log=False)
    m = meta["machine"]
    fig.suptitle(f"gpupool benchmark {meta['date']} ({meta['mode']}) on {m['cores']} cores, {m['cpu'][:40]}; "
                 "blue: ours, red: peers, grey: floor / by hand", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path
