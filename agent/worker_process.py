"""The worker: a child of the agent that serves one run, importing its code and running its chunks.

It is started with CUDA_VISIBLE_DEVICES already narrowed to the agent's GPU and with the run's
``--env`` (and the agent's thread counts) in its environment, before anything is imported, so
CUDA state and libraries set up by the run's tasks live here for the run (``agent.workers``).
Protocol, one JSON line each way on two inherited pipes:
  request ``{"job": {...}, "gpu_id": N, "device": "cuda:0", "arrays_path": "<final .npz>",
          "log": "<the chunk's log>", "spool": "<BASE>"}`` (the job's stdout and stderr go to its
          chunk's log, ``ChunkOutput``; the worker log, its own stdout and stderr, keeps the
          worker's lines: a mark before each job, its warnings)
  reply   ``{"ok": true, "value": ..., "arrays_tmp": "<temp .npz>"|null}`` or
          ``{"ok": false, "error": {"type", "message", "traceback"[, "errno"]}}`` (``jobs.outcomes.Failure``)
          (``errno`` where the exception is an OSError, so that the agent can tell a full
          disk from the job's own failure; ``gpu_error`` and ``poisoned`` where the failure
          is the GPU's, see ``after_failure``; ``setup`` where the run's --setup raised)
          or ``{"ok": false, "restart": "<why>"[, "cold": true]}``: the job was not run, and
          this worker exits; the agent sends it to a fresh one (``Session.restart_reason``:
          a job of another run, a source file changed since it was imported; ``cold``: the
          run's folder has a module named like one this spare preloaded).
  Before its reply, a job may send notes ``{"note": {"waiting": "<why>"}}``: its value is computed
  and waits for disk space to be saved (``save_arrays``).
  Either reply may carry ``"libs": [...]``, the top-level libraries first imported by that job
  (``agent.sources``), which the agent's next spare worker preloads.
  A batch (``jobs.batches``: the job's ``batch``) runs all its chunks in one request, its output
  in one log (``log``: the batch's), and its ok reply is ``{"ok": true, "batch": {"codes": "oeb...",
  "values": [...], "durations": [...], "errors": {"<chunk>": error}, "arrays": {"<chunk>": [temp
  .npz, bytes, form]}[, "poisoned": "<why>"]}}``, one letter a chunk: ``o`` ok, ``e`` raised (its
  error), ``b`` not run (see ``run_batch``); a failed reply (its setup or its import failed) is a
  failure of the whole batch.

Started as a spare (``argv[5]``: library names, comma-separated), it imports those libraries
first, then waits for its first job like any worker.

A failed job whose CUDA context is left unusable (``poisoned`` in its error), or whose run's
--setup failed, is the worker's last: it exits right after that reply, without reading the next
request, and the agent starts a fresh one (CUDA's documentation: after such an error the process
must be terminated and relaunched; every later CUDA call in it fails).

A job may fork: a forked child that returns from the job function (instead of ``os._exit``)
leaves quietly here, never answering a request or reading the next one.
"""
from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # imported where used: the worker starts on the standard library alone
    from gpupool.jobs.outcomes import Failure, GpuFault


def _die_with_parent(parent: int) -> None:
    """PR_SET_PDEATHSIG: the kernel kills us if the agent dies, whatever kills it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the agent died before prctl took effect
        os._exit(1)


def set_title(title: str, name: str) -> None:
    """Name this process for ps, top and nvidia-smi: its whole command line becomes ``title`` where
    the ``setproctitle`` package is installed (nvidia-smi and ``ps -f`` show the command line),
    and its 15-character kernel name (``/proc/<pid>/comm``: ``ps``, ``top``, ``pkill``) becomes
    ``name`` in any case."""
    global _titler
    if _titler is None:
        _titler = _find_titler()
    set_line, prctl = _titler
    if set_line is not None:
        set_line(title)
    if prctl is not None:
        prctl(15, name.encode()[:15])  # 15 = PR_SET_NAME


_titler: tuple[Any, Any] | None = None  # (setproctitle.setproctitle or None, libc's prctl or None), found once


def _find_titler() -> tuple[Any, Any]:
    try:
        from setproctitle import setproctitle
    except ImportError:
        setproctitle = None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        prctl = None
    return setproctitle, prctl


def title_for(agent: str, job: dict[str, Any] | None) -> str:
    """``gpupool-worker <agent> idle``, or ``... <run> chunk <N>`` while a job runs."""
    what = "idle" if job is None else f"{job.get('run')} chunk {job.get('chunk_id')}"
    return f"gpupool-worker {agent} {what}"


def chunk_words(job: Any) -> str:
    """``chunk 7``, or ``chunks 7..106 (a batch)``: what a line of the logs names a job by."""
    return f"chunk {job.chunk_id}" if job.batch is None else \
        f"chunks {job.chunk_id}..{job.chunk_id + job.batch - 1} (a batch)"


TEXT_LIMIT = 64 * 1024  # an error's message and traceback are cut past this many characters
VALUE_ROOM = 64 * 1024  # what a result record needs beside the value (agent, times, names)
_BIG, _SHORT = 1 << 63, 1 << 16  # an int or a string within these is plain JSON of a few hundred KB at most


def jsonable(value: Any) -> Any:
    """``value`` as result data (``jobs.codec``: plain JSON as it is, tuples, bytes, sets, arrays...
    tagged); raises CodecError naming what cannot travel, and ResultTooLarge if it is too big for
    a result record, ResultTooDeep if it nests too deep for one (it then never crosses the pipe)."""
    kind = type(value)
    if value is None or kind is bool or (kind is int and -_BIG < value < _BIG) or \
            (kind is float and value - value == 0.0) or (kind is str and len(value) <= _SHORT):
        return value  # plain JSON far within the limit: nothing to encode or measure (a batch's chunk costs less)
    from gpupool.jobs.codec import TooDeep, encode
    from gpupool.jobs.results import RESULT_LIMIT, ResultTooDeep, ResultTooLarge

    try:
        data = encode(value)
    except TooDeep:
        raise ResultTooDeep() from None
    size = len(json.dumps(data))
    if size > RESULT_LIMIT - VALUE_ROOM:
        raise ResultTooLarge(size, "the value the task returned")
    return data


def call_args(job: Any, fn: Any, req: dict[str, Any], session: "Session") -> tuple[list[Any], dict[str, Any]]:
    """The positional and keyword arguments of ``fn`` for ``job``: the built-ins it asks for, the
    chunk's and shared arrays by name (``arrays_as_kwargs``), then the job's own arguments, and
    ``state`` (what the run's --setup returned) where it takes it."""
    from gpupool.agent.task import array_kwargs, build_kwargs, takes
    from gpupool.jobs.codec import decode

    builtins = session.builtins(job, req)
    kwargs = build_kwargs(fn, job, builtins)
    if job.arrays_as_kwargs:
        kwargs = array_kwargs(fn, job, kwargs, builtins)
    if job.setup is not None and job.setup_args is None and takes(fn, "state"):
        kwargs["state"] = session.state
    return (decode(job.args) if job.encoded else list(job.args)), kwargs


def chunk_calls(job: Any, fn: Any, req: dict[str, Any], session: "Session"
                ) -> Callable[[int], tuple[list[Any], dict[str, Any]]]:
    """``call_args`` of the ``i``-th chunk of batch ``job`` (its ``chunk_id``, its kwargs
    ``job.chunk_kwargs(i)``), what its chunks share found once: the built-ins other than
    ``chunk_id``, the positional arguments, ``state``; a chunk then costs a dict. A kwarg holding
    a list or a dict is a fresh copy for each chunk, as each single chunk's is its own (a task may
    change it). Where the arguments are built otherwise (arrays passed by name, an Executor call's
    encoded ones, positional ones holding lists or dicts), each chunk's are a single chunk's, built
    by ``call_args`` from a job of its own: the same arguments, at a single chunk's cost."""
    import dataclasses

    from gpupool.agent.task import takes, wanted_builtins

    if job.arrays_as_kwargs or job.encoded or any(isinstance(a, (list, dict)) for a in job.args):
        def alone(i: int) -> tuple[list[Any], dict[str, Any]]:
            one = dataclasses.replace(job, chunk_id=job.chunk_id + i, kwargs=job.chunk_kwargs(i),
                                      params=job.chunk_params(i), batch=None, batch_params=None)
            return call_args(one, fn, req, session)
        return alone
    wanted = wanted_builtins(fn, job)
    named = "chunk_id" in wanted
    fixed = {k: make() for k, make in session.builtins(job, req).items() if k in wanted and k != "chunk_id"}
    tail = {"state": session.state} if job.setup is not None and job.setup_args is None and takes(fn, "state") else {}
    args, first, kwargs, params = list(job.args), job.chunk_id, job.kwargs, job.batch_params
    changeable = {k: v for k, v in kwargs.items() if isinstance(v, (list, dict))}
    text = json.dumps(changeable) if changeable else None

    def call(i: int) -> tuple[list[Any], dict[str, Any]]:
        user = kwargs if text is None else {**kwargs, **json.loads(text)}
        if params is not None:
            user = {**user, **params[i]}
        return args, ({"chunk_id": first + i, **fixed, **user, **tail} if named else {**fixed, **user, **tail})
    return call


ARRAYS_FORM = {tuple: "tuple", list: "list"}  # a returned sequence of arrays, saved as arr_0, arr_1, ...


def returned_arrays(value: Any) -> tuple[dict[str, Any], str | None] | None:
    """The arrays to save as the chunk's ``.npz`` and the form they came in (None: a dict), or
    None when ``value`` is not a dict, tuple or list of numpy arrays only."""
    if "numpy" not in sys.modules:  # no job imported it: no value holds an array (a worker imports it only so)
        return None
    from gpupool.jobs.npzio import check_arrays

    form = ARRAYS_FORM.get(type(value))
    if form is not None and value and all(type(v).__module__ == "numpy" for v in value):
        import numpy as np

        if not all(isinstance(v, np.ndarray) for v in value):
            return None
        arrays = check_arrays({f"arr_{i}": v for i, v in enumerate(value)})
        return (arrays, form) if arrays is not None else None
    arrays = check_arrays(value)
    return (arrays, None) if arrays is not None else None


class Session:
    """What one worker process keeps for the run it serves: the run, its callables and shared
    data, what its --setup returned, and the source files its chunks imported."""

    def __init__(self, preloaded: tuple[str, ...] = ()) -> None:
        from gpupool.agent.sources import SourceWatch
        from gpupool.agent.task import SharedCache, TaskCache

        self.tasks, self.shared, self.watch = TaskCache(), SharedCache(), SourceWatch()
        self.preloaded = preloaded  # libraries imported before the first job (a spare's)
        for name in preloaded:
            self.watch.watch(sys.modules[name])
        self.run: tuple[str, str | None] | None = None  # (run, epoch) of the first job
        self.state: Any = None
        self.set_up = False
        self.in_setup = False
        self.notify: Callable[[dict[str, Any]], None] = lambda note: None  # a note to the agent (see save_arrays)
        self.computed: float | None = None  # when the job function returned (before its arrays were saved)
        self._spool: Any = None  # the spool of the chunk logs (see spool_at)
        self._scratch: tuple[str, int] | None = None  # (path, descriptor) of the agent's scratch output file

    def scratch(self, base: str, path: str) -> int:
        """The descriptor of the agent's scratch output file ``path`` (see ``ChunkOutput``), opened
        once by this worker (to append, no link followed)."""
        if self._scratch is None or self._scratch[0] != path:
            f = self.spool_at(base).open_log(Path(path))
            if self._scratch is not None:
                os.close(self._scratch[1])
            self._scratch = (path, os.dup(f.fileno()))
            f.close()
        return self._scratch[1]

    def spool_at(self, base: str) -> Any:
        """The ``Spool`` at ``base`` (made once: its checks cost a few system calls), whose
        ``open_log`` opens the chunk logs (see ``ChunkOutput``)."""
        if self._spool is None or str(self._spool.base) != base:
            from gpupool.jobs.paths import Spool

            self._spool = Spool(base)
        return self._spool

    def builtins(self, job: Any, req: dict[str, Any]) -> dict[str, Any]:
        """Each built-in argument, as a thunk (shared or chunk data is only loaded when asked for)."""
        def data() -> Any:
            from gpupool.jobs.npzio import load_npz  # numpy: in the workers of runs with data only

            return load_npz(job.data) if job.data else None

        def gpu_id() -> int:  # visible_gpu_id: the index CUDA gives the agent's GPU in this process
            return 0 if job.visible_gpu_id and str(req["device"]).startswith("cuda") else req["gpu_id"]

        return {
            "chunk_id": lambda: job.chunk_id,
            "total_chunks": lambda: job.total_chunks,
            "gpu_id": gpu_id,
            "device": lambda: req["device"],
            "shared": lambda: self.shared.get(job.shared) if job.shared else None,
            "data": data,
        }

    def restart_reason(self, job: Any) -> tuple[str, bool] | None:
        """Why ``job`` must run in a fresh worker instead (and whether that one must not be a
        preloaded spare), or None: this worker serves another run, or a source file it imported
        changed, or (a spare's first job) the run's folder has a module named like one it preloaded."""
        key = (job.run, job.epoch)
        if self.run is None:
            if shadow := self._shadowed(job.workdir):
                return f"the run's folder {job.workdir} has its own {shadow!r}, which this spare worker " \
                       f"imported from the libraries", True
            self.run = key
        elif key != self.run:
            return f"this worker serves run {self.run[0]} (epoch {self.run[1]})", False
        changed = self.watch.changed()
        if changed is not None:
            return f"{changed} changed since this worker imported it", False
        return None

    def _shadowed(self, workdir: str | None) -> str | None:
        """A preloaded library name that ``workdir`` (first on the path of the run's chunks) has a module of."""
        if not workdir or not self.preloaded:
            return None
        import importlib.machinery

        for name in self.preloaded:
            try:
                if importlib.machinery.PathFinder.find_spec(name, [workdir]) is not None:
                    return name
            except (ImportError, ValueError, OSError):
                continue
        return None

    def setup(self, job: Any, req: dict[str, Any]) -> None:
        """Call the run's --setup (an Executor's initializer) once, before its first chunk."""
        if job.setup is None or self.set_up:
            return
        from gpupool.agent.task import setup_kwargs
        from gpupool.jobs.codec import decode

        fn = self.tasks.get(job.setup, job.workdir)
        if job.setup_args is not None:  # initializer(*initargs), as ProcessPoolExecutor calls it
            args, kwargs = decode(job.setup_args), {}
        else:
            args, kwargs = [], setup_kwargs(fn, job, self.builtins(job, req))
        self.in_setup = True
        self.state = fn(*args, **kwargs)
        self.in_setup = False
        self.set_up = True


def run_one(req: dict[str, Any], job: Any, session: Session) -> dict[str, Any]:
    from gpupool.jobs.descriptor import JOB_MARK

    print(f"{JOB_MARK} {job.run} chunk {job.chunk_id} attempt {job.attempt}", flush=True)  # in the worker log
    with ChunkOutput(req, job, session):  # what the setup, the import and the call print: the chunk's log
        session.setup(job, req)
        fn = session.tasks.get(job.target, job.workdir)
        args, kwargs = call_args(job, fn, req, session)
        value = fn(*args, **kwargs)
    session.computed = time.time()
    value, tmp, form = kept(value, lambda: Path(req["arrays_path"]), req, session)
    return {"ok": True, "value": value, "arrays_tmp": tmp, **({"arrays_form": form} if form else {})}


def kept(value: Any, final: Callable[[], Path], req: dict[str, Any], session: Session
         ) -> tuple[Any, str | None, str | None]:
    """What the task returned, as a reply carries it: (the value as JSON, None, None), or (None,
    the temp file of its arrays, their form) where it is a dict (tuple, list) of numpy arrays,
    saved beside ``final()`` (``save_arrays``). TypeError where it can be neither."""
    found = returned_arrays(value)
    if found is not None:
        arrays, form = found
        return None, str(save_arrays(final(), arrays, session.notify, req.get("spool"))), form
    try:
        return jsonable(value), None, None
    except Exception as e:
        from gpupool.jobs.codec import CodecError

        if not isinstance(e, CodecError):  # too large, too deep: as it is
            raise
        raise TypeError(f"the task returned a {type(value).__name__}, which is neither a dict (or tuple or list) of "
                        f"numpy arrays nor a value that can travel back ({e})") from None


PROGRESS_EVERY = 0.1  # a batch with a time-out says at most this often which chunk it starts (run_batch)


def run_batch(req: dict[str, Any], job: Any, session: Session) -> dict[str, Any]:
    """A batch's chunks (``jobs.batches``), one after another in this request: the run's --setup
    and the task's import once, then each chunk called with its own arguments (``chunk_calls``).
    Each gives its value (or its arrays, saved as a single chunk's are) or its error, and its
    duration; its error is the batch's end only where it is the GPU's (``gpu_fault``, or a context
    found unusable): the chunks after it are not run (``b``), and where the context is unusable
    (``poisoned``) the worker exits after the reply (``last_reply``). Their output goes to one log,
    the batch's (``ChunkOutput``); a failed setup or import fails the whole batch (``handle``)."""
    from gpupool.jobs.descriptor import JOB_MARK

    print(f"{JOB_MARK} {job.run} {chunk_words(job)} attempt {job.attempt}", flush=True)  # in the worker log
    count, first, me = job.batch, job.chunk_id, _worker_pid
    codes: list[str] = []
    values: list[Any] = []
    durations: list[float | None] = []
    errors: dict[str, Any] = {}
    arrays: dict[str, list[Any]] = {}
    out: dict[str, Any] = {}
    npz = session.spool_at(req["spool"]).result_npz
    clock = time.perf_counter
    noted = -math.inf if job.timeout is not None else math.inf  # progress notes only where a time-out runs
    with ChunkOutput(req, job, session):
        session.setup(job, req)
        fn = session.tasks.get(job.target, job.workdir)
        call = chunk_calls(job, fn, req, session)
        for i in range(count):
            begun, took = clock(), None
            if begun - noted >= PROGRESS_EVERY:  # the runner's time-out of a chunk runs from here
                session.notify({"progress": first + i})
                noted = begun
            try:
                args, kwargs = call(i)
                value = fn(*args, **kwargs)
                took = clock() - begun
                if me is not None and os.getpid() != me:
                    return out  # a child the job forked returned: it leaves quietly (see main)
                value, tmp, form = kept(value, lambda: npz(job.run, first + i, job.attempt), req, session)
            except BaseException as e:  # SystemExit and KeyboardInterrupt from task code too
                if me is not None and os.getpid() != me:
                    raise  # a child the job forked: it exits as Python makes it
                took = clock() - begun if took is None else took
                failure, fault = judged(e, req)
            else:
                codes.append("o")
                values.append(value)
                durations.append(round(took, 6))
                if tmp is not None:
                    arrays[str(first + i)] = [tmp, os.stat(tmp).st_size, form]
                continue
            failure = checked(failure, fault)  # out of the except block: the chunk's frames are let go
            codes.append("e")
            values.append(None)
            durations.append(round(took, 6))
            errors[str(first + i)] = failure.to_dict()
            if fault is not None or failure.poisoned:  # the GPU's: the chunks after it go back, unrun
                if failure.poisoned:
                    out["poisoned"] = f"{failure.poisoned}, in chunk {first + i}"
                break
    back = count - len(codes)
    return {"ok": True, "batch": {"codes": "".join(codes) + "b" * back, "values": values + [None] * back,
                                  "durations": durations + [None] * back, "errors": errors, "arrays": arrays, **out}}


class ChunkOutput:
    """For the time of a job: its stdout and stderr go to the agent's scratch output file
    (``req["scratch"]``, ``Spool.scratch_log``: emptied at the job's start), and what the job wrote
    there is then appended to its chunk's log (``req["log"]``) after a header line naming the
    attempt (``jobs.descriptor.attempt_header``, as script jobs get); then back to the worker log.
    A job that prints nothing leaves no chunk log: no file per chunk of a run of short silent
    chunks, and no file creation on the way of each. File descriptors 1 and 2 are pointed there
    (``os.dup2``), so what C code writes and what the programs the job starts (``os.system``,
    ``subprocess``) print goes there too; Python's and C's buffers are flushed on each side of the
    switch. An agent runs one job at a time, so one scratch file serves all its workers. A worker
    killed by its job leaves what the job printed in the scratch file, and the agent moves it to
    the chunk's log (``agent.runner.Runner._printed``). A child the job forked keeps writing to the
    scratch file (it never goes back to the worker's loop): what it writes after the next job
    starts is lost. Both files are opened by ``Spool.open_log`` (no link followed, the folder's mode);
    an OSError (its errno kept: the agent waits out a full disk) fails the job unrun. Without
    ``req["scratch"]`` (a request of an older agent) nothing is redirected."""

    def __init__(self, req: dict[str, Any], job: Any, session: Session) -> None:
        self.req, self.job, self.session = req, job, session
        self.saved: tuple[int, int] | None = None  # the worker log's descriptors, while the job runs
        self.pid = os.getpid()

    def __enter__(self) -> "ChunkOutput":
        if not self.req.get("scratch"):
            return self
        flush_output()
        try:
            out = self.session.scratch(self.req["spool"], self.req["scratch"])
            os.ftruncate(out, 0)
        except OSError as e:
            raise OSError(e.errno, f"cannot open the scratch file {self.req['scratch']} for the job's output: "
                                   f"{e.strerror or e}") from e
        saved = os.dup(1), os.dup(2)  # not inherited by what the job starts
        os.dup2(out, 1)
        os.dup2(out, 2)
        self.saved, self.pid = saved, os.getpid()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.saved is None:
            return
        flush_output()
        if os.getpid() != self.pid:  # a child the job forked: it never writes to the worker log
            return
        for fd, old in zip((1, 2), self.saved):
            os.dup2(old, fd)
            os.close(old)
        self.saved = None
        spool = self.session.spool_at(self.req["spool"])
        try:
            job = self.job
            batch = "" if job.batch is None else f"batch of chunks {job.chunk_id}..{job.chunk_id + job.batch - 1}, "
            spool.keep_output(Path(self.req["scratch"]), Path(self.req["log"]), job.attempt,
                              f"{job.target} ({batch}worker pid {os.getpid()})")
        except OSError as e:  # a full disk: the output is lost, never the job's value
            print(f"worker {os.getpid()}: the output of {self.job.run} {chunk_words(self.job)} could not be "
                  f"kept in {self.req['log']}: {e}", file=sys.stderr, flush=True)


_fflush: Any = None  # libc's fflush, found once (False: none)


def flush_output() -> None:
    """Flush Python's stdout and stderr, and C's stdio buffers (``fflush(NULL)``), never raising
    (a job may have closed or replaced ``sys.stdout``; a full disk loses what was buffered)."""
    global _fflush
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    if _fflush is None:
        try:
            _fflush = ctypes.CDLL(None).fflush
        except (OSError, AttributeError):
            _fflush = False
    if _fflush:
        _fflush(None)


def cut(text: str, limit: int = TEXT_LIMIT) -> str:
    """``text``, or its head and tail with a note between them when it is over ``limit``."""
    if len(text) <= limit:
        return text
    tail = limit // 4
    return f"{text[:limit - tail]} ... [cut: {len(text)} characters in all] ... {text[-tail:]}"


def error_of(exc: BaseException) -> dict[str, Any]:
    """The failed reply's error (``jobs.outcomes.Failure``, as it crosses the pipe): see ``failure_of``."""
    return failure_of(exc).to_dict()


def failure_of(exc: BaseException) -> Failure:
    """The failed job's ``Failure``; a job's huge exception message is cut (results have a size limit).
    Never raises, whatever ``exc`` does: a ``str()`` that raises gives ``<str() failed: ...>``, a
    traceback that cannot be formatted gives what of it can be had, and ``args`` or attributes that
    cannot be read or encoded are left out (see ``master.remote``, which raises it again)."""
    from gpupool.jobs.outcomes import Failure

    kind = type(exc)
    code = _safely(lambda: _errno_of(exc), None)
    return Failure(kind.__name__, cut(_text_of(exc)), cut(_traceback_of(exc)), module=_name(kind, "__module__"),
                   qualname=_name(kind, "__qualname__"), errno=int(code) if isinstance(code, int) else None,
                   **_safely(lambda: _state_of(exc), {}))


def _safely(step: Any, fallback: Any) -> Any:
    """What ``step()`` returns, or ``fallback`` whatever it raises (a job's exception runs its own
    code when read: ``__str__``, properties, ``__repr__`` of what it holds; never the worker's death)."""
    try:
        return step()
    except BaseException:  # SystemExit from an exception's own __str__ too
        return fallback


def _text_of(exc: BaseException) -> str:
    """``str(exc)``, or ``<str() failed: TYPE: MESSAGE>`` where that raises (``master.remote.text_of``
    says the same of a rebuilt one: the two must agree)."""
    try:
        text = str(exc)
        return text if type(text) is str else str.__str__(text)  # a str subclass's methods may be anything
    except BaseException as e:
        failure = e
    why = _safely(lambda: str.__str__(str(failure)), "?")
    return f"<str() failed: {type(failure).__name__}: {why}>"


def _traceback_of(exc: BaseException) -> str:
    """The exception's traceback as Python prints it, or, where that fails (an odd ``__notes__``,
    a cause that cannot be shown), its frames and its type and message."""
    try:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException as e:
        why = f"(its full traceback could not be formatted: {type(e).__name__}: {_text_of(e)})"
    frames = _safely(lambda: "".join(traceback.format_tb(exc.__traceback__)), "")
    return f"Traceback (most recent call last):\n{frames}{type(exc).__name__}: {_text_of(exc)}\n{why}\n"


def _name(kind: type, attribute: str) -> str:
    """A class's ``__module__`` or ``__qualname__`` as text (a class may set them to anything)."""
    value = _safely(lambda: getattr(kind, attribute), None)
    return value if type(value) is str else _safely(lambda: str.__str__(str(value)), "?")


def _state_of(exc: BaseException) -> dict[str, Any]:
    """The exception's ``args`` and attributes as pickle keeps them (read past any override of
    ``args`` or ``__dict__``), encoded (``jobs.codec``), so that the caller of an Executor can raise
    the same exception again: each attribute left out where it cannot travel, the ``args`` where one
    of them cannot; all of it within ``TEXT_LIMIT``."""
    out: dict[str, Any] = {}
    args = _safely(lambda: list(BaseException.args.__get__(exc)), None)
    found = _encoded(args) if args is not None else None
    room = TEXT_LIMIT
    if found is not None and found[1] <= room:
        out["args"], room = found[0], room - found[1]
    attrs: dict[str, Any] = {}
    own = _safely(lambda: dict(BaseException.__dict__["__dict__"].__get__(exc)), {})
    for key, value in own.items():
        if type(key) is not str or key.startswith("__"):
            continue
        found = _encoded({key: value})
        if found is not None and found[1] <= room:
            attrs.update(found[0])
            room -= found[1]
    if attrs:
        out["attrs"] = attrs
    return out


def _encoded(value: Any) -> tuple[Any, int] | None:
    """``value`` encoded (``jobs.codec``) and the length of its JSON, or None where it cannot travel
    (or its parts raise while they are looked at)."""
    from gpupool.jobs.codec import encode

    try:
        data = encode(value)
        return data, len(json.dumps(data))
    except BaseException:
        return None


def _errno_of(exc: BaseException) -> int | None:
    """The errno of ``exc`` or of the OSError it was raised from or while handling (a library's
    own exception around a failed write), nearest first."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and isinstance(e.errno, int):
            return e.errno
        e = e.__cause__ if e.__cause__ is not None else e.__context__  # never bool() of an exception
    return None


# GPU failures, by the text of the exception (and of those it was raised from). Messages of
# torch ("CUDA error: ..."), CuPy (cudaError...), the driver API (CUDA_ERROR_...), cuBLAS/cuDNN.
OUT_OF_MEMORY = re.compile(r"out of memory|OUT_OF_MEMORY|cudaErrorMemoryAllocation|CUBLAS_STATUS_ALLOC_FAILED|"
                           r"CUDNN_STATUS_ALLOC_FAILED", re.I)
# The GPU or its driver is unusable, whatever the job does: no device, a driver that does not
# load or does not match, a device lost or with an uncorrectable ECC error.
DRIVER_ERROR = re.compile(
    r"no CUDA-capable device|CUDA driver|NVIDIA driver|driver version is insufficient|driver shutting down|"
    r"CUDA error: (?:initialization|unknown) error|busy or unavailable|uncorrectable ECC|GPU is lost|"
    r"fallen off the bus|cudaError(?:NoDevice|InsufficientDriver|InitializationError|DevicesUnavailable|"
    r"SystemNotReady|SystemDriverMismatch|ECCUncorrectable|Unknown)|"
    r"CUDA_ERROR_(?:NO_DEVICE|NOT_INITIALIZED|DEINITIALIZED|ECC_UNCORRECTABLE|SYSTEM_DRIVER_MISMATCH|UNKNOWN)",
    re.I)
# A kernel of the job failed, which leaves the context unusable ("sticky" errors: a device-side
# assert, an illegal address or instruction, a launch failure or time-out), or any other CUDA
# error: a fresh worker costs a process start, a context kept poisoned costs every later chunk.
KERNEL_ERROR = re.compile(
    r"CUDA error|cudaError|CUDA_ERROR_|device-side assert|illegal memory access|illegal address|"
    r"illegal instruction|misaligned address|unspecified launch failure|launch timed out|invalid program counter|"
    r"hardware stack error|CUBLAS_STATUS_EXECUTION_FAILED|CUBLAS_STATUS_INTERNAL_ERROR|"
    r"CUDNN_STATUS_EXECUTION_FAILED|CUDNN_STATUS_INTERNAL_ERROR", re.I)


# A job that asks for CUDA on an agent without a GPU (--cpu, or a host without one): what torch,
# CuPy and the driver say then ("No CUDA GPUs are available", "Torch not compiled with CUDA
# enabled", "Found no NVIDIA driver", "invalid device ordinal"). Said first in the message.
ASKS_CUDA = re.compile(r"CUDA|cuda:\d|NVIDIA|device ordinal", re.I)
NO_GPU_HERE = ("the job asked for CUDA on an agent without a GPU (device 'cpu'); build the device from the "
               "'device' argument the agent passes (cuda:0 on a GPU agent, cpu here), or run it on GPU agents")


def _cuda() -> Any:
    """``torch.cuda`` if the job code has imported torch (never imported here), else None."""
    return getattr(sys.modules.get("torch"), "cuda", None)


def gpu_fault(exc: BaseException) -> GpuFault | None:
    """What kind of GPU failure ``exc`` is (``jobs.outcomes.GpuFault``): ``OUT_OF_MEMORY``, ``DRIVER``
    (see ``DRIVER_ERROR``), ``KERNEL`` (``KERNEL_ERROR``), or None (not a GPU failure), judged on
    it and on the exceptions it was raised from or while handling, nearest first."""
    from gpupool.jobs.outcomes import GpuFault

    oom = getattr(_cuda(), "OutOfMemoryError", None)
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(oom, type) and isinstance(e, oom):
            return GpuFault.OUT_OF_MEMORY
        text = f"{type(e).__name__}: {_text_of(e)[:TEXT_LIMIT]}"
        for kind, pattern in ((GpuFault.OUT_OF_MEMORY, OUT_OF_MEMORY), (GpuFault.DRIVER, DRIVER_ERROR),
                              (GpuFault.KERNEL, KERNEL_ERROR)):
            if pattern.search(text):
                return kind
        e = e.__cause__ if e.__cause__ is not None else e.__context__  # never bool() of an exception
    return None


def context_error() -> str | None:
    """Why this process's CUDA context is unusable (``torch.cuda.synchronize()`` raises), or
    None: it works, or torch is not imported, or CUDA was never initialised here."""
    cuda = _cuda()
    if cuda is None:
        return None
    try:
        if not cuda.is_initialized():
            return None
        cuda.synchronize()
    except Exception as e:
        return f"{type(e).__name__}: {cut(str(e), 1000)}"
    return None


def free_memory() -> None:
    """After an out-of-memory error: what the failed job held goes back before the next job
    (its frames are gone with its exception; ``gc`` finds the cycles, ``empty_cache`` hands
    torch's cached blocks back to the driver, for other processes too)."""
    gc.collect()
    cuda = _cuda()
    try:
        if cuda is not None and cuda.is_initialized():
            cuda.empty_cache()
    except Exception as e:  # never the worker's death
        print(f"warning: torch.cuda.empty_cache() failed after an out-of-memory error: {e}", file=sys.stderr)


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[:limit] + "..."


def after_failure(err: Failure, fault: GpuFault | None) -> Failure:
    """After a failed job: is the GPU still usable by this process? Adds to the job's error
    (its own type and message stay) ``gpu_error``, the kind of GPU failure, and ``poisoned``,
    why this worker must not run another job (it exits after the reply):

    - ``OUT_OF_MEMORY``: not poisoned; the memory is freed (``free_memory``) before the next job;
    - ``DRIVER``, ``KERNEL`` (the job's own error, see ``gpu_fault``): poisoned;
    - ``CONTEXT``: the job's error was no CUDA error, yet the context is found unusable by
      ``torch.cuda.synchronize()`` (checked after every failed job once torch has initialised
      CUDA here): poisoned (``DRIVER`` instead when what it raised names the driver)."""
    from gpupool.jobs.outcomes import GpuFault

    why = None
    if fault in (GpuFault.DRIVER, GpuFault.KERNEL):
        why = f"the job's {err.type}: {_first_line(err.message)}"
    broken = context_error() if why is None else None
    if broken is not None:
        fault = GpuFault.DRIVER if DRIVER_ERROR.search(broken) else GpuFault.CONTEXT
        why = f"torch.cuda.synchronize() failed after the job's {err.type}: {_first_line(broken)}"
    if fault is not None:
        err = err.replace(gpu_error=fault.value)
    if why is not None:
        err = err.replace(poisoned=why)
    elif fault is GpuFault.OUT_OF_MEMORY or err.type == "MemoryError":
        free_memory()
    return err


_worker_pid: int | None = None  # set by main(): a forked child has another pid


def save_arrays(final: Path, arrays: Any, notify: Callable[[dict[str, Any]], None], base: str | None = None) -> Path:
    """Save a job's arrays to a temp file beside ``final`` (the agent commits it); returns its path.
    On a full disk (or quota) the value is kept and the save tried again, 0.5 s doubling up to 30 s,
    until space returns: the chunk is not computed again. The agent is told at each try (a note,
    ``{"waiting": "<why>"}``): the job's time-out no longer runs (it computed in time) and its
    heartbeat says why it waits. Nothing partial is left between tries (``jobs.atomic.writing``).
    With ``base`` (BASE), a folder on the way below it that is a link (or no folder) is refused,
    as the commit refuses it: nothing is written outside BASE (an OSError, ELOOP)."""
    import errno

    from gpupool.jobs.atomic import DISK_FULL, linked_folder, writing
    from gpupool.jobs.npzio import save_npz

    found = linked_folder(Path(base), final.parent) if base else None
    if found is not None:
        raise OSError(errno.ELOOP, f"is a {found[1]}; results are never written through a link", str(found[0]))
    pause = 0.0
    while True:
        try:
            with writing(final, fsync=False) as (f, tmp):  # no fsync: see results.sync_run
                save_npz(f, arrays)
            return tmp
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            pause = min(30.0, max(0.5, pause * 2))
            notify({"waiting": f"cannot save the arrays as {final.name}: {e.strerror}; the value is kept, "
                               f"saved again in {pause:g} s"})
            time.sleep(pause)


def handle(request: dict[str, Any], session: Session) -> dict[str, Any]:
    """One request to one reply; a job's exception becomes a failed reply, never our death."""
    from gpupool.jobs.descriptor import Job

    started = time.time()
    fault = failure = None
    job = None
    try:
        job = Job.from_dict(request["job"])
        restart = session.restart_reason(job)
        if restart is not None:
            return {"ok": False, "restart": restart[0], **({"cold": True} if restart[1] else {})}
        reply = run_one(request, job, session) if job.batch is None else run_batch(request, job, session)
    except BaseException as e:  # SystemExit and KeyboardInterrupt from task code too
        if _worker_pid is not None and os.getpid() != _worker_pid:
            raise  # a child the job forked: it exits as Python makes it (sys.exit(3) gives 3)
        failure, fault = judged(e, request)
        if session.in_setup:  # this worker is left half set up: its last job (see main)
            session.in_setup = False
            failure = failure.replace(setup=job.setup, message=f"the run's setup {job.setup} failed: {failure.message}")
        reply = {"ok": False, "error": failure}
    finished = session.computed or time.time()
    session.computed = None
    if failure is not None:  # out of the except block: the job's frames (and tensors) are let go
        reply["error"] = checked(failure, fault).to_dict()
    try:
        libs = session.watch.scan()
    except Exception as e:  # never the reply's loss: the spare preloads less, a changed file goes unseen
        print(f"warning: listing what the job imported failed: {e!r}", file=sys.stderr)
        libs = []
    if libs:
        reply["libs"] = libs
    reply.update(started_at=started, finished_at=finished)
    return reply


def judged(exc: BaseException, request: dict[str, Any]) -> tuple[Failure, GpuFault | None]:
    """A job's exception as its ``Failure``, and the kind of GPU failure it is (or None); on an
    agent without a GPU, one that asked for CUDA says so first (``NO_GPU_HERE``)."""
    failure, fault = failure_of(exc), gpu_fault(exc)
    if request.get("device") == "cpu" and (fault or ASKS_CUDA.search(f"{type(exc).__name__}: "
                                                                      f"{_text_of(exc)[:TEXT_LIMIT]}")):
        failure = failure.replace(message=f"{NO_GPU_HERE}: {failure.message}")
    return failure, fault


def checked(failure: Failure, fault: GpuFault | None) -> Failure:
    """``after_failure``, which must never cost the reply."""
    try:
        return after_failure(failure, fault)
    except Exception as e:
        print(f"warning: checking the GPU after a failed job failed: {e!r}", file=sys.stderr)
        return failure


def last_reply(reply: dict[str, Any]) -> str | None:
    """Why the worker exits after sending ``reply`` (the agent then starts a fresh one), or None."""
    if reply.get("restart"):
        return f"a fresh worker is needed ({reply['restart']})"
    err = reply.get("error") if not reply.get("ok") else None
    if isinstance(err, dict) and err.get("poisoned"):
        return f"CUDA context unusable ({err['poisoned']})"
    if isinstance(err, dict) and err.get("setup"):
        return f"the run's setup {err['setup']} failed"
    if isinstance(reply.get("batch"), dict) and reply["batch"].get("poisoned"):
        return f"CUDA context unusable ({reply['batch']['poisoned']})"
    return None


def preload(names: list[str]) -> tuple[str, ...]:
    """A spare's libraries, imported before its first job; those that fail to import are left out."""
    import importlib

    done = []
    for name in names:
        try:
            importlib.import_module(name)
            done.append(name)
        except BaseException as e:  # a library that fails here fails the same way in the job that imports it
            print(f"spare worker: preloading {name} failed ({type(e).__name__}: {e}); left to the jobs",
                  file=sys.stderr, flush=True)
    return tuple(done)


def main() -> None:
    rfd, wfd, parent = (int(x) for x in sys.argv[1:4])
    agent = sys.argv[4] if len(sys.argv) > 4 else "-"
    _die_with_parent(parent)
    name = f"w:{agent[-13:]}"  # the agent id's end: its GPU
    set_title(title_for(agent, None), name)
    # The agent decides when we stop: Ctrl-C goes to the whole foreground group, and Slurm
    # sends SIGTERM to every process of a job step before its time limit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for fd in (rfd, wfd):  # programs the job runs do not hold our pipes (a fork still does)
        os.set_inheritable(fd, False)
    global _worker_pid
    me = _worker_pid = os.getpid()
    from gpupool.jobs.descriptor import IN_WORKER_ENV

    os.environ[IN_WORKER_ENV] = str(me)  # an Executor made by code imported here refuses to start
    preloaded = preload([n for n in (sys.argv[5] if len(sys.argv) > 5 else "").split(",") if n])
    for name in ("gpupool.jobs.atomic", "gpupool.jobs.codec", "gpupool.jobs.results"):  # what a first job needs
        __import__(name)  # (numpy: only in the workers of runs that use it)
    session = Session(preloaded)  # all a first job needs, made before it comes (a spare waits for it ready)
    rd, wr = os.fdopen(rfd, "rb"), os.fdopen(wfd, "wb", buffering=0)
    session.notify = lambda note: wr.write(json.dumps({"note": note}).encode() + b"\n")
    for line in rd:
        request = json.loads(line)
        set_title(title_for(agent, request.get("job")), name)
        reply = handle(request, session)
        sys.stdout.flush()
        sys.stderr.flush()
        if os.getpid() != me:  # a child the job forked returned into our loop: it is not the worker
            os._exit(0)
        wr.write(json.dumps(reply).encode() + b"\n")
        set_title(title_for(agent, None), name)
        why = last_reply(reply)
        if why is not None:  # the agent starts a fresh worker; what waits in our pipe is sent to it again
            print(f"worker {me}: {why}; exiting", file=sys.stderr, flush=True)
            os._exit(0)  # no teardown: CUDA calls in destructors would fail (or hang) in a poisoned context


if __name__ == "__main__":
    main()
