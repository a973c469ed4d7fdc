"""llmq_crossentropy_fused and llmq_loss_reduce on the GPU against a PyTorch fp32 reference."""
import pytest

from optim_loss_program import family_program

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu


def reference(x: torch.Tensor, targets: torch.Tensor, gs: float):
    x = x.float()
    keep = targets != -100
    lse = torch.logsumexp(x, dim=1)
    t = targets.clamp(min=0).long()
    loss = torch.where(keep, lse - x.gather(1, t[:, None])[:, 0], 0.0)
    grad = torch.softmax(x, dim=1)
    grad[torch.arange(len(x)), t] -= 1.0
    grad = torch.where(keep[:, None], grad * gs, 0.0)
    return loss, torch.where(keep, lse, 0.0), grad


@pytest.mark.parametrize("V,B,T,chunks", [(1024, 2, 128, 2), (1001, 2, 64, 4), (151936, 1, 64, 2)])
def test_fused_matches_torch(V, B, T, chunks):
    prog, ctx = family_program(["crossentropy"], V=V, B=B, T=T, lm_head_chunks=chunks)
    bt, rows = ctx["BT"], ctx["BT"] // chunks
    g = torch.Generator(device="cuda").manual_seed(V)
    logits = (torch.randn(bt, V, device="cuda", generator=g) * 4 + torch.linspace(-8, 8, V, device="cuda"))
    logits = logits.bfloat16()
    targets = torch.randint(0, V, (bt,), device="cuda", generator=g, dtype=torch.int32)
    targets[::7] = -100
    valid = int((targets != -100).sum())
    gs = 1.0 / valid
    ref_loss, ref_lse, ref_grad = reference(logits, targets, gs)

    work = logits.clone()
    losses = torch.full((bt,), float("nan"), device="cuda")
    lse = torch.full((bt,), float("nan"), device="cuda")
    grad_scale = torch.tensor([gs], device="cuda")
    for c in range(chunks):
        prog.launch("llmq_crossentropy_fused", work[c * rows:(c + 1) * rows], targets, losses, lse,
                    grad_scale, c * rows)
    torch.testing.assert_close(losses, ref_loss, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=2e-5)
    # bf16 gradient: one rounding of the fp32 value
    torch.testing.assert_close(work.float(), ref_grad, rtol=2 ** -8, atol=gs * 1e-5)
    assert not work[targets == -100].any()

    acc = torch.tensor([0.25], device="cuda")
    prog.launch("llmq_loss_reduce", losses, grad_scale, acc)
    assert acc.item() == pytest.approx(0.25 + ref_loss.double().sum().item() * gs, rel=1e-5)
    again = torch.tensor([0.25], device="cuda")
    prog.launch("llmq_loss_reduce", losses, grad_scale, again)
    assert again.item() == acc.item()  # fixed summation order: bit-identical


@pytest.mark.parametrize("V,B,T,chunks", [(1024, 2, 128, 2), (1040, 1, 160, 2), (151936, 1, 64, 1)])
def test_fp8_head_stats_and_dual_match_torch(V, B, T, chunks):
    """An FP8 LM head's pair: llmq_crossentropy_stats (loss, LSE) and llmq_crossentropy_dual (the e5m2
    gradient [RC, V] and its transpose, at the bound's scale): loss and LSE as the fused kernel's, the bytes
    the gradient rounded once to e5m2 (2 mantissa bits) times E5M2_MAX, partial tiles included (1040, 80)."""
    prog, ctx = family_program(["quantize", "crossentropy"], V=V, B=B, T=T, lm_head_chunks=chunks,
                               lm_head="fp8")
    bt, rows = ctx["BT"], ctx["BT"] // chunks
    g = torch.Generator(device="cuda").manual_seed(V + 1)
    logits = (torch.randn(bt, V, device="cuda", generator=g) * 4 + torch.linspace(-8, 8, V, device="cuda"))
    logits = logits.bfloat16()
    targets = torch.randint(0, V, (bt,), device="cuda", generator=g, dtype=torch.int32)
    targets[::7] = -100
    gs = 1.0 / int((targets != -100).sum())
    ref_loss, ref_lse, ref_grad = reference(logits, targets, gs)

    losses = torch.full((bt,), float("nan"), device="cuda")
    lse = torch.full((bt,), float("nan"), device="cuda")
    grad_scale = torch.tensor([gs], device="cuda")
    out = torch.full((bt, V), 0x7F, dtype=torch.uint8, device="cuda")
    out_t = torch.full((chunks, V, rows), 0x7F, dtype=torch.uint8, device="cuda")
    stats = torch.zeros(8, device="cuda")
    for c in range(chunks):
        chunk = logits[c * rows:(c + 1) * rows]
        prog.launch("llmq_crossentropy_stats", chunk, targets, losses, lse, c * rows)
        prog.launch("llmq_crossentropy_dual", out[c * rows:(c + 1) * rows], out_t[c], chunk, targets, lse,
                    grad_scale, stats, c * rows)
    torch.testing.assert_close(losses, ref_loss, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=2e-5)
    fmax = 57344.0
    assert stats[4].item() == pytest.approx(gs / fmax, rel=1e-7)
    got = out.view(torch.float8_e5m2).float() * stats[4]
    want = (ref_grad / gs * fmax).to(torch.float8_e5m2).float() * stats[4]   # one e5m2 rounding
    torch.testing.assert_close(got, want, rtol=0.26, atol=gs * 2 ** -16)
    assert (got - ref_grad).abs().max().item() <= 0.125 * ref_grad.abs().max().item()
    for c in range(chunks):
        assert torch.equal(out_t[c], out[c * rows:(c + 1) * rows].T)
    assert not out[targets == -100].any()
