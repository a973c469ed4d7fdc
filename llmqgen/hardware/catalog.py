"""Built-in GPU catalog: dense tensor rates, memory and links of the GPUs llmqgen plans for.

Rates are DENSE (never the 2:4-sparse marketing figures) with FP32 ACCUMULATION, which is what
training GEMMs use. GeForce cards run FP32-accumulate tensor math at half their FP16-accumulate rate;
datacenter and professional cards run it at full rate. Where a datasheet gives no dense figure the
rate is SMs x boost clock x FLOP/clock/SM (Ada/Blackwell GeForce: 512 BF16 FLOP/clk/SM with FP32
accumulation, twice that for FP8). memory_bytes is the total nvidia-smi reports (MiB), not the label.
"""
from __future__ import annotations

import difflib
import re

from .spec import GpuSpec

MiB = 2**20
_SMEM_99K = 99 * 1024      # opt-in shared memory per block on sm_86/sm_89/sm_120
_SMEM_163K = 163 * 1024    # sm_80
_SMEM_227K = 227 * 1024    # sm_90/sm_100


def _gpu(name: str, display: str, cc: tuple[int, int], sms: int, mem_mib: int, bf16: float,
         fp8: float | None, bw: float, l2_mib: float, smem: int, pcie: tuple[int, int], *,
         nvlink: float = 0.0, peer: bool, consumer: bool) -> GpuSpec:
    return GpuSpec(name=name, display_name=display, compute_capability=cc, sm_count=sms,
                   memory_bytes=mem_mib * MiB, bf16_tflops=bf16, fp8_tflops=fp8, mem_bandwidth_gbs=bw,
                   l2_bytes=int(l2_mib * MiB), max_smem_per_block=smem, pcie_gen=pcie[0],
                   pcie_lanes=pcie[1], nvlink_gbs=nvlink, peer_access=peer, consumer=consumer)


_GPUS = [
    # --- GeForce: the driver disables P2P over PCIe (a 3090 pair can peer across its NVLink bridge,
    # which not every box has: not assumed) ---
    # Ampere whitepaper: 142 TFLOPS FP16-acc, 71 with FP32 accumulation; no FP8 tensor cores.
    # NVLink bridge (optional, pairs only): 112.5 GB/s both directions.
    _gpu("3090", "NVIDIA GeForce RTX 3090", (8, 6), 82, 24576, 71.0, None, 936.0, 6, _SMEM_99K, (4, 16),
         nvlink=56.25, peer=False, consumer=True),
    # 34 SMs x 2.535 GHz; the 16 GB card has an x8 link.
    _gpu("4060ti", "NVIDIA GeForce RTX 4060 Ti", (8, 9), 34, 16380, 44.1, 88.3, 288.0, 32, _SMEM_99K,
         (4, 8), peer=False, consumer=True),
    # 66 SMs x 2.61 GHz.
    _gpu("4070tis", "NVIDIA GeForce RTX 4070 Ti SUPER", (8, 9), 66, 16376, 88.2, 176.4, 672.0, 48,
         _SMEM_99K, (4, 16), peer=False, consumer=True),
    # Ada whitepaper (RTX 4080 / 4090 tables, FP32 accumulate).
    _gpu("4080", "NVIDIA GeForce RTX 4080", (8, 9), 76, 16376, 97.5, 194.9, 716.8, 64, _SMEM_99K, (4, 16),
         peer=False, consumer=True),
    _gpu("4090", "NVIDIA GeForce RTX 4090", (8, 9), 128, 24564, 165.2, 330.3, 1008.0, 72, _SMEM_99K,
         (4, 16), peer=False, consumer=True),
    # 84 SMs x 2.617 GHz.
    _gpu("5080", "NVIDIA GeForce RTX 5080", (12, 0), 84, 16303, 112.6, 225.1, 960.0, 64, _SMEM_99K,
         (5, 16), peer=False, consumer=True),
    # Blackwell RTX whitepaper: 209.5 BF16 / 419 FP8 with FP32 accumulation.
    _gpu("5090", "NVIDIA GeForce RTX 5090", (12, 0), 170, 32607, 209.5, 419.0, 1792.0, 96, _SMEM_99K,
         (5, 16), peer=False, consumer=True),
    # --- Professional: full-rate FP32 accumulation, P2P over PCIe ---
    # Datasheet: 1457 TFLOPS FP8 sparse -> 728.5 dense.
    _gpu("6000ada", "NVIDIA RTX 6000 Ada Generation", (8, 9), 142, 49140, 364.2, 728.5, 960.0, 96,
         _SMEM_99K, (4, 16), peer=True, consumer=False),
    # 188 SMs x 2.617 GHz x 1024 BF16 FLOP/clk (datasheet: 4000 TOPS FP4 sparse).
    _gpu("pro6000", "NVIDIA RTX PRO 6000 Blackwell Workstation Edition", (12, 0), 188, 97887, 503.8,
         1007.6, 1792.0, 128, _SMEM_99K, (5, 16), peer=True, consumer=False),
    # --- Datacenter PCIe ---
    # Datasheet: 242 BF16 / 485 FP8 sparse -> half dense.
    _gpu("l4", "NVIDIA L4", (8, 9), 58, 23034, 121.0, 242.5, 300.0, 48, _SMEM_99K, (4, 16),
         peer=True, consumer=False),
    # Datasheet: 362.05 BF16 dense, 1466 FP8 sparse -> 733 dense.
    _gpu("l40s", "NVIDIA L40S", (8, 9), 142, 46068, 362.05, 733.0, 864.0, 96, _SMEM_99K, (4, 16),
         peer=True, consumer=False),
    # --- Datacenter SXM/HBM; NVLink figures are per direction (A100 600, H100/H200 900,
    # B200 1800 GB/s both directions) ---
    _gpu("a100-40", "NVIDIA A100-SXM4-40GB", (8, 0), 108, 40960, 312.0, None, 1555.0, 40, _SMEM_163K,
         (4, 16), nvlink=300.0, peer=True, consumer=False),
    _gpu("a100-80", "NVIDIA A100-SXM4-80GB", (8, 0), 108, 81920, 312.0, None, 2039.0, 40, _SMEM_163K,
         (4, 16), nvlink=300.0, peer=True, consumer=False),
    # Datasheet: 1513 BF16 / 3026 FP8 sparse. NVLink only through an optional bridge: not assumed.
    _gpu("h100-pcie", "NVIDIA H100 PCIe", (9, 0), 114, 81559, 756.5, 1513.0, 2000.0, 50, _SMEM_227K,
         (5, 16), peer=True, consumer=False),
    _gpu("h100", "NVIDIA H100 80GB HBM3", (9, 0), 132, 81559, 989.4, 1978.9, 3350.0, 50, _SMEM_227K,
         (5, 16), nvlink=450.0, peer=True, consumer=False),
    _gpu("h200", "NVIDIA H200", (9, 0), 132, 143771, 989.4, 1978.9, 4800.0, 50, _SMEM_227K, (5, 16),
         nvlink=450.0, peer=True, consumer=False),
    # HGX B200 datasheet: 4.5 PF BF16 / 9 PF FP8 sparse per GPU -> half dense; L2 about 126 MB.
    _gpu("b200", "NVIDIA B200", (10, 0), 148, 183359, 2250.0, 4500.0, 8000.0, 126, _SMEM_227K, (5, 16),
         nvlink=900.0, peer=True, consumer=False),
]

GPUS: dict[str, GpuSpec] = {g.name: g for g in _GPUS}

ALIASES: dict[str, str] = {
    "4060ti16": "4060ti", "4060ti16gb": "4060ti", "4070tisuper": "4070tis",
    "6000adageneration": "6000ada", "pro6000blackwell": "pro6000",
    "a100": "a100-80", "a10080gb": "a100-80", "a10040gb": "a100-40",
    "h100sxm": "h100", "h100sxm5": "h100", "h100pcie": "h100-pcie",
}

# NVML marketing names (lower case, "NVIDIA "/"GeForce " dropped) -> catalog key. Names that are not
# here (4090 D, 4080 SUPER, H100 NVL, ...) are different products: `auto` refuses them by name.
NVML_NAMES: dict[str, str] = {
    "rtx 3090": "3090", "rtx 4060 ti": "4060ti", "rtx 4070 ti super": "4070tis", "rtx 4080": "4080",
    "rtx 4090": "4090", "rtx 5080": "5080", "rtx 5090": "5090",
    "rtx 6000 ada generation": "6000ada",
    "rtx pro 6000 blackwell workstation edition": "pro6000",
    "rtx pro 6000 blackwell server edition": "pro6000",
    "l4": "l4", "l40s": "l40s",
    "a100-sxm4-40gb": "a100-40", "a100-pcie-40gb": "a100-40",
    "a100-sxm4-80gb": "a100-80", "a100 80gb pcie": "a100-80",
    "h100 pcie": "h100-pcie", "h100 80gb hbm3": "h100", "h200": "h200", "b200": "b200",
}


def _norm(name: str) -> str:
    """"NVIDIA GeForce RTX-4090" -> "4090": lower case, no separators, no vendor/brand prefix."""
    key = re.sub(r"[\s_\-]+", "", name.lower())
    return re.sub(r"^(nvidia)?(geforce)?(rtx)?", "", key) or key


_LOOKUP: dict[str, str] = {_norm(k): k for k in GPUS} | {_norm(a): k for a, k in ALIASES.items()}


def resolve_gpu(name: str) -> GpuSpec:
    """A catalog GPU by key or alias, case-insensitive: "4090", "RTX-4090", "a100", "h100-sxm"."""
    key = _LOOKUP.get(_norm(name))
    if key is not None:
        return GPUS[key]
    spelled = [*GPUS, *ALIASES]
    # aliases suggested as the catalog key they stand for, so that every suggestion is in the list below
    close = list(dict.fromkeys(ALIASES.get(c, c) for c in
                               difflib.get_close_matches(name.strip().lower(), spelled, n=4, cutoff=0.4)))
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ValueError(f"unknown GPU {name!r}: {hint}Known GPUs: {', '.join(GPUS)}")


def match_nvml_name(marketing_name: str) -> GpuSpec:
    """The catalog entry for a driver-reported name ("NVIDIA GeForce RTX 4090" -> 4090)."""
    key = re.sub(r"\s+", " ", marketing_name.strip().lower())
    key = re.sub(r"^(nvidia )?(geforce )?", "", key)
    if key in NVML_NAMES:
        return GPUS[NVML_NAMES[key]]
    close = difflib.get_close_matches(key, list(NVML_NAMES), n=3, cutoff=0.6)
    hint = f" (closest: {', '.join(GPUS[NVML_NAMES[c]].name for c in close)})" if close else ""
    raise ValueError(f"GPU {marketing_name!r} is not in the catalog{hint}. If it performs like a "
                     f"catalog GPU, name it instead of auto, e.g. --gpus 1x4090; known GPUs: "
                     f"{', '.join(GPUS)}")
