"""llmq_gradnorm_partial/_finalize on the GPU: the norm of many bf16 tensors against torch (float64),
determinism, the clip scale and the non-finite flag."""
import math

import pytest

from optim_loss_program import family_program
from llmqgen.codegen.families import adamw, gradnorm

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu

SIZES = [1, 7, 8, 1000, 65536 + 3, 3_000_000, 40_000_001]


@pytest.fixture(scope="module")
def prog():
    return family_program(["gradnorm"])[0]


def run_norm(prog, grads, max_norm):
    grids, offsets, total = gradnorm.partials_layout([g.numel() for g in grads])
    partials = torch.full((total + 16,), float("nan"), device="cuda")
    hyper = torch.tensor(adamw.hyper_values(1e-3, 0.9, 0.95, 1e-8, 0.1, 1, max_norm), device="cuda")
    out = torch.full((4,), float("nan"), device="cuda")
    for g, grid, off in zip(grads, grids, offsets):
        prog.launch("llmq_gradnorm_partial", g, g.numel(), partials, off, grid=(grid, 1, 1))
    # Every partial slot written (the poison is gone), nothing past the layout touched; a NaN
    # gradient legitimately makes its own partial NaN, so only finite inputs are checked for it.
    if all(g.isfinite().all() for g in grads):
        assert not partials[:total].isnan().any()
    assert partials[total:].isnan().all()
    prog.launch("llmq_gradnorm_finalize", partials, total, hyper, out)
    return out.tolist(), partials[:total].clone()


def make_grads(seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [(torch.randn(n, device="cuda", generator=g) * 10 ** (i % 3 - 3)).bfloat16()
            for i, n in enumerate(SIZES)]


def test_norm_and_clip(prog):
    grads = make_grads()
    ref = math.sqrt(sum(g.double().square().sum().item() for g in grads))
    (norm, scale, flag, sum_sq), partials = run_norm(prog, grads, max_norm=ref / 4)
    assert norm == pytest.approx(ref, rel=1e-5)
    assert sum_sq == pytest.approx(ref * ref, rel=1e-5)
    assert scale == pytest.approx(0.25, rel=1e-5) and flag == 0.0    # by the norm, not its square
    (norm2, scale2, _, _), partials2 = run_norm(prog, grads, max_norm=ref * 4)
    assert norm2 == norm and torch.equal(partials, partials2)        # deterministic, bit for bit
    assert scale2 == 1.0
    assert run_norm(prog, grads, max_norm=0.0)[0][1] == 1.0          # max_norm <= 0: no clipping


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_gives_zero_scale(prog, bad):
    grads = make_grads(1)
    grads[4][123] = bad
    norm, scale, flag, _ = run_norm(prog, grads, max_norm=1.0)[0]
    assert not math.isfinite(norm) and scale == 0.0 and flag == 1.0
