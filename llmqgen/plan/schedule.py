"""schedule.json: the ordered operations of a training step, every argument bound.

Sections: `init` and `layer_init` (once, at load), the micro-step (`prologue`, `layer_forward` for
l = 0..L-1, `head`, `layer_backward` for l = L-1..0, `epilogue`), the optimizer step (`gradnorm`: the
gradient sums over GPUs and the global norm, read back by the runtime before it launches the update;
`optimizer`, `layer_optimizer` for every l, `publish`, `layer_publish` for every l, `gather`; the publish
sections also run at load, making the work copies from the loaded masters) and evaluation (`eval.head`:
the head's forward operations and the loss only, run after `prologue` and `layer_forward`).
A layer's forward and the recompute opening its backward follow the block table (plan/block.py): backward
reruns exactly the operations that produce what the plan's recompute set dropped.
Offloaded rows (place "host") are mapped pinned memory: operations may address them directly; streamed
block weights, block gradients, residuals and the optimizer's block states go through their device double
buffers ("stage.*") by asynchronous `copy` operations (`stream` "h2d" or "d2h": the copy engines, beside
the computation). Such a copy starts once the computation issued before it is done and the copies
named in its `after` tags have landed; `copy_wait` makes the computation wait for the copies of a tag.

References name rows of the plan's memory table (plan/refs.py: "act.res[l]", "lmhead.ln+4096",
"grads.qkv[l]@shard", "fp8:ln1[l]/descale", "scalar:grad_scale", "stage.grads.qkv[l%2]").
`collective` operations name whole rows (`tensors`: [row, per_layer], every instance; `into`: other
rows receiving the result) or a byte `region`; the runtime runs them over all GPUs at once (copy
engines or NCCL). An `overlap` collective runs beside the computation that follows it, under a `tag`
("w[l+1]": layer l+1's weights); `await` makes the computation after it wait for that tag, and
`skip_layers` lists the layers where a per-layer collective (or copy) does not happen.
Numbers are passed as they are. `linear` ops are the three GEMMs of a linear layer (forward,
dgrad, wgrad) in the row-major convention of runtime/blas.py: y[M,N] = x[M,K] . W[N,K]^T.
"""
from __future__ import annotations

from ..layout import (ACT_SLOTS, FP8_SLOT_BYTES, HEAD_SLOTS, SCALARS, WEIGHT_SLOTS, act_slot_count, fp8_slot_count,
                      fp8_slot_index, num_unique_index)
from .block import block_ops, recomputed
from .emit import Emitter
from .layer_ops import block_backward, block_op
from .optimizer_step import gather, gradnorm, init, layer_init, layer_optimizer, layer_publish, optimizer, publish
from .refs import Fp8Ref, Ref, Scalar
from .schema import Plan


# The micro-step's sections in the order they run: (name, once per layer?, layers in reverse?) — the runtime
# binds them so (runtime/rank.py), the cost model counts them so (plan/traffic.py).
MICRO_SECTIONS = (("prologue", False, False), ("layer_forward", True, False), ("head", False, False),
                  ("layer_backward", True, True), ("epilogue", False, False))


def build_schedule(plan: Plan) -> dict:
    """The plan's schedule.json as a dict: {"schema", "plan", "layers", "scalars", "fp8_slots", "init",
    "layer_init", "micro_step": {section: [op]}, "eval", "optimizer_step": {section: [op]}}; every op a
    dict {"op", "phase", ...} whose references are strings (plan/refs.py). Raises KeyError when an
    operation names a row the memory table lacks (a bug of this module or of plan/memory.py)."""
    e = Emitter(plan)
    micro = {"prologue": prologue(e), "layer_forward": layer_forward(e), "head": lm_head(e),
             "layer_backward": layer_backward(e), "epilogue": epilogue(e)}
    step = {"gradnorm": gradnorm(e), "optimizer": optimizer(e), "layer_optimizer": layer_optimizer(e),
            "publish": publish(e), "layer_publish": layer_publish(e), "gather": gather(e)}
    return {"schema": 1, "plan": plan.name, "layers": e.L, "scalars": SCALARS,
            "fp8_slots": {"act": list(ACT_SLOTS), "weights": list(WEIGHT_SLOTS), "head": list(HEAD_SLOTS),
                          "bytes": FP8_SLOT_BYTES, "count": fp8_slot_count(e.L)},
            "init": init(e), "layer_init": layer_init(e), "micro_step": micro,
            "eval": {"head": eval_head(e, micro["head"])},
            "optimizer_step": step}


# ---- streams: what arrives ahead of a layer and leaves after it ---------------------------------------
# Layer l+1's inputs arrive while layer l computes (l-1's in backward), outputs leave while the next layer
# computes; a double buffer's next fill waits for the copy out of its previous contents (`after`). Tags of
# layers that do not exist are dropped, and a wait for a copy not in flight (its data is still in the buffer)
# does nothing.

def gather_weights(e: Emitter, phase: str, target: str, skip: list[int]) -> None:
    """ZeRO-3: overlapped all-gather of layer `target`'s weights (an index expression of l) into its buffer;
    skipped for the layers in `skip` (no such layer, or its weights are still in the buffer)."""
    e.add("collective", phase, kind="all_gather", dtype="uint8", overlap=True, tag=f"w[{target}]",
          skip_layers=skip, tensors=[[Ref(f"weights.{n}", target), False] for n in e.layer_tensors],
          into=[Ref(f"stage.weights.{n}", f"({target})%2") for n in e.layer_tensors])


def fetch_weights(e: Emitter, phase: str, target: str, skip=()) -> None:
    for n in e.layer_tensors:
        e.copy(phase, Ref(f"stage.weights.{n}", f"({target})%2"), Ref(f"weights.{n}", target), "h2d",
               f"w_in[{target}]", skip=skip)


def fetch_grads(e: Emitter, phase: str, target: str, after=(), skip=()) -> None:
    for n in e.layer_tensors:
        e.copy(phase, Ref(f"stage.grads.{n}", f"({target})%2"), Ref(f"grads.{n}", target), "h2d",
               f"g_in[{target}]", after, skip)

# ---- the micro-step ---------------------------------------------------------------------------------

def prologue(e: Emitter) -> list[dict]:
    """Zero the activations' amaxes (delayed scaling: zero already, see `epilogue`), bring layer 0's weights,
    embed the tokens."""
    if e.fp8 and not e.delayed:
        e.add("memset", "forward", dst=Ref("stats.fp8"), bytes=act_slot_count(e.L) * FP8_SLOT_BYTES)
    if e.zero3:
        e.add("collective", "forward", kind="all_gather", dtype="uint8", overlap=False, tag="w[0]",
              skip_layers=[], tensors=[[Ref(f"weights.{n}", "0"), False] for n in e.layer_tensors],
              into=[Ref(f"stage.weights.{n}", "0") for n in e.layer_tensors])
    if e.stream_w:
        fetch_weights(e, "forward", "0")
    e.kernel("llmq_embedding_forward", "forward", x=Ref("stage.res" if e.offload_residual else "act.res", "0"),
             tokens=Ref("tokens.inputs"), wte=Ref("weights.embedding"))
    return e.take()


def layer_forward(e: Emitter) -> list[dict]:
    """Layer l's forward: its weights in (layer l+1's on their way), then the block table's operations."""
    if e.zero3:      # layer l+1 arrives while layer l computes (layer 0: gathered in the prologue)
        gather_weights(e, "forward", "l+1", [e.L - 1])
        e.add("await", "forward", tag="w[l]")
    if e.stream_w:   # layer 0: fetched in the prologue
        fetch_weights(e, "forward", "l+1", skip=[e.L - 1])
        e.add("copy_wait", "forward", tag="w_in[l]")
    if e.offload_residual:  # the buffer's previous block input (layer l-2) has left for the host
        e.add("copy_wait", "forward", tag="r_out[l-2]")
    for op in block_ops(e.m.qk_norm):
        block_op(e, op.name, "forward")
    return e.take()


def lm_head(e: Emitter) -> list[dict]:
    """Final norm, then per chunk of token rows the logits, the loss and its gradient (in place), dgrad
    and wgrad; the loss summed; the final norm's backward. An FP8 head (precision.lm_head) first makes the
    weight's e4m3 copies and takes the input's amax; per chunk it quantizes the input and writes the e5m2
    gradient (and its transpose, for wgrad) beside the logits."""
    m, C, plan = e.m, e.C, e.plan
    head_w = Ref("weights.embedding" if m.tie_embeddings else "weights.lm_head")
    head_g = Ref("grads.embedding" if m.tie_embeddings else "grads.lm_head")
    e.kernel("llmq_rmsnorm_forward_final", "forward", res_out=Ref("lmhead.x"), res_in=Ref("act.res2", str(e.L - 1)),
             delta=Ref("work.branch"), weight=Ref("weights.final_norm"), y=Ref("lmhead.ln"), rstd=Ref("lmhead.rstd"))
    if e.fp8_head:
        _fp8_head_inputs(e, head_w)
    rows = e.BT // plan.lm_head_chunks
    for c in range(plan.lm_head_chunks):
        at_row = c * rows
        ln = Ref("lmhead.ln", offset=at_row * C * 2)
        if e.fp8_head:
            _fp8_head_chunk(e, ln, head_g, rows, at_row)
            continue
        e.add("linear", "forward", **{"pass": "forward", "layer_name": "lm_head", "M": rows, "N": m.vocab_size,
              "K": C, "x": ln, "w": head_w, "y": Ref("lmhead.logits"),
              "dtype": "bf16", "bias": None, "x_scale": None, "w_scale": None, "accumulate": False})
        e.kernel("llmq_crossentropy_fused", "forward", logits=Ref("lmhead.logits"), targets=Ref("tokens.targets"),
                 losses=Ref("lmhead.losses"), lse=Ref("lmhead.lse"), grad_scale=Scalar("grad_scale"), row_offset=at_row)
        common = {"layer_name": "lm_head", "M": rows, "N": m.vocab_size, "K": C, "dtype": "bf16",
                  "grad_dtype": "bf16", "dy_scale": None}
        e.add("linear", "backward", **{"pass": "dgrad", **common, "dy": Ref("lmhead.logits"), "w": head_w,
              "dx": Ref("work.d_ln", offset=at_row * C * 2), "w_scale": None, "accumulate": False})
        e.add("linear", "backward", **{"pass": "wgrad", **common, "dy": Ref("lmhead.logits"),
              "x": ln, "dw": head_g, "x_scale": None, "accumulate": True})
    e.kernel("llmq_loss_reduce", "forward", losses=Ref("lmhead.losses"), scale=Scalar("grad_scale"),
             acc=Scalar("loss"))
    e.kernel("llmq_rmsnorm_backward_final", "backward", dx=Ref("work.d_res"), dy=Ref("work.d_ln"), res=Ref("lmhead.x"),
             weight=Ref("weights.final_norm"), rstd=Ref("lmhead.rstd"), dw_partial=Ref("work.norm_partials"),
             **e.sink())
    e.kernel("llmq_rmsnorm_dweight_final", "backward", dw=Ref("grads.final_norm"), dw_partial=Ref("work.norm_partials"))
    return e.take()


def _fp8_head_inputs(e: Emitter, head_w: Ref) -> None:
    """The head's slots zeroed (current scaling, every micro-step); the weight's e4m3 copy and transpose from
    its bf16 work copy; the amax of the whole micro-step's input (one scale for every chunk)."""
    first = fp8_slot_index(HEAD_SLOTS[0], 0, e.L)
    e.add("memset", "forward", dst=Ref("stats.fp8", offset=first * FP8_SLOT_BYTES),
          bytes=len(HEAD_SLOTS) * FP8_SLOT_BYTES)
    e.kernel(f"llmq_amax_{e.site['head_w']}", "forward", **{"in": head_w}, stats=Fp8Ref("head_w", None))
    e.kernel(f"llmq_quantize_dual_{e.site['head_w']}", "forward", out=Ref("lmhead.w_q"), out_t=Ref("lmhead.w_qt"),
             **{"in": head_w}, stats=Fp8Ref("head_w", None))
    e.kernel(f"llmq_amax_{e.site['head_x']}", "forward", **{"in": Ref("lmhead.ln")}, stats=Fp8Ref("head_x", None))


def _fp8_head_chunk(e: Emitter, ln: Ref, head_g: Ref, rows: int, at_row: int) -> None:
    """One chunk of an FP8 head: input in e4m3 (both ways), logits, loss and LSE, the e5m2 logit gradient
    (both ways), dgrad and wgrad."""
    m, C = e.m, e.C
    descale = lambda slot: Fp8Ref(slot, None, descale=True)      # noqa: E731
    e.kernel(f"llmq_quantize_dual_{e.site['head_xc']}", "forward", out=Ref("lmhead.x_q"), out_t=Ref("lmhead.x_qt"),
             **{"in": ln}, stats=Fp8Ref("head_x", None))
    e.add("linear", "forward", **{"pass": "forward", "layer_name": "lm_head", "M": rows, "N": m.vocab_size,
          "K": C, "x": Ref("lmhead.x_q"), "w": Ref("lmhead.w_q"), "y": Ref("lmhead.logits"), "dtype": "e4m3",
          "bias": None, "x_scale": descale("head_x"), "w_scale": descale("head_w"), "accumulate": False})
    e.kernel("llmq_crossentropy_stats", "forward", logits=Ref("lmhead.logits"), targets=Ref("tokens.targets"),
             losses=Ref("lmhead.losses"), lse=Ref("lmhead.lse"), row_offset=at_row)
    e.kernel("llmq_crossentropy_dual", "backward", out=Ref("lmhead.dlogits_q"), out_t=Ref("lmhead.dlogits_qt"),
             logits=Ref("lmhead.logits"), targets=Ref("tokens.targets"), lse=Ref("lmhead.lse"),
             grad_scale=Scalar("grad_scale"), stats=Fp8Ref("head_dy", None), row_offset=at_row)
    common = {"layer_name": "lm_head", "M": rows, "N": m.vocab_size, "K": C, "dtype": "e4m3",
              "grad_dtype": "e5m2", "dy_scale": descale("head_dy")}
    e.add("linear", "backward", **{"pass": "dgrad", **common, "dy": Ref("lmhead.dlogits_q"),
          "w": Ref("lmhead.w_qt"), "dx": Ref("work.d_ln", offset=at_row * C * 2), "w_scale": descale("head_w"),
          "accumulate": False})
    e.add("linear", "backward", **{"pass": "wgrad", **common, "dy": Ref("lmhead.dlogits_qt"), "x": Ref("lmhead.x_qt"),
          "dw": head_g, "x_scale": descale("head_x"), "accumulate": True})


def backward_streams(e: Emitter) -> None:
    """What layer l's backward needs that is elsewhere: its weights, block input and gradients so far."""
    L, b = e.L, "backward"
    if e.zero3:      # the last two layers are still in the buffers from the forward
        gather_weights(e, b, "l-1", [0, L - 1])
        e.add("await", b, tag="w[l]")
    if e.stream_w:   # the last two layers are still in the buffers from the forward
        fetch_weights(e, b, "l-1", skip=[L - 1, 0])
        e.add("copy_wait", b, tag="w_in[l]")
    if e.offload_residual:  # the last two layers' block inputs are still in their buffers from the forward
        e.copy(b, Ref("stage.res", "(l-1)%2"), Ref("act.res", "l-1"), "h2d", "r_in[l-1]", after=["r_out[l+1]"],
               skip=[L - 1, 0])
        e.add("copy_wait", b, tag="r_in[l]")
    if e.stream_g:   # the gradients accumulated so far (over micro-steps); the first layer's: not ahead (the
        # LM head's buffers are live until then)
        fetch_grads(e, b, "l", skip=range(L - 1))
        fetch_grads(e, b, "l-1", after=["g_out[l+1]"], skip=[0])
        e.add("copy_wait", b, tag="g_in[l]")
    if e.zero2:      # the buffer's previous user, layer l+2, has been reduce-scattered
        e.add("await", b, tag="g[l+2]")
        for n in e.layer_tensors:
            e.add("memset", b, dst=e.grad(n), bytes=e.rows[f"stage.grads.{n}"].bytes)

def layer_backward(e: Emitter) -> list[dict]:
    """Layer l's backward: inputs in, the recompute of what the plan dropped, the chain rule, gradients out."""
    backward_streams(e)
    for rerun in recomputed(e.plan.recompute, e.m.qk_norm):
        block_op(e, rerun.op.name, "recompute", rerun.from_saved)
    block_backward(e)
    if e.stream_g:
        for n in e.layer_tensors:
            e.copy("backward", Ref(f"grads.{n}", "l"), e.grad(n), "d2h", "g_out[l]")
    if e.zero2:      # overlapped with the next block's backward on the communication streams
        e.add("collective", "backward", kind="reduce_scatter", dtype="bf16", overlap=True, tag="g[l]",
              skip_layers=[], tensors=[[e.grad(n), False] for n in e.layer_tensors],
              into=[Ref(f"grads.{n}", "l") for n in e.layer_tensors])
    return e.take()


def epilogue(e: Emitter) -> list[dict]:
    """The embedding's gradient; delayed scaling: the micro-step's amaxes into their history (and zeroed)."""
    e.kernel("llmq_embedding_backward", "backward", dwte=Ref("grads.embedding"), dx=Ref("work.d_res"),
             tokens=Ref("tokens.inputs"), sorted_pos=Ref("tokens.sorted_pos"), seg_start=Ref("tokens.segments"),
             num_segments=Ref("tokens.segments", offset=4 * num_unique_index(e.BT)))
    if e.delayed:
        e.kernel("llmq_amax_roll", "backward", stats=Ref("stats.fp8"), history=Ref("stats.amax_history"))
    return e.take()


def eval_head(e: Emitter, head: list[dict]) -> list[dict]:
    """Evaluation's head: the training head's forward operations; delayed scaling: then the amaxes the
    evaluation recorded are dropped, so that it leaves the history (and training) as it was."""
    ops = [op for op in head if op["phase"] == "forward"]
    if e.delayed:
        e.kernel("llmq_amax_clear", "forward", stats=Ref("stats.fp8"))
        ops += e.take()
    return ops

# ---- reading a schedule ----------------------------------------------------------------------------

def iter_ops(schedule: dict):
    """Every operation of a schedule (branches of branch_on_layer included)."""
    sections = [schedule["init"], schedule["layer_init"], *schedule["micro_step"].values(),
                *schedule["optimizer_step"].values(), *schedule["eval"].values()]
    for section in sections:
        for op in section:
            if op["op"] == "branch_on_layer":
                yield from op["first"]
                yield from op["rest"]
            else:
                yield op


# Kernels of ours the runtime launches for operations that are not `kernel` operations: flash attention (when
# the plan has it; else cuDNN), the gradient norm, and the collectives' arithmetic (runtime/collectives.py: which
# of them depends on copy engines or NCCL).
OP_KERNELS = {"attention_forward": ("llmq_attention_forward",),
              "attention_backward": ("llmq_attention_bwd_dot", "llmq_attention_backward"),
              "gradnorm_partials": ("llmq_gradnorm_partial",), "gradnorm_finalize": ("llmq_gradnorm_finalize",),
              "collective": ("llmq_reduce_bf16", "llmq_reduce_max_f32", "llmq_add_bf16")}


def launched_kernels(schedule: dict) -> set[str]:
    """Names of the kernels a schedule launches: its kernel operations', and OP_KERNELS of the others."""
    out: set[str] = set()
    for op in iter_ops(schedule):
        out |= {op["kernel"]} if op["op"] == "kernel" else set(OP_KERNELS.get(op["op"], ()))
    return out


def check_schedule(schedule: dict, kernels) -> None:
    """Every kernel the schedule launches exists, and its operation binds exactly the kernel's arguments."""
    by_name = {k.name: k for k in kernels}
    for op in iter_ops(schedule):
        if op["op"] != "kernel":
            continue
        k = by_name.get(op["kernel"])
        if k is None:
            raise ValueError(f"the schedule launches {op['kernel']}, which the program lacks")
        want, have = {a for a, _ in k.args}, set(op["args"])
        if want != have:
            raise ValueError(f"{op['kernel']}: the schedule binds {sorted(have)}, the kernel takes {sorted(want)}")
