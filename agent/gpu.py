"""The GPU probe (pynvml), and the choice of this agent's GPU.

NVML numbers GPUs by PCI bus id and ignores CUDA_VISIBLE_DEVICES; agents set
CUDA_DEVICE_ORDER=PCI_BUS_ID so that CUDA numbers them the same way. When a scheduler
(Slurm, HTCondor) has set CUDA_VISIBLE_DEVICES, ``--gpu N`` indexes that list.

Tests replace the probe with a fake one through $GPUPOOL_FAKE_GPUS, a JSON list of
``{"name", "mem_total_gb", "mem_used_gb", "util", "temp"}`` objects.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

GIB = 1024**3


@dataclass(frozen=True)
class Gpu:
    index: int  # NVML (PCI bus) index
    token: str  # what to put in CUDA_VISIBLE_DEVICES for it
    uuid: str
    name: str
    error: str | None = None  # NVML could not describe it (lost, no permission...): no agent may take it


class NoGpu:
    """The probe on a host without a usable NVIDIA driver."""

    why = "no NVIDIA GPU or driver found"

    def count(self) -> int:
        return 0

    def describe(self, index: int) -> Gpu:
        raise IndexError(index)

    def metrics(self, index: int) -> dict[str, Any]:
        return {}

    def index_of_uuid(self, uuid: str) -> int | None:
        return None


class NvmlProbe(NoGpu):
    def __init__(self) -> None:
        import pynvml

        self.nv = pynvml
        pynvml.nvmlInit()

    def count(self) -> int:
        return self.nv.nvmlDeviceGetCount()

    def _handle(self, index: int):
        return self.nv.nvmlDeviceGetHandleByIndex(index)

    def describe(self, index: int) -> Gpu:
        h = self._handle(index)
        return Gpu(index, str(index), _text(self.nv.nvmlDeviceGetUUID(h)), _text(self.nv.nvmlDeviceGetName(h)))

    def metrics(self, index: int) -> dict[str, Any]:
        nv, h = self.nv, self._handle(index)
        out: dict[str, Any] = {"name": _text(nv.nvmlDeviceGetName(h))}
        for key, fn in (
            ("util", lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu),
            ("mem_used", lambda: nv.nvmlDeviceGetMemoryInfo(h).used),
            ("mem_total", lambda: nv.nvmlDeviceGetMemoryInfo(h).total),
            ("temp", lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
        ):
            try:
                out[key] = int(fn())
            except nv.NVMLError:
                out[key] = None  # not supported on this GPU (e.g. MIG): shown as '-'
        return out

    def index_of_uuid(self, uuid: str) -> int | None:
        for i in range(self.count()):
            if _text(self.nv.nvmlDeviceGetUUID(self._handle(i))) == uuid:
                return i
        return None


class FakeGpuIsLost(RuntimeError):
    """What NVML raises as NVMLError_GpuIsLost when a GPU falls off the bus (fake probe only)."""


class FakeProbe(NoGpu):
    def __init__(self, spec: list[dict[str, Any]]) -> None:
        self.spec = spec

    def count(self) -> int:
        return len(self.spec)

    def describe(self, index: int) -> Gpu:
        s = self.spec[index]
        if s.get("broken"):  # tests: a GPU NVML cannot describe
            raise FakeGpuIsLost(f"NVML cannot describe GPU {index} (the fake probe's 'broken')")
        return Gpu(index, str(index), f"GPU-fake-{index}", s.get("name", "Fake GPU"))

    def metrics(self, index: int) -> dict[str, Any]:
        s = self.spec[index]
        if s.get("lost_if") and os.path.exists(s["lost_if"]):  # tests: a GPU lost at run time
            raise FakeGpuIsLost("GPU is lost (the fake probe's lost_if file exists)")
        return {"name": s.get("name", "Fake GPU"), "util": s.get("util", 0), "temp": s.get("temp", 40),
                "mem_used": int(s.get("mem_used_gb", 0) * GIB), "mem_total": int(s.get("mem_total_gb", 16) * GIB)}

    def index_of_uuid(self, uuid: str) -> int | None:
        return next((i for i in range(self.count()) if self.describe(i).uuid == uuid), None)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def make_probe() -> NoGpu:
    """The fake probe if $GPUPOOL_FAKE_GPUS is set, else NVML, else NoGpu."""
    fake = os.environ.get("GPUPOOL_FAKE_GPUS")
    if fake is not None:
        return FakeProbe(json.loads(fake))
    try:
        probe = NvmlProbe()
        probe.count()
        return probe
    except Exception as e:  # no driver, no library, no device: run on the CPU
        p = NoGpu()
        p.why = f"NVML unavailable ({type(e).__name__}: {e})"
        return p


def visible_gpus(probe: NoGpu, env: dict[str, str] | None = None) -> list[Gpu]:
    """The GPUs this host lets us use, in the order ``--gpu N`` counts them."""
    env = os.environ if env is None else env
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        return [_describe(probe, i) for i in range(probe.count())]
    out = []
    for token in (t.strip() for t in cvd.split(",")):
        if not token or token == "-1":
            break  # CUDA stops at the first invalid entry
        if token.isdigit():
            if int(token) >= probe.count():
                break
            g = _describe(probe, int(token))
            out.append(Gpu(g.index, token, g.uuid, g.name, g.error))
        else:
            idx = probe.index_of_uuid(token)
            if idx is None:
                break
            g = _describe(probe, idx)
            out.append(Gpu(idx, token, token, g.name, g.error))
    return out


def _describe(probe: NoGpu, index: int) -> Gpu:
    """``probe.describe``; a GPU NVML cannot describe (lost, NO_PERMISSION, ...) is kept in its place
    (``--gpu N`` counts every visible GPU) with its error, so that only its own agent is refused."""
    try:
        return probe.describe(index)
    except Exception as e:
        return Gpu(index, str(index), f"unusable-{index}", "unusable", f"{type(e).__name__}: {e}")


def free_gb(probe: NoGpu, gpu: Gpu) -> float:
    m = probe.metrics(gpu.index)
    if m.get("mem_total") is None or m.get("mem_used") is None:
        return float("inf")
    return (m["mem_total"] - m["mem_used"]) / GIB
