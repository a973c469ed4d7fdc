"""Fused LM-head cross-entropy: per-row loss, LSE and dlogits in place, plus the loss reduce.

The LM head runs in LM_HEAD_CHUNKS chunks of RC = BT / LM_HEAD_CHUNKS rows: cuBLAS writes a chunk's
bf16 logits [RC, V], `llmq_crossentropy_fused` (one block per row) turns them into their gradient in
place, and the next GEMMs consume it. `llmq_loss_reduce` sums the per-token losses once per micro-step.

An FP8 head (precision.lm_head "fp8") splits the fused kernel: `llmq_crossentropy_stats` (one block per row:
loss and LSE) and `llmq_crossentropy_dual` (64x64 tiles: the gradient in e5m2, [RC, V] for dgrad and its
transpose [V, RC] for wgrad, through shared memory; the same two reads of the logits). Its scale is the
gradient's exact bound: |softmax - onehot| <= 1, so the bytes are (softmax - onehot) * E5M2_MAX and the
descale grad_scale / E5M2_MAX; nothing saturates and no amax pass is needed.
"""
from __future__ import annotations

from ..kernel import Kernel, cdiv
from .quantize import FMAX

TEMPLATE = "_crossentropy.cu.j2"

IGNORE_INDEX = -100          # HF/PyTorch convention for "no target here"
LOSS_REDUCE_THREADS = 1024
DUAL_TILE, DUAL_THREADS = 64, 256   # the quantize family's tiles (llmq_quant::Tile, store_transposed)


def _ce_threads(v: int) -> int:
    """Threads per row: about 8 vector loads per thread, a power of two in [128, 1024]."""
    want = cdiv(v, 8 * 8)
    threads = 128
    while threads < want and threads < 1024:
        threads *= 2
    return threads


def rows_per_chunk(ctx: dict) -> int:
    bt, chunks = ctx["BT"], ctx["LM_HEAD_CHUNKS"]
    if chunks < 1 or bt % chunks:
        raise ValueError(f"LM_HEAD_CHUNKS={chunks} must divide B*T={bt}: pick a chunk count that divides "
                         f"the tokens per micro-step (e.g. a power of two)")
    return bt // chunks


def context(ctx: dict) -> dict:
    return {
        "CE_THREADS": _ce_threads(ctx["V"]),
        "CE_VEC": 8 if ctx["V"] % 8 == 0 else 1,   # rows stay 16-byte aligned only when V % 8 == 0
        "CE_REDUCE_THREADS": LOSS_REDUCE_THREADS,
        "CE_IGNORE_INDEX": IGNORE_INDEX,
        "CE_ROWS": rows_per_chunk(ctx),
        "CE_E5M2_MAX": FMAX["e5m2"],
    }


def kernels(ctx: dict) -> list[Kernel]:
    extra = context(ctx)
    rc = extra["CE_ROWS"]
    meta = {"rows": rc, "chunks": ctx["LM_HEAD_CHUNKS"], "ignore_index": IGNORE_INDEX,
            "row_offset": "chunk index * rows"}
    if ctx["FP8_HEAD"]:
        row_kernels = [
            Kernel(name="llmq_crossentropy_stats", grid=(rc, 1, 1), block=(extra["CE_THREADS"], 1, 1),
                   args=(("logits", "const __nv_bfloat16*"), ("targets", "const int*"), ("losses", "float*"),
                         ("lse", "float*"), ("row_offset", "int")),
                   doc="per row of a logits chunk: LSE, loss = LSE - x[target]", meta=meta),
            Kernel(name="llmq_crossentropy_dual", grid=(cdiv(ctx["V"], DUAL_TILE), cdiv(rc, DUAL_TILE), 1),
                   block=(DUAL_THREADS, 1, 1),
                   args=(("out", "uint8_t*"), ("out_t", "uint8_t*"), ("logits", "const __nv_bfloat16*"),
                         ("targets", "const int*"), ("lse", "const float*"), ("grad_scale", "const float*"),
                         ("stats", "float*"), ("row_offset", "int")),
                   doc="out [RC,V] and out_t [V,RC] = e5m2((softmax(x) - onehot) * E5M2_MAX); "
                       "stats[4] = grad_scale / E5M2_MAX", meta=meta),
        ]
    else:
        row_kernels = [
            Kernel(name="llmq_crossentropy_fused", grid=(rc, 1, 1), block=(extra["CE_THREADS"], 1, 1),
                   args=(("logits", "__nv_bfloat16*"), ("targets", "const int*"), ("losses", "float*"),
                         ("lse", "float*"), ("grad_scale", "const float*"), ("row_offset", "int")),
                   doc="per row of a logits chunk: LSE, loss = LSE - x[target], "
                       "x <- (softmax(x) - onehot) * grad_scale", meta=meta)]
    return row_kernels + [
        Kernel(
            name="llmq_loss_reduce",
            grid=(1, 1, 1),
            block=(LOSS_REDUCE_THREADS, 1, 1),
            args=(("losses", "const float*"), ("scale", "const float*"), ("acc", "float*")),
            doc="acc += scale * sum(losses[BT]) in a fixed order (deterministic)",
            meta={"n": ctx["BT"]},
        ),
    ]
