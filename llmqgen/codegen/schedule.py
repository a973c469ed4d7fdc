"""schedule.json: the ordered operations of a micro-step (forward + backward) and of an optimizer step.

Every operation names buffers of the plan's memory table: `act.res[l]` is layer l's instance of a
per-layer row, a bare name a shared or persistent row. Layer sections run for l = 0..L-1 (forward)
and l = L-1..0 (backward). Recompute operations open the backward of a layer, exactly for the
activations the plan's recompute set dropped. The runtime executes these lists in order; kernels
are named as in kernels.json, GEMMs as (A, B -> D) with D[m,n] (+)= A[m,k] . B[n,k]^T (TN).
"""
from __future__ import annotations

from ..plan.memory import memory_table
from ..plan.schema import MemRow, Plan


class _Ops:
    def __init__(self, rows: list[MemRow], fp8: bool):
        self.rows = {r.name: r for r in rows}
        self.fp8 = fp8
        self.ops: list[dict] = []

    def ref(self, name: str) -> str:
        row = self.rows.get(name)
        if row is None:
            raise KeyError(f"schedule names {name!r}, which the memory table lacks")
        return f"{name}[l]" if row.lifetime == "per_layer" or (row.count > 1 and row.lifetime == "persistent") else name

    def kernel(self, name: str, phase: str, **buffers: str):
        self.ops.append({"op": "kernel", "kernel": name, "phase": phase,
                         "buffers": {k: self.ref(v) for k, v in buffers.items()}})

    def gemm(self, what: str, phase: str, a: str, b: str, d: str, accumulate: bool = False, bias: str = ""):
        op = {"op": "gemm", "gemm": what, "phase": phase, "a": self.ref(a), "b": self.ref(b), "d": self.ref(d),
              "dtype": "e4m3" if self.fp8 else "bf16", "accumulate": accumulate}
        if bias:
            op["bias"] = self.ref(bias)
        self.ops.append(op)

    def op(self, kind: str, phase: str, **buffers: str):
        self.ops.append({"op": kind, "phase": phase, "buffers": {k: self.ref(v) for k, v in buffers.items()}})

    def take(self) -> list[dict]:
        out, self.ops = self.ops, []
        return out


def _site_kernels(plan: Plan) -> dict[str, str]:
    """Quantize site -> the suffix of its (deduplicated) kernels: llmq_quantize[_t|_dual]_<suffix>."""
    from .context import build_context
    from .families import quantize
    if not plan.fp8:
        return {}
    ctx = build_context(plan, plan.inventory.gpu.arch)
    ctx.update(quantize.context(ctx))
    return {site: row["name"] for row in quantize.quant_sites(ctx) for site in row["sites"]}


def build_schedule(plan: Plan) -> dict:
    m, r, fp8 = plan.model, plan.recompute, plan.fp8
    o = _Ops(plan.estimate.memory if plan.estimate else memory_table(plan), fp8)
    site = _site_kernels(plan)
    quant = lambda kind, s: f"llmq_quantize_{kind}{site[s]}"           # noqa: E731
    transpose = lambda s: f"llmq_transpose_fp8_{site[s]}"               # noqa: E731
    w = lambda n: f"weights.{n}"          # noqa: E731
    g = lambda n: f"grads.{n}"            # noqa: E731
    qk = m.qk_norm

    # ---- forward of one block ----------------------------------------------------------------
    def forward(phase: str):
        o.kernel("llmq_rmsnorm_forward_ln1", phase, res_out="act.res", weight=w("ln1"), y="act.ln1",
                 rstd="act.rstd1")
        if fp8:
            o.kernel(quant("", "ln1"), phase, out="act.ln1", **{"in": "work.ln"})
        o.gemm("qkv", phase, "act.ln1", w("qkv"), "act.qkv_pre" if qk else "act.qkv",
               bias=w("qkv_bias") if m.qkv_bias else "")
        if qk:
            o.kernel("llmq_rope_forward", phase, out="act.qkv", qkv="act.qkv_pre", table="rope.table",
                     rstd="act.qk_rstd")
        else:
            o.kernel("llmq_rope_forward", phase, qkv="act.qkv", table="rope.table")
        o.op("attention_forward", phase, qkv="act.qkv", out="act.att", lse="act.lse")
        if fp8:
            o.kernel(quant("", "att"), phase, out="work.att_q", **{"in": "act.att"})
        o.gemm("attn_out", phase, "work.att_q" if fp8 else "act.att", w("attn_out"), "work.branch")
        o.kernel("llmq_rmsnorm_forward_ln2", phase, res_out="act.res2", res_in="act.res", delta="work.branch",
                 weight=w("ln2"), y="act.ln2", rstd="act.rstd2")
        if fp8:
            o.kernel(quant("", "ln2"), phase, out="act.ln2", **{"in": "work.ln"})
        o.gemm("gate_up", phase, "act.ln2", w("gate_up"), "act.gu")
        o.kernel("llmq_swiglu_forward", phase, h="work.h" if fp8 else "act.h", gate_up="act.gu")
        if fp8:
            o.kernel(quant("", "swiglu"), phase, out="act.h", **{"in": "work.h"})
        o.gemm("down", phase, "act.h", w("down"), "work.branch")

    forward("forward")
    layer_forward = o.take()

    # ---- backward of one block: recompute first, then the chain rule bottom-up ----------------
    if r.block:
        forward("recompute")
    else:
        if r.norm:
            o.kernel("llmq_rmsnorm_recompute_ln1", "recompute", res="act.res", weight=w("ln1"), rstd="act.rstd1",
                     y="act.ln1")
            o.kernel("llmq_rmsnorm_recompute_ln2", "recompute", res="act.res2", weight=w("ln2"), rstd="act.rstd2",
                     y="act.ln2")
        if r.qkv:
            o.gemm("qkv", "recompute", "act.ln1", w("qkv"), "act.qkv_pre" if qk else "act.qkv",
                   bias=w("qkv_bias") if m.qkv_bias else "")
            o.kernel("llmq_rope_forward", "recompute", qkv="act.qkv", table="rope.table")
        if r.attention:
            o.op("attention_forward", "recompute", qkv="act.qkv", out="act.att", lse="act.lse")
        if r.ffn:
            o.gemm("gate_up", "recompute", "act.ln2", w("gate_up"), "act.gu")
        if r.swiglu:
            o.kernel("llmq_swiglu_forward", "recompute", h="work.h" if fp8 else "act.h", gate_up="act.gu")
            if fp8:
                o.kernel(quant("", "swiglu"), "recompute", out="act.h", **{"in": "work.h"})
    b = "backward"
    dq = "work.dy_q" if fp8 else "work.d_res"      # the output gradient operand of dgrad
    # down: d_res (the residual gradient) is dY; dgrad -> d_h, wgrad accumulates into grads.down
    if fp8:   # dgrad needs W^T and wgrad X^T in e4m3: transposed copies, made per layer
        o.kernel(quant("dual_", "d_down"), b, out="work.dy_q", out_t="work.dy_qt", **{"in": "work.d_res"})
        o.kernel(transpose("down"), b, out_t="work.w_qt", **{"in": w("down")})
        o.kernel(transpose("swiglu"), b, out_t="work.x_qt", **{"in": "act.h"})
    o.gemm("down.dgrad", b, dq, "work.w_qt" if fp8 else w("down"), "work.d_h")
    o.gemm("down.wgrad", b, "work.dy_qt" if fp8 else "work.d_res", "work.x_qt" if fp8 else "act.h", g("down"),
           accumulate=True)
    o.kernel("llmq_swiglu_backward", b, d_gate_up="work.d_gu", dh="work.d_h", gate_up="act.gu")
    if fp8:
        o.kernel(quant("dual_", "d_gate_up"), b, out="work.dy_q", out_t="work.dy_qt", **{"in": "work.d_gu"})
        o.kernel(transpose("gate_up"), b, out_t="work.w_qt", **{"in": w("gate_up")})
        o.kernel(transpose("ln2"), b, out_t="work.x_qt", **{"in": "act.ln2"})
    o.gemm("gate_up.dgrad", b, "work.dy_q" if fp8 else "work.d_gu", "work.w_qt" if fp8 else w("gate_up"), "work.d_ln")
    o.gemm("gate_up.wgrad", b, "work.dy_qt" if fp8 else "work.d_gu", "work.x_qt" if fp8 else "act.ln2",
           g("gate_up"), accumulate=True)
    o.kernel("llmq_rmsnorm_backward_ln2", b, dx="work.d_res", d_res="work.d_res", dy="work.d_ln", res="act.res2",
             weight=w("ln2"), rstd="act.rstd2", dw_partial="work.norm_partials")
    o.kernel("llmq_rmsnorm_dweight_ln2", b, dw=g("ln2"), dw_partial="work.norm_partials")
    if fp8:
        o.kernel(quant("dual_", "d_att_out"), b, out="work.dy_q", out_t="work.dy_qt", **{"in": "work.d_res"})
        o.kernel(transpose("att_out"), b, out_t="work.w_qt", **{"in": w("attn_out")})
        o.kernel(quant("t_", "att"), b, out_t="work.x_qt", **{"in": "act.att"})
    o.gemm("attn_out.dgrad", b, dq, "work.w_qt" if fp8 else w("attn_out"), "work.d_att")
    o.gemm("attn_out.wgrad", b, "work.dy_qt" if fp8 else "work.d_res", "work.x_qt" if fp8 else "act.att",
           g("attn_out"), accumulate=True)
    o.op("attention_backward", b, qkv="act.qkv", out="act.att", dout="work.d_att", lse="act.lse",
         dqkv="work.d_qkv")
    o.kernel("llmq_rope_backward", b, dqkv="work.d_qkv", table="rope.table")
    if fp8:
        o.kernel(quant("dual_", "d_qkv"), b, out="work.dy_q", out_t="work.dy_qt", **{"in": "work.d_qkv"})
        o.kernel(transpose("qkv"), b, out_t="work.w_qt", **{"in": w("qkv")})
        o.kernel(transpose("ln1"), b, out_t="work.x_qt", **{"in": "act.ln1"})
    o.gemm("qkv.dgrad", b, "work.dy_q" if fp8 else "work.d_qkv", "work.w_qt" if fp8 else w("qkv"), "work.d_ln")
    o.gemm("qkv.wgrad", b, "work.dy_qt" if fp8 else "work.d_qkv", "work.x_qt" if fp8 else "act.ln1", g("qkv"),
           accumulate=True)
    o.kernel("llmq_rmsnorm_backward_ln1", b, dx="work.d_res", d_res="work.d_res", dy="work.d_ln", res="act.res",
             weight=w("ln1"), rstd="act.rstd1", dw_partial="work.norm_partials")
    o.kernel("llmq_rmsnorm_dweight_ln1", b, dw=g("ln1"), dw_partial="work.norm_partials")
    layer_backward = o.take()

    # ---- embedding, LM head, loss --------------------------------------------------------------
    o.op("copy_h2d", "forward", src="stage.tokens", dst="tokens.inputs")
    o.kernel("llmq_embedding_forward", "forward", x="act.res", tokens="tokens.inputs", wte=w("embedding"))
    prologue = o.take()
    head_w = w("embedding") if m.tie_embeddings else w("lm_head")
    head_g = g("embedding") if m.tie_embeddings else g("lm_head")
    o.kernel("llmq_rmsnorm_forward_final", "forward", res_out="lmhead.x", weight=w("final_norm"), y="lmhead.ln",
             rstd="lmhead.rstd")
    for _ in range(plan.lm_head_chunks):
        o.gemm("lm_head", "forward", "lmhead.ln", head_w, "lmhead.logits")
        o.kernel("llmq_crossentropy_fused", "forward", logits="lmhead.logits", targets="tokens.targets",
                 losses="lmhead.losses", lse="lmhead.lse")
        o.gemm("lm_head.dgrad", "backward", "lmhead.logits", head_w, "work.d_ln")
        o.gemm("lm_head.wgrad", "backward", "lmhead.logits", "lmhead.ln", head_g, accumulate=True)
    o.kernel("llmq_loss_reduce", "forward", losses="lmhead.losses", acc="stats.scalars")
    o.kernel("llmq_rmsnorm_backward_final", "backward", dx="work.d_res", dy="work.d_ln", res="lmhead.x",
             weight=w("final_norm"), rstd="lmhead.rstd", dw_partial="work.norm_partials")
    o.kernel("llmq_rmsnorm_dweight_final", "backward", dw=g("final_norm"), dw_partial="work.norm_partials")
    head = o.take()
    o.kernel("llmq_embedding_backward", "backward", dwte=g("embedding"), dx="work.d_res", tokens="tokens.inputs",
             sorted_pos="tokens.sorted_pos", seg_start="tokens.segments")
    epilogue = o.take()

    # ---- optimizer step ---------------------------------------------------------------------------
    from .families import adamw as adamw_family
    tensors = [n[len("grads."):] for n in o.rows if n.startswith("grads.")]
    for t in tensors:
        o.kernel("llmq_gradnorm_partial", "optimizer", grad=g(t), partials="stats.gradnorm")
    o.kernel("llmq_gradnorm_finalize", "optimizer", partials="stats.gradnorm", out="stats.scalars")
    adam = adamw_family.kernel_name(_adam_ctx(plan))
    for t in tensors:
        param = f"master.{t}" if f"master.{t}" in o.rows else w(t)
        o.kernel(adam, "optimizer", param=param, grad=g(t), m=f"adam_m.{t}", v=f"adam_v.{t}")
        if fp8 and o.rows[w(t)].dtype == "e4m3":      # the new e4m3 work copy, from the new master
            o.kernel(quant("", {"attn_out": "att_out"}.get(t, t)), "optimizer", out=w(t), **{"in": param})
    optimizer = o.take()
    return {"schema": 1, "plan": plan.name, "layers": m.num_layers,
            "micro_step": {"prologue": prologue, "layer_forward": layer_forward, "head": head,
                           "layer_backward": layer_backward, "epilogue": epilogue},
            "optimizer_step": optimizer}


def _adam_ctx(plan: Plan) -> dict:
    p = plan.precision
    return {"MASTER_FP32": p.master == "fp32", "ADAM_M_FP32": p.adam_m == "fp32", "ADAM_V_FP32": p.adam_v == "fp32"}


def iter_ops(schedule: dict):
    """Every operation of a schedule, micro-step sections first."""
    for section in schedule["micro_step"].values():
        yield from section
    yield from schedule["optimizer_step"]
