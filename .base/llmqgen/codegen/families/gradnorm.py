"""Deterministic global gradient L2 norm and clip scale.

`llmq_gradnorm_partial` runs once per gradient tensor with a grid fixed by `layout.gradnorm_partials` (never by
the GPU model, so the norm is bit-identical across GPUs and runs) and writes one fp32 sum of squares
per block; `llmq_gradnorm_finalize` sums all partials in a fixed order and writes the norm slot
{norm, clip_scale, nonfinite, sum_sq}. AdamW reads clip_scale (slot + 1) and skips the step when it is 0.
"""
from __future__ import annotations

from ...layout import GRADNORM_MAX_BLOCKS
from ...layout import gradnorm_partials as partials_layout  # noqa: F401 - runtime/rank.py grids its launches by it
from ..kernel import Kernel
from .adamw import HYPER

TEMPLATE = "_gradnorm.cu.j2"

THREADS = 256
FINAL_THREADS = 1024
SLOT = ("norm", "clip_scale", "nonfinite", "sum_sq")   # float[4] written by the finalize


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
            grid=(GRADNORM_MAX_BLOCKS, 1, 1),
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
