"""Per-GPU utilisation and memory over the last hour, for the dashboard's sparklines.

Agents report their GPU's figures in every heartbeat (``gpu``: util, mem_used, mem_total; see
``agent.gpu`` and ``Agent._heartbeat``) but keep no history. The dashboard process samples
the heartbeats every ``every`` seconds (a ``Sampler`` thread, through ``master.core.liveness``) into a
small ring per agent: at most ``window / every`` points, none older than ``window``, and at
most ``max_agents`` rings (the agent heard from least recently goes first). A dead agent's
heartbeat adds nothing: its line stops where it died. The history lives only in the dashboard
process: a dashboard started now shows the hour from now on.
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable

from gpupool.jobs.logsetup import logger

from gpupool.jobs.jsonio import is_num
from gpupool.jobs.paths import Spool
from gpupool.master.core.liveness import Liveness
from gpupool.master.spec.placement import combined, gpus_of

WINDOW_S = 3600.0
SAMPLE_S = 10.0


class GpuHistory:
    """A bounded ring of (time, util %, mem used, mem total) per agent."""

    def __init__(self, window: float = WINDOW_S, every: float = SAMPLE_S, max_agents: int = 256) -> None:
        self.window, self.every, self.max_agents = window, every, max_agents
        self.points = max(2, math.ceil(window / every) + 1)
        self._rings: OrderedDict[str, deque[tuple[float, float | None, float | None, float | None]]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, agent: str, t: float, gpu: dict[str, Any]) -> None:
        """One sample of ``agent``'s heartbeat ``gpu`` figures at ``t`` (a value missing: None)."""
        util, used, total = (gpu.get(k) if is_num(gpu.get(k)) else None for k in ("util", "mem_used", "mem_total"))
        with self._lock:
            ring = self._rings.pop(agent, None) or deque(maxlen=self.points)
            self._rings[agent] = ring  # now the most recently heard from
            ring.append((t, util, used, total))
            while len(self._rings) > self.max_agents:
                self._rings.popitem(last=False)

    def series(self, now: float) -> dict[str, list[tuple[float, float | None, float | None, float | None]]]:
        """Every agent's samples of the last ``window`` up to ``now``, oldest first."""
        with self._lock:
            for agent in list(self._rings):
                ring = self._rings[agent]
                while ring and ring[0][0] < now - self.window:
                    ring.popleft()
                if not ring:
                    del self._rings[agent]
            return {agent: list(ring) for agent, ring in self._rings.items()}

    def to_json(self, now: float) -> dict[str, Any]:
        """``/api/gpus``: per agent, its samples as lists of [time, util, mem_used, mem_total]."""
        return {"window_s": self.window, "points": self.points,
                "agents": {a: [list(p) for p in s] for a, s in self.series(now).items()}}


class Sampler:
    """A daemon thread that samples every live agent's GPU figures into a ``GpuHistory``."""

    def __init__(self, spool: Spool, history: GpuHistory, every: float = SAMPLE_S, dead_after: float = 20.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.history, self.every, self.clock = history, every, clock
        self.liveness = Liveness(spool, dead_after)  # its own: the status reader's is not shared across threads
        self._stop = threading.Event()

    def sample(self) -> None:
        """One pass: a point for each live agent that reports a GPU."""
        now = self.clock()
        for ident, v in self.liveness.refresh().items():
            gpu = combined(gpus_of(v.status))  # an agent of several GPUs: their memory summed, the highest use
            if v.alive and gpu and "error" not in gpu:
                self.history.add(ident, now, gpu)

    def start(self) -> "Sampler":
        threading.Thread(target=self._loop, name="gpu-sampler", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:  # the spool is untrusted: the sparklines pause, the dashboard serves on
                logger.exception("dashboard: sampling the agents' GPU figures failed")
            if self._stop.wait(self.every):
                return


def sparkline(values: list[tuple[float, float | None]], t0: float, t1: float, top: float, color: str,
              gap: float, width: int = 160, height: int = 26) -> str:
    """(time, value) points from ``t0`` to ``t1`` as a small inline SVG, 0 at the bottom and ``top``
    at the top; a missing value or a silence longer than ``gap`` seconds breaks the line."""
    span = max(t1 - t0, 1e-9)
    lines: list[list[str]] = []
    last = None
    for t, v in values:
        if v is None:
            last = None
            continue
        if last is None or t - last > gap:
            lines.append([])
        x = (t - t0) / span * (width - 2) + 1
        y = height - 2 - min(max(v / top, 0.0), 1.0) * (height - 4) if top > 0 else height - 2
        lines[-1].append((x, y))
        last = t
    body = "".join(f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in c)}" fill="none" '
                   f'stroke="{color}" stroke-width="1.5"/>' if len(c) > 1 else
                   f'<circle cx="{c[0][0]:.1f}" cy="{c[0][1]:.1f}" r="1.5" fill="{color}"/>' for c in lines)
    return (f'<svg class="spark" width="{width}" height="{height}"><rect width="{width}" height="{height}" '
            f'fill="#f4f4f4"/>{body}</svg>')
