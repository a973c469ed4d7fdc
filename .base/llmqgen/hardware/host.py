"""What this machine has: total host RAM, and the NVIDIA GPUs the driver reports (through NVML)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NamedTuple

NO_DRIVER = "no NVIDIA driver found: name the GPUs, e.g. --gpus 1x4090"


class NoDriverError(ValueError):
    """NVML is missing or cannot start: there is no NVIDIA driver to ask."""


class DetectedGpu(NamedTuple):
    name: str           # marketing name as NVML reports it, e.g. "NVIDIA GeForce RTX 4090"
    memory_bytes: int   # total device memory as the driver reports it
    uuid: str


def _meminfo_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _sysconf_total() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _windows_total() -> int | None:
    if sys.platform != "win32":
        return None
    import ctypes

    class MemoryStatusEx(ctypes.Structure):
        _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                    ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                    ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                    ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                    ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

    status = MemoryStatusEx(dwLength=ctypes.sizeof(MemoryStatusEx))
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
        return None
    return int(status.ullTotalPhys)


def _cgroup_limit() -> int | None:
    """A container's memory limit (cgroup v2, then v1): pinned host buffers are charged to it."""
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(f).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


def detect_host_memory() -> int:
    """Total host RAM in bytes, capped by the container's memory limit when there is one."""
    total = _meminfo_total() or _sysconf_total() or _windows_total()
    if not total:
        raise ValueError("could not detect the host memory: give it, e.g. --host-mem 128G")
    limit = _cgroup_limit()
    return min(total, limit) if limit else total


def _visible(gpus: list[DetectedGpu]) -> list[DetectedGpu]:
    """Apply CUDA_VISIBLE_DEVICES (NVML ignores it). Indices count in PCI bus order, NVML's order,
    which CUDA follows with CUDA_DEVICE_ORDER=PCI_BUS_ID (and for GPUs of one model anyway)."""
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return gpus
    chosen = []
    for entry in (e.strip() for e in spec.split(",")):
        if entry.isdigit() and int(entry) < len(gpus):
            chosen.append(gpus[int(entry)])
        elif entry.startswith("GPU-"):
            chosen += [g for g in gpus if g.uuid.startswith(entry)]
        else:
            break  # CUDA stops at the first entry it cannot use
    return chosen


def detected_gpus() -> list[DetectedGpu]:
    """The GPUs this process may use, as NVML reports them; ValueError when there is no driver."""
    try:
        import pynvml
    except ImportError:
        raise NoDriverError(f"{NO_DRIVER} (or install nvidia-ml-py)") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        raise NoDriverError(NO_DRIVER) from None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name, uuid = pynvml.nvmlDeviceGetName(h), pynvml.nvmlDeviceGetUUID(h)
            gpus.append(DetectedGpu(name.decode() if isinstance(name, bytes) else name,
                                    int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
                                    uuid.decode() if isinstance(uuid, bytes) else uuid))
    finally:
        pynvml.nvmlShutdown()
    return _visible(gpus)
