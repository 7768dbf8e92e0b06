"""Turn raw measurements into comparisons (ratios to the peers, min/median/max over repeats),
PASS/FAIL per target of issue 5, and the JSON, markdown and PNG files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import ratios, spread


def _med(xs: list[float] | None) -> float | None:
    return spread(xs or [])["median"]


def _fmt(x: float | None, unit: str = "", digits: int = 3) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}{unit}"
    return f"{x:.{digits}g}{unit}"


def _sp(sp: dict[str, Any], unit: str = "", scale: float = 1.0) -> str:
    if not sp or sp.get("median") is None:
        return "-"
    m, lo, hi = (sp[k] * scale for k in ("median", "min", "max"))
    return _fmt(m, unit) if sp["n"] == 1 else f"{_fmt(m, unit)} [{_fmt(lo)}–{_fmt(hi)}]"


def comparisons(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows: what, ours (spread), peer, peer (spread), ratio (spread) and how to read the ratio."""
    rows: list[dict[str, Any]] = []

    def row(scen: str, what: str, ours: list[float], unit: str, peer: str, theirs: list[float] | None,
            ratio: dict[str, Any] | None, reading: str, scale: float = 1.0) -> None:
        rows.append({"scenario": scen, "measure": what, "ours": spread(ours), "unit": unit, "scale": scale,
                     "peer": peer, "peer_value": spread(theirs or []), "ratio": ratio or spread([]),
                     "reading": reading})

    t = r.get("1_tiny")
    if t:
        for k, ours in t["ours"].items():
            for peer, key in (("Ray tasks", "ray_tasks"), ("Ray actors", "ray_actors"), ("OctoRun", "octorun")):
                theirs = (t.get(key) or {}).get(k)
                if theirs:
                    row("1 tiny", f"no-op chunks/s, {k} agent(s)", ours, "/s", peer, theirs,
                        ratios(ours, theirs), "ours ÷ peer, higher is better")
            if k == 2 or len(t["ours"]) == 1:
                row("1 tiny", f"no-op chunks/s, {k} agent(s)", ours, "/s", "floor (plain loop)", t["floor"],
                    ratios(ours, t["floor"]), "ours ÷ floor")
    s = r.get("2_small")
    if s:
        c = s["ours_callable"]
        for peer, key, reading in (("OctoRun (script)", "octorun", "peer ÷ ours = speed-up"),
                                   ("Ray tasks", "ray_tasks", "peer ÷ ours = speed-up"),
                                   ("Ray actors", "ray_actors", "peer ÷ ours = speed-up"),
                                   ("floor (plain loop)", "floor", "peer ÷ ours")):
            if s.get(key):
                row("2 small", "callable, ms/chunk", c, " ms", peer, s[key], ratios(s[key], c), reading, 1000)
        sc = s["ours_script"]
        for peer, key in (("OctoRun (script)", "octorun"), ("by hand, back to back", "by_hand")):
            if s.get(key):
                row("2 small", "script, ms/chunk", sc, " ms", peer, s[key], ratios(sc, s[key]),
                    "ours ÷ peer, lower is better", 1000)
    lat = r.get("3_latency")
    if lat:
        ray_p50 = ((lat.get("ray_tasks") or {}).get("submit_to_start") or {}).get("p50_ms")
        for mode in ("inotify", "poll", "back_to_back"):
            m = lat.get(mode)
            if m is None:
                continue
            for what in ("submit_to_start", "finish_to_collected"):
                for q in ("p50", "p99"):
                    v = m[what][f"{q}_ms"]
                    peer = ray_p50 if (what == "submit_to_start" and q == "p50") else None
                    row("3 latency", f"{what.replace('_', '-')} {q}, {mode}", [v], " ms",
                        "Ray task" if peer else "-", [peer] if peer else None,
                        ratios([v], [peer]) if peer else None, "ours ÷ peer, lower is better" if peer else "")
    g = (r.get("1_tiny") or {}).get("gaps")
    if g:
        for k, v in g.items():
            for q in ("p50", "p99"):
                row("4 idle gap", f"{q}, {k} agent(s), backlog", [v[f"{q}_ms"]], " ms", "-", None, None, "")
    sh = r.get("5_shared")
    if sh:
        size, a = sh["file_bytes"], sh["agents"]
        per = lambda ms, key: [sum(m[key]) / (a * size) for m in ms]  # noqa: E731
        row("5 shared", "storage bytes read ÷ (agents × file)", per(sh["shared"], "read_bytes"), "",
            "reload per chunk (our worker)", per(sh["reload"], "read_bytes"), None, "")
        row("5 shared", "read() copies per chunk ÷ file", [sum(m["rchar"]) / (sh["chunks"] * size) for m in sh["shared"]],
            "", "reload per chunk (our worker)", [sum(m["rchar"]) / (sh["chunks"] * size) for m in sh["reload"]], None, "")
        w = [m["wall_s"] for m in sh["shared"]]
        row("5 shared", "wall s", w, " s", "reload per chunk (our worker)", [m["wall_s"] for m in sh["reload"]],
            ratios([m["wall_s"] for m in sh["reload"]], w), "peer ÷ ours = speed-up")
        if sh.get("octorun"):
            row("5 shared", "wall s", w, " s", "OctoRun (load per process)", [m["wall_s"] for m in sh["octorun"]],
                ratios([m["wall_s"] for m in sh["octorun"]], w), "peer ÷ ours = speed-up")
    sc6 = r.get("6_scale")
    if sc6:
        for n, p in sc6["ours"].items():
            rt = (sc6.get("ray_tasks") or {}).get(n) or (sc6.get("ray_tasks") or {}).get(str(n))
            row("6 scale", f"{n} chunks: submit → first job s", [p["setup_s"]], " s", "Ray (submit N tasks)" if rt else "-",
                [rt["submit_s"]] if rt else None, ratios([rt["submit_s"]], [p["setup_s"]]) if rt else None,
                "peer ÷ ours" if rt else "")
            row("6 scale", f"{n} chunks: chunks/s", [p["chunks_per_s"]], "/s", "Ray tasks" if rt else "-",
                [int(n) / rt["wall_s"]] if rt else None,
                ratios([p["chunks_per_s"]], [int(n) / rt["wall_s"]]) if rt else None, "ours ÷ peer" if rt else "")
            for key, label in (("maxrss_mb", "master peak MB"), ("status_s", "status s"), ("resume_s", "resume s")):
                row("6 scale", f"{n} chunks: {label}", [p[key]], "", "-", None, None, "")
    idle = r.get("7_idle")
    if idle:
        ray_cpu = (idle.get("ray_idle") or {}).get("cpu_core_pct")
        for mode in ("inotify", "poll"):
            m = idle[mode]
            row("7 idle", f"fs ops/s, {mode}", [m.get("fs_ops_per_s")], "/s", "-", None, None, "")
            row("7 idle", f"% of a core, {mode}", [m["cpu_core_pct"]], " %", "Ray idle daemons" if ray_cpu else "-",
                [ray_cpu] if ray_cpu else None, ratios([m["cpu_core_pct"]], [ray_cpu]) if ray_cpu else None,
                "ours ÷ peer" if ray_cpu else "")
    gpu = r.get("8_gpu")
    if gpu and not gpu.get("skipped"):
        for peer, key in (("OctoRun", "octorun"), ("Ray GPU tasks", "ray_tasks")):
            if gpu.get(key):
                row("8 GPU", "small torch matmul, ms/chunk", gpu["ours"], " ms", peer, gpu[key],
                    ratios(gpu[key], gpu["ours"]), "peer ÷ ours = speed-up", 1000)
    b = r.get("13_batch")
    if b:
        what = f"{b['chunks']:,} no-op chunks/s, {b['workers']} agents"
        if b.get("ray_tasks"):
            row("13 batches", f"{what}, default", b["ours"], "/s", "Ray tasks", b["ray_tasks"],
                ratios(b["ours"], b["ray_tasks"]), "ours ÷ peer, higher is better")
        if b.get("ours_batch1"):
            row("13 batches", f"{what}, default", b["ours"], "/s", "ours, batch 1", b["ours_batch1"],
                ratios(b["ours"], b["ours_batch1"]), "default ÷ batch 1")
        for n, p in (b.get("big") or {}).items():
            for key, label, scale in (("wall_s", "python main.py s", 1.0), ("chunks_per_s", "chunks/s", 1.0),
                                      ("files", "files under results/<run>", 1.0),
                                      ("disk_bytes", "MB on disk", 1e-6), ("maxrss_mb", "master peak MB", 1.0),
                                      ("status_s", "status s", 1.0), ("collect_s", "collect s", 1.0)):
                row("13 batches", f"{int(n):,} chunks: {label}", [p[key]], "", "-", None, None, "", scale)
    rb = r.get("11_boundary")
    if rb:
        row("11 boundary", "submit → next run's first chunk, s", rb["spare"], " s", "ours, --no-spare-worker",
            rb["no_spare"], ratios(rb["no_spare"], rb["spare"]), "peer ÷ ours = speed-up")
    return rows


def targets(r: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    """PASS/FAIL per target of issue 5 (judged on medians over repeats); None = not measured."""
    out: list[dict[str, Any]] = []

    def tgt(name: str, measured: str, ok: bool | None, note: str = "") -> None:
        out.append({"target": name, "measured": measured, "pass": ok, "note": note})

    t = r.get("1_tiny") or {}
    ours2, rt2, ra2 = (t.get("ours") or {}).get(2), (t.get("ray_tasks") or {}).get(2), (t.get("ray_actors") or {}).get(2)
    if ours2 and rt2:
        rr = ratios(ours2, rt2)["median"]
        ra = ratios(ours2, ra2)["median"] if ra2 else None
        tgt("1. tiny chunks, 2 agents: ≥ Ray task throughput (aim: Ray actors)",
            f"{_med(ours2):.0f}/s vs Ray tasks {_med(rt2):.0f}/s = {rr:.2f}x"
            + (f"; vs actors {_med(ra2):.0f}/s = {ra:.2f}x" if ra else ""), rr >= 1.0)
    else:
        tgt("1. tiny chunks, 2 agents: ≥ Ray task throughput", "Ray not measured", None)
    s = r.get("2_small") or {}
    if s.get("octorun"):
        sp = ratios(s["octorun"], s["ours_callable"])["median"]
        tgt("2. small chunks, callable: ≥ 30x faster than OctoRun", f"{sp:.1f}x per chunk", sp >= 30,
            "" if s["script_chunks"] == s["chunks"] else f"OctoRun on {s['script_chunks']} chunks, compared per chunk")
        if s.get("ours_main_py"):
            e2e = ratios(s["octorun"], s["ours_main_py"])["median"]
            tgt("2. small chunks end to end: python main.py (whole command) ≥ 30x faster than OctoRun per chunk",
                f"{e2e:.1f}x", e2e >= 30)
        so = ratios(s["ours_script"], s["octorun"])["median"]
        tgt("2. small chunks, script: no slower than OctoRun", f"ours ÷ OctoRun = {so:.3f}", so <= 1.0)
    else:
        tgt("2. small chunks, callable: ≥ 30x faster than OctoRun", "OctoRun not measured", None)
    if s.get("by_hand"):
        sh = ratios(s["ours_script"], s["by_hand"])["median"]
        tgt("2. small chunks, script: within 10% of the same processes by hand", f"ours ÷ by hand = {sh:.3f}", sh <= 1.10)
    lat = r.get("3_latency")
    if lat:
        p = lat["inotify"]["submit_to_start"]["p50_ms"]
        tgt("3. submit-to-start, idle pool, inotify: p50 < 5 ms", f"p50 {p:.2f} ms", p < 5)
        lim = lat["poll_interval_s"] * 1100
        p = lat["poll"]["submit_to_start"]["p50_ms"]
        tgt(f"3. submit-to-start, idle pool, polling: p50 < poll interval + 10% ({lim:.0f} ms)", f"p50 {p:.1f} ms", p < lim)
    g = (t.get("gaps") or {}).get(2)
    if g:
        tgt("4. idle gap with a backlog: p50 < 1 ms", f"p50 {g['p50_ms']:.3f} ms (2 agents, {g['n']} gaps)", g["p50_ms"] < 1)
        tgt("4. idle gap with a backlog: p99 < 5 ms", f"p99 {g['p99_ms']:.3f} ms", g["p99_ms"] < 5)
    sh = r.get("5_shared")
    if sh:
        worst = max(sum(m["read_bytes"]) for m in sh["shared"]) / (sh["agents"] * sh["file_bytes"])
        tgt("5. shared data: bytes read ≤ 1.05 x agents x file size", f"{worst:.3f} x (worst repeat)", worst <= 1.05,
            f"file {sh['file_bytes'] / 2**20:.0f} MiB")
        copy = max(sum(m["rchar"]) for m in sh["shared"]) / (sh["chunks"] * sh["file_bytes"])
        tgt("5. shared data: no full copy per chunk (memory-mapped)", f"read() copies {copy:.4f} x file per chunk",
            copy < 0.05)
    sc = r.get("6_scale")
    if sc:
        pts = {int(n): v for n, v in sc["ours"].items()}
        big = max(pts)
        note = "" if big >= 100000 else f"measured up to {big}; 100k extrapolated on the line through the two largest sizes"
        at = lambda key: extrapolate(pts, key, 100000)  # noqa: E731
        tgt("6. 100k chunks: submit < 20 s", f"{at('setup_s'):.2f} s", at("setup_s") < 20, note)
        tgt("6. 100k chunks: master peak memory < 300 MB", f"{at('maxrss_mb'):.0f} MB", at("maxrss_mb") < 300, note)
        tgt("6. 100k chunks: resume/status scan < 5 s", f"status {at('status_s'):.2f} s, resume {at('resume_s'):.2f} s",
            max(at("status_s"), at("resume_s")) < 5, note)
        gr = sc.get("growth") or {}
        worst_slope = max((v for v in gr.values() if v is not None), default=None)
        tgt("6. cost grows no faster than linearly", f"largest log-log slope {worst_slope}",
            None if worst_slope is None else worst_slope <= 1.1, json.dumps(gr))
    idle = r.get("7_idle")
    if idle:
        m = idle["poll"]
        ops = m.get("fs_ops_per_s")
        tgt("7. idle agent, polling: ≤ 20 fs ops/s", "-" if ops is None else f"{ops:.1f}/s", None if ops is None else ops <= 20)
        tgt("7. idle agent, polling: < 1% of a core", f"{m['cpu_core_pct']:.2f}%", m["cpu_core_pct"] < 1)
    gpu = r.get("8_gpu") or {}
    if gpu.get("skipped") or not gpu:
        tgt("8. GPU: ≥ 50x faster than OctoRun per small chunk; ≥ 95% utilisation", "skipped", None,
            gpu.get("skipped", "not run"))
    else:
        if gpu.get("octorun"):
            sp = ratios(gpu["octorun"], gpu["ours"])["median"]
            tgt("8. GPU: ≥ 50x faster than OctoRun per small chunk", f"{sp:.1f}x", sp >= 50)
        u = (gpu.get("util_pct") or {}).get("mean")
        tgt("8. GPU: utilisation ≥ 95% on a stream of medium chunks", "-" if u is None else f"{u:.1f}%",
            None if u is None else u >= 95, (gpu.get("util_pct") or {}).get("error") or "")  # MIG: NVML has none
    bal = r.get("9_balance")
    if bal:
        for fl in bal["few_long"]:
            worst = max(fl["wall_over_chunk"])
            up = fl.get("startup_s", 1.0)
            tgt(f"9. {fl['agents']} chunks of {fl['chunk_s']:g} s on {fl['agents']} idle agents: every agent runs one, "
                "main.py within 1.1x of one chunk + start-up",
                f"wall {_med(fl['wall_s']):.2f} s (worst {worst:.2f}x the chunk; start-up {up:.2f} s), "
                f"agents used {fl['agents_used']}",
                all(u == fl["agents"] for u in fl["agents_used"]) and _med(fl["wall_s"]) <= 1.1 * fl["chunk_s"] + up)
        m = bal["many"]
        up = m.get("startup_s", 1.0)
        tgt(f"9. {m['agents']} agents x {m['chunks'] // m['agents']} chunks: within 1.2x of ideal + start-up",
            f"wall {_med(m['wall_s']):.2f} s, ideal {m['ideal_s']:g} s, start-up {up:.2f} s",
            _med(m["wall_s"]) <= 1.2 * m["ideal_s"] + up)
        for tr in bal["two_runs"]:
            share = _med([x for x in tr["b_share"] if x is not None])
            want = tr["b_target_share"]
            tgt(f"9. two runs {tr['weights'][0]:g}:{tr['weights'][1]:g}: the later run's share of the overlap "
                f"within 10% of {want:.2f}", f"{share:.3f}" if share is not None else "-",
                None if share is None else abs(share - want) <= 0.1 * want)
            half = [x for x in tr["b_half_s"] if x is not None]
            tgt(f"9. two runs {tr['weights'][0]:g}:{tr['weights'][1]:g}: the later run on its share within one chunk "
                "+ 1 s", f"after {_med(half):.2f} s" if half else "never", bool(half) and _med(half) <= 1.1 and
                len(half) == len(tr["b_half_s"]))
        ex = bal["executor"]
        tgt(f"9. Executor: {ex['calls']} calls of 1 s on {ex['calls']} idle agents take about 1 s",
            f"{_med(ex['wall_s']):.2f} s", _med(ex["wall_s"]) <= 1.5)
    sfs = r.get("10_sharedfs") or {}
    if sfs.get("ratio"):
        ra = _med(sfs["ratio"])
        tgt(f"10. {sfs['chunks']} chunks of {sfs['chunk_s'] * 1000:.0f} ms across two GlusterFS mounts: at most 1.5x "
            "the local wall", f"{_med(sfs['gluster_s']):.2f} s vs {_med(sfs['local_s']):.2f} s = {ra:.2f}x", ra <= 1.5)
    elif r.get("10_sharedfs") is not None:
        tgt("10. across two GlusterFS mounts: at most 1.5x the local wall", "skipped", None, sfs.get("skipped", ""))
    rb = r.get("11_boundary")
    if rb:
        sp, cold = _med(rb["spare"]), _med(rb["no_spare"])
        tgt(f"11. run boundary: the next run's first chunk within 0.3 s of its submit (a library of "
            f"{rb['import_s']:g} s import, pool idle {rb['idle_s']:g} s)",
            f"{sp:.3f} s with the spare worker; {cold:.3f} s without it (--no-spare-worker)", sp <= 0.3)
    for case in (r.get("12_map") or {}).get("cases", []):
        limit = 3.0 if case["chunksize"] > 1 else 2.0  # issue 27
        ratio = _med(case["ratio"])
        tgt(f"12. Executor.map of {case['calls']:,} calls of pow, chunksize {case['chunksize']}: at most {limit:g}x "
            "ProcessPoolExecutor(2).map, start to last result", f"{_med(case['ours_s']):.3f} s vs "
            f"{_med(case['ppe_s']):.3f} s = {ratio:.2f}x (best {min(case['ratio']):.2f}x)", ratio <= limit)
    b = r.get("13_batch") or {}
    if b:
        name = f"13. {b['chunks']:,} no-op chunks end to end, {b['workers']} agents: ≥ 5x Ray task throughput"
        if b.get("ray_tasks"):
            rr = ratios(b["ours"], b["ray_tasks"])["median"]
            tgt(name, f"{_med(b['ours']):.0f}/s vs Ray tasks {_med(b['ray_tasks']):.0f}/s = {rr:.2f}x"
                + (f"; with batch 1: {_med(b['ours_batch1']):.0f}/s" if b.get("ours_batch1") else ""), rr >= 5)
        else:
            tgt(name, f"{_med(b['ours']):.0f}/s; Ray not measured", None)
    if b.get("big"):
        pts = {int(n): v for n, v in b["big"].items()}
        big, full = max(pts), 1_000_000
        note = "" if big >= full else (f"measured at {', '.join(f'{n:,}' for n in sorted(pts))} chunks; 1,000,000 "
                                       + ("on the line through the two largest" if len(pts) > 1 else "scaled linearly"))
        at = lambda key: extrapolate(pts, key, full)  # noqa: E731
        what = "13. 1,000,000 no-op chunks, 2 agents:"
        tgt(f"{what} python main.py under 120 s", f"{at('wall_s'):.1f} s", at("wall_s") < 120, note)
        tgt(f"{what} at most 5,000 files under results/<run>",
            f"{at('files'):,.0f} files, {at('disk_bytes') / 1e6:,.0f} MB on disk", at("files") <= 5000, note)
        tgt(f"{what} master peak memory under 500 MB", f"{at('maxrss_mb'):.0f} MB", at("maxrss_mb") < 500, note)
        tgt(f"{what} status and collect each under 10 s", f"status {at('status_s'):.2f} s, collect "
            f"{at('collect_s'):.2f} s", max(at("status_s"), at("collect_s")) < 10, note)
    if mode == "smoke":  # sizes far too small to judge a target: the smoke run only proves the code works
        out = [{**t, "pass": None, "note": "smoke: not judged"} for t in out]
    return out


def extrapolate(points: dict[int, dict[str, float]], key: str, n: int) -> float:
    """``key`` at ``n`` chunks: measured if it was, else on the line through the two largest
    sizes (fixed costs such as an interpreter start stay fixed; never below the last point)."""
    if n in points:
        return points[n][key]
    ns = sorted(points)
    if len(ns) == 1:
        return points[ns[0]][key] * n / ns[0]
    a, b = ns[-2], ns[-1]
    slope = (points[b][key] - points[a][key]) / (b - a)
    return points[b][key] + max(0.0, slope) * (n - b)


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]], tg: list[dict[str, Any]], chart: str | None) -> str:
    m = meta["machine"]
    lines = [f"# Benchmark {meta['date']} ({meta['mode']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gb']} GB RAM, Linux {m['kernel']}, Python "
             f"{m['python']}, spool on local {m['tmp_fs']}; peers: "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if k in ("ray", "octorun")) + "; "
             f"repeats {meta['repeats']}; wall {meta['wall_s']:.0f} s; commit {m['commit']}.", "",
             "Ratios are per repeat (the runs of one repeat are interleaved), shown as median [min–max].", "",
             "| target | measured | result |", "| --- | --- | --- |"]
    for t in tg:
        res = {True: "PASS", False: "**FAIL**", None: "n/a"}[t["pass"]]
        lines.append(f"| {t['target']} | {t['measured']}{' (' + t['note'] + ')' if t['note'] else ''} | {res} |")
    lines += ["", "| scenario | measure | ours | peer | peer value | ratio | reading |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['measure']} | {_sp(r['ours'], r['unit'], r['scale'])} | {r['peer']} | "
                     f"{_sp(r['peer_value'], r['unit'], r['scale'])} | {_sp(r['ratio'], 'x') if r['ratio']['n'] else '-'} | "
                     f"{r['reading']} |")
    if meta.get("notes"):
        lines += [""] + [f"- {n}" for n in meta["notes"]]
    if chart:
        lines += ["", f"![benchmark chart]({chart})"]
    return "\n".join(lines) + "\n"


def write(out_dir: Path, stem: str, meta: dict[str, Any], raw: dict[str, Any], chart: bool = True) -> dict[str, Path]:
    rows, tg = comparisons(raw), targets(raw, meta["mode"])
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    png = None
    if chart:
        from bench.chart import draw

        png = draw(raw, out_dir / f"{stem}.png", meta)
        if png is not None:
            paths["png"] = png
    paths["json"].write_text(json.dumps({"meta": meta, "targets": tg, "comparisons": rows, "raw": raw},
                                        indent=1, default=str))
    paths["md"].write_text(markdown(meta, rows, tg, png.name if png else None))
    return paths


KEY_ROWS = ("1 tiny", "2 small", "3 latency", "5 shared", "6 scale", "7 idle", "8 GPU", "13 batches")


def _key_row(r: dict[str, Any]) -> bool:
    """The README keeps one row per comparison: 2 agents, no no-op floor, latency with inotify."""
    if r["peer"] == "-" or not r["scenario"].startswith(KEY_ROWS):
        return False
    m = r["measure"]
    if r["scenario"] == "1 tiny" and ("2 agent" not in m or r["peer"].startswith("floor")):
        return False
    if r["scenario"] == "6 scale" and not m.startswith(("100000", "10000 ")):
        return False
    return not (r["scenario"] == "3 latency" and "poll" in m)


def _int_keys(x: Any) -> Any:
    """JSON made the agent counts and chunk counts of dict keys strings: make them ints again."""
    if isinstance(x, dict):
        return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_int_keys(v) for v in x]
    return x


def readme_section(doc: dict[str, Any], stem: str) -> str:
    """docs/speed.md for a results file: the targets and the main ratios (`python -m bench.report FILE.json > docs/speed.md`)."""
    meta, tg = doc["meta"], doc["targets"]
    rows = comparisons(_int_keys(doc["raw"]))
    m = meta["machine"]
    g = doc["raw"].get("8_gpu") or {}
    gpus = f"{g['gpus']} GPU(s)" if g.get("gpus") else "no GPU"
    head = (f"Measured side by side in one run of `python bench/run.py{' --quick' if meta['mode'] == 'quick' else ''}` "
            f"on {meta['date']} on a {m['cores']}-core {m['cpu']} VM with {m['mem_gb']:.0f} GB of memory, "
            f"{gpus}, the spool on a local {m['tmp_fs']} disk (Python {m['python']}, Ray "
            f"{m['versions'].get('ray', '-')}, OctoRun {m['versions'].get('octorun', '-')}; commit {m['commit']}). "
            "The machine was shared with other work, so every figure is the median of "
            f"{meta['repeats']} interleaved repeats with [min–max]; absolute times hold for this machine only. "
            f"Every run committed every chunk exactly once ({len(meta['checks'])} runs checked).")
    lines = ["# Speed", "", head, "",
             "| target (issues 5, 11 and 27) | measured | result |", "| --- | --- | --- |"]
    for t in tg:
        res = {True: "PASS", False: "**FAIL**", None: "n/a"}[t["pass"]]
        lines.append(f"| {t['target']} | {t['measured']}{' (' + t['note'] + ')' if t['note'] else ''} | {res} |")
    lines += ["", "| scenario | measure | ours | compared with | their value | ratio (how to read) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if not _key_row(r):
            continue
        how = f" ({r['reading']})" if r["reading"] else ""
        lines.append(f"| {r['scenario']} | {r['measure']} | {_sp(r['ours'], r['unit'], r['scale'])} | {r['peer']} | "
                     f"{_sp(r['peer_value'], r['unit'], r['scale'])} | "
                     f"{_sp(r['ratio'], 'x') if r['ratio']['n'] else '-'}{how} |")
    fails = [t["target"].split(":")[0] for t in tg if t["pass"] is False]
    if fails:
        lines += ["", "Not reached yet: " + "; ".join(dict.fromkeys(fails)) + ". What was measured, changed and "
                  "is left to try: [bench/README.md](../bench/README.md#what-was-measured-and-changed)."]
    lines += ["", f"![benchmark chart](../bench/results/{stem}.png)", "",
              f"All figures, the scale and idle-cost rows and the methods: [bench/results/{stem}.md]"
              f"(../bench/results/{stem}.md), [bench/README.md](../bench/README.md). Run it yourself with "
              "`pip install -r bench/requirements.txt && python bench/run.py --quick` (under 2 minutes).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    path = Path(sys.argv[1])
    print(readme_section(json.loads(path.read_text()), path.stem))
