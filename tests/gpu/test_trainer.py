"""One optimizer step's gradients of the generated program against an independent fp32 PyTorch model."""
import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
pytest.importorskip("nvmath", reason="the runtime's GEMMs need nvmath-python: pip install 'llmqgen[gpu]'")
pytest.importorskip("cudnn", reason="the runtime's attention needs nvidia-cudnn-frontend")

from harness import small_plan  # noqa: E402
from reference import Reference, assert_close_grads, compare_grads, init_params  # noqa: E402

from llmqgen.data.loader import TokenBatch, embedding_backward_index  # noqa: E402
from llmqgen.plan.schema import Recompute  # noqa: E402
from llmqgen.runtime.trainer import Trainer  # noqa: E402


def batches(plan, n, seed=0, motif=False):
    """Uniform random tokens, or (motif) each sequence a short random phrase of a 64-token sub-vocabulary
    repeated: text-like data whose gradients add up coherently instead of cancelling like noise."""
    rng = np.random.default_rng(seed)
    B, T, V = plan.batch.micro_batch, plan.batch.seq_len, plan.model.vocab_size
    out = []
    for _ in range(n):
        if motif:
            vocab = rng.choice(V, 64, replace=False).astype(np.int32)
            phrases = vocab[rng.integers(0, 64, size=(B, 8))]
            toks = np.tile(phrases, (1, (T + 8) // 8))[:, :T + 1].astype(np.int32)
        else:
            toks = rng.integers(0, V, size=(B, T + 1), dtype=np.int32)
        inputs, targets = toks[:, :-1].copy(), toks[:, 1:].copy()
        targets[0, :5] = -100                                  # a masked span counts for nothing
        order, seg, uniq = embedding_backward_index(inputs)
        out.append(TokenBatch(inputs, targets, order, seg, uniq))
    return out


CASES = [("qwen2", False, {}), ("qwen2", True, {}), ("llama", True, {}), ("qwen3", True, {}),
         ("llama", False, {}), ("qwen3", False, {}),
         ("qwen2", True, {"recompute": Recompute(block=True)}), ("qwen2", True, {"lm_head_chunks": 2}),
         ("qwen2", True, {"lm_head": "fp8"}), ("llama", True, {"lm_head": "fp8", "lm_head_chunks": 2}),
         ("qwen3", True, {"lm_head": "fp8", "scaling": "delayed"}),
         ("llama", True, {"lm_head": "fp8", "scaling": "delayed", "fast_accum": True})]


@pytest.mark.parametrize("arch,fp8,extra", CASES + [("qwen3", True, {"attention": "flash"}),
                                                   ("llama", False, {"attention": "flash"})], ids=lambda v: str(v))
def test_gradients_match_pytorch(arch, fp8, extra):
    extra = dict(extra)
    attention = extra.pop("attention", "cudnn")     # "flash": the generated kernels instead of cuDNN
    plan = small_plan(arch, fp8, **extra)
    params = init_params(plan.model, seed=1)
    tr = Trainer(plan, out_root=str(__import__("tempfile").mkdtemp()), attention=attention)
    try:
        tr.load_params(params)
        bs = batches(plan, 2, motif=fp8)   # FP8's error is relative to the signal: give it a coherent one
        tr.accumulate(bs)
        loss, grads = tr.loss(), tr.gradients()
        ref_params = tr.params() if fp8 else params     # FP8 plans train from their bf16 masters
        ref = Reference(plan.model, ref_params, device="cuda")
        tokens = torch.tensor(np.concatenate([b.inputs for b in bs]), device="cuda", dtype=torch.long)
        targets = torch.tensor(np.concatenate([b.targets for b in bs]), device="cuda", dtype=torch.long)
        ref_loss, ref_grads = ref.loss_and_grads(tokens, targets)
        assert abs(loss - ref_loss) / ref_loss < 1e-2, (loss, ref_loss)
        stats = compare_grads(grads, ref_grads)
        print(f"\n  {arch} {'fp8' if fp8 else 'bf16'} {extra} {attention}: loss {loss:.5f} vs {ref_loss:.5f}; "
              f"mean cos {stats['mean_cos']:.5f}, mean rel norm err {stats['mean_rel']:.4f}, "
              f"mean |a-b|/|b| {stats['mean_diff']:.4f}")
        if fp8:
            assert_close_grads(stats, 0.99, 0.012)
        else:
            assert_close_grads(stats, 0.999, 0.01)
        before = tr.params()
        norm = tr.optimizer_step(lr=1e-3)
        after = tr.params()
        ref_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in ref_grads.values())))
        assert abs(norm - ref_norm) / ref_norm < 2e-2, (norm, ref_norm)
        moved = [k for k in before if not np.array_equal(before[k], after[k])]
        assert len(moved) == len(before) and all(np.isfinite(v).all() for v in after.values())
        assert np.abs(tr.gradients()["embedding"]).max() == 0       # zeroed for the next step
    finally:
        tr.close()


def test_loss_falls_and_replays_are_deterministic():
    plan = small_plan("qwen2", True, grad_accum=2)
    losses = []
    for _ in range(2):
        tr = Trainer(plan, out_root=str(__import__("tempfile").mkdtemp()))
        tr.load_params(init_params(plan.model, seed=3))
        run = []
        data = batches(plan, 2, seed=5)          # the same step repeated: memorisation must show
        for step in range(8):
            tr.accumulate(data)
            run.append(tr.loss())
            tr.optimizer_step(lr=3e-3)
        tr.close()
        losses.append(run)
    print("\n  losses", [f"{x:.4f}" for x in losses[0]])
    assert losses[0] == losses[1], "two identical runs must give bit-identical losses"
    assert losses[0][-1] < losses[0][0] - 0.5


@pytest.mark.parametrize("arch,extra", [("qwen2", {}), ("llama", {}), ("qwen3", {}),
                                        ("qwen2", {"recompute": Recompute(block=True)})], ids=str)
def test_fp8_gradients_match_the_recipe_emulated(arch, extra):
    """FP8 gradients against (a) the fp32 model and (b) the same model with the FP8 recipe emulated in
    PyTorch (E4M3 quantise-dequantise with per-tensor current scaling at llmqgen's points, saturating,
    per micro-batch). (a) is the recipe's own error; (b) must agree to cosine >= 0.999 per tensor, so
    that what remains of (a) is the recipe's, not the implementation's."""
    plan = small_plan(arch, True, **extra)
    tr = Trainer(plan, out_root=str(__import__("tempfile").mkdtemp()))
    try:
        tr.load_params(init_params(plan.model, seed=1))
        bs = batches(plan, 2, motif=True)
        tr.accumulate(bs)
        loss, grads, params = tr.loss(), tr.gradients(), tr.params()
    finally:
        tr.close()
    micro = [(torch.tensor(b.inputs, device="cuda", dtype=torch.long),
              torch.tensor(b.targets, device="cuda", dtype=torch.long)) for b in bs]
    _, fp32_grads = Reference(plan.model, params, device="cuda").loss_and_grads_micro(micro)
    emu_loss, emu_grads = Reference(plan.model, params, device="cuda",
                                    fp8=("e4m3", plan.precision.gradient)).loss_and_grads_micro(micro)
    vs_fp32, vs_emu = compare_grads(grads, fp32_grads), compare_grads(grads, emu_grads)
    recipe = compare_grads({k: v.cpu().numpy() for k, v in emu_grads.items()}, fp32_grads)
    print(f"\n  {arch} fp8 {extra}: loss {loss:.6f} emulated {emu_loss:.6f}")
    print(f"  {'tensor':<22} {'cos vs fp32':>12} {'cos vs emul':>12} {'emul vs fp32':>13}")
    for name in sorted(grads):
        print(f"  {name:<22} {vs_fp32['tensors'][name]['cos']:12.6f} {vs_emu['tensors'][name]['cos']:12.6f} "
              f"{recipe['tensors'][name]['cos']:13.6f}")
    print(f"  mean cos: vs fp32 {vs_fp32['mean_cos']:.6f}, vs emulation {vs_emu['mean_cos']:.6f}, "
          f"emulation vs fp32 {recipe['mean_cos']:.6f}")
    assert abs(loss - emu_loss) / emu_loss < 1e-3, (loss, emu_loss)
    worst = min(vs_emu["tensors"].items(), key=lambda kv: kv[1]["cos"])
    assert worst[1]["cos"] >= 0.999, f"{worst[0]}: cosine {worst[1]['cos']:.6f} against the emulated recipe"
