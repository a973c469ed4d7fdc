"""The optimizer step's sections of the schedule (plan/schedule.py), and init.

Several GPUs: gradients are summed over GPUs first (reduce-scatter; ZeRO-0 all-gathers the sums too).
A sharded optimizer updates this GPU's shard ("@shard": the part at rank*S of a whole row), FP8 weight
amaxes are max-reduced so that every GPU quantizes with one scale, and the new work copy is published
into the shard's place and all-gathered. Offloaded block states stream through their device double
buffers: layer l+1's arrive while layer l updates, layer l's leave while l+1 updates."""
from __future__ import annotations

from math import prod

from ..layout import FP8_SLOT_BYTES, WEIGHT_SLOTS, act_slot_count, gradnorm_partials
from .block import site_of
from .emit import Emitter
from .layer_ops import quantize
from .memory import RowKind, param_tensors, row_kind, shard_elems
from .refs import Fp8Ref, Ref, Scalar, Seed


def adamw_kernel(master: str, adam_m: str, adam_v: str) -> str:
    """The AdamW kernel of the plan's master / m / v dtypes ("bf16" or "fp32")."""
    return f"llmq_adamw_p{master}_m{adam_m}_v{adam_v}"


def init(e: Emitter) -> list[dict]:
    """The RoPE table (the weights' work copies come from `publish`)."""
    e.kernel("llmq_rope_table", "init", table=Ref("rope.table"))
    return e.take()


def layer_init(e: Emitter) -> list[dict]:
    """The amaxes of the initial block weights."""
    if e.fp8:
        for n in WEIGHT_SLOTS:
            kernel = (f"llmq_amax_shard_{site_of('w_' + n)}" if e.opt_shard else f"llmq_amax_{e.site['w_' + n]}")
            e.kernel(kernel, "init", **{"in": Ref(f"master.{n}", "l")}, stats=Fp8Ref(f"w_{n}"))
    return e.take()


def _staged(e: Emitter, n: str, per_layer: bool) -> bool:
    """ZeRO-2 block gradients: already reduced shards."""
    return e.zero2 and per_layer


def grad_ref(e: Emitter, n: str, index: str | None, per_layer: bool) -> Ref:
    """The gradient the optimizer reads: this GPU's shard when the optimizer is sharded."""
    return Ref(f"grads.{n}", index, shard=e.opt_shard and not _staged(e, n, per_layer))


def elems(e: Emitter, shape) -> int:
    """The optimizer's domain of one tensor instance."""
    return shard_elems(prod(shape), e.plan.num_gpus) if e.opt_shard else prod(shape)


def gradnorm(e: Emitter) -> list[dict]:
    """Gradients summed over GPUs; per-tensor partial sums of squares, then the norm and the clip scale."""
    tensors, N = param_tensors(e.plan), e.plan.num_gpus
    whole = [[Ref(f"grads.{n}"), pl] for n, _, pl, _ in tensors if not _staged(e, n, pl)]
    if N > 1:
        e.add("collective", "optimizer", kind="reduce_scatter", dtype="bf16", overlap=False, tensors=whole,
              into=None)
        if not e.opt_shard:
            e.add("collective", "optimizer", kind="all_gather", dtype="bf16", overlap=False, tensors=whole)
    sizes = [elems(e, shape) for _, shape, pl, _ in tensors for _ in range(e.L if pl else 1)]
    _, _, n_partials = gradnorm_partials(sizes)
    e.add("gradnorm_partials", "optimizer", tensors=[[grad_ref(e, n, None, pl), pl] for n, _, pl, _ in tensors],
          sizes=sizes, partials=Ref("stats.gradnorm"), rank_offset=n_partials if e.opt_shard else 0)
    if e.opt_shard:        # every GPU sums all partials in one order: one norm, bit-identical everywhere
        e.add("collective", "optimizer", kind="all_gather", dtype="fp32", overlap=False,
              region=Ref("stats.gradnorm"), bytes=N * n_partials * 4)
    e.add("gradnorm_finalize", "optimizer", partials=Ref("stats.gradnorm"),
          count=n_partials * (N if e.opt_shard else 1), out=Scalar("norm"), hyper=Scalar("hyper"))
    return e.take()


def master_of(e: Emitter, n: str, index: str | None) -> Ref:
    """The master copy of a tensor: its own row, or the work copy where that serves as master."""
    return Ref(f"master.{n}" if f"master.{n}" in e.rows else f"weights.{n}", index)


def streamed(e: Emitter, n: str) -> dict[str, str]:
    """Offloaded block states that stream through their device double buffers: state -> its row. Whole-model
    tensors' states, and offloaded gradients (read once), are used where they are, in mapped pinned memory."""
    rows = {"master": master_of(e, n, None).row, "adam_m": f"adam_m.{n}", "adam_v": f"adam_v.{n}"}
    return {what: row for what, row in rows.items() if f"stage.{what}.{n}" in e.rows}


def move_states(e: Emitter, target: str, into_stage: bool, skip=()) -> None:
    """Layer `target`'s streamed states into their buffers (after the buffer's previous layer has left), or
    out of them back to the host."""
    for n, _, pl, _ in param_tensors(e.plan):
        for what, row in streamed(e, n).items() if pl else ():
            buf, src = Ref(f"stage.{what}.{n}", f"({target})%2"), Ref(row, target)
            if into_stage:
                e.copy("optimizer", buf, src, "h2d", f"o_in[{target}]", after=[f"o_out[{target}-2]"], skip=skip)
            else:
                e.copy("optimizer", src, buf, "d2h", f"o_out[{target}]")


def adamw(e: Emitter, n: str, shape, per_layer: bool, is_matrix: bool) -> None:
    idx = "l" if per_layer else None
    p = e.plan.precision
    rows = {"master": master_of(e, n, idx), "adam_m": Ref(f"adam_m.{n}", idx), "adam_v": Ref(f"adam_v.{n}", idx)}
    if per_layer:
        rows.update({what: Ref(f"stage.{what}.{n}", "l%2") for what in streamed(e, n)})
    e.kernel(adamw_kernel(p.master, p.adam_m, p.adam_v), "optimizer", param=rows["master"],
             grad=grad_ref(e, n, idx, per_layer), m=rows["adam_m"], v=rows["adam_v"], hyper=Scalar("hyper"),
             clip_scale=Scalar("clip_scale"), amax=Fp8Ref(f"w_{n}") if (e.fp8 and is_matrix) else 0,
             n=elems(e, shape), seed=Seed(n),
             apply_weight_decay=int(is_matrix or n in ("embedding", "lm_head")), zero_grad=1)


def publish_tensor(e: Emitter, n: str, shape, per_layer: bool, is_matrix: bool) -> None:
    """The work copy from the new master (this GPU's shard of it when the optimizer is sharded)."""
    idx = "l" if per_layer else None
    src = master_of(e, n, idx)
    if row_kind(src.row) is RowKind.WEIGHTS:
        return                                  # the work copy is the master
    shard_row = e.zero3 and per_layer           # ZeRO-3 block weights: the row is this GPU's shard
    dst = Ref(f"weights.{n}", idx, shard=e.opt_shard and not shard_row)
    if e.fp8 and is_matrix:
        if e.opt_shard:
            e.kernel(f"llmq_quantize_shard_{site_of('w_' + n)}", "optimizer", out=dst, stats=Fp8Ref(f"w_{n}"),
                     **{"in": src})
        else:
            quantize(e, "", f"w_{n}", "optimizer", src, out=dst)
    elif e.plan.precision.master == "fp32":
        e.kernel("llmq_cast_f32_bf16", "optimizer", dst=dst, src=src, n=elems(e, shape))
    else:
        e.add("copy", "optimizer", dst=dst, src=src, bytes=2 * elems(e, shape))


def each(e: Emitter, fn, per_layer: bool) -> None:
    for n, shape, pl, is_matrix in param_tensors(e.plan):
        if pl == per_layer:
            fn(e, n, shape, pl, is_matrix)


def optimizer(e: Emitter) -> list[dict]:
    """Zero the weights' amaxes; layer 0's streamed states in; AdamW on the whole-model tensors."""
    if e.fp8:
        e.add("memset", "optimizer", dst=Ref("stats.fp8", offset=act_slot_count(e.L) * FP8_SLOT_BYTES),
              bytes=len(WEIGHT_SLOTS) * e.L * FP8_SLOT_BYTES)
    move_states(e, "0", True)
    each(e, adamw, False)
    return e.take()


def layer_optimizer(e: Emitter) -> list[dict]:
    """AdamW on layer l's tensors, layer l+1's streamed states arriving meanwhile, l's leaving after."""
    move_states(e, "l+1", True, skip=[e.L - 1])
    e.add("copy_wait", "optimizer", tag="o_in[l]")
    each(e, adamw, True)
    move_states(e, "l", False)
    return e.take()


def publish(e: Emitter) -> list[dict]:
    """One amax for all GPUs; the whole-model tensors' work copies."""
    if e.opt_shard and e.fp8:
        e.add("collective", "optimizer", kind="all_reduce_max", dtype="fp32", overlap=False,
              region=Ref("stats.fp8", offset=act_slot_count(e.L) * FP8_SLOT_BYTES),
              bytes=len(WEIGHT_SLOTS) * e.L * FP8_SLOT_BYTES)
    each(e, publish_tensor, False)
    return e.take()


def layer_publish(e: Emitter) -> list[dict]:
    if any(streamed(e, n) for n, _, pl, _ in param_tensors(e.plan) if pl):    # the new master has reached the host
        e.add("copy_wait", "optimizer", tag="o_out[l]")
    each(e, publish_tensor, True)
    return e.take()


def gather(e: Emitter) -> list[dict]:
    """Sharded optimizer: every GPU's new work copies to all; the gradients' other shards zeroed."""
    if e.opt_shard:
        tensors = param_tensors(e.plan)
        e.add("collective", "optimizer", kind="all_gather", dtype="uint8", overlap=False,
              tensors=[[Ref(f"weights.{n}"), pl] for n, _, pl, _ in tensors if not (e.zero3 and pl)])
        for n, _, pl, _ in tensors:      # AdamW zeroed this GPU's shard; the rest held local sums
            if not _staged(e, n, pl):
                e.add("memset", "optimizer", dst=Ref(f"grads.{n}"), bytes=e.rows[f"grads.{n}"].total)
    return e.take()
