"""schedule.json: the ordered operations of a training step, every argument bound.

Sections: `init` and `layer_init` (once, at load), the micro-step (`prologue`, `layer_forward` for
l = 0..L-1, `head`, `layer_backward` for l = L-1..0, `epilogue`), the optimizer step (`gradnorm`: the
gradient sums over GPUs and the global norm, read back by the runtime before it launches the update;
`optimizer`, `layer_optimizer` for every l, `publish`, `layer_publish` for every l, `gather`; the publish
sections also run at load, making the work copies from the loaded masters) and evaluation (`eval.head`:
the head's forward operations and the loss only, run after `prologue` and `layer_forward`).
Recompute operations open a layer's backward, exactly for the activations the plan's recompute set dropped.
Offloaded rows (place "host") are mapped pinned memory: operations may address them directly; streamed
block weights, block gradients, residuals and the optimizer's block states go through their device double
buffers ("stage.*") by asynchronous `copy` operations (`stream` "h2d" or "d2h": the copy engines, beside
the computation). Such a copy starts once the computation issued before it is done and the copies
named in its `after` tags have landed; `copy_wait` makes the computation wait for the copies of a tag.

References (strings) name rows of the plan's memory table:
  "act.res[l]"      layer l's instance of a per-layer row ("[l-1]" the previous layer's); on a shared
                    row (a recomputed activation) the one instance every layer reuses
  "work.d_res"      a shared or single row;  "lmhead.ln+4096" a byte offset into a row
  "fp8:ln1[l]"      layer l's FP8 stats slot of that tensor (amax at +0; "fp8:ln1[l]/descale" is +16)
  "scalar:grad_scale"  a float of stats.scalars (SCALARS gives the index)
  "stage.grads.qkv[l%2]"  instance l mod 2 of a double buffer
  "grads.qkv[l]@shard"    this GPU's shard of a whole row: + rank * S elements (memory.shard_elems)
`collective` operations name whole rows (`tensors`: [row, per_layer], every instance; `into`: other
rows receiving the result) or a byte `region`; the runtime runs them over all GPUs at once (copy
engines or NCCL). An `overlap` collective runs beside the computation that follows it, under a `tag`
("w[l+1]": layer l+1's weights); `await` makes the computation after it wait for that tag, and
`skip_layers` lists the layers where a per-layer collective (or copy) does not happen. Index expressions:
"[l]", "[l-1]", "[l+1]", "[l%2]", "[(l+1)%2]".
Numbers are passed as they are. `linear` ops are the three GEMMs of a linear layer (forward,
dgrad, wgrad) in the row-major convention of runtime/blas.py: y[M,N] = x[M,K] . W[N,K]^T.
"""
from __future__ import annotations

from math import prod

from ..layout import ACT_SLOTS, FP8_SLOT_BYTES, SCALARS, WEIGHT_SLOTS, fp8_slot_count, num_unique_index
from ..plan.memory import memory_table, param_tensors
from ..plan.schema import MemRow, Plan


# FP8 stats slot -> the quantize family's site of that tensor.
SITE_OF = {"ln1": "ln1", "att": "att", "ln2": "ln2", "h": "swiglu", "d_down": "d_down", "d_gu": "d_gate_up",
           "d_att_out": "d_att_out", "d_qkv": "d_qkv", "w_qkv": "qkv", "w_attn_out": "att_out",
           "w_gate_up": "gate_up", "w_down": "down"}


def _site_kernels(plan: Plan) -> tuple[dict[str, str], dict[str, str]]:
    """Slot -> suffix of its deduplicated quantize kernels (llmq_{amax,quantize[_t|_dual]}_<suffix>), and
    slot -> suffix of its fp8 transpose kernel (llmq_transpose_fp8_<suffix>)."""
    from .context import build_context
    from .families import quantize
    if not plan.fp8:
        return {}, {}
    ctx = build_context(plan, plan.inventory.gpu.arch)
    ctx.update(quantize.context(ctx))
    q = {s: row["name"] for row in quantize.quant_sites(ctx) for s in row["sites"]}
    t = {s: row["name"] for row in quantize.transpose_sites(ctx) for s in row["sites"]}
    return ({slot: q[site] for slot, site in SITE_OF.items()},
            {slot: t[site] for slot, site in SITE_OF.items() if site in t})


class _Ops:
    def __init__(self, rows: list[MemRow]):
        self.rows = {r.name: r for r in rows}
        self.ops: list[dict] = []

    def check(self, value):
        # references name a table row ("act.res[l]"); other strings are tags ("forward", "seed:qkv")
        if isinstance(value, list):
            return [self.check(v) for v in value]
        if isinstance(value, str) and "." in value and not value.startswith(("fp8:", "scalar:", "seed:")):
            name = value.split("[")[0].split("+")[0].split("@")[0]
            if name not in self.rows:
                raise KeyError(f"schedule names {name!r}, which the memory table lacks")
        return value

    def kernel(self, name: str, phase: str, **args):
        self.ops.append({"op": "kernel", "kernel": name, "phase": phase,
                         "args": {k: self.check(v) for k, v in args.items()}})

    def add(self, op: str, phase: str, **fields):
        self.ops.append({"op": op, "phase": phase, **{k: self.check(v) for k, v in fields.items()}})

    def take(self) -> list[dict]:
        out, self.ops = self.ops, []
        return out


def build_schedule(plan: Plan) -> dict:
    m, r, fp8 = plan.model, plan.recompute, plan.fp8
    L, C, BT = m.num_layers, m.hidden_size, plan.batch.micro_batch * plan.batch.seq_len
    QKV, qk = m.qkv_dim, m.qk_norm
    o = _Ops(memory_table(plan))    # from the inputs: a saved estimate may predate this llmqgen
    site, tsite = _site_kernels(plan)
    gdt = plan.precision.gradient
    N_gpu, sh = plan.num_gpus, plan.sharding
    zero2, zero3 = N_gpu > 1 and sh.gradients, N_gpu > 1 and sh.weights
    off = plan.offload
    # Offload (pinned host rows, mapped: kernels and GEMMs may address them, but block weights, block
    # gradients and residuals go through their device double buffers by asynchronous copies):
    # streamed block weights (one GPU's sharded weights, or offloaded work copies without ZeRO-3) are
    # fetched a layer ahead; block gradients are fetched a layer ahead of the backward and leave after it.
    stream_w = not zero3 and (off.quantized_weights or (sh.weights and N_gpu == 1))
    stream_g = not zero2 and off.gradients
    # ZeRO-3: a block's weights are all-gathered from the shards into a double buffer ahead of use
    W = (lambda n: f"stage.weights.{n}[l%2]") if (zero3 or stream_w) else (lambda n: f"weights.{n}[l]")  # noqa: E731
    # ZeRO-2: a block's gradients go to a double buffer, reduce-scattered as backward leaves the block
    G = (lambda n: f"stage.grads.{n}[l%2]") if (zero2 or stream_g) else (lambda n: f"grads.{n}[l]")  # noqa: E731
    # offloaded residuals: the block input lives in a device double buffer while its layer runs and is
    # copied to its host row after the forward norm, back before the layer's backward
    RES = "stage.res[l%2]" if off.residual else "act.res[l]"
    amax = (lambda s: {"amax": f"fp8:{s}[l]"}) if fp8 else (lambda s: {})    # noqa: E731
    sink = {"amax": "fp8:sink"} if fp8 else {}
    shapes = m.block_matrix_shapes()
    attn_ws = {"workspace": "ws.attention"}     # cuDNN's scratch (the flash kernels: `delta` in backward)

    def linear_forward(name, phase, x, y, x_slot, bias=None, accumulate=False):
        N, K = shapes[name]
        o.add("linear", phase, **{"pass": "forward", "layer_name": name, "M": BT, "N": N, "K": K, "x": x,
              "w": W(name), "y": y, "dtype": "e4m3" if fp8 else "bf16", "bias": bias,
              "x_scale": f"fp8:{x_slot}[l]/descale" if fp8 else None,
              "w_scale": f"fp8:w_{name}[l]/descale" if fp8 else None, "accumulate": accumulate})

    def quantize(kind, slot, phase, src, **outs):
        o.kernel(f"llmq_quantize_{kind}{site[slot]}", phase, **outs, **{"in": src}, stats=f"fp8:{slot}[l]")

    def rope_forward(phase):
        if qk:
            o.kernel("llmq_rope_forward", phase, out="act.qkv[l]", qkv="act.qkv_pre[l]", table="rope.table",
                     q_norm=W("q_norm"), k_norm=W("k_norm"), rstd="act.qk_rstd[l]")
        else:
            o.kernel("llmq_rope_forward", phase, qkv="act.qkv[l]", table="rope.table")

    def swiglu_forward(phase):
        o.kernel("llmq_swiglu_forward", phase, h="work.h" if fp8 else "act.h[l]", gate_up="act.gu[l]", **amax("h"))
        if fp8:
            quantize("", "h", phase, "work.h", out="act.h[l]")

    def norm_out(which):   # where a norm writes: bf16 scratch before e4m3 in FP8 plans
        return "work.ln" if fp8 else f"act.{which}[l]"

    # ---- forward of one block (also the recompute of a whole block) ---------------------------------
    def block_forward(phase):
        if fp8:
            quantize("", "ln1", phase, "work.ln", out="act.ln1[l]")
        linear_forward("qkv", phase, "act.ln1[l]", "act.qkv_pre[l]" if qk else "act.qkv[l]", "ln1",
                       bias=W("qkv_bias") if m.qkv_bias else None)
        rope_forward(phase)
        o.add("attention_forward", phase, qkv="act.qkv[l]", out="act.att[l]", lse="act.lse[l]", **attn_ws)
        if fp8:
            o.kernel(f"llmq_amax_{site['att']}", phase, **{"in": "act.att[l]"}, stats="fp8:att[l]")
            quantize("", "att", phase, "act.att[l]", out="work.att_q")
        linear_forward("attn_out", phase, "work.att_q" if fp8 else "act.att[l]", "work.branch", "att")
        o.kernel("llmq_rmsnorm_forward_ln2", phase, res_out="act.res2[l]", res_in=RES,
                 delta="work.branch", weight=W("ln2"), y=norm_out("ln2"), rstd="act.rstd2[l]", **amax("ln2"))
        if fp8:
            quantize("", "ln2", phase, "work.ln", out="act.ln2[l]")
        linear_forward("gate_up", phase, "act.ln2[l]", "act.gu[l]", "ln2")
        swiglu_forward(phase)

    def ln1_forward(phase):
        args = dict(weight=W("ln1"), y=norm_out("ln1"), rstd="act.rstd1[l]", **amax("ln1"))
        o.add("branch_on_layer", phase, first=[{"op": "kernel", "kernel": "llmq_rmsnorm_forward_ln1_first",
                                                "args": {"res_in": RES, **args}}],
              rest=[{"op": "kernel", "kernel": "llmq_rmsnorm_forward_ln1",
                     "args": {"res_out": RES, "res_in": "act.res2[l-1]", "delta": "work.branch", **args}}])

    layer_tensors = [(n, sh_) for n, sh_, per_layer, _ in param_tensors(plan) if per_layer]

    def gather_weights(phase, target, skip):
        """Overlapped all-gather of layer `target`'s weights (an index expression of l) into its buffer;
        skipped for the layers in `skip` (no such layer, or its weights are still in the buffer)."""
        o.add("collective", phase, kind="all_gather", dtype="uint8", overlap=True, tag=f"w[{target}]",
              skip_layers=skip, tensors=[[f"weights.{n}[{target}]", False] for n, _ in layer_tensors],
              into=[f"stage.weights.{n}[({target})%2]" for n, _ in layer_tensors])

    def transfer(phase, dst, src, row_a, row_b, stream, tag, after=(), skip=()):
        """An asynchronous copy between a host row and its device buffer on the `stream` ("h2d"/"d2h")
        copy engine: it starts when the computation issued before it is done (and the copies tagged
        `after`), and the computation waits for it at `copy_wait` of its tag."""
        o.add("copy", phase, dst=dst, src=src, bytes=_same_bytes(o.rows, row_a, row_b), stream=stream, tag=tag,
              after=list(after), skip_layers=list(skip))

    def fetch_weights(phase, target, skip=()):
        for n, _ in layer_tensors:
            transfer(phase, f"stage.weights.{n}[({target})%2]", f"weights.{n}[{target}]", f"stage.weights.{n}",
                     f"weights.{n}", "h2d", f"w_in[{target}]", skip=skip)

    def fetch_grads(phase, target, after=(), skip=()):
        for n, _ in layer_tensors:
            transfer(phase, f"stage.grads.{n}[({target})%2]", f"grads.{n}[{target}]", f"stage.grads.{n}",
                     f"grads.{n}", "h2d", f"g_in[{target}]", after, skip)

    # Streams overlap the computation: layer l+1's inputs arrive while layer l computes (l-1's in
    # backward), outputs leave while the next layer computes; a double buffer's next fill waits for the
    # copy out of its previous contents (`after`). Tags of layers that do not exist are dropped, and a
    # wait for a copy not in flight (its data is still in the buffer) does nothing.
    if zero3:      # layer l+1 arrives while layer l computes (layer 0: gathered in the prologue)
        gather_weights("forward", "l+1", [L - 1])
        o.add("await", "forward", tag="w[l]")
    if stream_w:   # layer 0: fetched in the prologue
        fetch_weights("forward", "l+1", skip=[L - 1])
        o.add("copy_wait", "forward", tag="w_in[l]")
    if off.residual:  # the buffer's previous block input (layer l-2) has left for the host
        o.add("copy_wait", "forward", tag="r_out[l-2]")
    ln1_forward("forward")
    if off.residual:
        transfer("forward", "act.res[l]", RES, "act.res", "stage.res", "d2h", "r_out[l]")
    block_forward("forward")
    linear_forward("down", "forward", "act.h[l]", "work.branch", "h")
    layer_forward = o.take()

    # ---- backward of one block: recompute first, then the chain rule bottom-up ---------------------
    if zero3:      # the last two layers are still in the buffers from the forward
        gather_weights("backward", "l-1", [0, L - 1])
        o.add("await", "backward", tag="w[l]")
    if stream_w:   # the last two layers are still in the buffers from the forward
        fetch_weights("backward", "l-1", skip=[L - 1, 0])
        o.add("copy_wait", "backward", tag="w_in[l]")
    if off.residual:  # the last two layers' block inputs are still in their buffers from the forward
        transfer("backward", "stage.res[(l-1)%2]", "act.res[l-1]", "act.res", "stage.res", "h2d", "r_in[l-1]",
                 after=["r_out[l+1]"], skip=[L - 1, 0])
        o.add("copy_wait", "backward", tag="r_in[l]")
    if stream_g:   # the gradients accumulated so far (over micro-steps); the first layer's: not ahead (the
        # LM head's buffers are live until then)
        fetch_grads("backward", "l", skip=range(L - 1))
        fetch_grads("backward", "l-1", after=["g_out[l+1]"], skip=[0])
        o.add("copy_wait", "backward", tag="g_in[l]")
    if zero2:      # the buffer's previous user, layer l+2, has been reduce-scattered
        o.add("await", "backward", tag="g[l+2]")
        for n, shape in layer_tensors:
            o.add("memset", "backward", dst=G(n), bytes=o.rows[f"stage.grads.{n}"].bytes)
    if r.block:    # rstd1 was not kept either: the no-add forward norm recomputes it from the block input
        o.kernel("llmq_rmsnorm_forward_ln1_first", "recompute", res_in=RES, weight=W("ln1"),
                 y=norm_out("ln1"), rstd="act.rstd1[l]", **amax("ln1"))
        block_forward("recompute")
    else:
        if r.norm:
            for n, res in (("ln1", RES), ("ln2", "act.res2[l]")):
                o.kernel(f"llmq_rmsnorm_recompute_{n}", "recompute", res=res, weight=W(n),
                         rstd=f"act.rstd{n[-1]}[l]", y=norm_out(n), **amax(n))
                if fp8:
                    quantize("", n, "recompute", "work.ln", out=f"act.{n}[l]")
        if r.qkv:
            linear_forward("qkv", "recompute", "act.ln1[l]", "act.qkv_pre[l]" if qk else "act.qkv[l]", "ln1",
                           bias=W("qkv_bias") if m.qkv_bias else None)
            rope_forward("recompute")
        if r.attention:
            o.add("attention_forward", "recompute", qkv="act.qkv[l]", out="act.att[l]", lse="act.lse[l]", **attn_ws)
        if r.ffn:
            linear_forward("gate_up", "recompute", "act.ln2[l]", "act.gu[l]", "ln2")
        if r.swiglu:
            swiglu_forward("recompute")
    b = "backward"

    def linear_backward(name, dy, dy_slot, x, x_slot, dx):
        """dgrad into dx and wgrad accumulated into grads.<name>[l]; FP8 through transposed copies."""
        N, K = shapes[name]
        if fp8:
            quantize("dual_", dy_slot, b, dy, out="work.dy_q", out_t="work.dy_qt")
            o.kernel(f"llmq_transpose_fp8_{tsite['w_' + name]}", b, out_t="work.w_qt", **{"in": W(name)})
            if x_slot != "att":
                o.kernel(f"llmq_transpose_fp8_{tsite[x_slot]}", b, out_t="work.x_qt", **{"in": x})
            else:       # attention output: saved in bf16, quantized transposed here
                quantize("t_", "att", b, x, out_t="work.x_qt")
        common = {"layer_name": name, "M": BT, "N": N, "K": K, "dtype": "e4m3" if fp8 else "bf16",
                  "grad_dtype": gdt}
        o.add("linear", b, **{"pass": "dgrad", **common, "dy": "work.dy_q" if fp8 else dy,
              "w": "work.w_qt" if fp8 else W(name), "dx": dx,
              "dy_scale": f"fp8:{dy_slot}[l]/descale" if fp8 else None,
              "w_scale": f"fp8:w_{name}[l]/descale" if fp8 else None, "accumulate": False})
        o.add("linear", b, **{"pass": "wgrad", **common, "dy": "work.dy_qt" if fp8 else dy,
              "x": "work.x_qt" if fp8 else x, "dw": G(name),
              "dy_scale": f"fp8:{dy_slot}[l]/descale" if fp8 else None,
              "x_scale": f"fp8:{x_slot}[l]/descale" if fp8 else None, "accumulate": True})

    if fp8:   # the residual gradient came from the layer above: its amax is taken here
        o.kernel(f"llmq_amax_{site['d_down']}", b, **{"in": "work.d_res"}, stats="fp8:d_down[l]")
    linear_backward("down", "work.d_res", "d_down", "act.h[l]", "h", "work.d_h")
    o.kernel("llmq_swiglu_backward", b, d_gate_up="work.d_gu", dh="work.d_h", gate_up="act.gu[l]", **amax("d_gu"))
    linear_backward("gate_up", "work.d_gu", "d_gu", "act.ln2[l]", "ln2", "work.d_ln")
    o.kernel("llmq_rmsnorm_backward_ln2", b, dx="work.d_res", d_res="work.d_res", dy="work.d_ln",
             res="act.res2[l]", weight=W("ln2"), rstd="act.rstd2[l]", dw_partial="work.norm_partials",
             **amax("d_att_out"))
    o.kernel("llmq_rmsnorm_dweight_ln2", b, dw=G("ln2"), dw_partial="work.norm_partials")
    linear_backward("attn_out", "work.d_res", "d_att_out", "act.att[l]", "att", "work.d_att")
    o.add("attention_backward", b, qkv="act.qkv[l]", out="act.att[l]", dout="work.d_att", lse="act.lse[l]",
          dqkv="work.d_qkv", **attn_ws, **({"delta": "work.attn_delta"} if "work.attn_delta" in o.rows else {}))
    if qk:
        o.kernel("llmq_rope_backward", b, dqkv="work.d_qkv", d="work.d_qkv", qkv="act.qkv_pre[l]",
                 rstd="act.qk_rstd[l]", table="rope.table", q_norm=W("q_norm"), k_norm=W("k_norm"),
                 dw_partial="work.norm_partials", **amax("d_qkv"))
        o.kernel("llmq_rope_qknorm_dweight", b, dq_norm=G("q_norm"), dk_norm=G("k_norm"),
                 dw_partial="work.norm_partials")
    else:
        o.kernel("llmq_rope_backward", b, dqkv="work.d_qkv", table="rope.table", **amax("d_qkv"))
    if m.qkv_bias:
        o.add("bias_grad", b, dy="work.d_qkv", db=G("qkv_bias"), ones="work.ones", rows=BT, cols=QKV)
    linear_backward("qkv", "work.d_qkv", "d_qkv", "act.ln1[l]", "ln1", "work.d_ln")
    o.kernel("llmq_rmsnorm_backward_ln1", b, dx="work.d_res", d_res="work.d_res", dy="work.d_ln",
             res=RES, weight=W("ln1"), rstd="act.rstd1[l]", dw_partial="work.norm_partials", **sink)
    o.kernel("llmq_rmsnorm_dweight_ln1", b, dw=G("ln1"), dw_partial="work.norm_partials")
    if stream_g:
        for n, _ in layer_tensors:
            transfer(b, f"grads.{n}[l]", G(n), f"grads.{n}", f"stage.grads.{n}", "d2h", "g_out[l]")
    if zero2:      # overlapped with the next block's backward on the communication streams
        o.add("collective", b, kind="reduce_scatter", dtype="bf16", overlap=True, tag="g[l]", skip_layers=[],
              tensors=[[G(n), False] for n, _ in layer_tensors], into=[f"grads.{n}[l]" for n, _ in layer_tensors])
    layer_backward = o.take()

    # ---- tokens in, embedding, LM head and loss --------------------------------------------------------
    if fp8:
        o.add("memset", "forward", dst="stats.fp8", bytes=len(ACT_SLOTS) * L * FP8_SLOT_BYTES)   # zero act/grad amaxes
    if zero3:
        o.add("collective", "forward", kind="all_gather", dtype="uint8", overlap=False, tag="w[0]",
              skip_layers=[], tensors=[[f"weights.{n}[0]", False] for n, _ in layer_tensors],
              into=[f"stage.weights.{n}[0]" for n, _ in layer_tensors])
    if stream_w:
        fetch_weights("forward", "0")
    o.kernel("llmq_embedding_forward", "forward", x="stage.res[0]" if off.residual else "act.res[0]",
             tokens="tokens.inputs", wte="weights.embedding")
    prologue = o.take()
    head_w = "weights.embedding" if m.tie_embeddings else "weights.lm_head"
    head_g = "grads.embedding" if m.tie_embeddings else "grads.lm_head"
    o.kernel("llmq_rmsnorm_forward_final", "forward", res_out="lmhead.x", res_in=f"act.res2[{L - 1}]",
             delta="work.branch", weight="weights.final_norm", y="lmhead.ln", rstd="lmhead.rstd")
    rows = BT // plan.lm_head_chunks
    for c in range(plan.lm_head_chunks):
        at_row = c * rows
        o.add("linear", "forward", **{"pass": "forward", "layer_name": "lm_head", "M": rows, "N": m.vocab_size,
              "K": C, "x": f"lmhead.ln+{at_row * C * 2}", "w": head_w, "y": "lmhead.logits", "dtype": "bf16",
              "bias": None, "x_scale": None, "w_scale": None, "accumulate": False})
        o.kernel("llmq_crossentropy_fused", "forward", logits="lmhead.logits", targets="tokens.targets",
                 losses="lmhead.losses", lse="lmhead.lse", grad_scale="scalar:grad_scale", row_offset=at_row)
        common = {"layer_name": "lm_head", "M": rows, "N": m.vocab_size, "K": C, "dtype": "bf16",
                  "grad_dtype": "bf16", "dy_scale": None}
        o.add("linear", "backward", **{"pass": "dgrad", **common, "dy": "lmhead.logits", "w": head_w,
              "dx": f"work.d_ln+{at_row * C * 2}", "w_scale": None, "accumulate": False})
        o.add("linear", "backward", **{"pass": "wgrad", **common, "dy": "lmhead.logits",
              "x": f"lmhead.ln+{at_row * C * 2}", "dw": head_g, "x_scale": None, "accumulate": True})
    o.kernel("llmq_loss_reduce", "forward", losses="lmhead.losses", scale="scalar:grad_scale", acc="scalar:loss")
    o.kernel("llmq_rmsnorm_backward_final", "backward", dx="work.d_res", dy="work.d_ln", res="lmhead.x",
             weight="weights.final_norm", rstd="lmhead.rstd", dw_partial="work.norm_partials", **sink)
    o.kernel("llmq_rmsnorm_dweight_final", "backward", dw="grads.final_norm", dw_partial="work.norm_partials")
    head = o.take()
    o.kernel("llmq_embedding_backward", "backward", dwte="grads.embedding", dx="work.d_res",
             tokens="tokens.inputs", sorted_pos="tokens.sorted_pos", seg_start="tokens.segments",
             num_segments=f"tokens.segments+{4 * num_unique_index(BT)}")
    epilogue = o.take()

    # ---- init: RoPE table; amaxes of the initial weights (their work copies come from `publish`) ------------
    # Several GPUs: gradients are summed over GPUs first (reduce-scatter; ZeRO-0 all-gathers the sums too).
    # A sharded optimizer updates this GPU's shard ("@shard": the part at rank*S of a whole row), FP8
    # weight amaxes are max-reduced so that every GPU quantizes with one scale, and the new work copy is
    # published into the shard's place and all-gathered.
    from ..plan.memory import shard_elems
    from .families import adamw as adamw_family
    from .families import gradnorm as gradnorm_family
    p = plan.precision
    tensors = param_tensors(plan)
    multi, opt_shard = N_gpu > 1, N_gpu > 1 and sh.optimizer
    sub = "@shard" if opt_shard else ""

    def elems(shape):        # the optimizer's domain of one tensor instance
        return shard_elems(prod(shape), N_gpu) if opt_shard else prod(shape)

    o.kernel("llmq_rope_table", "init", table="rope.table")
    init = o.take()
    if fp8:
        for n in WEIGHT_SLOTS:
            kernel = f"llmq_amax_shard_{SITE_OF['w_' + n]}" if opt_shard else f"llmq_amax_{site['w_' + n]}"
            o.kernel(kernel, "init", **{"in": f"master.{n}[l]"}, stats=f"fp8:w_{n}[l]")
    layer_init = o.take()

    # ---- optimizer step ----------------------------------------------------------------------------------
    adam = adamw_family.kernel_name({"MASTER_FP32": p.master == "fp32", "ADAM_M_FP32": p.adam_m == "fp32",
                                     "ADAM_V_FP32": p.adam_v == "fp32"})
    staged = {n: zero2 and pl for n, _, pl, _ in tensors}       # ZeRO-2 block gradients: already reduced shards
    whole = [[f"grads.{n}", pl] for n, _, pl, _ in tensors if not staged[n]]
    if multi:
        o.add("collective", "optimizer", kind="reduce_scatter", dtype="bf16", overlap=False, tensors=whole,
              into=None)
        if not opt_shard:
            o.add("collective", "optimizer", kind="all_gather", dtype="bf16", overlap=False, tensors=whole)

    def grad(n, idx):
        return f"grads.{n}{idx}" + ("" if staged[n] else sub)

    sizes = [elems(shape) for _, shape, pl, _ in tensors for _ in range(L if pl else 1)]
    _, _, n_partials = gradnorm_family.partials_layout(sizes)
    o.add("gradnorm_partials", "optimizer", tensors=[[grad(n, ""), pl] for n, _, pl, _ in tensors],
          sizes=sizes, partials="stats.gradnorm", rank_offset=n_partials if opt_shard else 0)
    if opt_shard:        # every GPU sums all partials in one order: one norm, bit-identical everywhere
        o.add("collective", "optimizer", kind="all_gather", dtype="fp32", overlap=False,
              region="stats.gradnorm", bytes=N_gpu * n_partials * 4)
    o.add("gradnorm_finalize", "optimizer", partials="stats.gradnorm",
          count=n_partials * (N_gpu if opt_shard else 1), out="scalar:norm", hyper="scalar:hyper")
    gradnorm = o.take()
    if fp8:
        o.add("memset", "optimizer", dst=f"stats.fp8+{len(ACT_SLOTS) * L * FP8_SLOT_BYTES}",
              bytes=len(WEIGHT_SLOTS) * L * FP8_SLOT_BYTES)

    def master_of(n, idx):
        return f"master.{n}{idx}" if f"master.{n}" in o.rows else f"weights.{n}{idx}"

    # Offloaded block states stream through their device double buffers: layer l+1's arrive while layer
    # l updates, layer l's leave while l+1 updates. Whole-model tensors' states, and offloaded gradients
    # (read once), are used where they are, in mapped pinned memory (no device buffer for them here).
    def streamed(n):
        rows = {"master": master_of(n, ""), "adam_m": f"adam_m.{n}", "adam_v": f"adam_v.{n}"}
        return {what: row for what, row in rows.items() if f"stage.{what}.{n}" in o.rows}

    def move_states(target, into_stage, skip=()):
        for n, _, pl, _ in tensors:
            for what, row in streamed(n).items() if pl else ():
                buf, src = f"stage.{what}.{n}[({target})%2]", f"{row}[{target}]"
                if into_stage:
                    transfer("optimizer", buf, src, f"stage.{what}.{n}", row, "h2d", f"o_in[{target}]",
                             after=[f"o_out[{target}-2]"], skip=skip)
                else:
                    transfer("optimizer", src, buf, f"stage.{what}.{n}", row, "d2h", f"o_out[{target}]")

    def adamw(n, shape, idx, is_matrix):
        rows = {"master": master_of(n, idx), "adam_m": f"adam_m.{n}{idx}", "adam_v": f"adam_v.{n}{idx}",
                "grads": grad(n, idx)}
        if idx:
            rows.update({what: f"stage.{what}.{n}[l%2]" for what in streamed(n)})
        o.kernel(adam, "optimizer", param=rows["master"], grad=rows["grads"], m=rows["adam_m"],
                 v=rows["adam_v"], hyper="scalar:hyper", clip_scale="scalar:clip_scale",
                 amax=f"fp8:w_{n}[l]" if (fp8 and is_matrix) else 0, n=elems(shape),
                 seed=f"seed:{n}", apply_weight_decay=int(is_matrix or n in ("embedding", "lm_head")), zero_grad=1)

    def publish(n, shape, idx, is_matrix):
        """The work copy from the new master (this GPU's shard of it when the optimizer is sharded)."""
        shard_row = zero3 and idx                   # ZeRO-3 block weights: the row is this GPU's shard
        src, dst = master_of(n, idx), f"weights.{n}{idx}" + ("" if shard_row else sub)
        if src.startswith("weights."):
            return                                  # the work copy is the master
        if fp8 and is_matrix:
            if opt_shard:
                o.kernel(f"llmq_quantize_shard_{SITE_OF['w_' + n]}", "optimizer", out=dst, stats=f"fp8:w_{n}[l]",
                         **{"in": src})
            else:
                quantize("", f"w_{n}", "optimizer", src, out=dst)
        elif p.master == "fp32":
            o.kernel("llmq_cast_f32_bf16", "optimizer", dst=dst, src=src, n=elems(shape))
        else:
            o.add("copy", "optimizer", dst=dst, src=src, bytes=2 * elems(shape))

    def each(fn, layered: bool):
        for n, shape, per_layer, is_matrix in tensors:
            if per_layer == layered:
                fn(n, shape, "[l]" if per_layer else "", is_matrix)

    move_states("0", True)
    each(adamw, False)
    optimizer = o.take()
    move_states("l+1", True, skip=[L - 1])
    o.add("copy_wait", "optimizer", tag="o_in[l]")
    each(adamw, True)
    move_states("l", False)
    layer_optimizer = o.take()
    if opt_shard and fp8:
        o.add("collective", "optimizer", kind="all_reduce_max", dtype="fp32", overlap=False,
              region=f"stats.fp8+{len(ACT_SLOTS) * L * FP8_SLOT_BYTES}", bytes=len(WEIGHT_SLOTS) * L * FP8_SLOT_BYTES)
    each(publish, False)
    publish_once = o.take()
    if any(streamed(n) for n, _, pl, _ in tensors if pl):    # the new master has reached the host
        o.add("copy_wait", "optimizer", tag="o_out[l]")
    each(publish, True)
    layer_publish = o.take()
    if opt_shard:
        o.add("collective", "optimizer", kind="all_gather", dtype="uint8", overlap=False,
              tensors=[[f"weights.{n}", pl] for n, _, pl, _ in tensors if not (zero3 and pl)])
        for n, _, pl, _ in tensors:      # AdamW zeroed this GPU's shard; the rest held local sums
            if not staged[n]:
                row = o.rows[f"grads.{n}"]
                o.add("memset", "optimizer", dst=f"grads.{n}", bytes=row.total)
    gather = o.take()
    return {"schema": 1, "plan": plan.name, "layers": L, "scalars": SCALARS,
            "fp8_slots": {"act": list(ACT_SLOTS), "weights": list(WEIGHT_SLOTS), "bytes": FP8_SLOT_BYTES,
                          "count": fp8_slot_count(L)},
            "init": init, "layer_init": layer_init,
            "micro_step": {"prologue": prologue, "layer_forward": layer_forward, "head": head,
                           "layer_backward": layer_backward, "epilogue": epilogue},
            "eval": {"head": [op for op in head if op["phase"] == "forward"]},
            "optimizer_step": {"gradnorm": gradnorm, "optimizer": optimizer,
                               "layer_optimizer": layer_optimizer,
                               "publish": publish_once, "layer_publish": layer_publish, "gather": gather}}


def _same_bytes(rows: dict, a: str, b: str) -> int:
    """Bytes of one instance of two rows a copy moves between (a host row and its device buffer)."""
    if rows[a].bytes != rows[b].bytes:
        raise ValueError(f"rows {a} ({rows[a].bytes} bytes) and {b} ({rows[b].bytes} bytes) differ: "
                         f"the memory table must size a host row and its device buffer alike")
    return rows[a].bytes


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


# --- what an operation does to the rows it names (lifetimes: plan/lifetimes.py) -----------------------
# Kernel arguments a kernel only writes, by kernel-name prefix (every other argument is read, or read
# and written). A row is killed by an operation only if all its references there are such writes.
KERNEL_WRITES = {
    "llmq_quantize_": ("out", "out_t"), "llmq_transpose_fp8_": ("out_t",),
    "llmq_rmsnorm_forward_": ("res_out", "y", "rstd"), "llmq_rmsnorm_recompute_": ("y",),
    "llmq_rmsnorm_backward_": ("dx", "dw_partial"), "llmq_rope_forward": ("out", "rstd"),
    "llmq_rope_backward": ("dw_partial",), "llmq_swiglu_forward": ("h",), "llmq_swiglu_backward": ("d_gate_up",),
    "llmq_embedding_forward": ("x",), "llmq_crossentropy_fused": ("losses", "lse"), "llmq_rope_table": ("table",),
    "llmq_cast_f32_bf16": ("dst",),
}
# Other operations: the fields they only write (a linear's output unless it accumulates), and scratch
# fields written and read within the operation (live at that operation only).
OP_WRITES = {"attention_forward": ("out", "lse"), "attention_backward": ("dqkv",), "memset": ("dst",),
             "copy": ("dst",)}
OP_SCRATCH = {"attention_forward": ("workspace",), "attention_backward": ("workspace", "delta")}


def _row_of(ref) -> tuple[str, bool] | None:
    """(row name, whole row?) of a reference; None for numbers, tags, fp8 slots and scalars. A byte
    offset, a shard or an instance of a multi-instance row is not the whole row (it does not kill it)."""
    if not isinstance(ref, str) or "." not in ref or ref.startswith(("fp8:", "scalar:", "seed:")):
        return None
    name = ref.split("[")[0].split("+")[0].split("@")[0]
    return name, "+" not in ref and "@" not in ref


def op_touches(op: dict) -> dict[str, str]:
    """Row name -> "w" (only written, whole), "s" (scratch of this operation) or "r" (read, or partly
    or also written) for every row an operation (not a branch) names."""
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
    for ref, how in refs:
        row = _row_of(ref)
        if row is None:
            continue
        name, whole = row
        how = how if whole or how == "r" else "r"
        prev = out.get(name)
        out[name] = how if prev is None or prev == how else "r"
    return out
