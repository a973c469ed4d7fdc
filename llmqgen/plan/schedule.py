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

from math import prod

from ..layout import ACT_SLOTS, FP8_SLOT_BYTES, SCALARS, WEIGHT_SLOTS, fp8_slot_count, gradnorm_partials, num_unique_index
from .block import LINEARS, block_ops, recomputed, site_of
from .emit import Emitter
from .memory import param_tensors, shard_elems
from .refs import Fp8Ref, Ref, Scalar, Seed
from .schema import Plan


def adamw_kernel(master: str, adam_m: str, adam_v: str) -> str:
    """The AdamW kernel of the plan's master / m / v dtypes ("bf16" or "fp32")."""
    return f"llmq_adamw_p{master}_m{adam_m}_v{adam_v}"


def build_schedule(plan: Plan) -> dict:
    """The plan's schedule.json as a dict: {"schema", "plan", "layers", "scalars", "fp8_slots", "init",
    "layer_init", "micro_step": {section: [op]}, "eval", "optimizer_step": {section: [op]}}; every op a
    dict {"op", "phase", ...} whose references are strings (plan/refs.py). Raises KeyError when an
    operation names a row the memory table lacks (a bug of this module or of plan/memory.py)."""
    e = Emitter(plan)
    sections = {name: build(e) for name, build in (
        ("layer_forward", layer_forward), ("layer_backward", layer_backward), ("prologue", prologue),
        ("head", lm_head), ("epilogue", epilogue), ("init", init), ("layer_init", layer_init),
        ("gradnorm", gradnorm), ("optimizer", optimizer), ("layer_optimizer", layer_optimizer),
        ("publish", publish), ("layer_publish", layer_publish), ("gather", gather))}
    s = sections
    return {"schema": 1, "plan": plan.name, "layers": e.L, "scalars": SCALARS,
            "fp8_slots": {"act": list(ACT_SLOTS), "weights": list(WEIGHT_SLOTS), "bytes": FP8_SLOT_BYTES,
                          "count": fp8_slot_count(e.L)},
            "init": s["init"], "layer_init": s["layer_init"],
            "micro_step": {k: s[k] for k in ("prologue", "layer_forward", "head", "layer_backward", "epilogue")},
            "eval": {"head": [op for op in s["head"] if op["phase"] == "forward"]},
            "optimizer_step": {"gradnorm": s["gradnorm"], **{k: s[k] for k in (
                "optimizer", "layer_optimizer", "publish", "layer_publish", "gather")}}}


# ---- the block's operations (plan/block.py's OPS), forward and recompute ----------------------------

def quantize(e: Emitter, kind: str, slot: str, phase: str, src, **outs) -> None:
    """An FP8 copy of `src` in `slot`'s scale: kind "" (out), "t_" (out_t: the transpose), "dual_" (both)."""
    e.kernel(f"llmq_quantize_{kind}{e.site[slot]}", phase, **outs, **{"in": src}, stats=Fp8Ref(slot))


def linear_forward(e: Emitter, name: str, phase: str, y: Ref) -> None:
    lin, (N, K) = LINEARS[name], e.m.block_matrix_shapes()[name]
    x = Ref("work.att_q") if (e.fp8 and lin.x == "att") else Ref(f"act.{lin.x}", "l")
    bias = e.weight("qkv_bias") if (name == "qkv" and e.m.qkv_bias) else None
    e.add("linear", phase, **{"pass": "forward", "layer_name": name, "M": e.BT, "N": N, "K": K, "x": x,
          "w": e.weight(name), "y": y, "dtype": "e4m3" if e.fp8 else "bf16", "bias": bias,
          "x_scale": Fp8Ref(lin.x_slot, descale=True) if e.fp8 else None,
          "w_scale": Fp8Ref(f"w_{name}", descale=True) if e.fp8 else None, "accumulate": False})


def norm_ln1(e: Emitter, phase: str, from_saved: bool) -> None:
    """ln1 = rmsnorm(res): in forward with the residual add (not at layer 0); recomputed from the saved rstd,
    or (block recompute) anew from the saved block input."""
    args = dict(weight=e.weight("ln1"), y=e.norm_out("ln1"), rstd=Ref("act.rstd1", "l"), **e.amax("ln1"))
    if from_saved:
        e.kernel("llmq_rmsnorm_recompute_ln1", phase, res=e.res, weight=e.weight("ln1"),
                 rstd=Ref("act.rstd1", "l"), y=e.norm_out("ln1"), **e.amax("ln1"))
    elif phase == "forward":
        e.add("branch_on_layer", phase,
              first=[{"op": "kernel", "kernel": "llmq_rmsnorm_forward_ln1_first", "args": {"res_in": e.res, **args}}],
              rest=[{"op": "kernel", "kernel": "llmq_rmsnorm_forward_ln1", "args": {
                  "res_out": e.res, "res_in": Ref("act.res2", "l-1"), "delta": Ref("work.branch"), **args}}])
        if e.offload_residual:   # the block input leaves for its host row once the norm has read it
            e.copy(phase, Ref("act.res", "l"), e.res, "d2h", "r_out[l]")
    else:
        e.kernel("llmq_rmsnorm_forward_ln1_first", phase, res_in=e.res, **args)
    if e.fp8:
        quantize(e, "", "ln1", phase, Ref("work.ln"), out=Ref("act.ln1", "l"))


def norm_ln2(e: Emitter, phase: str, from_saved: bool) -> None:
    """res2 = res + attention-out, ln2 = rmsnorm(res2); or ln2 alone from the saved res2 and rstd."""
    if from_saved:
        e.kernel("llmq_rmsnorm_recompute_ln2", phase, res=Ref("act.res2", "l"), weight=e.weight("ln2"),
                 rstd=Ref("act.rstd2", "l"), y=e.norm_out("ln2"), **e.amax("ln2"))
    else:
        e.kernel("llmq_rmsnorm_forward_ln2", phase, res_out=Ref("act.res2", "l"), res_in=e.res,
                 delta=Ref("work.branch"), weight=e.weight("ln2"), y=e.norm_out("ln2"), rstd=Ref("act.rstd2", "l"),
                 **e.amax("ln2"))
    if e.fp8:
        quantize(e, "", "ln2", phase, Ref("work.ln"), out=Ref("act.ln2", "l"))


def rope(e: Emitter, phase: str) -> None:
    if e.m.qk_norm:
        e.kernel("llmq_rope_forward", phase, out=Ref("act.qkv", "l"), qkv=Ref("act.qkv_pre", "l"),
                 table=Ref("rope.table"), q_norm=e.weight("q_norm"), k_norm=e.weight("k_norm"),
                 rstd=Ref("act.qk_rstd", "l"))
    else:
        e.kernel("llmq_rope_forward", phase, qkv=Ref("act.qkv", "l"), table=Ref("rope.table"))


def attention(e: Emitter, phase: str) -> None:
    e.add("attention_forward", phase, qkv=Ref("act.qkv", "l"), out=Ref("act.att", "l"), lse=Ref("act.lse", "l"),
          workspace=Ref("ws.attention"))      # cuDNN's scratch (the flash kernels: `delta` in backward)


def attn_out(e: Emitter, phase: str) -> None:
    if e.fp8:    # the attention output has no amax of its own: taken here, then quantized
        e.kernel(f"llmq_amax_{e.site['att']}", phase, **{"in": Ref("act.att", "l")}, stats=Fp8Ref("att"))
        quantize(e, "", "att", phase, Ref("act.att", "l"), out=Ref("work.att_q"))
    linear_forward(e, "attn_out", phase, Ref("work.branch"))


def swiglu(e: Emitter, phase: str) -> None:
    h = Ref("work.h") if e.fp8 else Ref("act.h", "l")
    e.kernel("llmq_swiglu_forward", phase, h=h, gate_up=Ref("act.gu", "l"), **e.amax("h"))
    if e.fp8:
        quantize(e, "", "h", phase, Ref("work.h"), out=Ref("act.h", "l"))


def block_op(e: Emitter, name: str, phase: str, from_saved: bool = False) -> None:
    """One operation of the block table, in forward or as backward's recompute."""
    qkv_out = Ref("act.qkv_pre" if e.m.qk_norm else "act.qkv", "l")
    {"ln1": lambda: norm_ln1(e, phase, from_saved),
     "qkv": lambda: linear_forward(e, "qkv", phase, qkv_out),
     "rope": lambda: rope(e, phase),
     "attention": lambda: attention(e, phase),
     "attn_out": lambda: attn_out(e, phase),
     "ln2": lambda: norm_ln2(e, phase, from_saved),
     "gate_up": lambda: linear_forward(e, "gate_up", phase, Ref("act.gu", "l")),
     "swiglu": lambda: swiglu(e, phase),
     "down": lambda: linear_forward(e, "down", phase, Ref("work.branch")),
     }[name]()


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
    """Zero the activations' amaxes, bring layer 0's weights, embed the tokens."""
    if e.fp8:
        e.add("memset", "forward", dst=Ref("stats.fp8"), bytes=len(ACT_SLOTS) * e.L * FP8_SLOT_BYTES)
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
    and wgrad; the loss summed; the final norm's backward."""
    m, C, plan = e.m, e.C, e.plan
    head_w = Ref("weights.embedding" if m.tie_embeddings else "weights.lm_head")
    head_g = Ref("grads.embedding" if m.tie_embeddings else "grads.lm_head")
    e.kernel("llmq_rmsnorm_forward_final", "forward", res_out=Ref("lmhead.x"), res_in=Ref("act.res2", str(e.L - 1)),
             delta=Ref("work.branch"), weight=Ref("weights.final_norm"), y=Ref("lmhead.ln"), rstd=Ref("lmhead.rstd"))
    rows = e.BT // plan.lm_head_chunks
    for c in range(plan.lm_head_chunks):
        at_row = c * rows
        e.add("linear", "forward", **{"pass": "forward", "layer_name": "lm_head", "M": rows, "N": m.vocab_size,
              "K": C, "x": Ref("lmhead.ln", offset=at_row * C * 2), "w": head_w, "y": Ref("lmhead.logits"),
              "dtype": "bf16", "bias": None, "x_scale": None, "w_scale": None, "accumulate": False})
        e.kernel("llmq_crossentropy_fused", "forward", logits=Ref("lmhead.logits"), targets=Ref("tokens.targets"),
                 losses=Ref("lmhead.losses"), lse=Ref("lmhead.lse"), grad_scale=Scalar("grad_scale"), row_offset=at_row)
        common = {"layer_name": "lm_head", "M": rows, "N": m.vocab_size, "K": C, "dtype": "bf16",
                  "grad_dtype": "bf16", "dy_scale": None}
        e.add("linear", "backward", **{"pass": "dgrad", **common, "dy": Ref("lmhead.logits"), "w": head_w,
              "dx": Ref("work.d_ln", offset=at_row * C * 2), "w_scale": None, "accumulate": False})
        e.add("linear", "backward", **{"pass": "wgrad", **common, "dy": Ref("lmhead.logits"),
              "x": Ref("lmhead.ln", offset=at_row * C * 2), "dw": head_g, "x_scale": None, "accumulate": True})
    e.kernel("llmq_loss_reduce", "forward", losses=Ref("lmhead.losses"), scale=Scalar("grad_scale"),
             acc=Scalar("loss"))
    e.kernel("llmq_rmsnorm_backward_final", "backward", dx=Ref("work.d_res"), dy=Ref("work.d_ln"), res=Ref("lmhead.x"),
             weight=Ref("weights.final_norm"), rstd=Ref("lmhead.rstd"), dw_partial=Ref("work.norm_partials"),
             **e.sink())
    e.kernel("llmq_rmsnorm_dweight_final", "backward", dw=Ref("grads.final_norm"), dw_partial=Ref("work.norm_partials"))
    return e.take()


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


def linear_backward(e: Emitter, name: str, dy: Ref, dx: Ref) -> None:
    """dgrad into dx and wgrad accumulated into the layer's gradient; FP8 through transposed copies."""
    lin, (N, K), b = LINEARS[name], e.m.block_matrix_shapes()[name], "backward"
    x = Ref(f"act.{lin.x}", "l")
    if e.fp8:
        quantize(e, "dual_", lin.dy_slot, b, dy, out=Ref("work.dy_q"), out_t=Ref("work.dy_qt"))
        e.kernel(f"llmq_transpose_fp8_{e.tsite['w_' + name]}", b, out_t=Ref("work.w_qt"), **{"in": e.weight(name)})
        if lin.x_slot != "att":
            e.kernel(f"llmq_transpose_fp8_{e.tsite[lin.x_slot]}", b, out_t=Ref("work.x_qt"), **{"in": x})
        else:       # attention output: saved in bf16, quantized transposed here
            quantize(e, "t_", "att", b, x, out_t=Ref("work.x_qt"))
    dy_scale = Fp8Ref(lin.dy_slot, descale=True) if e.fp8 else None
    common = {"layer_name": name, "M": e.BT, "N": N, "K": K, "dtype": "e4m3" if e.fp8 else "bf16",
              "grad_dtype": e.plan.precision.gradient}
    e.add("linear", b, **{"pass": "dgrad", **common, "dy": Ref("work.dy_q") if e.fp8 else dy,
          "w": Ref("work.w_qt") if e.fp8 else e.weight(name), "dx": dx, "dy_scale": dy_scale,
          "w_scale": Fp8Ref(f"w_{name}", descale=True) if e.fp8 else None, "accumulate": False})
    e.add("linear", b, **{"pass": "wgrad", **common, "dy": Ref("work.dy_qt") if e.fp8 else dy,
          "x": Ref("work.x_qt") if e.fp8 else x, "dw": e.grad(name), "dy_scale": dy_scale,
          "x_scale": Fp8Ref(lin.x_slot, descale=True) if e.fp8 else None, "accumulate": True})


def block_backward(e: Emitter) -> None:
    """The chain rule through the block, bottom-up: down, SwiGLU, gate/up, ln2, attention-out, attention,
    RoPE, QKV, ln1; the residual gradient runs through work.d_res."""
    m, b, d_res, d_ln = e.m, "backward", Ref("work.d_res"), Ref("work.d_ln")
    if e.fp8:   # the residual gradient came from the layer above: its amax is taken here
        e.kernel(f"llmq_amax_{e.site['d_down']}", b, **{"in": d_res}, stats=Fp8Ref("d_down"))
    linear_backward(e, "down", d_res, Ref("work.d_h"))
    e.kernel("llmq_swiglu_backward", b, d_gate_up=Ref("work.d_gu"), dh=Ref("work.d_h"), gate_up=Ref("act.gu", "l"),
             **e.amax("d_gu"))
    linear_backward(e, "gate_up", Ref("work.d_gu"), d_ln)
    e.kernel("llmq_rmsnorm_backward_ln2", b, dx=d_res, d_res=d_res, dy=d_ln, res=Ref("act.res2", "l"),
             weight=e.weight("ln2"), rstd=Ref("act.rstd2", "l"), dw_partial=Ref("work.norm_partials"),
             **e.amax("d_att_out"))
    e.kernel("llmq_rmsnorm_dweight_ln2", b, dw=e.grad("ln2"), dw_partial=Ref("work.norm_partials"))
    linear_backward(e, "attn_out", d_res, Ref("work.d_att"))
    delta = {"delta": Ref("work.attn_delta")} if "work.attn_delta" in e.rows else {}
    e.add("attention_backward", b, qkv=Ref("act.qkv", "l"), out=Ref("act.att", "l"), dout=Ref("work.d_att"),
          lse=Ref("act.lse", "l"), dqkv=Ref("work.d_qkv"), workspace=Ref("ws.attention"), **delta)
    if m.qk_norm:
        e.kernel("llmq_rope_backward", b, dqkv=Ref("work.d_qkv"), d=Ref("work.d_qkv"), qkv=Ref("act.qkv_pre", "l"),
                 rstd=Ref("act.qk_rstd", "l"), table=Ref("rope.table"), q_norm=e.weight("q_norm"),
                 k_norm=e.weight("k_norm"), dw_partial=Ref("work.norm_partials"), **e.amax("d_qkv"))
        e.kernel("llmq_rope_qknorm_dweight", b, dq_norm=e.grad("q_norm"), dk_norm=e.grad("k_norm"),
                 dw_partial=Ref("work.norm_partials"))
    else:
        e.kernel("llmq_rope_backward", b, dqkv=Ref("work.d_qkv"), table=Ref("rope.table"), **e.amax("d_qkv"))
    if m.qkv_bias:
        e.add("bias_grad", b, dy=Ref("work.d_qkv"), db=e.grad("qkv_bias"), ones=Ref("work.ones"), rows=e.BT,
              cols=m.qkv_dim)
    linear_backward(e, "qkv", Ref("work.d_qkv"), d_ln)
    e.kernel("llmq_rmsnorm_backward_ln1", b, dx=d_res, d_res=d_res, dy=d_ln, res=e.res, weight=e.weight("ln1"),
             rstd=Ref("act.rstd1", "l"), dw_partial=Ref("work.norm_partials"), **e.sink())
    e.kernel("llmq_rmsnorm_dweight_ln1", b, dw=e.grad("ln1"), dw_partial=Ref("work.norm_partials"))


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
    e.kernel("llmq_embedding_backward", "backward", dwte=Ref("grads.embedding"), dx=Ref("work.d_res"),
             tokens=Ref("tokens.inputs"), sorted_pos=Ref("tokens.sorted_pos"), seg_start=Ref("tokens.segments"),
             num_segments=Ref("tokens.segments", offset=4 * num_unique_index(e.BT)))
    return e.take()


# ---- init and the optimizer step -------------------------------------------------------------------
# Several GPUs: gradients are summed over GPUs first (reduce-scatter; ZeRO-0 all-gathers the sums too).
# A sharded optimizer updates this GPU's shard ("@shard": the part at rank*S of a whole row), FP8 weight
# amaxes are max-reduced so that every GPU quantizes with one scale, and the new work copy is published
# into the shard's place and all-gathered.

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
             n=elems(e, shape), step="step", seed=Seed(n),
             apply_weight_decay=int(is_matrix or n in ("embedding", "lm_head")), zero_grad=1)


def publish_tensor(e: Emitter, n: str, shape, per_layer: bool, is_matrix: bool) -> None:
    """The work copy from the new master (this GPU's shard of it when the optimizer is sharded)."""
    idx = "l" if per_layer else None
    src = master_of(e, n, idx)
    if src.row.startswith("weights."):
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
        e.add("memset", "optimizer", dst=Ref("stats.fp8", offset=len(ACT_SLOTS) * e.L * FP8_SLOT_BYTES),
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
              region=Ref("stats.fp8", offset=len(ACT_SLOTS) * e.L * FP8_SLOT_BYTES),
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


# ---- reading a schedule ----------------------------------------------------------------------------

def runtime_unsupported(plan: Plan) -> list[str]:
    """What of the plan the runtime cannot execute, one phrase each naming the pin that avoids it (empty:
    everything executes). `llmqgen plan` warns with these and Trainer refuses with them."""
    return []


def iter_ops(schedule: dict):
    """Every operation of a schedule (branches of branch_on_layer included)."""
    sections = [schedule["init"], schedule["layer_init"], *schedule["micro_step"].values(),
                *schedule["optimizer_step"].values()]
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
