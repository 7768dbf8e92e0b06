"""A stand-in for ``pynvml`` (nvidia-ml-py), for tests only: the NVML calls ``agent.gpu.NvmlProbe``
makes, behaving as NVML does on a real host, so that the probe and everything above it run in CI
through their real code path. Put ``tests/fake_nvml`` first on PYTHONPATH (or load this file);
the host it describes comes from the environment, read at ``nvmlInit``:

``$FAKE_NVML``: JSON ``{"driver": "ok" | "not_loaded" | "no_library", "gpus": [GPU, ...]}``, each GPU
  ``{"name", "uuid", "pci", "minor", "mem_total_gb", "mem_used_gb", "util", "temp",
    "error": "GPU_IS_LOST" | "NO_PERMISSION" | ...,   every call on it fails so (NO_PERMISSION: at
                                                       nvmlDeviceGetHandleByIndex, as NVML does)
    "lost_if": PATH,                                  GPU is lost once PATH exists
    "processes": [{"pid", "mem_mb"}, ...],            nvmlDeviceGetComputeRunningProcesses
    "processes_file": PATH,                           the same list, read from PATH at each call
    "mig": [{"name", "uuid", "gi", "ci", "mem_total_gb", "mem_used_gb", "processes"}, ...]}``
  (``"mig": []``: MIG mode on, no MIG device made yet; ``"mig_capable": true``: MIG mode off).
  Missing fields get realistic values: ``GPU-xxxxxxxx-xxxx-...`` UUIDs, ``00000000:XX:00.0`` bus ids,
  minor number = host index.
``$FAKE_NVML_CGROUP``: comma-separated UUIDs: the GPUs this process's device cgroup lets it open
  (a Slurm job's allocation). NVML then enumerates only those, numbered from 0, as it does inside
  such a job; their UUIDs, bus ids and minor numbers stay the host's.
"""
from __future__ import annotations

import hashlib
import json
import os
import string
import sys
import time
from types import SimpleNamespace
from typing import Any

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_ALREADY_INITIALIZED = 5
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

NVML_TEMPERATURE_GPU = 0
NVML_GPU_UTILIZATION_SAMPLES = 1
NVML_VALUE_TYPE_UNSIGNED_INT = 1
NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1
MAX_MIG_DEVICES = 7  # an A100/H100: up to 7 MIG devices per GPU

_STRINGS = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized", NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported", NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_ALREADY_INITIALIZED: "Already Initialized", NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded", NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found", NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """As pynvml's: ``NVMLError(code)`` is an instance of the code's own subclass
    (``NVMLError_GpuIsLost``...), ``.value`` the code, ``str()`` NVML's text."""

    _valClassMapping: dict[int, type] = {}

    def __new__(typ, value):
        if typ is NVMLError:
            typ = NVMLError._valClassMapping.get(value, typ)
        obj = Exception.__new__(typ)
        obj.value = value
        return obj

    def __init__(self, *args: Any) -> None:
        super().__init__()

    def __str__(self) -> str:
        return _STRINGS.get(self.value, f"NVML Error with code {self.value}")


def _make_error_classes() -> None:
    me = sys.modules[__name__]
    for name in [n for n in dir(me) if n.startswith("NVML_ERROR_")]:
        cls_name = "NVMLError_" + string.capwords(name.replace("NVML_ERROR_", ""), "_").replace("_", "")
        value = getattr(me, name)

        def new(typ, *args, _v=value):
            return NVMLError.__new__(typ, _v)

        cls = type(cls_name, (NVMLError,), {"__new__": new})
        cls.__module__ = __name__
        setattr(me, cls_name, cls)
        NVMLError._valClassMapping[value] = cls


_make_error_classes()

GIB = 1024**3
_host: dict[str, Any] | None = None  # set by nvmlInit
_visible: list[dict[str, Any]] = []


def _uuid(kind: str, seed: str) -> str:
    h = hashlib.sha1(seed.encode()).hexdigest()
    return f"{kind}-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _fill(i: int, g: dict[str, Any]) -> dict[str, Any]:
    g = {"name": "NVIDIA A100-SXM4-40GB", "uuid": _uuid("GPU", f"gpu{i}"), "pci": f"00000000:{0x07 + 0x10 * i:02X}:00.0",
         "minor": i, "mem_total_gb": 40, "mem_used_gb": 0.5, "util": 0, "temp": 35, **g}
    if "mig" in g:
        g["mig"] = [{"name": f"{g['name']} MIG 3g.20gb", "uuid": _uuid("MIG", f"{g['uuid']}/{j}"), "gi": j + 1, "ci": 0,
                     "mem_total_gb": 20, "mem_used_gb": 0.0, **m} for j, m in enumerate(g["mig"])]
    return g


def nvmlInit() -> None:
    global _host, _visible
    spec = json.loads(os.environ.get("FAKE_NVML") or "{}")
    driver = spec.get("driver", "ok")
    if driver == "not_loaded":
        raise NVMLError(NVML_ERROR_DRIVER_NOT_LOADED)
    if driver == "no_library":
        raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
    gpus = [_fill(i, g) for i, g in enumerate(spec.get("gpus", []))]
    cgroup = os.environ.get("FAKE_NVML_CGROUP")
    if cgroup is not None:
        allowed = {u.strip() for u in cgroup.split(",") if u.strip()}
        gpus = [g for g in gpus if g["uuid"] in allowed]
    _host, _visible = spec, gpus


nvmlInitWithFlags = lambda flags: nvmlInit()  # noqa: E731


def nvmlShutdown() -> None:
    global _host
    _host = None


def _initialised() -> None:
    if _host is None:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)


class _Handle:
    def __init__(self, gpu: dict[str, Any], index: int, mig: dict[str, Any] | None = None) -> None:
        self.gpu, self.index, self.mig = gpu, index, mig

    def check(self) -> None:
        _initialised()
        err = self.gpu.get("error")
        lost = self.gpu.get("lost_if")
        if lost and os.path.exists(lost):
            err = "GPU_IS_LOST"
        if err:
            raise NVMLError(globals()[f"NVML_ERROR_{err}"])

    @property
    def spec(self) -> dict[str, Any]:
        return self.mig if self.mig is not None else self.gpu


def nvmlDeviceGetCount() -> int:
    _initialised()
    return len(_visible)  # NVML counts a GPU it may not open (NO_PERMISSION) too


def nvmlDeviceGetHandleByIndex(index: int) -> _Handle:
    _initialised()
    if not 0 <= index < len(_visible):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    g = _visible[index]
    if g.get("error") == "NO_PERMISSION":
        raise NVMLError(NVML_ERROR_NO_PERMISSION)
    return _Handle(g, index)


def nvmlDeviceGetHandleByUUID(uuid: str | bytes) -> _Handle:
    _initialised()
    uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
    for i, g in enumerate(_visible):
        if g["uuid"] == uuid:
            return nvmlDeviceGetHandleByIndex(i)
        for m in g.get("mig") or []:
            if m["uuid"] == uuid:
                return _Handle(g, i, m)
    raise NVMLError(NVML_ERROR_NOT_FOUND)


def nvmlDeviceGetUUID(h: _Handle) -> str:
    h.check()
    return h.spec["uuid"]


def nvmlDeviceGetName(h: _Handle) -> str:
    h.check()
    return h.spec["name"]


def nvmlDeviceGetMinorNumber(h: _Handle) -> int:
    h.check()
    if h.mig is not None:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return h.gpu["minor"]


def nvmlDeviceGetIndex(h: _Handle) -> int:
    h.check()
    return h.index


def nvmlDeviceGetPciInfo(h: _Handle) -> SimpleNamespace:
    h.check()
    bus = h.gpu["pci"]
    return SimpleNamespace(busId=bus, busIdLegacy=bus[4:], domain=int(bus[:8], 16), bus=int(bus[9:11], 16), device=0)


def nvmlDeviceGetMemoryInfo(h: _Handle) -> SimpleNamespace:
    h.check()
    total, used = int(h.spec["mem_total_gb"] * GIB), int(h.spec["mem_used_gb"] * GIB)
    return SimpleNamespace(total=total, used=used, free=total - used)


def nvmlDeviceGetUtilizationRates(h: _Handle) -> SimpleNamespace:
    h.check()
    if h.mig is not None:  # NVML gives no utilisation for a MIG device
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return SimpleNamespace(gpu=h.gpu["util"], memory=0)


def nvmlDeviceGetSamples(h: _Handle, sampling_type: int, last_seen: int) -> tuple[int, list[SimpleNamespace]]:
    """One sample per call, stamped now (us): the GPU's ``util``. NotSupported on a MIG device."""
    h.check()
    if h.mig is not None or sampling_type != NVML_GPU_UTILIZATION_SAMPLES:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    now = max(time.time_ns() // 1000, last_seen + 1)
    return NVML_VALUE_TYPE_UNSIGNED_INT, [SimpleNamespace(timeStamp=now, sampleValue=SimpleNamespace(uiVal=h.gpu["util"]))]


def nvmlDeviceGetTemperature(h: _Handle, sensor: int) -> int:
    h.check()
    if h.mig is not None:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return h.gpu["temp"]


def nvmlDeviceGetComputeRunningProcesses(h: _Handle) -> list[SimpleNamespace]:
    h.check()
    procs = h.spec.get("processes", [])
    path = h.spec.get("processes_file")
    if path and os.path.exists(path):
        with open(path) as f:
            procs = json.load(f)
    return [SimpleNamespace(pid=p["pid"], usedGpuMemory=None if p.get("mem_mb") is None else int(p["mem_mb"]) * 2**20,
                            gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)
            for p in procs]


def nvmlDeviceGetMigMode(h: _Handle) -> list[int]:
    h.check()
    if h.mig is not None or not ("mig" in h.gpu or h.gpu.get("mig_capable")):
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    mode = NVML_DEVICE_MIG_ENABLE if "mig" in h.gpu else NVML_DEVICE_MIG_DISABLE
    return [mode, mode]


def nvmlDeviceGetMaxMigDeviceCount(h: _Handle) -> int:
    h.check()
    return MAX_MIG_DEVICES if "mig" in h.gpu or h.gpu.get("mig_capable") else 0


def nvmlDeviceGetMigDeviceHandleByIndex(h: _Handle, index: int) -> _Handle:
    h.check()
    if not 0 <= index < MAX_MIG_DEVICES:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    migs = h.gpu.get("mig") or []
    if index >= len(migs):
        raise NVMLError(NVML_ERROR_NOT_FOUND)
    return _Handle(h.gpu, h.index, migs[index])


def nvmlDeviceIsMigDeviceHandle(h: _Handle) -> bool:
    return h.mig is not None


def nvmlDeviceGetGpuInstanceId(h: _Handle) -> int:
    h.check()
    if h.mig is None:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return h.mig["gi"]


def nvmlDeviceGetComputeInstanceId(h: _Handle) -> int:
    h.check()
    if h.mig is None:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return h.mig["ci"]


def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(h: _Handle) -> _Handle:
    return _Handle(h.gpu, h.index)
