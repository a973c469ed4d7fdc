"""Embedding family: x = wte[tokens] and a deterministic backward (no float atomics).

The backward's host side sorts each micro-batch's positions stably by token id and hands the kernel
(sorted positions int32[BT], segment starts int32[BT+1], number of segments as an int32 device
scalar); one block per segment sums its dx rows in position order and adds once into dwte."""
from __future__ import annotations

import numpy as np

from ...layout import grid_stride_blocks, row_threads
from ..kernel import Kernel

TEMPLATE = "_embedding.cu.j2"
FWD_THREADS = 256


def context(ctx: dict) -> dict:
    if ctx["C"] % 8:
        raise ValueError(f"the embedding needs hidden_size % 8 == 0 for 16-byte vectors, got C={ctx['C']}")
    threads, vpt = row_threads(ctx["C"] // 8)
    return dict(EMB_FWD_THREADS=FWD_THREADS, EMB_BWD_THREADS=threads, EMB_BWD_VPT=vpt)


def kernels(ctx: dict) -> list[Kernel]:
    BT, C = ctx["BT"], ctx["C"]
    bwd_threads, _ = row_threads(C // 8)
    fwd_blocks = grid_stride_blocks(ctx["GPU_ARCH"], ctx["SM_COUNT"], BT * C // 8, FWD_THREADS)
    return [
        Kernel("llmq_embedding_forward", (fwd_blocks, 1, 1),
               (FWD_THREADS, 1, 1), (("x", "bf16*"), ("tokens", "const int*"), ("wte", "const bf16*")),
               doc="x[i] = wte[tokens[i]]; traps on a token id outside [0, V)"),
        Kernel("llmq_embedding_backward", (BT, 1, 1), (bwd_threads, 1, 1),
               (("dwte", "bf16*"), ("dx", "const bf16*"), ("tokens", "const int*"),
                ("sorted_pos", "const int*"), ("seg_start", "const int*"), ("num_segments", "const int*")),
               doc="dwte[t] += sum of dx[p] over the positions p of token t, in position order (deterministic)",
               meta={"host_inputs": "sorted_pos: positions sorted stably by token id; seg_start[s]: first index "
                                    "of segment s in sorted_pos, seg_start[num_segments] = BT",
                     "blocks_exit_past": "num_segments"}),
    ]


def segments(tokens):
    """Host side of the backward, for the runtime and tests: (sorted_pos, seg_start[BT+1], count)."""
    tokens = np.asarray(tokens).reshape(-1)
    order = np.argsort(tokens, kind="stable").astype(np.int32)
    st = tokens[order]
    starts = np.flatnonzero(np.r_[True, st[1:] != st[:-1]]).astype(np.int32)
    seg = np.full(tokens.size + 1, tokens.size, dtype=np.int32)
    seg[:starts.size] = starts
    return order, seg, int(starts.size)
