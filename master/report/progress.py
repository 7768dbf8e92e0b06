"""What the user sees while a run is fed: one progress bar, failures as they happen, a summary."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from gpupool.jobs.descriptor import JobState
from gpupool.jobs.invoked import respell, spell
from gpupool.jobs.names import printable
from gpupool.jobs.paths import Spool
from gpupool.jobs.results import result_file, scan_run
from gpupool.jobs.words import plural
from gpupool.master.core.after import HALTED as AFTER_HALTED
from gpupool.master.core.feeder import Summary
from gpupool.master.spec.runspec import RunSpec


class Progress:
    def __init__(self, spec: RunSpec, enabled: bool = True, base: Path | None = None, out: TextIO = sys.stderr) -> None:
        self.spec, self.enabled, self.base, self.out = spec, enabled, base, out
        self.bar: tqdm | None = None

    def start(self, already_done: int) -> None:
        if already_done:
            self._say(f"run {self.spec.name}: {already_done} of {plural(self.spec.chunks, 'chunk')} already done; resuming")
        if self.enabled:
            self.bar = tqdm(total=self.spec.chunks, initial=already_done, unit="chunk", desc=self.spec.name[:30],
                            file=self.out, dynamic_ncols=True, smoothing=0.1)

    def event(self, kind: str, info: dict[str, Any]) -> None:
        out = info.get("outcome")
        if kind in ("ok", "failed") and self.bar is not None:
            self.bar.update(1)
        if kind == "failed":
            self._say(f"chunk {info['chunk']} failed for good on {out.agent} (attempt {out.attempt}): {out.error}")
        elif kind == "retry":
            self._say(f"chunk {info['chunk']} attempt {out.attempt} failed on {out.agent}: {out.error}; "
                      f"retrying in {info['delay']:g} s")
        elif kind == "handback":
            self._say(f"agent {info['agent']}: {info['why']}; re-queued chunks {info['chunks']}")
        elif kind == "cancelled":
            self._say(respell(f"run {self.spec.name} was cancelled (python -m master cancel); stopped feeding it "
                              f"with {plural(info.get('pending', 0), 'chunk')} not done. Resume it with: "
                              f"python -m master retry --base {self.base or 'BASE'} --run {self.spec.name}"))
        elif kind == "kwargs_changed":
            self._say(kwargs_note(self.spec, info["earlier"], info["kwargs"], info["kept"]))
        elif kind == "halted":
            self._say(f"run {self.spec.name}: stopped early: {info['why']}")
        elif kind == "no_agents":
            base, waited = self.base or "BASE", info.get("waited_s") or 0.0
            self._say(f"no live agents in {base}{f' for {waited / 60:.0f} min' if waited >= 60 else ''}; waiting for "
                      f"some (--wait-agents S to give up). Start them with:  {spell('agents')} N {base}")

    def advance(self, done: int) -> None:
        """The bar at ``done`` chunks (a run another master feeds: see ``master.follow``)."""
        if self.bar is not None and done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def say(self, line: str) -> None:
        self._say(line)

    def _say(self, line: str) -> None:
        line = printable(line)  # errors and names a job or a spool file wrote: no escape sequence reaches the terminal
        if self.bar is not None:
            self.bar.write(line, file=self.out)
        else:
            print(line, file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_summary(s: Summary, base: Path) -> str:
    """The end-of-run report: totals, a table per agent, the failed chunks and what to do next."""
    rate = s.done_this_session / s.wall_s if s.wall_s > 0 else 0.0
    spool = Spool(base)
    head = "CANCELLED " if s.cancelled else "STOPPED " if s.halted else ""
    tries = ""  # failed attempts count as well as failed chunks: a halted run may have failed no chunk yet
    if s.failed_attempts:
        tries = f" ({plural(s.failed_attempts, 'failed attempt')}" + (
            "" if s.halted or not s.retried_attempts else f", {s.retried_attempts} of them retried") + ")"
    lines = [f"{head}run {s.run}: {plural(s.chunks, 'chunk')}, {s.ok} ok, {len(s.failed)} failed{tries} in "
             f"{s.wall_s:.2f} s ({s.done_this_session} this session, {rate:.1f} chunks/s)"]
    lines += agent_table(s)
    names = "000000.json" if s.chunks <= 1 else f"000000.json .. {s.chunks - 1:06d}.json"  # jobs.paths.result_json
    scan = scan_run(spool, s.run)  # a batch's chunks have their results in its slot (jobs.batches)
    each = "one per chunk" if not (scan.slots or scan.fenced) else \
        "one per chunk, or per batch of short chunks (<first>+<count>.json)"
    lines.append(f"  results: {s.results_dir}/{names}, {each} (+ .npz arrays)")
    failed = [c for c in s.failed if c in s.outcomes]
    for c in failed[:20]:
        o = s.outcomes[c]
        lines.append(f"  FAILED chunk {c} (attempt {o.attempt}, {o.agent}): {printable(o.error)}  -> "
                     f"{result_file(spool, s.run, c, scan)}")
    if len(failed) > 20:
        lines.append(f"  ... and {plural(len(failed) - 20, 'more failed chunk')}: {failed[20:40]} ...")
    if failed:
        lines.append(f"  read one:  python -m master logs --base {base} --run {s.run} --chunk {failed[0]}")
        lines.append(f"  retry:     python -m master retry --base {base} --run {s.run}   (or re-run the same command)")
    not_done = s.chunks - len(s.outcomes)
    if s.halted and s.halted.startswith(AFTER_HALTED):  # master.core.after: a run it needed ok did not end ok
        why = s.halted[len(AFTER_HALTED):]  # "run NAME failed (...); ..."
        lines.append(f"  not started: {printable(why)}. Fix it (python -m master retry --base {base} --run "
                     f"{printable(why.split()[1])}), then run the same command again: it waits for it anew")
    elif s.halted:
        lines.append(f"  stopped early: {printable(s.halted)}; every chunk would fail the same way. Fix it, then run the same "
                     f"command again: it resumes, and failed chunks run again (--max-failures 0: never stop early)")
    if s.cancelled and not_done > 0:
        lines.append(f"  {plural(not_done, 'chunk')} not run; resume: python -m master retry --base {base} --run {s.run}")
    return "\n".join(lines)


def agent_table(s: Summary) -> list[str]:
    """Per agent: chunks ok and failed, mean and longest chunk time."""
    per: dict[str, list] = {}
    for o in s.outcomes.values():
        if o.agent:
            per.setdefault(o.agent, []).append(o)
    if not per:
        return []
    width = max(12, *(len(a) for a in per))
    lines = [f"  {'AGENT':<{width}} {'OK':>6} {'FAILED':>6} {'MEAN S':>8} {'MAX S':>8}"]
    for agent, outs in sorted(per.items()):
        times = [o.duration_s for o in outs if isinstance(o.duration_s, (int, float))]
        ok = sum(o.status == JobState.OK for o in outs)
        mean = f"{sum(times) / len(times):.3f}" if times else "-"
        longest = f"{max(times):.3f}" if times else "-"
        lines.append(f"  {agent:<{width}} {ok:>6} {len(outs) - ok:>6} {mean:>8} {longest:>8}")
    return lines


def kwargs_note(spec: RunSpec, earlier: dict[str, Any], now: dict[str, Any], kept: list[int]) -> str:
    """What a rerun with other kwargs keeps (an OctoRun config: completion is keyed on chunk ids)."""
    changed = ", ".join(f"{k}: {_flag(earlier, k)} -> {_flag(now, k)}" for k in sorted(earlier.keys() | now.keys())
                        if (k in earlier, earlier.get(k)) != (k in now, now.get(k)))
    left = spec.chunks - len(kept)
    kept_text = (f"chunks {chunk_ranges(kept)} ({len(kept)} of {spec.chunks}) are done and kept: they ran with the "
                 f"earlier kwargs (or older ones)") if kept else "no chunk was done yet"
    return f"run {spec.name}: kwargs changed ({changed}); {kept_text}; {plural(left, 'chunk')} run with the new kwargs"


def _flag(kwargs: dict[str, Any], key: str) -> str:
    text = repr(kwargs[key]) if key in kwargs else "(unset)"
    return text if len(text) <= 80 else text[:77] + "..."


def chunk_ranges(chunks: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` as ``0-2, 5, 7-8``."""
    spans: list[list[int]] = []
    for c in sorted(chunks):
        if spans and c == spans[-1][1] + 1:
            spans[-1][1] = c
        else:
            spans.append([c, c])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
