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
