"""A plan run on a GPU other than the one it was made for (a stand-in): a plan for one RTX 4060 Ti on an H200.

The Trainer allocates the plan's arena and nothing else, so the run holds the plan's device memory (no
more than the plan's card has) on any GPU; the program is the plan's too (its kernels' grids and scratch
sized for the plan's card, compiled for the running GPU's architecture). Speeds are the running GPU's
(its compute, memory bandwidth and host link): `RunningOn` says so in one line, re-costs the plan on the
running GPU (`cost.on_gpu`: the same batch, recompute, offload, sharding and chunks) for the prediction a
measurement there is compared with, and computes SOL and MFU against that GPU's rates.

`check_runs_on` refuses, in one line and before any build, a GPU the plan cannot run on.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from ..hardware.catalog import match_nvml_name
from ..hardware.spec import GpuSpec
from ..metrics import plan_throughput
from ..plan import calibration as K
from ..plan.cost import StepCost, on_gpu, step_cost
from ..plan.schema import Plan
from ..plan.solver import usable_device
from .devmem import planned_device_bytes

GiB = 1 << 30
FP8_CAPABILITY = (8, 9)          # Ada and newer have FP8 tensor cores


def short_name(display: str) -> str:
    """"NVIDIA GeForce RTX 4060 Ti" -> "4060 Ti", "NVIDIA H200" -> "H200"."""
    return re.sub(r"^(NVIDIA\s+)?(GeForce\s+)?(RTX\s+)?", "", display.strip()) or display


def check_runs_on(plan: Plan, dev) -> None:
    """Raises ValueError (one line) when the GPU `dev` (driver.Device: ordinal, name, total_memory,
    compute_capability, max_smem_optin) cannot run `plan`: less memory than the planner allowed itself
    on the plan's card (its total less calibration.DEVICE_MARGIN, which also absorbs a driver reporting a
    little less than the catalog for the very same card), FP8 matmuls without FP8 tensor cores, or less
    shared memory per block than the kernels were sized for. Another architecture is no reason: the
    Trainer compiles the program for the GPU it opened."""
    gpu, what = plan.inventory.gpu, f"GPU {dev.ordinal} ({dev.name}"
    usable = usable_device(plan.inventory)
    if dev.total_memory < usable:
        raise ValueError(f"plan {plan.name} may use {usable / GiB:.2f} GiB per GPU (made for {gpu.display_name}); "
                         f"{what}) has {dev.total_memory / GiB:.2f} GiB: plan for this GPU (--gpus auto)")
    if plan.fp8 and tuple(dev.compute_capability) < FP8_CAPABILITY:
        cc = ".".join(map(str, dev.compute_capability))
        raise ValueError(f"plan {plan.name} uses FP8 matmuls; {what}, compute capability {cc}) has no FP8 "
                         f"tensor cores: plan for this GPU (--gpus auto, or --dtype bf16)")
    if gpu.max_smem_per_block > dev.max_smem_optin:
        raise ValueError(f"plan {plan.name}'s kernels may use {gpu.max_smem_per_block // 1024} KiB of shared "
                         f"memory per block ({gpu.display_name}); {what}) allows {dev.max_smem_optin // 1024} "
                         f"KiB: plan for this GPU (--gpus auto)")


@dataclass(frozen=True)
class RunningOn:
    """The GPU a plan runs on, next to the one it was made for."""

    plan: Plan
    name: str                       # the running GPU as the driver names it
    memory_bytes: int               # its total memory, as the driver reports it
    spec: GpuSpec | None            # its catalog entry with that total; None: not in the catalog

    @classmethod
    def of(cls, plan: Plan, dev) -> RunningOn:
        """`dev`: the GPU the Trainer opened (driver.Device: name, total_memory)."""
        try:
            spec = match_nvml_name(dev.name).model_copy(update={"memory_bytes": int(dev.total_memory)})
        except ValueError:
            spec = None
        return cls(plan, dev.name, int(dev.total_memory), spec)

    @classmethod
    def home(cls, plan: Plan) -> RunningOn:
        """On the plan's own GPU."""
        gpu = plan.inventory.gpu
        return cls(plan, gpu.display_name, gpu.memory_bytes, gpu)

    @property
    def stand_in(self) -> bool:
        """Another GPU model than the plan's, or the same with memory differing by more than DEVICE_MARGIN."""
        gpu = self.plan.inventory.gpu
        if self.spec is None or self.spec.name != gpu.name:
            return True
        return abs(self.memory_bytes - gpu.memory_bytes) > K.DEVICE_MARGIN * gpu.memory_bytes

    @cached_property
    def speed_plan(self) -> Plan:
        """The plan whose GPU the speeds are predicted for and SOL/MFU measured against: the plan on the
        running GPU (the plan itself on its own GPU, or when the catalog lacks the running one)."""
        return on_gpu(self.plan, self.spec) if self.stand_in and self.spec is not None else self.plan

    @cached_property
    def predicted(self) -> StepCost | None:
        """The cost model's step on the running GPU; None when the catalog lacks it."""
        return None if self.spec is None else step_cost(self.speed_plan)

    def lines(self) -> list[str]:
        """What `run` and `bench` print once the GPU is open: nothing on the plan's own GPU; else the
        stand-in line and the prediction on the running GPU."""
        if not self.stand_in:
            return []
        inv, gpu = self.plan.inventory, self.plan.inventory.gpu
        card = (f"{inv.nodes}x" if inv.nodes > 1 else "") + f"{inv.count}x {gpu.display_name}"
        mine, theirs = short_name(self.name), short_name(gpu.display_name)
        head = (f"stand-in: running plan for {card} ({gpu.memory_bytes / GiB:.0f} GiB) on {self.name} "
                f"({self.memory_bytes / GiB:.0f} GiB): the arena is the plan's "
                f"({planned_device_bytes(self.plan) / GiB:.2f} GiB with the CUDA context); ")
        if self.predicted is None:
            return [head + f"speeds are the {mine}'s, not the {theirs}'s ({self.name} is not in the GPU catalog: "
                           f"no prediction for it, SOL and MFU against the {theirs}'s rates)"]
        if self.spec.name == gpu.name:          # less memory is refused (check_runs_on)
            return [head + "the same GPU model with more memory: speeds are the plan's"]
        why = ["faster GPU" if self.predicted.step_ms < step_cost(self.plan).step_ms else "slower GPU"]
        link = (self.spec.pcie_gen, self.spec.pcie_lanes)
        if link != (gpu.pcie_gen, gpu.pcie_lanes):
            why.append(f"PCIe {link[0]}.0 x{link[1]} host link")
        p = self.predicted
        return [head + f"speeds are the {mine}'s ({', '.join(why)}), not the {theirs}'s",
                f"predicted on the {mine}: {p.step_ms:.0f} ms/step | "
                + plan_throughput(self.speed_plan, p.step_ms / 1e3).line()]

    def fields(self) -> dict:
        """The bench record's fields: the stand-in (None on the plan's own GPU) and the prediction here."""
        gpu, p = self.plan.inventory.gpu, self.predicted
        stand = None if not self.stand_in else {
            "plan_gpu": gpu.display_name, "plan_gpu_memory_bytes": gpu.memory_bytes, "plan_gpus": self.plan.num_gpus,
            "gpu": self.name, "gpu_memory_bytes": self.memory_bytes, "in_catalog": self.spec is not None,
            "planned_mem_bytes": planned_device_bytes(self.plan),
            "note": (f"runs in the plan's arena; speeds are the {short_name(self.name)}'s, "
                     f"not the {short_name(gpu.display_name)}'s")}
        return {"stand_in": stand,
                "predicted_step_ms_here": None if p is None else p.step_ms,
                "predicted_tokens_per_s_here": None if p is None else p.tokens_per_s}
