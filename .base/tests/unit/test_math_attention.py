"""The math of the flash-attention family on the CPU: causal GQA forward (out, natural-log LSE) and the
flash backward recipe (delta = rowsum(dO*O), P from LSE, dS = P (dP - delta), dK/dV summed over the
group) checked against an independent loop implementation and central finite differences; plus the
family's launch rows and its errors."""
import numpy as np
import pytest

from llmqgen.codegen.families import flash_attention as fa


def split(qkv, b, t, hq, hkv, hd):
    """[BT, QKV] -> q [B, HQ, T, HD], k, v [B, HKV, T, HD]."""
    x = qkv.reshape(b, t, hq + 2 * hkv, hd).transpose(0, 2, 1, 3)
    return x[:, :hq], x[:, hq:hq + hkv], x[:, hq + hkv:]


def forward(qkv, b, t, hq, hkv, hd):
    q, k, v = split(qkv, b, t, hq, hkv, hd)
    g = hq // hkv
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    mx = s.max(-1, keepdims=True)
    lse = mx[..., 0] + np.log(np.exp(s - mx).sum(-1))
    o = np.exp(s - lse[..., None]) @ v
    return o.transpose(0, 2, 1, 3).reshape(b * t, hq * hd), lse


def backward(qkv, out, dout, lse, b, t, hq, hkv, hd):
    """The kernels' recipe, in numpy: returns dqkv [BT, QKV]."""
    q, k, v = split(qkv, b, t, hq, hkv, hd)
    g = hq // hkv
    kr, vr = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    o4 = out.reshape(b, t, hq, hd).transpose(0, 2, 1, 3)
    do4 = dout.reshape(b, t, hq, hd).transpose(0, 2, 1, 3)
    delta = (o4 * do4).sum(-1)                                   # llmq_attention_bwd_dot
    scale = 1 / np.sqrt(hd)
    p = np.exp(q @ kr.transpose(0, 1, 3, 2) * scale - lse[..., None])
    p = np.where(np.tril(np.ones((t, t), bool)), p, 0.0)
    dp = do4 @ vr.transpose(0, 1, 3, 2)
    ds = p * (dp - delta[..., None])
    dq = scale * ds @ kr
    dk = (scale * ds.transpose(0, 1, 3, 2) @ q).reshape(b, hkv, g, t, hd).sum(2)   # sum over the group
    dv = (p.transpose(0, 1, 3, 2) @ do4).reshape(b, hkv, g, t, hd).sum(2)
    return np.concatenate([dq, dk, dv], axis=1).transpose(0, 2, 1, 3).reshape(b * t, -1)


def forward_loops(qkv, b, t, hq, hkv, hd):
    """Independent reference: one query at a time, explicit softmax over the visible keys."""
    q, k, v = split(qkv, b, t, hq, hkv, hd)
    out, lse = np.zeros((b, t, hq, hd)), np.zeros((b, hq, t))
    for bi in range(b):
        for h in range(hq):
            kv = h // (hq // hkv)
            for i in range(t):
                s = np.array([q[bi, h, i] @ k[bi, kv, j] for j in range(i + 1)]) / np.sqrt(hd)
                w = np.exp(s - s.max())
                lse[bi, h, i] = s.max() + np.log(w.sum())
                out[bi, i, h] = (w / w.sum()) @ v[bi, kv, :i + 1]
    return out.reshape(b * t, hq * hd), lse


SHAPES = [(1, 5, 4, 2, 4), (2, 4, 2, 2, 3), (1, 6, 4, 1, 2)]  # (B, T, HQ, HKV, HD): GQA, MHA, MQA


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_loops(shape):
    b, t, hq, hkv, hd = shape
    qkv = np.random.default_rng(0).standard_normal((b * t, (hq + 2 * hkv) * hd))
    o, lse = forward(qkv, *shape)
    o_ref, lse_ref = forward_loops(qkv, *shape)
    np.testing.assert_allclose(o, o_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_finite_differences(shape):
    b, t, hq, hkv, hd = shape
    rng = np.random.default_rng(1)
    qkv = rng.standard_normal((b * t, (hq + 2 * hkv) * hd))
    dout = rng.standard_normal((b * t, hq * hd))   # loss = sum(out * dout)
    out, lse = forward(qkv, *shape)
    dqkv = backward(qkv, out, dout, lse, *shape)
    eps, num = 1e-6, np.zeros_like(qkv)
    for idx in np.ndindex(qkv.shape):
        up, dn = qkv.copy(), qkv.copy()
        up[idx] += eps
        dn[idx] -= eps
        num[idx] = ((forward(up, *shape)[0] - forward(dn, *shape)[0]) * dout).sum() / (2 * eps)
    np.testing.assert_allclose(dqkv, num, rtol=1e-6, atol=1e-7)


def ctx(**over):
    c = dict(HQ=8, HKV=2, HD=128, B=2, T=256, ATTN_BWD_CHUNKS=1, MAX_SMEM=99 * 1024)
    c.update(over)
    return c


def test_launch_rows():
    ks = {k.name: k for k in fa.kernels(ctx())}
    fwd, dot, bwd = ks["llmq_attention_forward"], ks["llmq_attention_bwd_dot"], ks["llmq_attention_backward"]
    assert fwd.grid == (4, 8, 2) and fwd.block == (128, 1, 1)
    assert fwd.smem == 2 * 64 * 136 * 2 and not fwd.meta["smem_optin"]
    assert fwd.meta["lse_bytes"] == dot.meta["delta_bytes"] == 2 * 8 * 256 * 4
    assert dot.grid[0] * dot.block[0] == 2 * 256 * 8 * 16        # HD/8 threads per (row, head)
    assert bwd.grid == (2 * 2 * 4 + 2 * 8 * 4, 1, 1) and bwd.meta["dkv_ctas"] == 16
    assert bwd.smem == 4 * 64 * 136 * 2 + 512 and bwd.meta["smem_optin"]
    assert bwd.meta["scratch_bytes"] == 0 and bwd.meta["deterministic"]
    assert [n for n, _ in bwd.args] == ["qkv", "dout", "lse", "delta", "dqkv"]
    extra = fa.context(ctx(HD=64))
    assert extra["FA_DKV_CTAS"] == 16 and extra["FA_LD"] == 72
    assert float(extra["FA_SCALE_LOG2"]) == pytest.approx(np.log2(np.e) / 8)


@pytest.mark.parametrize("over, words", [
    (dict(HD=96), "head_dim"),
    (dict(T=200), "--seq-len 256"),
    (dict(HQ=6, HKV=4), "multiple of key/value heads"),
    (dict(MAX_SMEM=48 * 1024), "shared memory"),
])
def test_errors_say_what_to_do(over, words):
    with pytest.raises(ValueError, match=words):
        fa.kernels(ctx(**over))
