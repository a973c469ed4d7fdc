"""GPU tests of the pointwise families (embedding, rmsnorm, rope, swiglu, quantize) against PyTorch fp32
references (autograd for every backward), on random inputs, outputs poisoned with NaN before launch."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pointwise_support as S  # noqa: E402
from harness import KernelProgram, current_device  # noqa: E402

from llmqgen.codegen.families import embedding, rope  # noqa: E402
from llmqgen.plan.schema import Recompute  # noqa: E402

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu

PLANS = {  # name -> (arch, fp8, overrides)
    "qwen2": ("qwen2", True, {}),
    "qwen3": ("qwen3", True, dict(recompute=Recompute(norm=True))),
    "llama_bf16": ("llama", False, {}),
    "qwen2_e5m2_f32": ("qwen2", True, dict(gradient="e5m2", master="fp32", C=336, F=656)),
}


@pytest.fixture(scope="module", params=list(PLANS))
def built(request):
    arch, fp8, over = PLANS[request.param]
    ctx = S.plan_ctx(arch, fp8, current_device().arch, **over)
    res, kernels = S.compile_ctx(ctx)
    return ctx, KernelProgram(res.cubin, kernels)


def rnd(*shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


def nan_like(t):
    return torch.full_like(t, float("nan"))


def close(out, ref, tol=2e-2):
    torch.testing.assert_close(out.detach().float(), ref.detach().float(), rtol=tol, atol=tol)


def slot():
    return torch.zeros(4, device="cuda")


def test_swiglu(built):
    ctx, prog = built
    torch.manual_seed(0)
    BT, F, fp8 = ctx["BT"], ctx["F"], ctx["FP8"]
    gu = rnd(BT, 2 * F, scale=2.0)
    h, amax = nan_like(rnd(BT, F)), slot()
    prog.launch("llmq_swiglu_forward", h, gu, *([amax] if fp8 else []))
    g = gu[:, :F].float().requires_grad_()
    u = gu[:, F:].float().requires_grad_()
    ref = torch.nn.functional.silu(g) * u
    close(h, ref)
    if fp8:
        assert amax[0].item() == h.float().abs().max().item()
    dh = rnd(BT, F)
    ref.backward(dh.float())
    dgu, amax = nan_like(gu), slot()
    prog.launch("llmq_swiglu_backward", dgu, dh, gu, *([amax] if fp8 else []))
    close(dgu, torch.cat([g.grad, u.grad], 1))
    if fp8:
        assert amax[0].item() == dgu.float().abs().max().item()


def _norm_ref(x, w, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def test_rmsnorm_forward_recompute(built):
    ctx, prog = built
    torch.manual_seed(1)
    BT, C, fp8, eps = ctx["BT"], ctx["C"], ctx["FP8"], ctx["EPS"]
    res_in, delta, w = rnd(BT, C), rnd(BT, C), rnd(C, scale=0.5) + 1
    for name in ("ln1_first", "ln1", "ln2", "final"):
        add, amax_on = name != "ln1_first", fp8 and name != "final"
        res_out, y, rstd, amax = nan_like(res_in), nan_like(res_in), torch.full((BT,), float("nan"), device="cuda"), slot()
        args = ([res_out, res_in, delta] if add else [res_in]) + [w, y, rstd] + ([amax] if amax_on else [])
        prog.launch(f"llmq_rmsnorm_forward_{name}", *args)
        x = (res_in.float() + delta.float()).bfloat16() if add else res_in
        if add:
            assert torch.equal(res_out, x)
        xf = x.float()
        close(rstd, torch.rsqrt((xf * xf).mean(-1) + eps), 1e-5)
        close(y, _norm_ref(xf, w.float(), eps))
        if amax_on:
            assert amax[0].item() == y.float().abs().max().item()
        if f"llmq_rmsnorm_recompute_{name}" in prog.kernels:
            y2, amax2 = nan_like(y), slot()
            prog.launch(f"llmq_rmsnorm_recompute_{name}", x, w, rstd, y2, *([amax2] if fp8 else []))
            assert torch.equal(y2, y), "recompute must be bit-identical to forward"
            if fp8:
                assert amax2[0].item() == amax[0].item()


def test_rmsnorm_backward(built):
    ctx, prog = built
    torch.manual_seed(2)
    BT, C, fp8, eps = ctx["BT"], ctx["C"], ctx["FP8"], ctx["EPS"]
    x, w, dy, d_res = rnd(BT, C), rnd(C, scale=0.5) + 1, rnd(BT, C), rnd(BT, C)
    rstd = torch.rsqrt((x.float() ** 2).mean(-1) + eps)
    xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
    _norm_ref(xf, wf, eps).backward(dy.float())
    for name in ("ln1", "ln2", "final"):
        k = prog.kernels[f"llmq_rmsnorm_backward_{name}"]
        dres = name != "final"
        results = []
        for _ in range(2):   # twice: dx and dw must be bit-identical (deterministic)
            dx, amax = nan_like(x), slot()
            partial = torch.full((k.meta["dw_scratch_floats"],), float("nan"), device="cuda")
            dw = (torch.arange(C, device="cuda") % 7 * 0.25).bfloat16()
            args = [dx] + ([d_res] if dres else []) + [dy, x, w, rstd, partial] + ([amax] if fp8 else [])
            prog.launch(k.name, *args)
            prog.launch(f"llmq_rmsnorm_dweight_{name}", dw, partial)
            results.append((dx, dw))
            ref = xf.grad + (d_res.float() if dres else 0)
            close(dx, ref)
            close(dw, (torch.arange(C, device="cuda") % 7 * 0.25) + wf.grad, 3e-2)
            if fp8:
                assert amax[0].item() == dx.float().abs().max().item()
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_embedding(built):
    ctx, prog = built
    torch.manual_seed(3)
    BT, C, V = ctx["BT"], ctx["C"], ctx["V"]
    tokens = torch.randint(0, V // 8, (BT,), device="cuda", dtype=torch.int32)   # many repeats
    wte = rnd(V, C)
    x = nan_like(rnd(BT, C))
    prog.launch("llmq_embedding_forward", x, tokens, wte)
    assert torch.equal(x, wte[tokens.long()])
    dx = rnd(BT, C)
    order, seg, n = embedding.segments(tokens.cpu().numpy())
    order, seg = torch.from_numpy(order).cuda(), torch.from_numpy(seg).cuda()
    count = torch.tensor([n], device="cuda", dtype=torch.int32)
    dwte0 = rnd(V, C, scale=0.1)
    ref = dwte0.float().index_add(0, tokens.long(), dx.float())
    outs = []
    for _ in range(2):
        dwte = dwte0.clone()
        prog.launch("llmq_embedding_backward", dwte, dx, tokens, order, seg, count)
        close(dwte, ref)
        outs.append(dwte)
    assert torch.equal(outs[0], outs[1])


def _rope_ref(x, cos, sin):
    """HF apply_rotary_pos_emb on [BT, H, HD] with cos/sin [BT, HD/2] (fp32)."""
    half = x.shape[-1] // 2
    c, s = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * c + rot * s


def _rope_setup(ctx, prog):
    T, HD = ctx["T"], ctx["HD"]
    table = torch.full((T, HD // 2, 2), float("nan"), device="cuda")
    prog.launch("llmq_rope_table", table)
    inv = torch.from_numpy(rope.inv_freq(ctx)).cuda()
    ang = torch.arange(T, device="cuda", dtype=torch.float32)[:, None] * inv[None]
    close(table[..., 0], ang.cos(), 1e-5)
    close(table[..., 1], ang.sin(), 1e-5)
    pos = torch.arange(ctx["BT"], device="cuda") % T
    return table, table[pos, :, 0], table[pos, :, 1]


def test_rope(built):
    ctx, prog = built
    torch.manual_seed(4)
    BT, HQ, HKV, HD, QKV, fp8 = ctx["BT"], ctx["HQ"], ctx["HKV"], ctx["HD"], ctx["QKV"], ctx["FP8"]
    nqk = HQ + HKV
    table, cos, sin = _rope_setup(ctx, prog)
    qkv = rnd(BT, QKV)
    x = qkv.float().view(BT, HQ + 2 * HKV, HD)[:, :nqk].clone().requires_grad_()
    if ctx["QK_NORM"]:
        wq, wk = rnd(HD, scale=0.3) + 1, rnd(HD, scale=0.3) + 1
        w = torch.cat([wq.float()[None].expand(HQ, HD), wk.float()[None].expand(HKV, HD)]).requires_grad_()
        ref = _rope_ref(_norm_ref(x, w, ctx["EPS"]), cos, sin)
        out, rstd = nan_like(qkv), torch.full((BT, nqk), float("nan"), device="cuda")
        prog.launch("llmq_rope_forward", out, qkv, table, wq, wk, rstd)
        close(rstd, torch.rsqrt((x.detach() ** 2).mean(-1) + ctx["EPS"]), 1e-5)
    else:
        ref = _rope_ref(x, cos, sin)
        out = qkv.clone()
        prog.launch("llmq_rope_forward", out, table)
    close(out.view(BT, -1, HD)[:, :nqk], ref)
    assert torch.equal(out[:, (HQ + HKV) * HD:], qkv[:, (HQ + HKV) * HD:]), "v must pass through"
    d = rnd(BT, QKV)
    ref.backward(d.float().view(BT, -1, HD)[:, :nqk])
    dref = torch.cat([x.grad.reshape(BT, -1), d[:, nqk * HD:].float()], 1)
    amax = slot()
    if ctx["QK_NORM"]:
        k = prog.kernels["llmq_rope_backward"]
        dqkv, partial = nan_like(d), torch.full((k.meta["dw_scratch_floats"],), float("nan"), device="cuda")
        prog.launch(k.name, dqkv, d, qkv, rstd, table, wq, wk, partial, *([amax] if fp8 else []))
        dq_n, dk_n = torch.zeros(HD, device="cuda", dtype=torch.bfloat16), torch.ones(HD, device="cuda", dtype=torch.bfloat16)
        prog.launch("llmq_rope_qknorm_dweight", dq_n, dk_n, partial)
        close(dq_n, w.grad[:HQ].sum(0), 3e-2)
        close(dk_n, 1 + w.grad[HQ:].sum(0), 3e-2)
    else:
        dqkv = d.clone()
        prog.launch("llmq_rope_backward", dqkv, table, *([amax] if fp8 else []))
    close(dqkv, dref)
    if fp8:
        assert amax[0].item() == dqkv.float().abs().max().item()


FP8_TORCH = {"e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2"}


def test_quantize(built):
    ctx, prog = built
    if not ctx["FP8"]:
        assert not any(n.startswith("llmq_quantize") for n in prog.kernels)
        return
    torch.manual_seed(5)
    # one group of kernels per site shape, named by its first site: the conversions its sites need (plan/block.py)
    quant = {k.meta["sites"][0]: k.meta for k in prog.kernels.values() if "fmax" in k.meta and "sites" in k.meta}
    for name, m in quant.items():
        has = lambda kind: f"llmq_{kind}{name}" in prog.kernels  # noqa: E731
        R, K = m["rows"], m["cols"]
        x = rnd(R, K, dtype=torch.float32 if m["src"] == "float" else torch.bfloat16, scale=3.0)
        true_amax = x.float().abs().max().item()
        if has("amax_"):
            found = torch.zeros(8, device="cuda")
            prog.launch(f"llmq_amax_{name}", x, found)
            assert found[0].item() == true_amax, f"llmq_amax_{name}"
        for amax in (true_amax, true_amax / 2):   # the second saturates half the range
            stats = torch.tensor([amax, 0, 0, 0, float("nan"), 0, 0, 0], device="cuda")
            scale = torch.tensor(m["fmax"], device="cuda") / torch.tensor(amax, device="cuda")
            ref = (x.float() * scale).clamp(-m["fmax"], m["fmax"]).to(getattr(torch, FP8_TORCH[m["dst"]]))
            ref = ref.view(torch.uint8)
            out, out_t, out2 = (torch.full((n,), 0xFF, dtype=torch.uint8, device="cuda") for n in [R * K] * 3)
            if has("quantize_"):
                prog.launch(f"llmq_quantize_{name}", out, x, stats)
                assert torch.equal(out.view(R, K), ref), f"llmq_quantize_{name}: {(out.view(R, K) != ref).sum()} differ"
                assert stats[4].item() == pytest.approx(amax / m["fmax"], rel=1e-6)
            if has("quantize_dual_"):
                out.fill_(0xFF)
                prog.launch(f"llmq_quantize_dual_{name}", out, out_t, x, stats)
                assert torch.equal(out.view(R, K), ref) and torch.equal(out_t.view(K, R), ref.t())
                assert stats[4].item() == pytest.approx(amax / m["fmax"], rel=1e-6)
            if has("quantize_t_"):
                prog.launch(f"llmq_quantize_t_{name}", out2, x, stats)
                assert torch.equal(out2.view(K, R), ref.t())
    for k in [k for k in prog.kernels.values() if k.name.startswith("llmq_transpose_fp8_")]:
        R, K = k.meta["rows"], k.meta["cols"]
        src = torch.randint(0, 256, (R, K), dtype=torch.uint8, device="cuda")
        out = torch.full((K, R), 0x7F, dtype=torch.uint8, device="cuda")
        prog.launch(k.name, out, src)
        assert torch.equal(out, src.t())
