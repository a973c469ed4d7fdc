"""Shard family (several GPUs): the arithmetic of copy-engine collectives and of sharded optimizer steps.

The copy engines move bytes; these kernels do what moving cannot:
  llmq_reduce_bf16     dst = [dst +] sum over ranks in rank order, one rank's part read in place (own),
                       the others from the staging row comm.recv (N-1 slots, `stride` elements apart):
                       the reduce-scatter's reduction, on the receiving GPU, fp32 sum, rounded once
  llmq_reduce_max_f32  dst = max(dst, staged slots): the all-reduce of FP8 weight amaxes
  llmq_add_bf16        dst += src: ZeRO-2 accumulates a reduced layer shard into its gradient shard
  llmq_cast_f32_bf16   dst = bf16(src): an fp32 master shard published into the bf16 work copy
All sizes are runtime arguments (pieces and shards differ per tensor); grids are one resident wave.
"""
from __future__ import annotations

from ...layout import grid_stride_blocks
from ..kernel import Kernel

TEMPLATE = "_shard.cu.j2"
THREADS = 256
E = 8                      # bf16 elements per 16-byte vector
WAVE_ITEMS = 1 << 30       # runtime sizes: the grid is the resident wave, whatever n is


def enabled(ctx: dict) -> bool:
    return ctx["NUM_GPUS"] > 1 or ctx["MASTER_FP32"]


def context(ctx: dict) -> dict:
    return {"SHARD_THREADS": THREADS, "SHARD_WORLD": ctx["NUM_GPUS"]}


def kernels(ctx: dict) -> list[Kernel]:
    grid = (grid_stride_blocks(ctx["GPU_ARCH"], ctx["SM_COUNT"], WAVE_ITEMS, THREADS), 1, 1)
    block = (THREADS, 1, 1)
    out = []
    if ctx["NUM_GPUS"] > 1:
        out += [
            Kernel("llmq_reduce_bf16", grid, block,
                   (("dst", "bf16*"), ("own", "const bf16*"), ("staged", "const bf16*"), ("stride", "int64_t"),
                    ("n", "int64_t"), ("self_rank", "int"), ("accumulate", "int")),
                   doc="dst = [dst +] sum_r (r == self ? own : staged[slot(r)]) in rank order, fp32",
                   meta={"runtime_size": True, "world": ctx["NUM_GPUS"]}, role="reduce_scatter"),
            Kernel("llmq_reduce_max_f32", grid, block,
                   (("dst", "float*"), ("staged", "const float*"), ("stride", "int64_t"), ("n", "int64_t")),
                   doc="dst = max(dst, staged[0..N-2]) elementwise", meta={"runtime_size": True},
                   role="all_reduce_max"),
            Kernel("llmq_add_bf16", grid, block, (("dst", "bf16*"), ("src", "const bf16*"), ("n", "int64_t")),
                   doc="dst += src, fp32 add rounded to nearest", meta={"runtime_size": True},
                   role="reduce_scatter_add"),
        ]
    if ctx["MASTER_FP32"]:
        out.append(Kernel("llmq_cast_f32_bf16", grid, block,
                          (("dst", "bf16*"), ("src", "const float*"), ("n", "int64_t")),
                          doc="dst = bf16_rn(src)", meta={"runtime_size": True}))
    return out
