"""llmq_adamw_* on the GPU: the fp32 variant equals PyTorch's AdamW algorithm (float64) to 1e-6,
bf16 stochastic rounding is unbiased over many steps' random streams, plus the flags (weight decay,
zeroing the gradient, skipping on a zero clip scale) and the weight amax."""
import pytest

from optim_loss_program import family_program
from llmqgen.codegen.families import adamw

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu

N = 8 * 1000 + 5                     # a vector part and a scalar tail
LR, B1, B2, EPS, WD, STEP, CLIP = 1e-3, 0.9, 0.95, 1e-8, 0.1, 3, 0.7


def reference(p, g, m, v, lr, wd, clip, step=STEP):
    """PyTorch's documented AdamW step, float64."""
    p, g, m, v = (t.double() for t in (p, g, m, v))
    g = g * clip
    p = p * (1 - lr * wd)
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * g * g
    p = p - lr * (m / (1 - B1 ** step)) / ((v / (1 - B2 ** step)).sqrt() + EPS)
    return p, m, v


def state(dtype, seed=0, n=N):
    g = torch.Generator(device="cuda").manual_seed(seed)
    p = (torch.randn(n, device="cuda", generator=g) * 0.02).to(dtype)
    m = (torch.randn(n, device="cuda", generator=g) * 1e-3).to(dtype)
    v = (torch.rand(n, device="cuda", generator=g) * 1e-5).to(dtype)
    grad = (torch.randn(n, device="cuda", generator=g) * 1e-2).bfloat16()
    return p, grad, m, v


def launch(prog, ctx, p, grad, m, v, lr=LR, wd=WD, clip=CLIP, amax=None, step=STEP, seed=5, apply_wd=1,
           zero_grad=0, grid=None):
    hyper = torch.tensor(adamw.hyper_values(lr, B1, B2, EPS, wd, step, 1.0), device="cuda")
    clip_t = torch.tensor([clip], device="cuda")
    prog.launch(adamw.kernel_name(ctx), p, grad, m, v, hyper, clip_t, 0 if amax is None else amax, p.numel(),
                seed, apply_wd, zero_grad, grid=grid or adamw.grid(p.numel(), ctx["SM_COUNT"]))


@pytest.fixture(scope="module")
def fp32():
    return family_program(["adamw"], master="fp32", adam_m="fp32", adam_v="fp32")


@pytest.fixture(scope="module")
def bf16():
    return family_program(["adamw"])


@pytest.mark.parametrize("apply_wd,grid", [(1, None), (0, (3, 1, 1))])   # (3,1,1): many grid-stride rounds
def test_fp32_matches_torch_adamw(fp32, apply_wd, grid):
    prog, ctx = fp32
    p, grad, m, v = state(torch.float32)
    ref_p, ref_m, ref_v = reference(p, grad, m, v, LR, WD if apply_wd else 0.0, CLIP)
    amax = torch.zeros(4, device="cuda")
    launch(prog, ctx, p, grad, m, v, amax=amax, apply_wd=apply_wd, grid=grid)
    torch.testing.assert_close(p.double(), ref_p, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m.double(), ref_m, rtol=1e-6, atol=1e-9)    # |m| ~ 1e-3
    torch.testing.assert_close(v.double(), ref_v, rtol=1e-6, atol=1e-13)   # v ~ 1e-5
    assert amax[0].item() == p.abs().max().item()


def test_zero_grad_and_skip_step(fp32):
    prog, ctx = fp32
    p, grad, m, v = state(torch.float32, seed=1)
    before = [t.clone() for t in (p, grad, m, v)]
    launch(prog, ctx, p, grad, m, v, zero_grad=0)
    assert torch.equal(grad, before[1]) and not torch.equal(p, before[0])
    launch(prog, ctx, p, grad, m, v, zero_grad=1)
    assert not grad.any()
    p, grad, m, v = state(torch.float32, seed=2)
    grad[17] = float("nan")                        # what made gradnorm write clip scale 0
    before = [t.clone() for t in (p, m, v)]
    launch(prog, ctx, p, grad, m, v, clip=0.0, zero_grad=1)
    assert all(torch.equal(a, b) for a, b in zip((p, m, v), before)) and not grad.any()


def test_bf16_stochastic_rounding_is_unbiased(bf16):
    """Updates far below half a bf16 step: round-to-nearest would never move the weights; stochastic
    rounding must move them by the right amount on average over many random streams."""
    prog, ctx = bf16
    n, runs, lr = 4096 + 3, 128, 1e-5
    p0, grad, m0, v0 = state(torch.bfloat16, seed=3, n=n)
    ref_p, ref_m, ref_v = reference(p0, grad, m0, v0, lr, WD, CLIP)
    sums = [torch.zeros(n, dtype=torch.float64, device="cuda") for _ in range(3)]
    amax = torch.zeros(4, device="cuda")
    for r in range(runs):
        p, m, v = p0.clone(), m0.clone(), v0.clone()
        amax.zero_()
        launch(prog, ctx, p, grad.clone(), m, v, lr=lr, step=STEP, seed=r, amax=amax)
        assert amax[0].item() == p.float().abs().max().item()
        for s, t in zip(sums, (p, m, v)):
            s += t.double()
    for s, ref, name in zip(sums, (ref_p, ref_m, ref_v), "pmv"):
        ulp = torch.ldexp(torch.ones_like(ref), torch.frexp(ref)[1] - 8)   # bf16 spacing at |ref|
        bias = (s / runs - ref) / ulp
        assert bias.abs().max().item() < 0.25, name      # 128 draws: std <= 0.5 / sqrt(128) = 0.044
        assert abs(bias.mean().item()) < 0.01, name
    moved = ((sums[0] / runs - p0.double()).abs() > 0).float().mean().item()
    assert moved > 0.5       # round-to-nearest would leave all but the smallest weights where they were
