"""SwiGLU family: h = silu(gate) * up over the fused gate_up [BT, 2F] (+ amax of h), and its backward."""
from __future__ import annotations

from ...layout import grid_stride_blocks
from ..kernel import Kernel

TEMPLATE = "_swiglu.cu.j2"
THREADS = 256

def _amax_arg(ctx: dict) -> tuple[tuple[str, str], ...]:
    return (("amax", "float*"),) if ctx["FP8"] else ()


def context(ctx: dict) -> dict:
    if ctx["F"] % 8:
        raise ValueError(f"SwiGLU needs intermediate_size % 8 == 0 for 16-byte vectors, got F={ctx['F']}")
    return {"SWIGLU_THREADS": THREADS}


def kernels(ctx: dict) -> list[Kernel]:
    items = ctx["BT"] * ctx["F"] // 8                      # one 16-byte vector of h per item
    grid = (grid_stride_blocks(ctx["GPU_ARCH"], ctx["SM_COUNT"], items, THREADS), 1, 1)
    block = (THREADS, 1, 1)
    return [
        Kernel("llmq_swiglu_forward", grid, block,
               (("h", "bf16*"), ("gate_up", "const bf16*")) + _amax_arg(ctx),
               doc="h = silu(gate) * up; gate_up [BT,2F] (gate | up) -> h [BT,F], amax(h)"),
        Kernel("llmq_swiglu_backward", grid, block,
               (("d_gate_up", "bf16*"), ("dh", "const bf16*"), ("gate_up", "const bf16*")) + _amax_arg(ctx),
               doc="d_gate = dh*up*silu'(gate), d_up = dh*silu(gate) -> d_gate_up [BT,2F], amax"),
    ]
