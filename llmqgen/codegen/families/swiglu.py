"""SwiGLU family: h = silu(gate) * up over the fused gate_up [BT, 2F] (+ amax of h), and its backward: in BF16
plans d_gate_up in bf16; in FP8 plans fused with the output gradient's quantization (an amax pass, then the
fp8 copy and its transpose from recomputed values: plan/block.py's d_gu slot has no quantize kernel)."""
from __future__ import annotations

from ...layout import grid_stride_blocks
from ..kernel import Kernel, cdiv
from .quantize import FMAX, TILE, TILE_THREADS

TEMPLATE = "_swiglu.cu.j2"
THREADS = 256


def context(ctx: dict) -> dict:
    if ctx["F"] % 8:
        raise ValueError(f"SwiGLU needs intermediate_size % 8 == 0 for 16-byte vectors, got F={ctx['F']}")
    g = ctx["GRAD_DTYPE"]
    return {"SWIGLU_THREADS": THREADS, "SWIGLU_GRAD_FMT": "__NV_E4M3" if g == "e4m3" else "__NV_E5M2",
            "SWIGLU_GRAD_FMAX": "LLMQ_FP8_E4M3_MAX" if g == "e4m3" else "LLMQ_FP8_E5M2_MAX"}


def kernels(ctx: dict) -> list[Kernel]:
    BT, F = ctx["BT"], ctx["F"]
    grid = (grid_stride_blocks(ctx["GPU_ARCH"], ctx["SM_COUNT"], BT * F // 8, THREADS), 1, 1)  # 16-byte vectors of h
    block = (THREADS, 1, 1)
    fwd = Kernel("llmq_swiglu_forward", grid, block,
                 (("h", "bf16*"), ("gate_up", "const bf16*")) + ((("amax", "float*"),) if ctx["FP8"] else ()),
                 doc="h = silu(gate) * up; gate_up [BT,2F] (gate | up) -> h [BT,F], amax(h)")
    if not ctx["FP8"]:
        return [fwd, Kernel("llmq_swiglu_backward", grid, block,
                            (("d_gate_up", "bf16*"), ("dh", "const bf16*"), ("gate_up", "const bf16*")),
                            doc="d_gate = dh*up*silu'(gate), d_up = dh*silu(gate) -> d_gate_up [BT,2F] bf16")]
    g = ctx["GRAD_DTYPE"]
    meta = dict(rows=BT, cols=2 * F, dst=g, fmax=FMAX[g])
    return [
        fwd,
        Kernel("llmq_swiglu_backward_amax", grid, block,
               (("dh", "const bf16*"), ("gate_up", "const bf16*"), ("stats", "float*")),
               doc="stats[0] = max(stats[0], amax(d_gate_up)) without storing d_gate_up", meta=meta),
        Kernel("llmq_swiglu_backward_dual", (cdiv(F, TILE), cdiv(BT, TILE), 1), (TILE_THREADS, 1, 1),
               (("out", "uint8_t*"), ("out_t", "uint8_t*"), ("dh", "const bf16*"), ("gate_up", "const bf16*"),
                ("stats", "float*")),
               doc=f"out [BT,2F] = sat_{g}(d_gate_up * FMAX/amax), out_t [2F,BT] its transpose; stats[4] = amax/FMAX",
               meta=meta),
    ]
