"""Every constant of the memory and cost models, in one place, so that measurements can replace them.

Rates are fractions of a GPU's datasheet figure (GpuSpec); the H200 values come from
shared/H200-RATES.md (cuBLASLt FP8 block GEMMs of real training steps reach ~1150 of 1979 TFLOP/s,
BF16 ~680 of 989, cuDNN SDPA 230-460 TFLOP/s, device copies 4.3 TB/s of 4.8, pinned PCIe 55 GB/s).
"""
from __future__ import annotations

GiB = 1 << 30
MiB = 1 << 20

# --- memory --------------------------------------------------------------------------------------
ARENA_ALIGN = 256                    # every row of the memory table starts on this boundary
CONTEXT_RESERVE = 640 * MiB          # CUDA context, cuBLASLt/cuDNN handles, module, graph pools
CUBLAS_WORKSPACE = 32 * MiB          # cuBLASLt's recommended workspace on Hopper/Ada
ATTN_WORKSPACE_MIN = 16 * MiB        # cuDNN SDPA fixed part (the per-token part is computed)
DEVICE_MARGIN = 0.03                 # keep this fraction of device memory free (fragmentation, driver)
HOST_USABLE = 0.80                   # fraction of host RAM a plan may pin
GRADNORM_PARTIALS = 1 << 16          # fp32 partial sums of the deterministic global norm
COMM_PIECE = 16 * MiB                # copy-engine collectives move tensors in pieces of this size
STATS_SLOT = 32                      # bytes per FP8 tensor's slot: amax @0, descale @16 (16-byte aligned)

# --- cost: achieved fraction of the datasheet dense rate --------------------------------------
# GEMM efficiency rises with size; e(flops) = GEMM_EFF_MAX * f / (f + GEMM_EFF_HALF_FLOPS).
GEMM_EFF_MAX = {"e4m3": 0.64, "bf16": 0.72}
GEMM_EFF_HALF_FLOPS = 2.0e9          # a GEMM of 2 GFLOP reaches half of GEMM_EFF_MAX
CONSUMER_GEMM_SCALE = 0.75           # GeForce cards clock down under sustained tensor load (unmeasured)
ATTN_EFF = {"fwd": 0.38, "bwd": 0.27}   # of the BF16 dense rate (cuDNN SDPA, causal)
MEM_EFF = 0.80                       # elementwise kernels: fraction of DRAM bandwidth
BWD_ELEMENTWISE_RATIO = 1.9          # backward elementwise bytes / forward (counted per kernel)
HOST_STAGED_EFF = 0.85               # host-staged collectives: 21.5 GB/s of payload of the 25 GB/s half-link (H200)
PCIE_EFF = 1.0                       # GpuSpec.pcie_gbs already holds the practical rate
KERNEL_LAUNCH_US = 2.5               # per launch inside a CUDA graph
SHARDING_MARGIN = 0.02               # each ZeRO level above 1 must be this much faster to be chosen
OFFLOAD_OVERLAP = 0.85               # fraction of streamed traffic hidden behind compute
NETWORK_GBS = 25.0                   # between machines per GPU (200 Gb/s NIC), a guess until measured
