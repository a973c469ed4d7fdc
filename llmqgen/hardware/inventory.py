"""The --gpus and --host-mem options: "4x4090", "1xH200", "h200", "auto"; "128G", "64GB"."""
from __future__ import annotations

import re

from .catalog import match_nvml_name, resolve_gpu
from .host import NO_DRIVER, DetectedGpu, detect_host_memory, detected_gpus
from .spec import GpuSpec, Inventory

_BINARY = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BYTES = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(ib|b)?\s*$", re.IGNORECASE)
_GPUS = re.compile(r"^\s*(?:(\d+)\s*[x×*]\s*)?(?:(\d+)\s*[x×*]\s*)?(\S.*?)\s*$", re.IGNORECASE)


def parse_bytes(value: str | int) -> int:
    """A size in bytes from an int or a string.

    K, M, G, T and KiB, MiB, GiB, TiB are binary (G = GiB = 2**30); KB, MB, GB, TB are decimal
    (GB = 10**9), as drives and cloud instance sheets use them. A string needs one of these units
    (a bare "64" is refused rather than read as 64 bytes); an int is bytes. Case is ignored;
    fractions are allowed ("1.5T")."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"size {value!r}: give bytes as an integer or a string such as 128G")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size {value} is negative")
        return value
    m = _BYTES.match(value)
    prefix, suffix = (m.group(2).lower(), (m.group(3) or "").lower()) if m else ("", "")
    if not m or (suffix == "ib" and not prefix):
        raise ValueError(f"size {value!r} not understood: use e.g. 128G, 128GiB, 64GB or 512M")
    if not prefix:
        # the number with a unit; for 0 (no host RAM, which no plan fits) the 128 GiB a named inventory assumes
        example = m.group(1).strip() if float(m.group(1)) else "128"
        raise ValueError(f"size {value!r} has no unit (a bare number would be bytes): add K, M, G or T "
                         f"(binary; KB, MB, GB, TB are decimal), e.g. {example}G")
    unit = (_DECIMAL if suffix == "b" else _BINARY)[prefix]
    return int(round(float(m.group(1)) * unit))


def human_bytes(n: float) -> str:
    """A size as people read it: "512 B", "3.5 KiB", "1.2 MiB", "40.0 GiB" (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def from_detected(gpus: list[DetectedGpu]) -> tuple[GpuSpec, int]:
    """The catalog GPU and count for the GPUs the driver reports (all of one model)."""
    if not gpus:
        raise ValueError(f"{NO_DRIVER} (the driver reports no GPU visible to this process; "
                         f"check CUDA_VISIBLE_DEVICES)")
    names = sorted({g.name for g in gpus})
    if len(names) > 1:
        raise ValueError(f"mixed GPU models ({', '.join(names)}): llmqgen plans for one model at a "
                         f"time; choose GPUs with CUDA_VISIBLE_DEVICES and name them, e.g. --gpus 2x4090")
    spec = match_nvml_name(names[0])
    # The driver's total is the truth for this card (variants, MIG, reserved memory): keep it.
    memory = min(g.memory_bytes for g in gpus)
    return spec.model_copy(update={"memory_bytes": memory}), len(gpus)


def parse_inventory(text: str, host_mem: str | int | None = None) -> Inventory:
    """An Inventory from "4x4090", "1xH200", "h200" (one GPU), "2x8xh100" (two machines of eight)
    or "auto" (ask the driver).

    host_mem: the host RAM to plan with (see parse_bytes); default: this machine's, detected."""
    nodes = 1
    if text.strip().lower() == "auto":
        gpu, count = from_detected(detected_gpus())
    else:
        m = _GPUS.match(text)
        if not m:
            raise ValueError(f"--gpus {text!r} not understood: use COUNTxGPU, e.g. 4x4090 or 1xh200, "
                             f"NODESxCOUNTxGPU for several machines, or auto")
        if m.group(2):
            nodes, count = int(m.group(1)), int(m.group(2))
        else:
            count = int(m.group(1)) if m.group(1) else 1
        if count < 1 or nodes < 1:
            raise ValueError(f"--gpus {text!r}: counts must be at least 1")
        if "," in text:
            raise ValueError(f"--gpus {text!r}: mixed GPU kinds are not supported (one kind per plan): "
                             f"plan for one of them, e.g. --gpus {text.split(',')[0].strip()}")
        gpu = resolve_gpu(m.group(3))
    if host_mem is None:
        return Inventory(gpu=gpu, count=count, nodes=nodes, host_mem_bytes=detect_host_memory(),
                         host_mem_source="detected")
    try:
        host_bytes = parse_bytes(host_mem)
    except ValueError as e:
        raise ValueError(f"--host-mem {host_mem}: {e}") from None
    return Inventory(gpu=gpu, count=count, nodes=nodes, host_mem_bytes=host_bytes, host_mem_source="user")
