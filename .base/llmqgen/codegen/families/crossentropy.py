"""Fused LM-head cross-entropy: per-row loss, LSE and dlogits in place, plus the loss reduce.

The LM head runs in LM_HEAD_CHUNKS chunks of RC = BT / LM_HEAD_CHUNKS rows: cuBLAS writes a chunk's
bf16 logits [RC, V], `llmq_crossentropy_fused` (one block per row) turns them into their gradient in
place, and the next GEMMs consume it. `llmq_loss_reduce` sums the per-token losses once per micro-step.
"""
from __future__ import annotations

from ..kernel import Kernel, cdiv

TEMPLATE = "_crossentropy.cu.j2"

IGNORE_INDEX = -100          # HF/PyTorch convention for "no target here"
LOSS_REDUCE_THREADS = 1024


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
    }


def kernels(ctx: dict) -> list[Kernel]:
    extra = context(ctx)
    rc = extra["CE_ROWS"]
    return [
        Kernel(
            name="llmq_crossentropy_fused",
            grid=(rc, 1, 1),
            block=(extra["CE_THREADS"], 1, 1),
            args=(("logits", "__nv_bfloat16*"), ("targets", "const int*"), ("losses", "float*"),
                  ("lse", "float*"), ("grad_scale", "const float*"), ("row_offset", "int")),
            doc="per row of a logits chunk: LSE, loss = LSE - x[target], x <- (softmax(x) - onehot) * grad_scale",
            meta={"rows": rc, "chunks": ctx["LM_HEAD_CHUNKS"], "ignore_index": IGNORE_INDEX,
                  "row_offset": "chunk index * rows"},
        ),
        Kernel(
            name="llmq_loss_reduce",
            grid=(1, 1, 1),
            block=(LOSS_REDUCE_THREADS, 1, 1),
            args=(("losses", "const float*"), ("scale", "const float*"), ("acc", "float*")),
            doc="acc += scale * sum(losses[BT]) in a fixed order (deterministic)",
            meta={"n": ctx["BT"]},
        ),
    ]
