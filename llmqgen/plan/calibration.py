"""Every constant of the memory and cost models, in one place, so that measurements can replace them.

Rates are fractions of a GPU's datasheet figure (GpuSpec); the H200 values come from
shared/H200-RATES.md (cuBLASLt FP8 block GEMMs of real training steps reach ~1150 of 1979 TFLOP/s,
BF16 ~680 of 989, cuDNN SDPA 230-460 TFLOP/s, device copies 4.3 TB/s of 4.8, pinned PCIe 55 GB/s).
"""
from __future__ import annotations

GiB = 1 << 30
MiB = 1 << 20

# --- memory --------------------------------------------------------------------------------------
CONTEXT_RESERVE = 640 * MiB          # CUDA context, cuBLASLt/cuDNN handles, module, graph pools
CUBLAS_WORKSPACE = 32 * MiB          # cuBLASLt's recommended workspace on Hopper/Ada
ATTN_WORKSPACE_MIN = 16 * MiB        # cuDNN SDPA fixed part (the per-token part is computed)
DEVICE_MARGIN = 0.03                 # keep this fraction of device memory free (fragmentation, driver)
HOST_USABLE = 0.80                   # fraction of host RAM a plan may pin
GRADNORM_PARTIALS = 1 << 16          # fp32 partial sums of the deterministic global norm
COMM_PIECE = 16 * MiB                # copy-engine collectives move tensors in pieces of this size

# --- cost: achieved fraction of the datasheet dense rate --------------------------------------
# GEMM efficiency rises with size; e(flops) = GEMM_EFF_MAX * f / (f + GEMM_EFF_HALF_FLOPS).
GEMM_EFF_MAX = {"e4m3": 0.64, "bf16": 0.72}
GEMM_EFF_HALF_FLOPS = 2.0e9          # a GEMM of 2 GFLOP reaches half of GEMM_EFF_MAX
# FP8 forward GEMMs with fast accumulation (precision.fast_accum), the fastest algorithm timed: this fraction of
# the precise time. H200, Qwen2.5-0.5B's forward GEMMs at 65,536 rows (bench/gemm_candidates.py): 0.86 for the
# block's four, 0.90 for the LM head's. Not measured on GeForce cards: no change there.
FP8_FAST_ACCUM_TIME = 0.87
ATTN_EFF = {"fwd": 0.38, "bwd": 0.27}   # of the BF16 dense rate (cuDNN SDPA, causal), head_dim 128
# head_dim 64 reaches less of it: Qwen2.5-0.5B's profiled attention took 1.35x what ATTN_EFF predicts (7B's,
# head_dim 128, 1.00x): `llmqgen bench --profile` shares of issue 13 times the measured step (bench/results)
ATTN_EFF_HEAD_DIM_64 = 0.74
MEM_EFF = 0.80                       # streaming kernels (optimizer): fraction of DRAM bandwidth
# The micro-step's elementwise operations (quantize, SwiGLU, RMSNorm, RoPE, transposes, cross-entropy, embedding)
# against the bytes plan/traffic.py counts: their profiled time (issue 13's `bench --profile` shares times the
# graphed step, launches taken out) moved those bytes at 0.704 (0.5B), 0.693 (1.5B) and 0.661 (7B) of the
# H200's 4.8 TB/s, FP8 (bench/results/issue13-ab-new-*.json): short rows, reductions and transposes stream
# slower than the optimizer's long vectors.
ELEMENTWISE_EFF = 0.69
HOST_STAGED_EFF = 0.85               # host-staged collectives: 21.5 GB/s of payload of the 25 GB/s half-link (H200)
PCIE_EFF = 1.0                       # GpuSpec.pcie_gbs already holds the practical rate
KERNEL_LAUNCH_US = 2.5               # per launch inside a CUDA graph
SHARDING_MARGIN = 0.02               # each ZeRO level above 1 must be this much faster to be chosen
OFFLOAD_MARGIN = 0.02                # a plan offloading more must be this much faster than the fastest plan,
                                     # else the fastest that offloads less is chosen (its PCIe overlap is
                                     # estimated, and it pins host RAM); recompute has no margin: its cost
                                     # is GEMM/elementwise time the model predicts like everything else
OFFLOAD_OVERLAP = 0.85               # fraction of streamed traffic hidden behind compute
NETWORK_GBS = 25.0                   # between machines per GPU (200 Gb/s NIC), a guess until measured

# --- cost: GeForce cards (consumer=True in the GPU catalog) -------------------------------------
# Fitted to LLMQ's published single-RTX 4090 results (arXiv 2512.15306; seq 1024, 524,288 tokens
# per step, PCIe 4.0 x16, 24 GB), tokens/s FP8 / BF16: 0.5B mb16 47.6k / 39.9k; 1.5B mb4 20.3k / 14.1k;
# 3B mb4 (master + Adam offloaded) 10.7k / 7.0k; 7B mb16 (block recompute, master/Adam/residual/
# quantized weights offloaded) 4.33k / 2.78k; 14B mb32 (block recompute, everything offloaded)
# 2.00k / 1.35k. tests/unit/test_llmq_4090.py checks the fit. Measured on the 4090 only: the other
# GeForce cards use the same fractions of their own datasheet rates.
# Fit (tokens/s of the 10 rows, with LLMQ's micro-batch, recompute and offload pinned, and with the
# solver's own choices at LLMQ's micro-batch): every row within 6.5%, RMS 3.5%, with the earlier per-block
# bytes formula; with plan/traffic.py's count of the schedule's kernels, unrefitted: within 9.4%, RMS 4.7%
# (CONSUMER_MEM_EFF 0.80-1.0 all give RMS 4.7-5.1%: the misfit is not this constant's).
# The previous guess (H200 fractions x 0.75 for GeForce clocks) predicted 37-47% too slow. What the fit says: the 4090's
# GEMMs run at about its datasheet rate (it boosts well above the 2.52 GHz the datasheet assumes; FP8
# is held back more by the power limit), far closer to peak than the H200's power-limited FP8 GEMMs,
# and they reach it at smaller sizes (the half-efficiency size scales with the rate: 0.33 GFLOP at
# 330 TFLOP/s is the same ~1 us as the H200's 2 GFLOP at 1979). LLMQ's block recompute costs its full
# extra forward here too (the 7B rows are fitted with it).
CONSUMER_GEMM_EFF_MAX = {"e4m3": 0.92, "bf16": 1.00}
CONSUMER_GEMM_EFF_HALF_FLOPS = 0.33e9
CONSUMER_ATTN_EFF = {"fwd": 0.50, "bwd": 0.355}   # of the BF16 dense rate (flash attention on Ada)
CONSUMER_MEM_EFF = 0.90               # elementwise kernels: fraction of DRAM bandwidth (72 MB L2 helps)
# Offload on the 4090 (PCIe 4.0 x16, GpuSpec.pcie_gbs = 25.2 GB/s, PCIE_EFF and OFFLOAD_OVERLAP above):
# LLMQ's offloaded rows are compute-bound at these micro-batches (7B mb16: ~1 s of streams per ~3.8 s
# micro-step; 14B mb32: ~3.4 s of transfers per ~16 s), so the data confirm that the streams hide
# but cannot pin OFFLOAD_OVERLAP itself; the exposed optimizer streaming (2 x offloaded state / PCIe,
# 2-3% of the 3B-14B steps) is consistent with 3B (master + Adam offloaded) reaching the 1.5B's SOL.
