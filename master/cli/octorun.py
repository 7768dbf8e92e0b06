"""``python main.py --octorun-config config.json``: an OctoRun config run on the pool, unchanged.

OctoRun's fields (``octorun save_config`` writes them) and what becomes of them here:

* ``script_path`` (relative to the current folder, as OctoRun runs it), ``total_chunks``
  (default 128) and ``kwargs`` (flags; ``--kwargs`` on the command line overrides keys, as
  ``octorun run --kwargs`` does): a ``--script`` run, one process per chunk with
  ``--gpu_id --chunk_id --total_chunks --key value``, exactly as OctoRun starts it.
* ``max_retries`` with ``restart_failed`` (retries only when it is true or absent): ``--retries``.
* ``gpus`` (``"auto"`` or a list of GPU ids): without ``--base``, one agent is started per
  listed GPU (a list on a host without GPUs means that many CPU slots, as with OctoRun) in a
  spool ``<log_dir>/gpupool`` and stopped at the end. With ``--base``, the run goes to the
  agents already serving that spool and ``gpus`` is not used.
* ``log_dir``: holds that spool; chunk output is in ``<spool>/logs/<run>/<chunk>.log``.
* ``success_codes`` (any exit codes from 0 to 255), ``retry_base_delay`` and ``retry_max_delay`` (the
  back-off doubles from the base up to the max, and starts from the base again each time the
  command is run, as in OctoRun): honoured.
* ``chunk_lock_dir`` (``lock_dir``; default ``<log_dir>/locks``): no lock files are made, but
  with the script and ``total_chunks`` it names the run, not the kwargs: as in OctoRun, whose
  completion is keyed on chunk ids in that folder, a rerun with other kwargs keeps the chunks
  done (and says which: they ran with other kwargs) and runs the others.
* ``monitor_interval``, ``memory_threshold``: not needed (no polling interval; one agent per
  GPU holds it); ignored with a note.

The same command on several machines sharing the folder (OctoRun's multi-node pattern): each
starts its own agents; the first to take the run feeds it to all of them, the others follow it
(``master.follow``) and end with it. Ctrl-C stops the agents the command started at once, with
their running chunks (they stay queued: the same command resumes). See docs/octorun.md.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpupool.jobs.descriptor import OPTION_CHECKS, JobKind, kwargs_problem
from gpupool.jobs.invoked import prefix
from gpupool.jobs.paths import Spool
from gpupool.master.spec.inputs import read_text
from gpupool.master.spec.runspec import UsageError, default_name, parse_env

# What ``octorun save_config`` writes (OctoRun's default_config.json), with ``script_path`` set.
DEFAULT_CONFIG: dict[str, Any] = {
    "gpus": "auto", "total_chunks": 128, "kwargs": {"batch_size": 32, "learning_rate": 0.001},
    "script_path": "./your_script.py", "log_dir": "./logs", "chunk_lock_dir": "./logs/locks", "monitor_interval": 60,
    "restart_failed": False, "max_retries": 3, "memory_threshold": 90, "success_codes": [0]}

KNOWN = {"script_path", "total_chunks", "kwargs", "gpus", "max_retries", "restart_failed", "log_dir",
         "chunk_lock_dir", "lock_dir", "monitor_interval", "memory_threshold", "success_codes", "retry_base_delay",
         "retry_max_delay"}
NAMES_RUN = "no lock files are made (a chunk is claimed through the agents' mailboxes); the folder names the run"
UNUSED = {"chunk_lock_dir": NAMES_RUN, "lock_dir": NAMES_RUN,
          "monitor_interval": "no polling interval: results are picked up as they are written",
          "memory_threshold": "one agent holds each GPU; use --min-free-gb with --gpu auto for agents"}

CONFIG_LIMIT = 1024 * 1024  # bytes of a config.json (OctoRun's are a few hundred)


@dataclass
class OctoConfig:
    script_path: str
    total_chunks: int = 128
    kwargs: dict[str, Any] = field(default_factory=dict)
    gpus: str | list[int] = "auto"
    retries: int = 0
    log_dir: str = "./logs"
    lock_dir: str | None = None  # OctoRun's chunk_lock_dir (default <log_dir>/locks): what names the run
    success_codes: list[int] | None = None  # exit codes that count as success (None: 0)
    retry_base_delay: float | None = None  # seconds before the first retry (None: main.py's --retry-delay)
    retry_max_delay: float | None = None  # the longest back-off (None: 60 s)
    notes: list[str] = field(default_factory=list)

    def run_name(self, spool: Spool) -> str:
        """OctoRun keys completion on chunk ids in its lock folder, whatever the kwargs: the run is
        named by the script, its chunk count and that folder, so that a rerun with other kwargs
        resumes it (a run named as before, with its kwargs in the name, is still found)."""
        script = str(Path(self.script_path).resolve())
        locks = str(Path(self.lock_dir or Path(self.log_dir) / "locks").resolve())
        name = default_name(JobKind.SCRIPT, script, self.total_chunks, {"chunk_lock_dir": locks}, None, None)
        older = default_name(JobKind.SCRIPT, script, self.total_chunks, self.kwargs, None, None)
        return older if spool.run_spec(older).exists() and not spool.run_spec(name).exists() else name


def load_config(path: str, cli_kwargs: dict[str, Any] | None = None) -> OctoConfig:
    """Read and check an OctoRun config.json; UsageError names the bad field."""
    if not Path(path).exists():
        raise UsageError(f"--octorun-config {path}: no such file; write one with `python -m master save-config "
                         "--script my_script.py` (or `octorun save_config`)")
    text = read_text(Path(path), f"--octorun-config {path}", CONFIG_LIMIT)
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise UsageError(f"--octorun-config {path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or "script_path" not in raw:
        raise UsageError(f"--octorun-config {path}: an OctoRun config is a JSON object with at least "
                         "\"script_path\" (and usually \"total_chunks\", \"kwargs\", \"gpus\")")
    cfg = OctoConfig(script_path=_str(raw, "script_path", path), total_chunks=raw.get("total_chunks", 128),
                     kwargs={**_dict(raw, "kwargs", path), **(cli_kwargs or {})}, gpus=_gpus(raw, path),
                     retries=_retries(raw, path), log_dir=_str({"log_dir": "./logs", **raw}, "log_dir", path))
    for key in ("chunk_lock_dir", "lock_dir"):
        if key in raw:
            cfg.lock_dir = _str(raw, key, path)
    if why := kwargs_problem(JobKind.SCRIPT, cfg.kwargs):
        raise UsageError(f"--octorun-config {path}: kwargs (its own and --kwargs) {why}")
    if isinstance(cfg.total_chunks, bool) or not isinstance(cfg.total_chunks, int) or cfg.total_chunks < 1:
        raise UsageError(f"--octorun-config {path}: 'total_chunks' must be a whole number >= 1, "
                         f"not {cfg.total_chunks!r}")
    if "success_codes" in raw:
        codes = raw["success_codes"]
        if not OPTION_CHECKS["success_codes"](codes):  # the check a job's success_codes option gets
            raise UsageError(f"--octorun-config {path}: 'success_codes' must be a list of exit codes from 0 to 255 "
                             f"like [0, 3], not {codes!r}")
        cfg.success_codes = codes
    cfg.retry_base_delay, cfg.retry_max_delay = _seconds(raw, "retry_base_delay", path), \
        _seconds(raw, "retry_max_delay", path)
    if cfg.retry_base_delay is not None and cfg.retry_max_delay is not None and \
            cfg.retry_max_delay < cfg.retry_base_delay:
        raise UsageError(f"--octorun-config {path}: 'retry_max_delay' {cfg.retry_max_delay:g} is shorter than "
                         f"'retry_base_delay' {cfg.retry_base_delay:g}")
    cfg.notes = [f"{k}: {UNUSED[k]}" if UNUSED[k] is NAMES_RUN else f"{k}: ignored ({UNUSED[k]})"
                 for k in raw if k in UNUSED]
    cfg.notes += [f"{k}: unknown OctoRun field, ignored" for k in raw if k not in KNOWN]
    return cfg


def _str(raw: dict, key: str, path: str) -> str:
    if not isinstance(raw.get(key), str) or not raw[key]:
        raise UsageError(f"--octorun-config {path}: {key!r} must be a path string, not {raw.get(key)!r}")
    return raw[key]


def _seconds(raw: dict, key: str, path: str) -> float | None:
    v = raw.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf):
        raise UsageError(f"--octorun-config {path}: {key!r} must be a number of seconds, 0 or more, not {v!r}")
    return None if v is None else float(v)


def _dict(raw: dict, key: str, path: str) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise UsageError(f"--octorun-config {path}: {key!r} must be a JSON object of flags, not {value!r}")
    return value


def _gpus(raw: dict, path: str) -> str | list[int]:
    gpus = raw.get("gpus", "auto")
    ok_list = isinstance(gpus, list) and gpus and all(isinstance(g, int) and g >= 0 for g in gpus)
    if gpus != "auto" and not ok_list:
        raise UsageError(f"--octorun-config {path}: 'gpus' must be \"auto\" or a non-empty list of GPU ids like "
                         f"[0, 1], not {gpus!r}")
    return gpus if gpus == "auto" else sorted(set(gpus))


def _retries(raw: dict, path: str) -> int:
    n = raw.get("max_retries", 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UsageError(f"--octorun-config {path}: 'max_retries' must be a whole number >= 0, not {n!r}")
    return n if raw.get("restart_failed", True) else 0  # OctoRun retries only with restart_failed


# local agents for the configured GPUs ---------------------------------------------------------
@dataclass
class LocalAgents:
    spool: Spool
    ids: list[str]
    started: list[str]

    def stop(self, now: bool = False) -> None:
        """Stop the agents this command started: each after its current chunk, or ``now``, killing
        it (the chunk stays queued: the next run of the command runs it again)."""
        from gpupool.agent import launcher

        launcher.stop(str(self.spool.base), only=self.started, now=now)


def gpu_numbers(gpus: str | list[int]) -> tuple[list[int], bool]:
    """The config's ``gpus`` as this host's GPU numbers, and whether it has any (CPU slots when
    not); UsageError when it cannot be served here. Nothing is made."""
    from gpupool.agent.gpu import make_probe, visible_gpus

    visible = visible_gpus(make_probe())
    if gpus == "auto" and not visible:
        raise UsageError("config 'gpus' is \"auto\" but this host has no visible GPU (OctoRun refuses this too); "
                         "set \"gpus\": [0, 1] to run two CPU slots, or pass --base BASE to use running agents")
    numbers = list(range(len(visible))) if gpus == "auto" else list(gpus)
    bad = [g for g in numbers if visible and g >= len(visible)]
    if bad:
        raise UsageError(f"config 'gpus' lists {bad}, but this host has {len(visible)} visible GPU(s)")
    return numbers, bool(visible)


def start_agents(spool: Spool, gpus: str | list[int], timeout: float = 120.0) -> LocalAgents:
    """One agent per configured GPU of this host (CPU slots when it has none)."""
    from gpupool.agent import launcher

    numbers, any_gpu = gpu_numbers(gpus)
    started = launcher.start(str(spool.base), len(numbers), cpu=not any_gpu, agent_args=["--heartbeat", "0.5"],
                             timeout=timeout, numbers=numbers, partial=True)
    return LocalAgents(spool, [s.agent_id for s in started], [s.agent_id for s in started if s.new])


# the run ----------------------------------------------------------------------------------------
def main(args: Any) -> int:
    """``main.py --octorun-config``: ``args`` are main.py's parsed options (``master.cli.run_cli.guarded``
    turns the errors a user can act on into one line)."""
    from gpupool.master.spec.runspec import parse_kwargs

    if args.task or args.script or args.chunks:
        raise UsageError("--octorun-config replaces --task/--script/--chunks (the config's script_path and "
                         "total_chunks say them); drop those options")
    from gpupool.master.cli.run_cli import option_problem
    from gpupool.master.spec.runspec import build

    # Everything is checked before any folder is made or agent started: a refused config leaves
    # the folder as it was (no <log_dir>/gpupool skeleton).
    if why := option_problem(args):
        raise UsageError(why)
    cfg = load_config(args.octorun_config, parse_kwargs(args.kwargs))
    env = parse_env(args.env)
    if not Path(cfg.script_path).is_file():
        raise UsageError(f"--octorun-config {args.octorun_config}: script_path {cfg.script_path!r}: "
                         f"{Path(cfg.script_path).resolve()} is not a file (OctoRun runs it from the current folder)")
    if not args.base:
        gpu_numbers(cfg.gpus)  # this host can serve the config's 'gpus'
    spool = Spool(args.base or Path(cfg.log_dir) / "gpupool")  # paths only: nothing made yet
    build(script=cfg.script_path, chunks=cfg.total_chunks, kwargs=cfg.kwargs, run=args.run or cfg.run_name(spool),
          retries=cfg.retries, timeout=args.timeout, env=env, success_codes=cfg.success_codes)  # the run's checks
    for note in cfg.notes:
        print(f"{prefix('run')}: octorun config: {note}", file=sys.stderr)
    return _feed(args, cfg, env)


def _feed(args: Any, cfg: OctoConfig, env: dict[str, str]) -> int:
    from gpupool.master.api import Pool
    from gpupool.master.core.feeder import FeedConfig
    from gpupool.master.report.progress import format_summary
    from gpupool.master.cli.run_cli import show_progress

    # --base: the agents serving that spool (a path that is no spool yet is refused, as main.py does,
    # unless --new-spool); else the config's own spool, made here
    pool = Pool(args.base or Path(cfg.log_dir) / "gpupool", create=not args.base or args.new_spool)
    local = None
    if args.base:
        print(f"{prefix('run')}: octorun config: running on the agents of {pool.spool.base}; its 'gpus' is not used",
              file=sys.stderr)
    else:
        local = start_agents(pool.spool, cfg.gpus)
        print(f"octorun config: spool {pool.spool.base}, agents {' '.join(local.ids)}", flush=True)
    interrupted = False
    try:
        run = pool.submit(script=cfg.script_path, chunks=cfg.total_chunks, kwargs=cfg.kwargs,
                          run=args.run or cfg.run_name(pool.spool), retries=cfg.retries, timeout=args.timeout,
                          fresh=args.fresh, kwargs_may_change=True, success_codes=cfg.success_codes,
                          env=env, force=args.force)
        base_delay = args.retry_delay if cfg.retry_base_delay is None else cfg.retry_base_delay
        feed = FeedConfig(depth=args.depth, max_depth=max(args.depth, args.max_depth), dead_after=args.dead_after,
                          retry_delay=base_delay, max_failures=args.max_failures,
                          retry_cap=max(base_delay, 60.0 if cfg.retry_max_delay is None else cfg.retry_max_delay))
        summary = run.join(progress=show_progress(args), cfg=feed)  # a second machine joins the run
    except KeyboardInterrupt:  # as OctoRun: Ctrl-C stops the running scripts at once
        if local is None:
            raise
        interrupted = True
        print(f"\n{prefix('run')}: interrupted: stopping this command's agents ({' '.join(local.started) or 'none'}) and "
              "their running chunks; run the same command again to resume", file=sys.stderr, flush=True)
        return 130
    finally:
        if local is not None:
            local.stop(now=interrupted)
    print(format_summary(summary, pool.spool.base))
    print(f"chunk output: {pool.spool.run_log_dir(run.name)}/<chunk:06d>.log")
    return 0 if summary.all_ok else 1


def save_config(path: str, script: str | None, force: bool = False) -> Path:
    """``octorun save_config [--script S]``: OctoRun's default config written to ``path``
    (an existing file is kept unless ``force``: it may be the only copy of a tuned config)."""
    out = Path(path)
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to replace it with the default config")
    cfg = {**DEFAULT_CONFIG, **({"script_path": script} if script else {})}
    out.write_text(json.dumps(cfg, indent=4) + "\n")
    return out
