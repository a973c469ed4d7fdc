"""RoPE family: the cos/sin table, NeoX/Qwen half-split rotation of the q and k heads of the fused
qkv [BT, QKV] (position = row % T), and its inverse in backward (+ amax of dqkv for FP8 plans).

inv_freq (with Llama-3 scaling) is computed here in Python and baked into the program as constants:
the table kernel then only does angle = pos * inv_freq and cos/sin in fp32, as HF does.
Qwen3 (QK_NORM): per-head RMSNorm of q and k (weights q_norm[HD], k_norm[HD]) before the rotation,
fused; forward then writes a separate buffer (the un-normed qkv stays saved for backward) and saves
rstd [BT, HQ+HKV]; backward adds the q/k-norm backward and deterministic weight gradients."""
from __future__ import annotations

import math

import numpy as np

from ...layout import ROPE_THREADS as THREADS
from ...layout import grid_stride_blocks, rope_backward_blocks, rope_backward_heads, rope_lanes
from ..kernel import Kernel

TEMPLATE = "_rope.cu.j2"


def inv_freq(ctx: dict) -> np.ndarray:
    """float32 [HD/2], HF's rotary frequencies (default or "llama3" rope_type)."""
    hd = ctx["HD"]
    f = 1.0 / (ctx["ROPE_THETA"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    sc = ctx["ROPE_SCALING"]
    if sc:
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / f
        scaled = np.where(wavelen > old / lo, f / factor, f)
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        f = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return f.astype(np.float32)


def _bwd_heads(ctx: dict) -> int:
    return rope_backward_heads(ctx["HQ"], ctx["HKV"], ctx["FP8"], ctx["QK_NORM"])


def _fwd_heads(ctx: dict) -> int:
    return ctx["HQ"] + (2 if ctx["QK_NORM"] else 1) * ctx["HKV"]


def _grids(ctx: dict) -> tuple[int, int, int]:
    arch, sms, bt, hd = ctx["GPU_ARCH"], ctx["SM_COUNT"], ctx["BT"], ctx["HD"]
    return (grid_stride_blocks(arch, sms, ctx["T"] * hd // 2, THREADS),
            grid_stride_blocks(arch, sms, bt * _fwd_heads(ctx) * rope_lanes(hd), THREADS),
            rope_backward_blocks(arch, sms, bt, _bwd_heads(ctx), hd))


def context(ctx: dict) -> dict:
    hd = ctx["HD"]
    if hd % 16 or (hd // 16) & (hd // 16 - 1) or hd > 512:
        raise ValueError(f"RoPE kernels need head_dim = 16 * 2^k <= 512 (64, 128, 256...), got {hd}")
    _, _, bwd_blocks = _grids(ctx)
    return dict(ROPE_INV_FREQ=[f"{x:.9e}f" for x in inv_freq(ctx)], ROPE_THREADS=THREADS, ROPE_LANES=rope_lanes(hd),
                ROPE_FWD_HEADS=_fwd_heads(ctx), ROPE_BWD_HEADS=_bwd_heads(ctx), ROPE_BWD_BLOCKS=bwd_blocks)


def kernels(ctx: dict) -> list[Kernel]:
    tgrid, fgrid, bgrid = _grids(ctx)
    blk, qkn, fp8 = (THREADS, 1, 1), ctx["QK_NORM"], ctx["FP8"]
    amax = (("amax", "float*"),) if fp8 else ()
    out = [Kernel("llmq_rope_table", (tgrid, 1, 1), blk, (("table", "float2*"),),
                  doc="table[t, i] = (cos, sin)(t * inv_freq[i]), float2 [T, HD/2]")]
    if qkn:
        scratch = bgrid * 2 * ctx["HD"]
        out += [
            Kernel("llmq_rope_forward", (fgrid, 1, 1), blk,
                   (("out", "bf16*"), ("qkv", "const bf16*"), ("table", "const float2*"),
                    ("q_norm", "const bf16*"), ("k_norm", "const bf16*"), ("rstd", "float*")),
                   doc="out = rope(rmsnorm_head(q|k) * w), v copied; rstd [BT, HQ+HKV] saved",
                   meta={"rstd_floats": ctx["BT"] * (ctx["HQ"] + ctx["HKV"])}),
            Kernel("llmq_rope_backward", (bgrid, 1, 1), blk,
                   (("dqkv", "bf16*"), ("d", "const bf16*"), ("qkv", "const bf16*"), ("rstd", "const float*"),
                    ("table", "const float2*"), ("q_norm", "const bf16*"), ("k_norm", "const bf16*"),
                    ("dw_partial", "float*")) + amax,
                   doc="dqkv = qknorm_bwd(rope^-1(d)), v passed through; dw partials [blocks, 2*HD]",
                   meta={"dw_scratch_floats": scratch, "dw_scratch_bytes": 4 * scratch,
                         "in_place_ok": "dqkv may alias d"}),
            Kernel("llmq_rope_qknorm_dweight", (1, 1, 1), (2 * ctx["HD"], 1, 1),
                   (("dq_norm", "bf16*"), ("dk_norm", "bf16*"), ("dw_partial", "const float*")),
                   doc="dq_norm, dk_norm += the backward's partials summed in block order (deterministic)",
                   meta={"dw_scratch_floats": scratch}),
        ]
    else:
        out += [
            Kernel("llmq_rope_forward", (fgrid, 1, 1), blk, (("qkv", "bf16*"), ("table", "const float2*")),
                   doc="rotate the q and k heads of qkv in place"),
            Kernel("llmq_rope_backward", (bgrid, 1, 1), blk, (("dqkv", "bf16*"), ("table", "const float2*")) + amax,
                   doc="inverse rotation of dq, dk in place; amax over all of dqkv"),
        ]
    return out
