"""GpuSpec: what the planner needs to know about one GPU model; Inventory: how many, and the host's RAM."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class GpuSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str                     # catalog key, lower case: "4090", "h200", "4060ti"
    display_name: str             # "NVIDIA GeForce RTX 4090"
    compute_capability: tuple[int, int]
    # rates and sizes are positive: the cost model divides by them (a hand-edited plan file is checked too)
    sm_count: int = Field(gt=0)
    memory_bytes: int = Field(gt=0)   # usable device memory as the driver reports its total
    bf16_tflops: float = Field(gt=0)  # dense tensor rate, FP32 accumulation
    fp8_tflops: Optional[float] = Field(gt=0)   # dense E4M3 rate with FP32 accumulation; None: no FP8 tensor cores
    mem_bandwidth_gbs: float = Field(gt=0)      # DRAM bandwidth, GB/s
    l2_bytes: int = Field(ge=0)
    max_smem_per_block: int = Field(gt=0)       # opt-in dynamic shared memory per block, bytes
    pcie_gen: Literal[3, 4, 5]
    pcie_lanes: int = Field(gt=0)
    nvlink_gbs: float = Field(default=0.0, ge=0)   # per direction per GPU; 0 when there is no NVLink
    peer_access: bool = False     # P2P over PCIe/NVLink allowed by the driver (GeForce: usually not)
    consumer: bool = False        # GeForce/consumer part

    @property
    def arch(self) -> str:
        major, minor = self.compute_capability
        return f"sm_{major}{minor}"

    @property
    def pcie_gbs(self) -> float:
        """Practical one-direction host<->device bandwidth (about 80% of the raw link)."""
        per_lane = {3: 0.985, 4: 1.969, 5: 3.938}[self.pcie_gen]
        return 0.8 * per_lane * self.pcie_lanes


class Inventory(BaseModel):
    """The GPUs a plan is for (hardware.inventory.parse_inventory reads them from --gpus/--host-mem)."""
    model_config = ConfigDict(frozen=True, extra="forbid")

    gpu: GpuSpec
    count: int = Field(ge=1)           # GPUs per machine
    host_mem_bytes: int = Field(ge=0)  # per machine
    host_mem_source: Literal["detected", "user", "assumed"] = "assumed"
    nodes: int = Field(default=1, ge=1)   # machines, joined by NCCL

    @property
    def label(self) -> str:
        return (f"{self.nodes}x" if self.nodes > 1 else "") + f"{self.count}x{self.gpu.name}"
