"""The GPU probe (pynvml), and which GPUs this process may use.

A device is a GPU, or a MIG device of a GPU in MIG mode (each MIG device is a device of its own,
with its own ``MIG-...`` UUID; a GPU in MIG mode is not one itself). Devices are told apart by
what is global on the host, never by an index: the UUID (what the worker's CUDA_VISIBLE_DEVICES
and the host-local GPU lock use) and the minor number (``/dev/nvidia<minor>``, what agent ids
use). NVML's index is not global: inside a Slurm job's device cgroup NVML and CUDA number the
job's GPUs from 0, and NVML's documentation says its index may not match CUDA's.

When a scheduler (Slurm, HTCondor) has set CUDA_VISIBLE_DEVICES, ``--gpu N`` indexes that list,
read as CUDA reads it (``visible_gpus``): indices, UUIDs, unique UUID prefixes, MIG UUIDs. An
entry that names no device is refused (``GpuConfigError``), never a silent run on the CPU.

Tests replace the probe: $GPUPOOL_FAKE_GPUS, a JSON list of ``{"name", "mem_total_gb",
"mem_used_gb", "util", "temp", "minor", "processes", "broken", "lost_if"}`` objects, replaces NVML
itself (``FakeProbe``); the stand-in
``pynvml`` of tests/fake_nvml keeps ``NvmlProbe`` and runs the real code path.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from gpupool.jobs.errors import SpoolError

GIB = 1024**3


@dataclass(frozen=True)
class Gpu:
    index: int  # NVML index of the GPU (of its parent GPU, for a MIG device): not global, see above
    token: str  # what to put in CUDA_VISIBLE_DEVICES for it: its UUID
    uuid: str
    name: str
    error: str | None = None  # NVML could not describe it (lost, no permission...): no agent may take it
    minor: int | None = None  # /dev/nvidia<minor>: the same in every cgroup of the host
    pci: str = ""  # PCI bus id
    mig: int | None = None  # a MIG device: its GPU instance id on the parent
    parent_uuid: str = ""  # a MIG device: its GPU's UUID

    @property
    def label(self) -> str:
        """The GPU part of the agent id: ``gpu<minor>`` or, for a MIG device, ``gpu<minor>-mig<gi>``."""
        n = self.index if self.minor is None else self.minor
        return f"gpu{n}" + ("" if self.mig is None else f"-mig{self.mig}")

    def describe(self) -> str:
        return f"GPU {self.label[3:]} ({self.name}, {self.uuid})"


class GpuConfigError(SpoolError):
    """CUDA_VISIBLE_DEVICES names a device this host does not have."""


class NoGpu:
    """The probe on a host without a usable NVIDIA driver."""

    why = "no NVIDIA GPU or driver found"

    def devices(self) -> list[Gpu]:
        """Every device in NVML order, a GPU in MIG mode replaced by its MIG devices; a GPU NVML
        cannot describe (lost, NO_PERMISSION) is kept in its place with its error."""
        return []

    def metrics(self, gpu: Gpu) -> dict[str, Any]:
        return {}

    def processes(self, gpu: Gpu) -> list[tuple[int, int | None]] | None:
        """(pid, bytes of GPU memory or None) of each compute process on ``gpu`` (NVML sees them
        across containers; their pids are the host's), or None when NVML cannot say."""
        return None


class NvmlProbe(NoGpu):
    def __init__(self, nv: Any = None) -> None:
        if nv is None:
            import pynvml as nv
        self.nv = nv
        nv.nvmlInit()
        self._handles: dict[str, Any] = {}  # uuid -> NVML handle, of the devices described

    def devices(self) -> list[Gpu]:
        out: list[Gpu] = []
        for i in range(self.nv.nvmlDeviceGetCount()):
            try:
                out += self._describe(i)
            except Exception as e:  # NVMLError_NoPermission, _GpuIsLost...: this GPU only
                out.append(unusable(i, e))
        return out

    def _describe(self, i: int) -> list[Gpu]:
        nv = self.nv
        h = nv.nvmlDeviceGetHandleByIndex(i)
        uuid = _text(nv.nvmlDeviceGetUUID(h))
        gpu = Gpu(i, uuid, uuid, _text(nv.nvmlDeviceGetName(h)), minor=self._optional(nv.nvmlDeviceGetMinorNumber, h),
                  pci=_text(self._optional(lambda x: nv.nvmlDeviceGetPciInfo(x).busId, h) or ""))
        self._handles[uuid] = h
        migs = self._mig_devices(h, gpu)
        return [gpu] if migs is None else migs

    def _mig_devices(self, h: Any, parent: Gpu) -> list[Gpu] | None:
        """The MIG devices of a GPU in MIG mode, or None when it is not in MIG mode."""
        nv = self.nv
        mode = self._optional(nv.nvmlDeviceGetMigMode, h)
        if mode is None or mode[0] != nv.NVML_DEVICE_MIG_ENABLE:
            return None
        out: list[Gpu] = []
        for j in range(nv.nvmlDeviceGetMaxMigDeviceCount(h)):
            try:
                m = nv.nvmlDeviceGetMigDeviceHandleByIndex(h, j)
            except nv.NVMLError as e:
                if e.value == nv.NVML_ERROR_NOT_FOUND:  # no MIG device at this index
                    continue
                raise
            uuid = _text(nv.nvmlDeviceGetUUID(m))
            gi = self._optional(nv.nvmlDeviceGetGpuInstanceId, m)
            out.append(Gpu(parent.index, uuid, uuid, _text(nv.nvmlDeviceGetName(m)), minor=parent.minor,
                           pci=parent.pci, mig=j if gi is None else gi, parent_uuid=parent.uuid))
            self._handles[uuid] = m
        if not out:  # kept in its place, refused with the reason
            return [Gpu(parent.index, parent.uuid, parent.uuid, parent.name, "in MIG mode with no MIG device (make "
                        "some: nvidia-smi mig -cgi ... -C)", parent.minor, parent.pci)]
        return out

    def _optional(self, fn: Any, h: Any) -> Any:
        """``fn(h)``, or None where this GPU or driver does not support it (a MIG device, an old driver)."""
        try:
            return fn(h)
        except self.nv.NVMLError as e:
            if e.value in (self.nv.NVML_ERROR_NOT_SUPPORTED, self.nv.NVML_ERROR_FUNCTION_NOT_FOUND):
                return None
            raise

    def _handle(self, gpu: Gpu) -> Any:
        h = self._handles.get(gpu.uuid)
        if h is None:
            h = self._handles[gpu.uuid] = self.nv.nvmlDeviceGetHandleByUUID(gpu.uuid)
        return h

    def metrics(self, gpu: Gpu) -> dict[str, Any]:
        """The figures for the heartbeat. A figure the device does not support (a MIG device has no
        utilisation) is None, shown as '-'; any other NVML error (GPU is lost) is raised."""
        nv, h = self.nv, self._handle(gpu)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        util = self._optional(nv.nvmlDeviceGetUtilizationRates, h)
        return {"name": _text(nv.nvmlDeviceGetName(h)), "uuid": gpu.uuid, "util": None if util is None else int(util.gpu),
                "mem_used": int(mem.used), "mem_total": int(mem.total),
                "temp": self._optional(lambda x: int(nv.nvmlDeviceGetTemperature(x, nv.NVML_TEMPERATURE_GPU)), h)}

    def processes(self, gpu: Gpu) -> list[tuple[int, int | None]] | None:
        procs = self._optional(self.nv.nvmlDeviceGetComputeRunningProcesses, self._handle(gpu))
        return None if procs is None else [(int(p.pid), p.usedGpuMemory) for p in procs]


class FakeGpuIsLost(RuntimeError):
    """What NVML raises as NVMLError_GpuIsLost when a GPU falls off the bus (fake probe only)."""


class FakeProbe(NoGpu):
    def __init__(self, spec: list[dict[str, Any]]) -> None:
        self.spec = spec

    def devices(self) -> list[Gpu]:
        out = []
        for i, s in enumerate(self.spec):
            if s.get("broken"):  # tests: a GPU NVML cannot describe
                out.append(unusable(i, FakeGpuIsLost(f"NVML cannot describe GPU {i} (the fake probe's 'broken')")))
            else:
                out.append(Gpu(i, f"GPU-fake-{i}", f"GPU-fake-{i}", s.get("name", "Fake GPU"), minor=s.get("minor", i)))
        return out

    def metrics(self, gpu: Gpu) -> dict[str, Any]:
        s = self.spec[gpu.index]
        if s.get("lost_if") and os.path.exists(s["lost_if"]):  # tests: a GPU lost at run time
            raise FakeGpuIsLost("GPU is lost (the fake probe's lost_if file exists)")
        return {"name": s.get("name", "Fake GPU"), "uuid": gpu.uuid, "util": s.get("util", 0), "temp": s.get("temp", 40),
                "mem_used": int(s.get("mem_used_gb", 0) * GIB), "mem_total": int(s.get("mem_total_gb", 16) * GIB)}

    def processes(self, gpu: Gpu) -> list[tuple[int, int | None]] | None:
        return [(int(p["pid"]), None if p.get("mem_mb") is None else int(p["mem_mb"] * 2**20))
                for p in self.spec[gpu.index].get("processes", [])]


def unusable(index: int, e: BaseException) -> Gpu:
    """A GPU NVML cannot describe: it keeps its place in ``--gpu N`` numbering, with its error,
    so that only its own agent is refused."""
    return Gpu(index, str(index), f"unusable-{index}", "unusable", f"{type(e).__name__}: {e}")


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def make_probe() -> NoGpu:
    """The fake probe if $GPUPOOL_FAKE_GPUS is set, else NVML, else NoGpu."""
    fake = os.environ.get("GPUPOOL_FAKE_GPUS")
    if fake is not None:
        return FakeProbe(json.loads(fake))
    try:
        probe = NvmlProbe()
        probe.nv.nvmlDeviceGetCount()
        return probe
    except Exception as e:  # no driver, no library, no device: run on the CPU
        p = NoGpu()
        p.why = f"NVML unavailable ({type(e).__name__}: {e})"
        return p


def visible_gpus(probe: NoGpu, env: dict[str, str] | None = None) -> list[Gpu]:
    """The devices this process may use, in the order ``--gpu N`` counts them: all of them, or
    those CUDA_VISIBLE_DEVICES names, matched as CUDA matches them (an index: NVML's, a GPU in MIG
    mode giving its MIG devices; a ``GPU-`` or ``MIG-`` UUID or a unique prefix of one; the old
    ``MIG-GPU-<uuid>/<gi>/<ci>`` form). An empty value, ``-1`` or ``NoDevFiles`` ends the list ("no GPU");
    an entry that names no device, or one already named, raises GpuConfigError."""
    env = os.environ if env is None else env
    devices = probe.devices()
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        return devices
    out: list[Gpu] = []
    for token in (t.strip() for t in cvd.split(",")):
        if token in ("", "-1", "NoDevFiles"):  # NoDevFiles: Slurm's "no GPU allocated"
            break  # CUDA stops here: what follows is invisible
        found = _match(token, devices)
        if not found:
            raise GpuConfigError(f"CUDA_VISIBLE_DEVICES={cvd!r}: {_why_none(token, devices, probe)}; CUDA would not "
                                 "use it either. Fix CUDA_VISIBLE_DEVICES (nvidia-smi -L lists the UUIDs), or run CPU "
                                 "agents (--cpu)")
        again = [g for g in found if g in out]
        if again:
            raise GpuConfigError(f"CUDA_VISIBLE_DEVICES={cvd!r}: {token!r} names {again[0].describe()} a second time")
        out += found
    return out


def _match(token: str, devices: list[Gpu]) -> list[Gpu]:
    """The devices one CUDA_VISIBLE_DEVICES entry names ([] for none); raises GpuConfigError for a
    UUID prefix that several GPUs share."""
    if token.isdigit():
        return [g for g in devices if g.index == int(token)]
    if token.startswith("MIG-GPU-") and "/" in token:  # MIG-GPU-<uuid>/<gi>/<ci> (drivers before R470)
        parent, _, rest = token[4:].partition("/")
        gi = rest.split("/")[0]
        return [g for g in devices if g.parent_uuid.startswith(parent) and gi.isdigit() and g.mig == int(gi)][:1]
    if token.startswith("MIG-"):
        hits = [g for g in devices if g.mig is not None and g.uuid.startswith(token)]
    elif token.startswith("GPU-"):
        hits = [g for g in devices if (g.parent_uuid or g.uuid).startswith(token)]
    else:
        return []
    parents = {g.parent_uuid or g.uuid for g in hits} if token.startswith("GPU-") else {g.uuid for g in hits}
    if len(parents) > 1:
        raise GpuConfigError(f"CUDA_VISIBLE_DEVICES entry {token!r} is the start of {len(parents)} UUIDs "
                             f"({', '.join(sorted(parents))}): give enough of it to name one")
    return hits


def _why_none(token: str, devices: list[Gpu], probe: NoGpu) -> str:
    if not devices:
        return f"entry {token!r} names a GPU, but this host shows none ({getattr(probe, 'why', 'no GPU')})"
    kind = "an NVML index" if token.isdigit() else "a GPU or MIG UUID" if token[:4] in ("GPU-", "MIG-") else None
    if kind is None:
        return f"entry {token!r} is neither a GPU index nor a GPU-/MIG- UUID"
    seen = "; ".join(f"{g.uuid} (NVML index {g.index})" for g in devices[:8])
    return f"entry {token!r}, {kind}, names no device of this host (it has: {seen})"


def free_gb(probe: NoGpu, gpu: Gpu) -> float:
    m = probe.metrics(gpu)
    if m.get("mem_total") is None or m.get("mem_used") is None:
        return float("inf")
    return (m["mem_total"] - m["mem_used"]) / GIB
