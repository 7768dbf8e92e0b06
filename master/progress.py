"""What the user sees while a run is fed: one progress bar, failures as they happen, a summary."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from master.feeder import Summary
from master.runspec import RunSpec


class Progress:
    def __init__(self, spec: RunSpec, enabled: bool = True, base: Path | None = None, out: TextIO = sys.stderr) -> None:
        self.spec, self.enabled, self.base, self.out = spec, enabled, base, out
        self.bar: tqdm | None = None

    def start(self, already_done: int) -> None:
        if already_done:
            self._say(f"run {self.spec.name}: {already_done} of {self.spec.chunks} chunks already done; resuming")
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
        elif kind == "no_agents":
            base = self.base or "BASE"
            self._say(f"no live agents in {base}; waiting for some. Start them with:  ./start_agents.sh N {base}")

    def _say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.out)
        else:
            print(line, file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_summary(s: Summary, base: Path) -> str:
    rate = s.chunks / s.wall_s if s.wall_s > 0 else 0.0
    lines = [f"run {s.run}: {s.chunks} chunks, {s.ok} ok, {len(s.failed)} failed in {s.wall_s:.2f} s "
             f"({rate:.1f} chunks/s this session)"]
    if s.per_agent:
        lines.append("  chunks per agent: " + ", ".join(f"{a} {n}" for a, n in sorted(s.per_agent.items())))
    lines.append(f"  results: {s.results_dir}/<chunk>.json (+ .npz arrays)")
    for c in s.failed[:20]:
        o = s.outcomes[c]
        lines.append(f"  FAILED chunk {c} (attempt {o.attempt}, {o.agent}): {o.error}  -> {s.results_dir / f'{c:06d}.json'}")
    if len(s.failed) > 20:
        lines.append(f"  ... and {len(s.failed) - 20} more failed chunks: {s.failed[20:40]} ...")
    if s.failed:
        lines.append(f"  re-run the same command to retry the failed chunks (see also: python -m master status --base {base})")
    return "\n".join(lines)
