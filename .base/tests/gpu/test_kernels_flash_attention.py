"""Flash-attention kernels on the GPU against a PyTorch fp32 reference (SDPA, causal, GQA) and autograd:
outputs, LSE, delta and dqkv; every output poisoned with NaN first; backward bit-for-bit deterministic."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import attention_support as sup  # noqa: E402
from harness import KernelProgram, build_program, current_device, small_plan  # noqa: E402

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
F = torch.nn.functional

SHAPES = {  # (B, T, HQ, HKV, HD)
    "gqa-hd64": (2, 128, 4, 2, 64),
    "gqa-hd128": (2, 256, 8, 2, 128),
    "mha-5tiles": (1, 320, 4, 4, 64),
    "mqa-hd128": (1, 192, 8, 1, 128),
}
_programs = {}


def program(shape) -> KernelProgram:
    if shape not in _programs:
        b, t, hq, hkv, hd = shape
        src, kernels = sup.render(sup.make_ctx(B=b, T=t, HQ=hq, HKV=hkv, HD=hd))
        cubin, _ = sup.compile_cubin(src, current_device().arch)
        _programs[shape] = KernelProgram(cubin, kernels)
    return _programs[shape]


def nan(*shape, dtype=torch.bfloat16):
    return torch.full(shape, float("nan"), dtype=dtype, device="cuda")


def reference(qkv, dout, b, t, hq, hkv, hd):
    """fp32 SDPA on the bf16 inputs: out, lse (natural log) and dqkv of loss = sum(out * dout)."""
    x = qkv.float().requires_grad_()
    q, k, v = x.view(b, t, hq + 2 * hkv, hd).transpose(1, 2).split([hq, hkv, hkv], dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out.backward(dout.float().view(b, t, hq, hd).transpose(1, 2))
    with torch.no_grad():
        s = q @ k.repeat_interleave(hq // hkv, dim=1).transpose(-1, -2) / hd ** 0.5
        s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool, device="cuda").tril(), float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
    return out.detach().transpose(1, 2).reshape(b * t, hq * hd), lse, x.grad


def assert_close(got, want, what, cos_min=0.999, rel_max=1e-2):
    got, want = got.float().flatten(), want.float().flatten()
    assert torch.isfinite(got).all(), f"{what}: non-finite values (unwritten or overflowed)"
    cos = F.cosine_similarity(got, want, dim=0).item()
    rel = ((got - want).norm() / want.norm()).item()
    assert cos > cos_min and rel < rel_max, f"{what}: cosine {cos:.6f}, relative error {rel:.2e}"


def run_forward(prog, qkv, b, t, hq, hd):
    out, lse = nan(b * t, hq * hd), nan(b, hq, t, dtype=torch.float32)
    prog.launch("llmq_attention_forward", qkv, out, lse)
    return out, lse


def run_backward(prog, qkv, out, dout, lse, b, t, hq, hkv, hd):
    delta = nan(b, hq, t, dtype=torch.float32)
    prog.launch("llmq_attention_bwd_dot", out, dout, delta)
    dqkv = nan(b * t, (hq + 2 * hkv) * hd)
    prog.launch("llmq_attention_backward", qkv, dout, lse, delta, dqkv)
    return delta, dqkv


def inputs(b, t, hq, hkv, hd, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = (1.5 * torch.randn(b * t, (hq + 2 * hkv) * hd, device="cuda", generator=g)).bfloat16()
    dout = torch.randn(b * t, hq * hd, device="cuda", generator=g).bfloat16()
    return qkv, dout


@pytest.mark.parametrize("name", SHAPES)
def test_forward_and_backward_match_torch(name):
    b, t, hq, hkv, hd = shape = SHAPES[name]
    prog = program(shape)
    qkv, dout = inputs(*shape)
    out_ref, lse_ref, dqkv_ref = reference(qkv, dout, *shape)

    out, lse = run_forward(prog, qkv, b, t, hq, hd)
    assert_close(out, out_ref, "out")
    assert (lse - lse_ref).abs().max().item() < 2e-3, "lse"

    delta, dqkv = run_backward(prog, qkv, out, dout, lse, *shape)
    delta_ref = (out.float() * dout.float()).view(b, t, hq, hd).sum(-1).transpose(1, 2)
    torch.testing.assert_close(delta, delta_ref, rtol=1e-4, atol=1e-4)
    qd, kvd = hq * hd, hkv * hd
    for what, cols in (("dq", slice(0, qd)), ("dk", slice(qd, qd + kvd)), ("dv", slice(qd + kvd, None))):
        assert_close(dqkv[:, cols], dqkv_ref[:, cols], what, rel_max=2e-2)

    _, again = run_backward(prog, qkv, out, dout, lse, *shape)
    assert torch.equal(dqkv, again), "backward is not deterministic"


def test_through_plan_build():
    """The family inside a whole program built from a plan (render + compile + load of every family)."""
    b, t, hq, hkv, hd = shape = (2, 128, 4, 2, 64)
    prog = build_program(small_plan("qwen3", fp8=False))
    qkv, dout = inputs(*shape, seed=1)
    out_ref, lse_ref, dqkv_ref = reference(qkv, dout, *shape)
    out, lse = run_forward(prog, qkv, b, t, hq, hd)
    assert_close(out, out_ref, "out")
    _, dqkv = run_backward(prog, qkv, out, dout, lse, *shape)
    assert_close(dqkv, dqkv_ref, "dqkv", rel_max=2e-2)


def test_model_sized_speed():
    """A 7B-like layer (HQ=28, HKV=4, HD=128, T=2048): correct, and timed against torch's bf16 SDPA."""
    b, t, hq, hkv, hd = shape = (2, 2048, 28, 4, 128)
    prog = program(shape)
    qkv, dout = inputs(*shape, seed=2)
    out_ref, _, dqkv_ref = reference(qkv, dout, *shape)
    out, lse = run_forward(prog, qkv, b, t, hq, hd)
    _, dqkv = run_backward(prog, qkv, out, dout, lse, *shape)
    assert_close(out, out_ref, "out")
    assert_close(dqkv, dqkv_ref, "dqkv", rel_max=2e-2)

    def ms(fn, n=10):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / n

    fwd_ms = ms(lambda: run_forward(prog, qkv, b, t, hq, hd))
    bwd_ms = ms(lambda: run_backward(prog, qkv, out, dout, lse, *shape))
    q, k, v = qkv.view(b, t, hq + 2 * hkv, hd).transpose(1, 2).split([hq, hkv, hkv], dim=1)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    torch_fwd = ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    g = dout.view(b, t, hq, hd).transpose(1, 2)
    torch_bwd = ms(lambda: torch.autograd.grad(o, (q, k, v), g, retain_graph=True))
    flops = 4 * b * hq * t * t / 2 * hd  # causal: half of the two forward matmuls
    print(f"\nflash attention {shape}: forward {fwd_ms:.3f} ms ({flops / fwd_ms / 1e9:.0f} TFLOP/s), "
          f"backward {bwd_ms:.3f} ms ({2.5 * flops / bwd_ms / 1e9:.0f} TFLOP/s); "
          f"torch bf16 SDPA forward {torch_fwd:.3f} ms, backward {torch_bwd:.3f} ms")
