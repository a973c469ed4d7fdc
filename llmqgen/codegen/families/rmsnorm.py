"""RMSNorm family: forward with fused residual add (+ amax), recompute of y, backward (+ amax) and a
deterministic weight gradient (per-block fp32 partials, then a fixed-order reduction).

Sites: ln1 (block input; `ln1_first` has no residual add, layer 0 reads the embedding output),
ln2 (after attention), final (before the LM head: its y feeds no FP8 matmul, so no amax)."""
from __future__ import annotations

from ...layout import norm_backward_blocks, row_threads
from ...plan.block import recomputed
from ...plan.schema import Recompute
from ..kernel import Kernel, cdiv

TEMPLATE = "_rmsnorm.cu.j2"
DWEIGHT_THREADS = 256


def _sites(ctx: dict) -> dict:
    """Forward, recompute and backward variants, each {name, site, add/dres, amax, fp8_out}; fp8_out (delayed
    scaling): y also in e4m3 (y_q), written instead of bf16 y once the slot is warm."""
    fp8, delayed = ctx["FP8"], ctx["FP8_DELAYED"]
    fwd = [dict(name="ln1_first", site="ln1", add=False, amax=fp8, fp8_out=delayed),
           dict(name="ln1", site="ln1", add=True, amax=fp8, fp8_out=delayed),
           dict(name="ln2", site="ln2", add=True, amax=fp8, fp8_out=delayed),
           dict(name="final", site="final", add=True, amax=False, fp8_out=False)]
    # norms backward recomputes from their saved residual and rstd (plan/block.py)
    reruns = recomputed(Recompute(**ctx["RECOMPUTE"]), ctx["QK_NORM"])
    recompute = [dict(name=x.op.name, site=x.op.name, amax=fp8, fp8_out=delayed) for x in reruns if x.from_saved]
    # dx of every site feeds an FP8 backward matmul (att-out, down); the final norm has no residual grad.
    bwd = [dict(name=s, site=s, dres=s != "final", amax=fp8) for s in ("ln1", "ln2", "final")]
    return dict(RMSNORM_FWD=fwd, RMSNORM_RECOMPUTE=recompute, RMSNORM_BWD=bwd)


def _bwd_blocks(ctx: dict) -> int:
    return norm_backward_blocks(ctx["GPU_ARCH"], ctx["SM_COUNT"], ctx["BT"], ctx["C"])


def context(ctx: dict) -> dict:
    if ctx["C"] % 8:
        raise ValueError(f"RMSNorm needs hidden_size % 8 == 0 for 16-byte vectors, got C={ctx['C']}")
    threads, vpt = row_threads(ctx["C"] // 8)
    return dict(_sites(ctx), RMSNORM_THREADS=threads, RMSNORM_VPT=vpt, RMSNORM_BWD_BLOCKS=_bwd_blocks(ctx),
                RMSNORM_DW_THREADS=DWEIGHT_THREADS)


def kernels(ctx: dict) -> list[Kernel]:
    C, BT = ctx["C"], ctx["BT"]
    threads, _ = row_threads(C // 8)
    sites, nblk = _sites(ctx), _bwd_blocks(ctx)
    row_grid, block = (BT, 1, 1), (threads, 1, 1)
    amax = lambda v: (("amax", "float*"),) if v["amax"] else ()  # noqa: E731
    y = lambda v: (("y", "bf16*"),) + ((("y_q", "uint8_t*"),) if v["fp8_out"] else ())  # noqa: E731
    out = []
    for v in sites["RMSNORM_FWD"]:
        args = (("res_out", "bf16*"), ("res_in", "const bf16*")) + ((("delta", "const bf16*"),) if v["add"] else ())
        args += (("weight", "const bf16*"), *y(v), ("rstd", "float*")) + amax(v)
        doc = ("res_out = res_in + delta; " if v["add"] else "") + "y = res * rstd * w, rstd = 1/rms(res)"
        if not v["add"]:   # res_out is res_in itself: no copy (args keep one shape for the schedule)
            args = args[1:]
        out.append(Kernel(f"llmq_rmsnorm_forward_{v['name']}", row_grid, block, args, doc=doc,
                          meta={"site": v["site"], "add": v["add"], "amax": v["amax"], "fp8_out": v["fp8_out"]}))
    for v in sites["RMSNORM_RECOMPUTE"]:
        out.append(Kernel(f"llmq_rmsnorm_recompute_{v['name']}", row_grid, block,
                          (("res", "const bf16*"), ("weight", "const bf16*"), ("rstd", "const float*"),
                           *y(v)) + amax(v),
                          doc="y = res * rstd * w from the saved residual and rstd (bit-identical to forward)",
                          meta={"site": v["site"], "amax": v["amax"], "fp8_out": v["fp8_out"]}))
    scratch = nblk * C
    for v in sites["RMSNORM_BWD"]:
        args = (("dx", "bf16*"),) + ((("d_res", "const bf16*"),) if v["dres"] else ())
        args += (("dy", "const bf16*"), ("res", "const bf16*"), ("weight", "const bf16*"),
                 ("rstd", "const float*"), ("dw_partial", "float*")) + amax(v)
        out.append(Kernel(f"llmq_rmsnorm_backward_{v['name']}", (nblk, 1, 1), block, args,
                          doc=("dx = d_res + " if v["dres"] else "dx = ") + "(w*dy - xhat*mean(w*dy*xhat)) * rstd; "
                              "dw partials per block",
                          meta={"site": v["site"], "dw_scratch_floats": scratch, "dw_scratch_bytes": 4 * scratch,
                                "amax": v["amax"], "in_place_ok": "dx may alias d_res"}))
        out.append(Kernel(f"llmq_rmsnorm_dweight_{v['name']}", (cdiv(C, DWEIGHT_THREADS), 1, 1),
                          (DWEIGHT_THREADS, 1, 1), (("dw", "bf16*"), ("dw_partial", "const float*")),
                          doc="dw += sum of the backward's per-block partials, in block order (deterministic)",
                          meta={"site": v["site"], "dw_scratch_floats": scratch}))
    return out
