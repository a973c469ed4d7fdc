"""Flash attention (causal, GQA) on packed QKV: the generated fallback where cuDNN is unavailable.

Kernels, in the order a step runs them (the runtime runs the kernels of an operation's role in table order,
binding each argument to the operation's field of the same name):
  llmq_attention_forward   qkv [BT, QKV] -> out [BT, QDIM] bf16, lse [B, HQ, T] fp32 (natural log)
  llmq_attention_bwd_dot   out, dout [BT, QDIM] -> delta [B, HQ, T] fp32 = rowsum(dout * out)
  llmq_attention_backward  qkv, dout, lse, delta -> dqkv [BT, QKV] bf16 (every element written once)

The backward is deterministic: CTAs of one kind own a (batch, kv head, key tile) and sum dK/dV over the
group's query heads in registers; CTAs of the other kind own a (batch, query head, query tile) and
recompute P and dP to form dQ (two more small matmuls instead of fp32 atomics), so no scratch buffer
beyond delta is needed. ATTN_BWD_CHUNKS (cuDNN's workspace chunking over the batch) does not apply.
"""
from __future__ import annotations

import math

from ...layout import FLASH_BLOCK as BLOCK     # query rows = key rows of a tile; 4 warps x 16 rows
from ...layout import attention_stats_bytes, flash_smem, flash_unsupported
from ..kernel import Kernel, cdiv

TEMPLATE = "_flash_attention.cu.j2"

SUB = 32              # columns per inner step of the backward: keeps dK+dV (2*HD/8 fp32 x 4) in registers
THREADS = 128
DOT_THREADS = 256
DEFAULT_SMEM = 48 * 1024  # above this a kernel needs CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES

BF16_PTR, F32_PTR = "__nv_bfloat16*", "float*"


def unsupported_reason(ctx: dict) -> str | None:
    """Why this plan cannot use the generated attention (then it needs cuDNN), or None."""
    return flash_unsupported(ctx["HD"], ctx["T"], ctx["HQ"], ctx["HKV"], ctx["MAX_SMEM"])


def enabled(ctx: dict) -> bool:
    return unsupported_reason(ctx) is None


def _check(ctx: dict) -> None:
    reason = unsupported_reason(ctx)
    if reason:
        raise ValueError(reason)


def context(ctx: dict) -> dict:
    _check(ctx)
    hd = ctx["HD"]
    return {
        "FA_BLOCK": BLOCK,
        "FA_LD": hd + 8,
        "FA_SUB": SUB,
        "FA_THREADS": THREADS,
        "FA_SCALE": repr(1.0 / math.sqrt(hd)),
        "FA_SCALE_LOG2": repr(math.log2(math.e) / math.sqrt(hd)),
        "FA_DKV_CTAS": ctx["B"] * ctx["HKV"] * (ctx["T"] // BLOCK),
    }


def kernels(ctx: dict) -> list[Kernel]:
    _check(ctx)
    b, t, hq, hkv, hd = ctx["B"], ctx["T"], ctx["HQ"], ctx["HKV"], ctx["HD"]
    nt = t // BLOCK
    smem = flash_smem(hd)
    stats_bytes = attention_stats_bytes(b, hq, t)
    dkv_ctas, dq_ctas = b * hkv * nt, b * hq * nt
    # Causal tile pairs each CTA kind visits: the backward's work is 2x the forward's plus the group loop.
    pairs = b * hq * nt * (nt + 1) // 2
    return [
        Kernel(
            name="llmq_attention_forward",
            grid=(nt, hq, b), block=(THREADS, 1, 1),
            args=(("qkv", "const " + BF16_PTR), ("out", BF16_PTR), ("lse", F32_PTR)),
            smem=smem["forward"],
            doc="out = softmax(q k^T / sqrt(HD), causal, GQA) v; lse = logsumexp of the scaled scores",
            meta={"tile": BLOCK, "lse_bytes": stats_bytes, "tile_pairs": pairs,
                  "smem_optin": smem["forward"] > DEFAULT_SMEM},
            role="attention_forward",
        ),
        Kernel(
            name="llmq_attention_bwd_dot",
            grid=(cdiv(b * t * hq * (hd // 8), DOT_THREADS), 1, 1), block=(DOT_THREADS, 1, 1),
            args=(("out", "const " + BF16_PTR), ("dout", "const " + BF16_PTR), ("delta", F32_PTR)),
            doc="delta[b, h, t] = sum_d dout * out over head h (the softmax backward's row term)",
            meta={"delta_bytes": stats_bytes},
            role="attention_backward",
        ),
        Kernel(
            name="llmq_attention_backward",
            grid=(dkv_ctas + dq_ctas, 1, 1), block=(THREADS, 1, 1),
            args=(("qkv", "const " + BF16_PTR), ("dout", "const " + BF16_PTR), ("lse", "const " + F32_PTR),
                  ("delta", "const " + F32_PTR), ("dqkv", BF16_PTR)),
            smem=smem["backward"],
            doc="dqkv of causal GQA attention, deterministic: dK/dV CTAs per key tile, dQ CTAs per query tile",
            meta={"tile": BLOCK, "sub": SUB, "dkv_ctas": dkv_ctas, "dq_ctas": dq_ctas,
                  "scratch_bytes": 0, "deterministic": True, "ignores_attn_bwd_chunks": True,
                  "smem_optin": smem["backward"] > DEFAULT_SMEM},
            role="attention_backward",
        ),
    ]
