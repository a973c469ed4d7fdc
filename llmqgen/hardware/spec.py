"""GpuSpec: what the planner needs to know about one GPU model."""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict


class GpuSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str                     # catalog key, lower case: "4090", "h200", "4060ti"
    display_name: str             # "NVIDIA GeForce RTX 4090"
    compute_capability: tuple[int, int]
    sm_count: int
    memory_bytes: int             # usable device memory as the driver reports its total
    bf16_tflops: float            # dense tensor rate, FP32 accumulation
    fp8_tflops: Optional[float]   # dense E4M3 rate with FP32 accumulation; None: no FP8 tensor cores
    mem_bandwidth_gbs: float      # DRAM bandwidth, GB/s
    l2_bytes: int
    max_smem_per_block: int       # opt-in dynamic shared memory per block, bytes
    pcie_gen: int
    pcie_lanes: int
    nvlink_gbs: float = 0.0       # per direction per GPU; 0 when there is no NVLink
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
