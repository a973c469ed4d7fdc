"""Deterministic global gradient L2 norm and clip scale.

`llmq_gradnorm_partial` runs once per gradient tensor with a grid fixed by `partials_layout` (never by
the GPU model, so the norm is bit-identical across GPUs and runs) and writes one fp32 sum of squares
per block; `llmq_gradnorm_finalize` sums all partials in a fixed order and writes the norm slot
{norm, clip_scale, nonfinite, sum_sq}. AdamW reads clip_scale (slot + 1) and skips the step when it is 0.
"""
from __future__ import annotations

from ..kernel import Kernel, cdiv
from .adamw import HYPER

TEMPLATE = "_gradnorm.cu.j2"

THREADS = 256
FINAL_THREADS = 1024
MIN_ELEMS_PER_BLOCK = THREADS * 8 * 4     # at least four 16-byte loads per thread
MAX_BLOCKS = 512                          # per tensor: ~4 blocks per SM on the largest GPUs
SLOT = ("norm", "clip_scale", "nonfinite", "sum_sq")   # float[4] written by the finalize


def blocks_for(n: int) -> int:
    if n < 1:
        raise ValueError(f"gradient tensor of {n} elements: every gradient tensor must be non-empty")
    return min(MAX_BLOCKS, cdiv(n, MIN_ELEMS_PER_BLOCK))


def partials_layout(sizes: list[int]) -> tuple[list[int], list[int], int]:
    """Per gradient tensor (in schedule order): its grid, its first partial's index; and the partial count."""
    grids = [blocks_for(n) for n in sizes]
    offsets, total = [], 0
    for g in grids:
        offsets.append(total)
        total += g
    return grids, offsets, total


def context(ctx: dict) -> dict:
    return {
        "GRADNORM_THREADS": THREADS,
        "GRADNORM_FINAL_THREADS": FINAL_THREADS,
        "GRADNORM_MAX_NORM_SLOT": HYPER.index("max_norm"),
    }


def kernels(ctx: dict) -> list[Kernel]:
    return [
        Kernel(
            name="llmq_gradnorm_partial",
            grid=(MAX_BLOCKS, 1, 1),
            block=(THREADS, 1, 1),
            args=(("grad", "const __nv_bfloat16*"), ("n", "int64_t"), ("partials", "float*"),
                  ("slot_offset", "int")),
            doc="partials[slot_offset + block] = sum(grad^2) over the block's grid-stride share",
            meta={"runtime_size": True, "elems_per_block": THREADS * 8,
                  "grid_for": "gradnorm.partials_layout(sizes)"},
            role="gradnorm_partials",
        ),
        Kernel(
            name="llmq_gradnorm_finalize",
            grid=(1, 1, 1),
            block=(FINAL_THREADS, 1, 1),
            args=(("partials", "const float*"), ("n_partials", "int"), ("hyper", "const float*"),
                  ("out", "float*")),
            doc="out = {norm = sqrt(sum partials), clip = min(1, max_norm/norm) (0 if non-finite), nonfinite, sum}",
            meta={"slot": list(SLOT), "max_norm_slot": HYPER.index("max_norm")},
            role="gradnorm_finalize",
        ),
    ]
