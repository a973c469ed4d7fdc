"""This process's device memory as NVML counts it, sampled after each step: the run's measured peak.

What is counted, in bytes, on the GPU of the process's first rank:
- "process": NVML's count for this process (nvmlDeviceGetComputeRunningProcesses, matched by PID):
  the CUDA context, loaded modules, library handles and workspaces, and the arena.
- "device": where NVML lists no such process (a container's PID namespace hides the host PID), the
  GPU's used memory less its used memory before the Trainer opened it (other processes' changes in
  between count too).
Both include the CUDA context, which the plan models as its reserved row ("CUDA context (reserved)",
calibration.CONTEXT_RESERVE), so the measurement is compared with the plan's total per GPU: the packed
arena plus that row (`llmqgen plan` prints it as "total per GPU"). Without pynvml or a working NVML,
nothing is measured: the peak is None and the reports say "not measured" and why.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..plan.lifetimes import packed_device_bytes
from ..plan.schema import Plan

GiB = 1 << 30
METHODS = {"process": "NVML, this process",
           "device": "NVML, the GPU's used memory less its use before the run"}


def planned_device_bytes(plan: Plan, ranks_on_gpu: int = 1) -> int:
    """The plan's device memory on one GPU: packed arena + reserve, times the ranks sharing that GPU."""
    return ranks_on_gpu * packed_device_bytes(plan)


def ranks_on_first_gpu(devices: list[int] | None) -> int:
    """Ranks of this process on its first rank's GPU (`devices`: the GPU of each rank; None: one each)."""
    return devices.count(devices[0]) if devices else 1


def _bus(text) -> tuple[int, ...]:
    """"00000000:1B:00.0" (NVML) and "0000:1b:00.0" (CUDA) -> (0, 27, 0, 0)."""
    text = text.decode() if isinstance(text, bytes) else text
    dom, bus, rest = text.strip().split(":")
    dev, fn = rest.split(".")
    return int(dom, 16), int(bus, 16), int(dev, 16), int(fn, 16)


class DeviceMemory:
    """Create it before the Trainer (it reads every GPU's used memory as the baseline), `watch` the GPU
    the Trainer opened, `sample()` after each step, `close()` at the end; `peak` is the largest sample
    (None: not measured, `why` says why), `method` a key of METHODS."""

    def __init__(self):
        self.peak: int | None = None
        self.method: str | None = None
        self.why = ""
        self._nvml = self._handle = self._key = None
        self._baseline: dict[tuple[int, ...], int] = {}
        nvml = self._start()
        if nvml is None:
            return
        try:
            for i in range(nvml.nvmlDeviceGetCount()):
                h = nvml.nvmlDeviceGetHandleByIndex(i)
                self._baseline[_bus(nvml.nvmlDeviceGetPciInfo(h).busId)] = int(nvml.nvmlDeviceGetMemoryInfo(h).used)
        except nvml.NVMLError as e:
            self.why = f"NVML failed ({e})"
        finally:
            nvml.nvmlShutdown()         # held again from `watch` on: nothing to release if the Trainer fails

    def _start(self):
        """pynvml, initialised; None (with `why`) when it is missing or NVML does not start."""
        try:
            import pynvml
        except ImportError:
            self.why = "pynvml is missing: pip install nvidia-ml-py"
            return None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            self.why = f"NVML failed ({e})"
            return None
        return pynvml

    def watch(self, dev) -> None:
        """The GPU to sample: `dev` (driver.Device), found in NVML by its PCI address."""
        if self.why:
            return
        from . import driver            # here: the record and report half of this module needs no CUDA
        bus = driver.pci_bus_id(dev)
        if _bus(bus) not in self._baseline:
            self.why = f"NVML does not list the GPU at {bus}"
            return
        nvml = self._start()
        if nvml is None:
            return
        try:
            self._handle = nvml.nvmlDeviceGetHandleByPciBusId(bus)
        except nvml.NVMLError as e:
            nvml.nvmlShutdown()
            self.why = f"NVML failed ({e})"
            return
        self._nvml, self._key = nvml, _bus(bus)

    def _process_bytes(self) -> int | None:
        pid = os.getpid()
        for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
            if p.pid == pid and p.usedGpuMemory is not None:
                return int(p.usedGpuMemory)
        return None

    def sample(self) -> int | None:
        """This process's device memory now (bytes; None: not measured); keeps the peak."""
        if self._handle is None:
            return None
        try:
            now = self._process_bytes() if self.method in (None, "process") else None
            if now is not None:
                self.method = "process"
            else:
                used = int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
                now, self.method = used - self._baseline[self._key], "device"
        except self._nvml.NVMLError as e:
            self._give_up(f"NVML failed ({e})")
            return None
        self.peak = now if self.peak is None else max(self.peak, now)
        return now

    def _give_up(self, why: str) -> None:
        """Stop measuring: `peak` becomes None (a partial peak would understate), `why` says why."""
        self.close()
        self.peak, self.method, self.why = None, None, why

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
        self._nvml = self._handle = None

    def report(self, plan: Plan, ranks_on_gpu: int = 1) -> MemoryReport:
        """The peak so far next to the plan's total (`ranks_on_gpu`: this process's ranks on the GPU)."""
        why = "" if self.peak is not None else self.why or "no step was sampled"
        return MemoryReport(self.peak, self.method, planned_device_bytes(plan, ranks_on_gpu), ranks_on_gpu, why)


@dataclass(frozen=True)
class MemoryReport:
    """The measured peak next to the plan's device total (bytes)."""

    peak_bytes: int | None          # None: not measured
    method: str | None              # a key of METHODS
    planned_bytes: int              # planned_device_bytes: arena + CUDA-context reserve, x ranks on the GPU
    ranks_on_gpu: int = 1
    why: str = ""                   # why not measured

    @property
    def ratio(self) -> float | None:
        return None if self.peak_bytes is None else self.peak_bytes / self.planned_bytes

    def line(self) -> str:
        """"device memory: peak 15.31 GiB (NVML, this process), 99.0% of the plan's 15.47 GiB (arena +
        CUDA context)" — or "not measured (why)"."""
        plan = f"the plan's {self.planned_bytes / GiB:.2f} GiB (arena + CUDA context" + (
            f", {self.ranks_on_gpu} ranks on this GPU)" if self.ranks_on_gpu > 1 else ")")
        if self.peak_bytes is None:
            return f"device memory: not measured ({self.why}); {plan}"
        return (f"device memory: peak {self.peak_bytes / GiB:.2f} GiB ({METHODS[self.method]}), "
                f"{100 * self.ratio:.1f}% of {plan}")

    def fields(self) -> dict:
        """The bench record's and the run log's fields (`from_fields` reads them back)."""
        return {"peak_mem_bytes": self.peak_bytes, "peak_mem_method": self.method,
                "planned_mem_bytes": self.planned_bytes, "peak_mem_ratio": self.ratio,
                "ranks_on_gpu": self.ranks_on_gpu, "peak_mem_not_measured": self.why or None}

    @classmethod
    def from_fields(cls, d: dict) -> MemoryReport:
        return cls(d["peak_mem_bytes"], d["peak_mem_method"], d["planned_mem_bytes"], d["ranks_on_gpu"],
                   d["peak_mem_not_measured"] or "")
