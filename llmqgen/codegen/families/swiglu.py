"""SwiGLU family: h = silu(gate) * up over the fused gate_up [BT, 2F] (+ amax of h), and its backward.

Also home of the launch-size helpers the other elementwise families share (grid-stride grids)."""
from __future__ import annotations

from ..kernel import Kernel, cdiv

TEMPLATE = "_swiglu.cu.j2"
THREADS = 256

# Resident threads per SM by architecture (CUDA occupancy tables); unknown archs get the small value.
_THREADS_PER_SM = {"sm_80": 2048, "sm_90": 2048, "sm_90a": 2048, "sm_100": 2048}


def resident_blocks(ctx: dict, threads: int) -> int:
    """Blocks of `threads` that fill every SM of the plan's GPU once: the grid of a grid-stride kernel."""
    per_sm = _THREADS_PER_SM.get(ctx["GPU_ARCH"], 1536)
    return ctx["SM_COUNT"] * max(1, per_sm // threads)


def grid_stride_blocks(ctx: dict, items: int, threads: int = THREADS) -> int:
    """Grid for `items` work items, one per thread per iteration: no more than one resident wave."""
    return max(1, min(cdiv(items, threads), resident_blocks(ctx, threads)))


def _amax_arg(ctx: dict) -> tuple[tuple[str, str], ...]:
    return (("amax", "float*"),) if ctx["FP8"] else ()


def context(ctx: dict) -> dict:
    if ctx["F"] % 8:
        raise ValueError(f"SwiGLU needs intermediate_size % 8 == 0 for 16-byte vectors, got F={ctx['F']}")
    return {"SWIGLU_THREADS": THREADS}


def kernels(ctx: dict) -> list[Kernel]:
    items = ctx["BT"] * ctx["F"] // 8                      # one 16-byte vector of h per item
    grid = (grid_stride_blocks(ctx, items), 1, 1)
    block = (THREADS, 1, 1)
    return [
        Kernel("llmq_swiglu_forward", grid, block,
               (("h", "bf16*"), ("gate_up", "const bf16*")) + _amax_arg(ctx),
               doc="h = silu(gate) * up; gate_up [BT,2F] (gate | up) -> h [BT,F], amax(h)"),
        Kernel("llmq_swiglu_backward", grid, block,
               (("d_gate_up", "bf16*"), ("dh", "const bf16*"), ("gate_up", "const bf16*")) + _amax_arg(ctx),
               doc="d_gate = dh*up*silu'(gate), d_up = dh*silu(gate) -> d_gate_up [BT,2F], amax"),
    ]
