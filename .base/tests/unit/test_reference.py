"""The PyTorch reference model (tests/gpu/reference.py) on the CPU in fp64: autograd gradients against central
finite differences for each architecture (tied and untied), causal masking, GQA = MHA with repeated kv heads,
RoPE properties, the Llama-3 frequency scaling, the init recipe and the gradient comparison helpers.
Skipped without torch (CI has none)."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the reference model needs torch: pip install torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
import reference as R  # noqa: E402

from llmqgen.models.hf_names import param_shapes  # noqa: E402
from llmqgen.models.spec import ModelSpec, RopeScaling  # noqa: E402

F64 = torch.float64
# HD=8 gives wavelengths 6.3, 63, 628, 6283 at theta 1e4; original_max 128 with factors 1/4 puts one in
# each band of the Llama-3 scaling (kept, interpolated, stretched).
LLAMA_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=128)
ARCH = {"qwen2": dict(qkv_bias=True, qk_norm=False, rope_theta=1e4),
        "qwen3": dict(qkv_bias=False, qk_norm=True, rope_theta=1e4),
        "llama": dict(qkv_bias=False, qk_norm=False, rope_theta=1e4, rope_scaling=LLAMA_SCALING)}


def tiny_spec(arch="qwen3", tied=True, **over) -> ModelSpec:
    # q_dim (16) != C (12): catches a transposed attn_out
    fields = dict(name=f"tiny-{arch}", architecture=arch, hidden_size=12, intermediate_size=10, num_layers=2,
                  num_heads=2, num_kv_heads=1, head_dim=8, vocab_size=13, tie_embeddings=tied, **ARCH[arch])
    fields.update(over)
    return ModelSpec(**fields)


def random_params(spec, seed=0) -> dict:
    """Generic point: norms != 1, biases != 0, weights large enough that attention is far from uniform."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in param_shapes(spec).items():
        if name.endswith(("ln1", "ln2", "q_norm", "k_norm", "final_norm")):
            out[name] = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            out[name] = 0.4 * rng.standard_normal(shape)
    return {k: torch.from_numpy(v) for k, v in out.items()}


def batch(spec, b=2, t=6, seed=1):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, spec.vocab_size, (b, t))
    targets = rng.integers(0, spec.vocab_size, (b, t))
    targets[0, 1] = targets[1, 4] = R.IGNORE_INDEX
    return tokens, targets


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_grads_match_finite_differences(arch, tied):
    """For every tensor, <grad, d> equals (L(p + eps d) - L(p - eps d)) / 2 eps along a random direction d."""
    spec = tiny_spec(arch, tied)
    params = random_params(spec)
    ref = R.Reference(spec, params, dtype=F64)
    tokens, targets = batch(spec)
    _, grads = ref.loss_and_grads(tokens, targets)
    assert set(grads) == set(param_shapes(spec))
    gen, eps = torch.Generator().manual_seed(2), 1e-6
    for name, g in grads.items():
        assert tuple(g.shape) == param_shapes(spec)[name]
        d = torch.randn(g.shape, generator=gen, dtype=F64)
        d /= d.norm()                                   # a unit step: truncation error ~ eps^2
        with torch.no_grad():
            p = ref.param(name)
            p += eps * d
            up = ref.loss(tokens, targets).item()
            p -= 2 * eps * d
            down = ref.loss(tokens, targets).item()
            p += eps * d
        fd, ad = (up - down) / (2 * eps), (g * d).sum().item()
        assert abs(ad) > 1e-4, f"{name}: gradient vanishes, the test point is degenerate"
        assert fd == pytest.approx(ad, rel=1e-6), name


def test_tied_embedding_grad_includes_lm_head():
    """Tied grads equal the untied model's embedding + lm_head grads at the same weights."""
    tied, untied = tiny_spec("qwen2", True), tiny_spec("qwen2", False)
    params = random_params(tied)
    _, g_tied = R.Reference(tied, params, dtype=F64).loss_and_grads(*batch(tied))
    _, g_untied = R.Reference(untied, {**params, "lm_head": params["embedding"]}, dtype=F64).loss_and_grads(
        *batch(tied))
    torch.testing.assert_close(g_tied["embedding"], g_untied["embedding"] + g_untied["lm_head"])
    assert g_untied["lm_head"].abs().max() > 1e-3


def test_loss_is_mean_over_kept_targets():
    spec = tiny_spec("qwen3")
    ref = R.Reference(spec, random_params(spec), dtype=F64)
    tokens, targets = batch(spec)
    with torch.no_grad():
        logp = ref(tokens).log_softmax(-1).numpy()
    kept = targets != R.IGNORE_INDEX
    expect = -np.mean(np.take_along_axis(logp, np.where(kept, targets, 0)[..., None], -1)[..., 0][kept])
    assert ref.loss(tokens, targets).item() == pytest.approx(expect, rel=1e-12)
    with pytest.raises(ValueError, match="every target"):
        ref.loss(tokens, np.full_like(targets, R.IGNORE_INDEX))


def test_causal_masking():
    """Changing token t0 leaves the logits before t0 bit-identical and changes those from t0 on."""
    spec = tiny_spec("qwen2")
    ref = R.Reference(spec, random_params(spec), dtype=F64)
    tokens, _ = batch(spec)
    changed = tokens.copy()
    changed[:, 3] = (changed[:, 3] + 1) % spec.vocab_size
    with torch.no_grad():
        a, b = ref(tokens), ref(changed)
    torch.testing.assert_close(a[:, :3], b[:, :3], rtol=0, atol=1e-13)
    assert (a[:, 3:] - b[:, 3:]).abs().amax(-1).min() > 1e-6


def test_gqa_equals_mha_with_repeated_kv_heads():
    """A GQA model (4 query heads, 2 kv heads) equals the MHA model whose kv head j is GQA's head j // 2."""
    gqa = tiny_spec("qwen2", num_heads=4, num_kv_heads=2, head_dim=4)
    mha = tiny_spec("qwen2", num_heads=4, num_kv_heads=4, head_dim=4)
    params = random_params(gqa)
    mha_params = dict(params)
    q, kv, hd = gqa.q_dim, gqa.kv_dim, gqa.head_dim
    for i in range(gqa.num_layers):
        for key in ("qkv", "qkv_bias"):
            w = params[f"layers.{i}.{key}"]
            k, v = w[q:q + kv], w[q + kv:]
            rep = [z.reshape(gqa.num_kv_heads, hd, *z.shape[1:]).repeat_interleave(2, dim=0).reshape(
                mha.kv_dim, *z.shape[1:]) for z in (k, v)]
            mha_params[f"layers.{i}.{key}"] = torch.cat([w[:q], *rep])
    tokens, _ = batch(gqa)
    with torch.no_grad():
        a = R.Reference(gqa, params, dtype=F64)(tokens)
        b = R.Reference(mha, mha_params, dtype=F64)(tokens)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_rope_properties():
    """Position 0 is the identity; each position is a rotation (norm kept); q.k depends on the offset only."""
    spec = tiny_spec("llama")
    cos, sin = R.rope_tables(spec, 16, F64)
    x = torch.randn(1, 16, 2, spec.head_dim, dtype=F64, generator=torch.Generator().manual_seed(0))
    y = R.apply_rope(x, cos, sin)
    torch.testing.assert_close(y[:, 0], x[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    # rotate-half pairs (i, i + HD/2): e_0 at position 1 turns by inv_freq[0] = 1 radian towards e_{HD/2}
    e0 = torch.zeros(1, 2, 1, spec.head_dim, dtype=F64)
    e0[..., 0] = 1
    expect = torch.zeros(spec.head_dim, dtype=F64)
    expect[0], expect[spec.head_dim // 2] = math.cos(1.0), math.sin(1.0)
    torch.testing.assert_close(R.apply_rope(e0, cos[:2], sin[:2])[0, 1, 0], expect)
    # the same q and k vectors at every position: <rope(q, m), rope(k, n)> is a function of m - n
    q = R.apply_rope(x[:, :1].expand(1, 16, 2, -1), cos, sin)[0, :, 0]
    k = R.apply_rope(x[:, 1:2].expand(1, 16, 2, -1), cos, sin)[0, :, 0]
    dots = q @ k.T
    for offset in (0, 3, 7):
        diag = torch.diagonal(dots, offset)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag))


def test_llama3_scaling_bands():
    """Short wavelengths kept, long ones divided by factor, and a continuous interpolation between."""
    s = LLAMA_SCALING
    inv_freq = torch.logspace(1, -5, 2001, dtype=F64)
    scaled = R.llama3_scale(inv_freq, s)
    wavelen = 2 * math.pi / inv_freq
    high = wavelen < s.original_max_position_embeddings / s.high_freq_factor
    low = wavelen > s.original_max_position_embeddings / s.low_freq_factor
    torch.testing.assert_close(scaled[high], inv_freq[high], rtol=0, atol=0)
    torch.testing.assert_close(scaled[low], inv_freq[low] / s.factor, rtol=0, atol=0)
    mid = ~high & ~low
    # by hand: wavelength 64 with original_max 128 is a third of the way from low (1) to high (4), so
    # f' = (2/3) f / 8 + (1/3) f = 5/12 f
    f = torch.tensor([2 * math.pi / 64], dtype=F64)
    assert R.llama3_scale(f, s).item() == pytest.approx(f.item() * 5 / 12, rel=1e-12)
    assert mid.sum() > 100
    assert ((scaled[mid] < inv_freq[mid]) & (scaled[mid] > inv_freq[mid] / s.factor)).all()
    assert (scaled.diff() < 0).all()                                    # monotone
    for edge in (s.original_max_position_embeddings / s.high_freq_factor,  # continuous at both band edges
                 s.original_max_position_embeddings / s.low_freq_factor):
        side = R.llama3_scale(2 * math.pi / (edge * torch.tensor([1 - 1e-12, 1 + 1e-12], dtype=F64)), s)
        assert side[0] == pytest.approx(side[1].item(), rel=1e-9)
    unscaled = tiny_spec("qwen3")
    torch.testing.assert_close(R.rope_tables(tiny_spec("llama"), 4)[0][:, :1], R.rope_tables(unscaled, 4)[0][:, :1])
    assert not torch.allclose(R.rope_tables(tiny_spec("llama"), 4)[0], R.rope_tables(unscaled, 4)[0])


def test_init_params_recipe():
    spec = tiny_spec("qwen2", tied=False, hidden_size=64, intermediate_size=96, num_layers=4)
    p = R.init_params(spec, seed=3)
    assert {k: v.shape for k, v in p.items()} == param_shapes(spec)
    assert all(v.dtype == np.float32 for v in p.values())
    for k in ("layers.0.qkv", "layers.3.gate_up", "embedding", "lm_head"):
        assert p[k].std() == pytest.approx(0.02, rel=0.1), k
    for k in ("layers.1.attn_out", "layers.2.down"):
        assert p[k].std() == pytest.approx(0.02 / math.sqrt(8), rel=0.1), k
    assert all((p[k] == 1).all() for k in ("layers.0.ln1", "layers.3.ln2", "final_norm"))
    assert (p["layers.2.qkv_bias"] == 0).all()
    again, other = R.init_params(spec, seed=3), R.init_params(spec, seed=4)
    assert all((again[k] == v).all() for k, v in p.items())
    assert not (other["embedding"] == p["embedding"]).all()
    qk = R.init_params(tiny_spec("qwen3"), seed=0)
    assert (qk["layers.1.q_norm"] == 1).all() and (qk["layers.1.k_norm"] == 1).all()


def test_reference_rejects_wrong_layout():
    spec = tiny_spec("qwen3")
    params = R.init_params(spec, 0)
    with pytest.raises(ValueError, match="missing"):
        R.Reference(spec, {k: v for k, v in params.items() if k != "layers.1.q_norm"})
    with pytest.raises(ValueError, match="layers.0.attn_out has shape"):
        R.Reference(spec, {**params, "layers.0.attn_out": params["layers.0.attn_out"].T})


def test_compare_and_assert_close_grads():
    spec = tiny_spec("qwen3")
    ref = {k: torch.from_numpy(v) for k, v in R.init_params(spec, 0).items()}
    ref["layers.0.qkv_bias_free_zero"] = torch.zeros(3)          # an exactly zero gradient
    ours = {k: v.numpy().copy() for k, v in ref.items()}
    stats = R.compare_grads(ours, ref)
    assert stats["mean_cos"] == pytest.approx(1.0) and stats["mean_rel"] == 0.0
    R.assert_close_grads(stats, min_mean_cos=0.999, max_mean_rel=1e-9)

    ours["embedding"] = ours["embedding"] * 1.1                   # same direction, 10% longer
    ours["layers.1.down"] = -ours["layers.1.down"]
    stats = R.compare_grads(ours, ref)
    assert stats["tensors"]["embedding"]["cos"] == pytest.approx(1.0)
    assert stats["tensors"]["embedding"]["rel"] == pytest.approx(0.1)
    assert stats["tensors"]["embedding"]["diff"] == pytest.approx(0.1)
    assert stats["tensors"]["layers.1.down"]["cos"] == pytest.approx(-1.0)
    assert stats["tensors"]["layers.1.down"]["rel"] == pytest.approx(0.0)     # same length, opposite way
    assert stats["tensors"]["layers.1.down"]["diff"] == pytest.approx(2.0)
    with pytest.raises(AssertionError, match=r"(?s)worst tensors:\n  embedding"):
        R.assert_close_grads(stats, min_mean_cos=0.99, max_mean_rel=0.012)

    ours["layers.0.qkv_bias_free_zero"] = np.ones(3)
    assert R.compare_grads(ours, ref)["tensors"]["layers.0.qkv_bias_free_zero"]["rel"] == math.inf
    with pytest.raises(KeyError, match="missing from ours"):
        R.compare_grads({k: v for k, v in ours.items() if k != "embedding"}, ref)
