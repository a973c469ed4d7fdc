"""The math of the pointwise kernels in numpy (float64): the backward formulas the templates implement,
checked against finite differences, and the Python side of the families (frequencies, segments, sites)."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pointwise_support as S  # noqa: E402

from llmqgen.codegen.families import embedding, quantize, rmsnorm, rope  # noqa: E402
from llmqgen.layout import row_threads  # noqa: E402

rng = np.random.default_rng(0)
EPS = 1e-6


def fd_grad(f, x, h=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[i] = h
        g[i] = (f(x + d) - f(x - d)) / (2 * h)
    return g


def norm(x, w):
    rstd = 1 / np.sqrt((x * x).mean(-1, keepdims=True) + EPS)
    return x * rstd * w, rstd


def norm_bwd(dy, x, w, rstd):
    """The templates' formula: dx = (w*dy - xhat*mean(w*dy*xhat)) * rstd, dw = sum dy*xhat."""
    xhat, g = x * rstd, w * dy
    return (g - xhat * (g * xhat).mean(-1, keepdims=True)) * rstd, (dy * xhat).reshape(-1, x.shape[-1]).sum(0)


def rotate(x, ang, inv=False):
    """NeoX half-split rotation of the last axis (x1, x2) by ang (or -ang): the templates' rotate<INV>."""
    h = x.shape[-1] // 2
    c, s = np.cos(ang), (-1 if inv else 1) * np.sin(ang)
    x1, x2 = x[..., :h], x[..., h:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def test_rmsnorm_backward_matches_finite_differences():
    x, w, dy = rng.normal(size=(3, 16)), rng.normal(size=16), rng.normal(size=(3, 16))
    _, rstd = norm(x, w)
    dx, dw = norm_bwd(dy, x, w, rstd)
    np.testing.assert_allclose(dx, fd_grad(lambda t: (norm(t, w)[0] * dy).sum(), x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dw, fd_grad(lambda t: (norm(x, t)[0] * dy).sum(), w), rtol=1e-6, atol=1e-8)


def test_qknorm_rope_backward_matches_finite_differences():
    hd, pos = 16, np.array([[0.0], [3.0], [7.0]])
    ang = pos * rope.inv_freq(dict(HD=hd, ROPE_THETA=1e4, ROPE_SCALING=None))[None].astype(np.float64)
    x, w, d = rng.normal(size=(3, hd)), rng.normal(size=hd), rng.normal(size=(3, hd))
    fwd = lambda t, wt: rotate(norm(t, wt)[0], ang)  # noqa: E731
    _, rstd = norm(x, w)
    dz = rotate(d, ang, inv=True)               # backward: inverse rotation, then the norm backward
    dx, dw = norm_bwd(dz, x, w, rstd)
    np.testing.assert_allclose(dx, fd_grad(lambda t: (fwd(t, w) * d).sum(), x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dw, fd_grad(lambda t: (fwd(x, t) * d).sum(), w), rtol=1e-6, atol=1e-8)


def test_swiglu_backward_matches_finite_differences():
    g, u, dh = rng.normal(size=8) * 3, rng.normal(size=8), rng.normal(size=8)
    silu = lambda t: t / (1 + np.exp(-t))  # noqa: E731
    s = 1 / (1 + np.exp(-g))
    dg, du = dh * u * s * (1 + g * (1 - s)), dh * g * s
    np.testing.assert_allclose(dg, fd_grad(lambda t: (silu(t) * u * dh).sum(), g), rtol=1e-6)
    np.testing.assert_allclose(du, fd_grad(lambda t: (silu(g) * t * dh).sum(), u), rtol=1e-6)


def test_inv_freq_default_and_llama3():
    base = dict(HD=128, ROPE_THETA=500000.0, ROPE_SCALING=None)
    f = rope.inv_freq(base)
    np.testing.assert_allclose(f, 500000.0 ** (-np.arange(0, 128, 2) / 128), rtol=1e-6)
    sc = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    g = rope.inv_freq(dict(base, ROPE_SCALING=sc))
    wavelen = 2 * np.pi / f
    hi, lo = wavelen < 8192 / 4, wavelen > 8192 / 1
    np.testing.assert_array_equal(g[hi], f[hi])                        # high frequencies untouched
    np.testing.assert_allclose(g[lo], f[lo] / 8, rtol=1e-6)           # low frequencies slowed by factor
    mid = ~hi & ~lo
    assert mid.any() and np.all(g[mid] <= f[mid]) and np.all(g[mid] >= f[mid] / 8)


def test_embedding_segments():
    tokens = rng.integers(0, 5, size=64).astype(np.int32)
    order, seg, n = embedding.segments(tokens)
    assert n == len(np.unique(tokens)) and seg[n] == tokens.size and seg.shape == (65,)
    for s in range(n):
        pos = order[seg[s]:seg[s + 1]]
        assert len(set(tokens[pos])) == 1 and np.all(np.diff(pos) > 0)   # one token, stable order
    assert sorted(order) == list(range(64))


def test_quantize_sites_deduplicate():
    ctx = S.plan_ctx("qwen2", True, C=768, F=1536, gradient="e5m2")
    sites = quantize.quant_sites(ctx)
    names = [s["name"] for s in sites]
    assert len(names) == len(set(names))
    assert sorted(x for s in sites for x in s["sites"]) == sorted(r[0] for r in quantize.site_shapes(ctx))
    by = {s["name"]: s for s in sites}
    assert by["ln1"]["sites"] == ["ln1", "ln2"] and by["d_att_out"]["sites"] == ["d_att_out", "d_down"]
    assert by["d_att_out"]["dst"] == "e5m2" and by["qkv"]["dst"] == "e4m3"
    assert not quantize.enabled(S.plan_ctx("qwen2", False))
    with pytest.raises(ValueError, match="divisible by 16"):
        quantize.quant_sites(dict(ctx, BT=ctx["BT"] + 8))


def test_row_threads_cover_the_row():
    for nvec in (8, 32, 112, 128, 640, 1024, 1040):
        threads, vpt = row_threads(nvec)
        assert threads % 32 == 0 and threads <= 512 and threads * vpt >= nvec > threads * (vpt - 1)


def test_shape_errors_say_what_to_do():
    with pytest.raises(ValueError, match="hidden_size % 8"):
        rmsnorm.context(dict(S.plan_ctx("qwen2", True), C=260))
    with pytest.raises(ValueError, match="head_dim"):
        rope.context(dict(S.plan_ctx("qwen2", True), HD=80))
