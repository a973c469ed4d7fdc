"""Benchmark result files: `bench/results/<gpu>-<plan>.json`, one measured plan on one machine.

A record holds what a reader needs to trust and reproduce the number: the median step time after
warm-up with the raw times, tokens/s in total and per GPU, SOL and MFU per GPU (llmqgen.metrics.
Throughput, the report `plan` and `run` print too),
the planner's prediction beside the measurement, and the prediction for the GPU it ran on (the plan
re-costed there when that GPU stands in for the plan's: runtime/standin.py, the `stand_in` field), the
measured peak device memory next to the plan's (runtime/devmem.py), the GPU, driver and library
versions, and the whole plan. SOL and MFU are against the rates of the GPU it ran on.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import statistics
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..metrics import plan_throughput
from ..plan.schema import Plan
from .devmem import MemoryReport
from .standin import RunningOn, short_name

# CUDA 13 wheels carry no suffix (cuDNN: -cu13); the -cu12 twins serve CUDA 12 drivers.
VERSIONED_DISTRIBUTIONS = (
    "cuda-bindings", "nvidia-cuda-nvrtc", "nvidia-cuda-nvrtc-cu12", "nvidia-cublas", "nvidia-cublas-cu12",
    "nvidia-cudnn-cu13", "nvidia-cudnn-cu12", "nvmath-python", "nvidia-cudnn-frontend", "numpy", "llmqgen",
)


def collect_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that decide speed (None: not installed)."""
    out: dict[str, str | None] = {}
    for dist in VERSIONED_DISTRIBUTIONS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def bench_record(plan: Plan, step_ms: list[float], warmup: int, device: dict, versions: dict,
                 memory: MemoryReport, running: RunningOn | None = None, profile: dict | None = None) -> dict:
    """`step_ms`: every optimizer step's time in order, the first `warmup` of them discarded.
    `device`: at least `name` (the GPU as the driver names it) and `driver` (its version).
    `memory`: the measured peak and the plan's total (devmem.DeviceMemory.report).
    `running`: the GPU it ran on next to the plan's (default: the plan's own GPU).
    `profile`: a profiled step's report (runtime/profile.py), kept as the record's `profile`."""
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if len(step_ms) <= warmup:
        raise ValueError(f"{len(step_ms)} step times with {warmup} warm-up steps leave none to measure: "
                         f"run more steps than --warmup")
    missing = [k for k in ("name", "driver") if k not in device]
    if missing:
        raise ValueError(f"device info lacks {missing}: pass the GPU name and driver version")
    running = running or RunningOn.home(plan)
    measured = [float(t) for t in step_ms[warmup:]]
    median_ms = statistics.median(measured)
    rep = plan_throughput(running.speed_plan, median_ms / 1e3)
    e = plan.estimate
    if profile is not None and not {"gpu_ms", "floor_share", "families", "phases"} <= set(profile):
        raise ValueError("profile must be a report of runtime.profile (gpu_ms, floor_share, families, phases)")
    here = running.fields()
    predicted_here = here["predicted_tokens_per_s_here"]
    record = {
        "llmqgen_version": __version__,
        "timestamp_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "plan_name": plan.name,
        "plan_hash": plan.inputs_hash(),
        "device": dict(device),
        "num_gpus": plan.num_gpus,
        "versions": dict(versions),
        "tokens_per_step": plan.tokens_per_step,
        "warmup_steps": warmup,
        "measured_steps": len(measured),
        "step_ms_median": median_ms,
        "tokens_per_s": rep.tokens_per_s,               # total, all GPUs
        "tokens_per_s_per_gpu": rep.tokens_per_s_per_gpu,
        "sol_pct": rep.sol_pct,                         # per GPU, against the GPU it ran on
        "mfu_pct": rep.mfu_pct,                         # per GPU
        "sol_pct_per_gpu": rep.sol_pct,
        "mfu_pct_per_gpu": rep.mfu_pct,
        **memory.fields(),
        "predicted": None if e is None else {           # the plan's, for the GPU it was made for
            "step_ms": e.step_ms, "tokens_per_s": e.tokens_per_s, "device_bytes": e.device_bytes},
        **here,
        "tokens_per_s_vs_predicted_here": None if predicted_here is None else rep.tokens_per_s / predicted_here,
        "step_ms": [float(t) for t in step_ms],
        "plan": plan.model_dump(mode="json", by_alias=True),
    }
    if profile is not None:
        record["profile"] = profile
    return record


def bench_summary(record: dict, path: Path | None = None) -> str:
    """The last line `llmqgen bench` prints: the median step, the throughput report of the record, how it
    compares with the prediction for the GPU it ran on, and the measured peak device memory."""
    from ..metrics import format_throughput
    line = (f"median {record['step_ms_median']:.1f} ms/step, "
            + format_throughput(record["tokens_per_s"], record["num_gpus"], record["sol_pct"], record["mfu_pct"],
                                sep=", "))
    if record["predicted_tokens_per_s_here"] is not None:
        stand = record["stand_in"]
        line += (f", {100 * record['tokens_per_s_vs_predicted_here']:.0f}% of the "
                 f"{record['predicted_tokens_per_s_here']:,.0f} tok/s predicted"
                 + (f" on the {short_name(stand['gpu'])}" if stand else ""))
    line += "; " + MemoryReport.from_fields(record).line()
    return line + (f" -> {path}" if path is not None else "")


def slug(text: str) -> str:
    """"NVIDIA GeForce RTX 4090" -> "nvidia-geforce-rtx-4090"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def bench_filename(record: dict) -> str:
    plan_name = record["plan_name"]
    if not plan_name or "/" in plan_name or "\\" in plan_name or plan_name.startswith("."):
        raise ValueError(f"plan name {plan_name!r} cannot be a file name: rename the plan")
    return f"{slug(record['device']['name'])}-{plan_name}.json"


def write_bench(record: dict, root: Path = Path("bench/results")) -> Path:
    """Writes the record (sorted keys, indent 2) atomically; a rerun of the same plan on the same GPU
    replaces the previous file, so the folder holds the latest number of each pair."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / bench_filename(record)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
