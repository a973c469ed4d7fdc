"""What a schedule operation does to the rows it names (read by plan/lifetimes.py): a write of a whole row
kills the row's old value, anything else reads it."""
from __future__ import annotations

from .refs import row_ref

# Kernel arguments a kernel only writes, by kernel-name prefix (every other argument is read, or read
# and written; the first matching prefix counts: longer ones first). A row is killed by an operation only if
# all its references there are such writes. A norm's y and y_q (delayed scaling) are written one or the other:
# each dies there all the same (the cold path's quantize writes y_q next).
KERNEL_WRITES = {
    "llmq_quantize_": ("out", "out_t"), "llmq_transpose_fp8_": ("out_t",),
    "llmq_rmsnorm_forward_": ("res_out", "y", "y_q", "rstd"), "llmq_rmsnorm_recompute_": ("y", "y_q"),
    "llmq_rmsnorm_backward_": ("dx", "dw_partial"), "llmq_rope_forward": ("out", "rstd"),
    "llmq_rope_backward": ("dw_partial",), "llmq_swiglu_forward": ("h",),
    "llmq_swiglu_backward_dual": ("out", "out_t"), "llmq_swiglu_backward": ("d_gate_up",),
    "llmq_embedding_forward": ("x",), "llmq_crossentropy_fused": ("losses", "lse"),
    "llmq_crossentropy_stats": ("losses", "lse"), "llmq_crossentropy_dual": ("out", "out_t"), "llmq_rope_table": ("table",),
    "llmq_cast_f32_bf16": ("dst",),
}
# Other operations: the fields they only write (a linear's output unless it accumulates), and scratch
# fields written and read within the operation (live at that operation only).
OP_WRITES = {"attention_forward": ("out", "lse"), "attention_backward": ("dqkv",), "memset": ("dst",),
             "copy": ("dst",)}
OP_SCRATCH = {"attention_forward": ("workspace",), "attention_backward": ("workspace", "delta")}


def op_touches(op: dict) -> dict[str, str]:
    """Row name -> "w" (only written, whole), "s" (scratch of this operation) or "r" (read, or partly
    or also written) for every row an operation (not a branch) names. A byte offset, a shard or an
    instance of a multi-instance row is not the whole row (it does not kill it)."""
    refs: list[tuple[object, str]] = []          # (reference, "w" | "s" | "r")
    kind = op["op"]
    if kind == "kernel":
        writes = next((w for p, w in KERNEL_WRITES.items() if op["kernel"].startswith(p)), ())
        refs = [(v, "w" if a in writes else "r") for a, v in op["args"].items()]
    elif kind == "linear":
        out = {"forward": "y", "dgrad": "dx", "wgrad": "dw"}[op["pass"]]
        refs = [(v, "w" if (k == out and not op["accumulate"]) else "r") for k, v in op.items()]
    elif kind == "collective":
        gather = op["kind"] == "all_gather" and op.get("into")
        refs = [(t, "r") for t, _ in op.get("tensors", [])] + [(t, "w" if gather else "r") for t in op.get("into") or []]
        refs += [(op["region"], "r")] if "region" in op else []
    elif kind == "gradnorm_partials":
        refs = [(t, "r") for t, _ in op["tensors"]] + [(op["partials"], "r")]
    else:
        w, s = OP_WRITES.get(kind, ()), OP_SCRATCH.get(kind, ())
        refs = [(v, "w" if k in w else "s" if k in s else "r") for k, v in op.items() if k != "op"]
    out: dict[str, str] = {}
    for value, how in refs:
        ref = row_ref(value)
        if ref is None:
            continue
        how = how if ref.whole() or how == "r" else "r"
        prev = out.get(ref.row)
        out[ref.row] = how if prev is None or prev == how else "r"
    return out
