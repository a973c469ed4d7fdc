"""AdamW's math on the CPU: the kernel's arrangement of the update equals PyTorch's AdamW algorithm
(as documented) over several steps, the hash-driven stochastic bf16 rounding is unbiased, and the
host-side helpers (hyper array, grid) say what the kernel expects."""
import numpy as np
import pytest

from llmqgen.codegen.families import adamw


def hash32(x: np.ndarray) -> np.ndarray:
    """_common.cu.j2's hash32 (lowbias32) on uint32 arrays."""
    mask = np.uint64(0xFFFFFFFF)  # products in uint64, wrapped to 32 bits as on the GPU
    x = np.asarray(x, dtype=np.uint64)
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & mask
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & mask
    x ^= x >> np.uint64(16)
    return x.astype(np.uint32)


def bf16_stochastic(x: np.ndarray, rnd: np.ndarray) -> np.ndarray:
    """_common.cu.j2's bf16_stochastic, returned as float32 holding the bf16 value."""
    u = x.astype(np.float32).view(np.uint32) + (rnd & np.uint32(0xFFFF))
    return (u & np.uint32(0xFFFF0000)).view(np.float32)


def kernel_step(p, g, m, v, hyper, clip, apply_wd):
    """The kernel's per-element update, float32 throughout (see update() in _adamw.cu.j2)."""
    f = np.float32
    lr, b1, b2, eps, wd, bc1, bc2, _, _ = (f(h) for h in hyper)
    g = g * f(clip)
    m = b1 * m + (f(1) - b1) * g
    v = b2 * v + (f(1) - b2) * g * g
    decay = f(1) - lr * wd if apply_wd else f(1)
    p = p * decay - (lr / bc1) * m / (np.sqrt(v) * (f(1) / np.sqrt(bc2)) + eps)
    return p, m, v


def torch_doc_step(p, g, m, v, t, lr, b1, b2, eps, wd, clip):
    """PyTorch's documented AdamW algorithm in float64."""
    g = g * clip
    p = p - lr * wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


def test_update_matches_documented_adamw_over_steps():
    rng = np.random.default_rng(0)
    n, lr, b1, b2, eps, wd, clip = 4096, 3e-3, 0.9, 0.95, 1e-8, 0.1, 0.6
    p64 = rng.normal(0, 0.02, n)
    m64, v64 = np.zeros(n), np.zeros(n)
    p32, m32, v32 = p64.astype(np.float32), m64.astype(np.float32), v64.astype(np.float32)
    for t in range(1, 6):
        g = rng.normal(0, 1e-2, n)
        hyper = adamw.hyper_values(lr, b1, b2, eps, wd, t, max_norm=1.0)
        p32, m32, v32 = kernel_step(p32, g.astype(np.float32), m32, v32, hyper, clip, True)
        p64, m64, v64 = torch_doc_step(p64, g, m64, v64, t, lr, b1, b2, eps, wd, clip)
    np.testing.assert_allclose(p32, p64, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m32, m64, rtol=1e-5, atol=1e-9)    # |m| ~ 1e-3
    np.testing.assert_allclose(v32, v64, rtol=1e-5, atol=1e-14)   # v ~ 1e-5


def test_first_step_moves_each_weight_by_lr():
    # Adam's first step is lr * sign(g) (eps -> 0, no decay): the bias corrections are in the right place
    g = np.array([3.0, -1e-3, 0.5], dtype=np.float32)
    zeros = np.zeros(3, np.float32)
    hyper = adamw.hyper_values(1e-2, 0.9, 0.999, 0.0, 0.1, 1, max_norm=0.0)
    p1, _, _ = kernel_step(zeros, g, zeros, zeros, hyper, 1.0, False)
    np.testing.assert_allclose(p1, -1e-2 * np.sign(g), rtol=1e-5)


def test_stochastic_rounding_is_unbiased_and_between_neighbours():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, 512).astype(np.float32)
    key = hash32(np.uint32(1234) ^ hash32(np.uint32(7 + 0x632BE5AB)))
    idx = np.arange(4096, dtype=np.uint32)
    rounded = np.stack([bf16_stochastic(np.full(4096, xi), hash32(idx ^ key)) for xi in x])
    lo = (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    hi = ((x.view(np.uint32) & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)
    assert np.all((rounded == lo[:, None]) | (rounded == hi[:, None]))
    ulp = np.abs(hi - lo)
    bias = (rounded.mean(axis=1) - x) / ulp          # per value, in units of its bf16 spacing
    assert np.abs(bias).max() < 0.03                 # 4096 draws: std <= 0.5/64
    assert abs(bias.mean()) < 0.003


def test_hyper_values_and_grid():
    h = adamw.hyper_values(1e-3, 0.9, 0.95, 1e-8, 0.1, 2, max_norm=1.0)
    assert len(h) == len(adamw.HYPER) == 9
    assert h[adamw.HYPER.index("step")] == 2.0
    assert h[adamw.HYPER.index("bias_corr1")] == pytest.approx(1 - 0.81)
    assert h[adamw.HYPER.index("bias_corr2")] == pytest.approx(1 - 0.95 ** 2)
    assert h[adamw.HYPER.index("max_norm")] == 1.0
    with pytest.raises(ValueError, match="count from 1"):
        adamw.hyper_values(1e-3, 0.9, 0.95, 1e-8, 0.1, 0, max_norm=1.0)
    assert adamw.hyper_values(1e-3, 0.9, 0.95, 1e-8, 0.1, adamw.MAX_STEP, 1.0)[-1] == adamw.MAX_STEP
    with pytest.raises(ValueError, match="exactly"):
        adamw.hyper_values(1e-3, 0.9, 0.95, 1e-8, 0.1, adamw.MAX_STEP + 1, max_norm=1.0)
    assert adamw.grid(1, 132) == (1, 1, 1)
    assert adamw.grid(adamw.THREADS * adamw.ELEMS_PER_THREAD + 1, 132) == (2, 1, 1)
    assert adamw.grid(10 ** 9, 132) == (132 * adamw.BLOCKS_PER_SM, 1, 1)


def test_kernel_name_follows_plan_dtypes():
    ctx = {"MASTER_FP32": True, "ADAM_M_FP32": False, "ADAM_V_FP32": True}
    assert adamw.kernel_name(ctx) == "llmq_adamw_pfp32_mbf16_vfp32"
    extra = adamw.context(ctx)
    assert (extra["ADAMW_MASTER_T"], extra["ADAMW_M_T"], extra["ADAMW_V_T"]) == ("float", "bf16", "float")
