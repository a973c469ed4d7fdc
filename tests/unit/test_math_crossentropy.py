"""The fused cross-entropy's math on the CPU: the gradient it writes is the derivative of the loss it
reports (finite differences), and its chunked online max/sum-exp equals logsumexp."""
import numpy as np
import pytest

from llmqgen.codegen.families import crossentropy as ce


def ce_reference(x: np.ndarray, targets: np.ndarray, grad_scale: float):
    """float64 loss, LSE and dlogits = (softmax - onehot) * grad_scale; ignored rows are all zero."""
    keep = targets != ce.IGNORE_INDEX
    mx = x.max(axis=1, keepdims=True)
    lse = (mx + np.log(np.exp(x - mx).sum(axis=1, keepdims=True)))[:, 0]
    t = np.where(keep, targets, 0)
    loss = np.where(keep, lse - x[np.arange(len(x)), t], 0.0)
    grad = np.exp(x - lse[:, None])
    grad[np.arange(len(x)), t] -= 1.0
    grad = np.where(keep[:, None], grad * grad_scale, 0.0)
    return loss, np.where(keep, lse, 0.0), grad


def test_gradient_is_derivative_of_scaled_loss():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, (4, 13))
    targets = np.array([3, ce.IGNORE_INDEX, 12, 0])
    gs = 1.0 / np.count_nonzero(targets != ce.IGNORE_INDEX)   # the host's 1 / valid tokens
    _, _, grad = ce_reference(x, targets, gs)
    h = 1e-6
    fd = np.zeros_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            xp, xm = x.copy(), x.copy()
            xp[i, j] += h
            xm[i, j] -= h
            fd[i, j] = gs * (ce_reference(xp, targets, gs)[0].sum() - ce_reference(xm, targets, gs)[0].sum()) / (2 * h)
    np.testing.assert_allclose(grad, fd, atol=1e-8)
    assert not grad[1].any()  # ignored row: zero gradient
    np.testing.assert_allclose(grad[[0, 2, 3]].sum(axis=1), 0.0, atol=1e-12)  # softmax - onehot sums to 0


def online_lse(row: np.ndarray, threads: int, width: int) -> float:
    """The kernel's pass 1 in float32: each thread folds its vectors into a running (max, sum-exp),
    then the block takes the max of maxima and rescales every sum to it."""
    row = row.astype(np.float32)
    vecs = row.reshape(-1, width)
    ms, ss = [], []
    for t in range(threads):
        m, s = np.float32(-np.inf), np.float32(0)
        for u in vecs[t::threads]:
            vmax = max(m, u.max())
            s = s * np.exp(m - vmax) + np.exp(u - vmax).sum(dtype=np.float32)
            m = vmax
        ms.append(m)
        ss.append(s)
    M = max(ms)
    total = sum(np.float32(0) if m == -np.inf else s * np.exp(m - M) for m, s in zip(ms, ss))
    return float(M + np.log(total))


@pytest.mark.parametrize("v,threads,width", [(1024, 128, 8), (1001, 128, 1), (64, 128, 8), (4096, 32, 8)])
def test_online_lse_equals_logsumexp(v, threads, width):
    # (64, 128, 8): most threads see no element and must not disturb the result
    rng = np.random.default_rng(v)
    row = rng.normal(0, 5, v) + np.linspace(-20, 20, v)   # maxima move while the loop runs
    ref = float(np.log(np.exp(row - row.max()).sum()) + row.max())
    with np.errstate(invalid="ignore"):
        assert online_lse(row, threads, width) == pytest.approx(ref, rel=1e-6)


def test_context_and_rows():
    ctx = {"V": 151936, "BT": 8192, "LM_HEAD_CHUNKS": 4}
    extra = ce.context(ctx)
    assert extra["CE_THREADS"] == 1024 and extra["CE_VEC"] == 8 and extra["CE_ROWS"] == 2048
    assert ce.context({"V": 1001, "BT": 256, "LM_HEAD_CHUNKS": 1})["CE_VEC"] == 1
    assert ce.context({"V": 1024, "BT": 256, "LM_HEAD_CHUNKS": 1})["CE_THREADS"] == 128
    with pytest.raises(ValueError, match="LM_HEAD_CHUNKS=3 must divide"):
        ce.rows_per_chunk({"BT": 256, "LM_HEAD_CHUNKS": 3})
