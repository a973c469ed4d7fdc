"""SwiGLU family: h = silu(gate) * up over the fused gate_up [BT, 2F], and its backward d_gate_up. BF16 plans:
bf16 outputs. FP8 plans: each fused with its quantization, in two passes (per-tensor current scaling needs
the whole tensor's amax first): the amax of the bf16-rounded values, then their fp8 bytes from recomputed
values, bit-identical to rounding, then quantizing (h in e4m3; d_gate_up and its transpose in the gradient
format). plan/block.py's h and d_gu slots have no quantize kernels of their own."""
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
    if not ctx["FP8"]:
        return [Kernel("llmq_swiglu_forward", grid, block, (("h", "bf16*"), ("gate_up", "const bf16*")),
                       doc="h = silu(gate) * up; gate_up [BT,2F] (gate | up) -> h [BT,F] bf16"),
                Kernel("llmq_swiglu_backward", grid, block,
                       (("d_gate_up", "bf16*"), ("dh", "const bf16*"), ("gate_up", "const bf16*")),
                       doc="d_gate = dh*up*silu'(gate), d_up = dh*silu(gate) -> d_gate_up [BT,2F] bf16")]
    g = ctx["GRAD_DTYPE"]
    h_meta = dict(rows=BT, cols=F, dst="e4m3", fmax=FMAX["e4m3"])
    d_meta = dict(rows=BT, cols=2 * F, dst=g, fmax=FMAX[g])
    return [
        Kernel("llmq_swiglu_forward_amax", grid, block, (("gate_up", "const bf16*"), ("stats", "float*")),
               doc="stats[0] = max(stats[0], amax(h)) without storing h", meta=h_meta),
        Kernel("llmq_swiglu_forward_fp8", grid, block,
               (("h", "uint8_t*"), ("gate_up", "const bf16*"), ("stats", "float*")),
               doc="h [BT,F] = sat_e4m3(silu(gate) * up * FMAX/amax); stats[4] = amax/FMAX", meta=h_meta),
        Kernel("llmq_swiglu_backward_amax", grid, block,
               (("dh", "const bf16*"), ("gate_up", "const bf16*"), ("stats", "float*")),
               doc="stats[0] = max(stats[0], amax(d_gate_up)) without storing d_gate_up", meta=d_meta),
        Kernel("llmq_swiglu_backward_dual", (cdiv(F, TILE), cdiv(BT, TILE), 1), (TILE_THREADS, 1, 1),
               (("out", "uint8_t*"), ("out_t", "uint8_t*"), ("dh", "const bf16*"), ("gate_up", "const bf16*"),
                ("stats", "float*")),
               doc=f"out [BT,2F] = sat_{g}(d_gate_up * FMAX/amax), out_t [2F,BT] its transpose; stats[4] = amax/FMAX",
               meta=d_meta),
    ]
