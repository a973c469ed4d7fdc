"""A transformer block's operations as schedule operations (plan/schedule.py): forward, backward's recompute
(one function per operation of plan/block.py's OPS) and backward (the chain rule through the block). FP8 plans
quantize each matmul operand in its slot's scale (plan/block.py's FP8_CONVERSIONS)."""
from __future__ import annotations

from .block import LINEARS
from .emit import Emitter
from .refs import Fp8Ref, Ref


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
    args = dict(weight=e.weight("ln1"), **e.norm_out("ln1"), rstd=Ref("act.rstd1", "l"), **e.amax("ln1"))
    if from_saved:
        e.kernel("llmq_rmsnorm_recompute_ln1", phase, res=e.res, weight=e.weight("ln1"),
                 rstd=Ref("act.rstd1", "l"), **e.norm_out("ln1"), **e.amax("ln1"))
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
        quantize(e, "cold_" if e.delayed else "", "ln1", phase, Ref("work.ln"), out=Ref("act.ln1", "l"))


def norm_ln2(e: Emitter, phase: str, from_saved: bool) -> None:
    """res2 = res + attention-out, ln2 = rmsnorm(res2); or ln2 alone from the saved res2 and rstd."""
    if from_saved:
        e.kernel("llmq_rmsnorm_recompute_ln2", phase, res=Ref("act.res2", "l"), weight=e.weight("ln2"),
                 rstd=Ref("act.rstd2", "l"), **e.norm_out("ln2"), **e.amax("ln2"))
    else:
        e.kernel("llmq_rmsnorm_forward_ln2", phase, res_out=Ref("act.res2", "l"), res_in=e.res,
                 delta=Ref("work.branch"), weight=e.weight("ln2"), **e.norm_out("ln2"), rstd=Ref("act.rstd2", "l"),
                 **e.amax("ln2"))
    if e.fp8:
        quantize(e, "cold_" if e.delayed else "", "ln2", phase, Ref("work.ln"), out=Ref("act.ln2", "l"))


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
    if e.fp8:    # the attention output has no amax of its own: taken here (see `swiglu`), then quantized
        if phase != "recompute":
            e.kernel(f"llmq_amax_{e.site['att']}", phase, **{"in": Ref("act.att", "l")}, stats=Fp8Ref("att"))
        quantize(e, "", "att", phase, Ref("act.att", "l"), out=Ref("work.att_q"))
    linear_forward(e, "attn_out", phase, Ref("work.branch"))


def swiglu(e: Emitter, phase: str) -> None:
    """h = swiglu(gu). FP8: straight into e4m3, in two passes (the amax, then the bytes); backward's recompute
    skips the amax pass: the layer's slot holds the forward's amax of these same values (recompute is
    bit-identical, and the slots are zeroed only as a micro-step starts)."""
    h, gu = Ref("act.h", "l"), Ref("act.gu", "l")
    if e.fp8:
        if phase != "recompute":
            e.kernel("llmq_swiglu_forward_amax", phase, gate_up=gu, stats=Fp8Ref("h"))
        e.kernel("llmq_swiglu_forward_fp8", phase, h=h, gate_up=gu, stats=Fp8Ref("h"))
    else:
        e.kernel("llmq_swiglu_forward", phase, h=h, gate_up=gu)


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


def linear_backward(e: Emitter, name: str, dy: Ref | None, dx: Ref) -> None:
    """dgrad into dx and wgrad accumulated into the layer's gradient; FP8 through transposed copies (dy None:
    its fp8 copies are in work.dy_q and work.dy_qt already)."""
    lin, (N, K), b = LINEARS[name], e.m.block_matrix_shapes()[name], "backward"
    x = Ref(f"act.{lin.x}", "l")
    if e.fp8:
        if dy is not None:
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
    dh, gu = Ref("work.d_h"), Ref("act.gu", "l")
    if e.fp8:   # d_gate_up straight into its fp8 copies (two passes: the amax, then the bytes)
        e.kernel("llmq_swiglu_backward_amax", b, dh=dh, gate_up=gu, stats=Fp8Ref("d_gu"))
        e.kernel("llmq_swiglu_backward_dual", b, out=Ref("work.dy_q"), out_t=Ref("work.dy_qt"), dh=dh, gate_up=gu,
                 stats=Fp8Ref("d_gu"))
        linear_backward(e, "gate_up", None, d_ln)
    else:
        e.kernel("llmq_swiglu_backward", b, d_gate_up=Ref("work.d_gu"), dh=dh, gate_up=gu)
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
