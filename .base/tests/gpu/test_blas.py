"""cuBLASLt GEMMs against an fp32 torch reference of the same (dequantized) operands."""
import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch", reason="the GPU tests use torch as allocator and reference")
pytest.importorskip("nvmath", reason="cuBLASLt comes through nvmath-python: pip install 'llmqgen[gpu]'")

from harness import current_device  # noqa: E402
from llmqgen.runtime.blas import Blas, Gemm, linear_dgrad, linear_forward, linear_wgrad  # noqa: E402

M, N, K = 256, 384, 512
FMAX = {"e4m3": 448.0, "e5m2": 57344.0}
TORCH_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


@pytest.fixture(scope="module")
def blas():
    current_device()
    ws = torch.empty(32 << 20, dtype=torch.uint8, device="cuda")
    b = Blas(ws.data_ptr(), ws.numel())
    b.keep = ws
    yield b
    b.close()


def stream():
    return torch.cuda.current_stream().cuda_stream


def rel(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()  # NaN (an unwritten element) fails any check


def randn(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def poisoned(*shape):
    return torch.full(shape, float("nan"), device="cuda", dtype=torch.bfloat16)


def quantize(x, dtype, scales, slot):
    """Per-tensor current scaling: q = sat(x * FMAX/amax); scales[4*slot] = amax/FMAX (the descale)."""
    amax = x.float().abs().max()
    q = (x.float() * (FMAX[dtype] / amax)).clamp(-FMAX[dtype], FMAX[dtype]).to(TORCH_FP8[dtype])
    scales[4 * slot] = amax / FMAX[dtype]
    return q, q.float() * scales[4 * slot]


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_forward(blas, bias):
    x, w, b, y = randn(M, K), randn(N, K), randn(N), poisoned(M, N)
    g = linear_forward(blas, M, N, K, bias=bias)
    g.run(stream(), x.data_ptr(), w.data_ptr(), y.data_ptr(), bias=b.data_ptr() if bias else 0)
    torch.cuda.synchronize()
    ref = x.float() @ w.float().T + (b.float() if bias else 0)
    assert rel(y, ref) < 1e-2


def test_bf16_dgrad_and_accumulating_wgrad(blas):
    x, w, dy = randn(M, K), randn(N, K), randn(M, N)
    dx, dw0 = poisoned(M, K), randn(N, K)
    dw = dw0.clone()
    linear_dgrad(blas, M, N, K).run(stream(), dy.data_ptr(), w.data_ptr(), dx.data_ptr())
    linear_wgrad(blas, M, N, K).run(stream(), dy.data_ptr(), x.data_ptr(), dw.data_ptr())
    torch.cuda.synchronize()
    assert rel(dx, dy.float() @ w.float()) < 1e-2
    assert rel(dw, dw0.float() + dy.float().T @ x.float()) < 1e-2


@pytest.mark.parametrize("a_dtype,b_dtype", [("e4m3", "e4m3"), ("e5m2", "e4m3"), ("e4m3", "e5m2")])
@pytest.mark.parametrize("accumulate", [False, True])
def test_fp8_tn_with_scale_pointers(blas, a_dtype, b_dtype, accumulate):
    scales = torch.zeros(8, device="cuda", dtype=torch.float32)  # two 16-byte stats slots
    a, a_ref = quantize(3.0 * randn(M, K), a_dtype, scales, 0)
    b, b_ref = quantize(0.02 * randn(N, K), b_dtype, scales, 1)
    d0 = randn(M, N)
    d = d0.clone() if accumulate else poisoned(M, N)
    g = linear_forward(blas, M, N, K, x_dtype=a_dtype, w_dtype=b_dtype, accumulate=accumulate)
    g.run(stream(), a.data_ptr(), b.data_ptr(), d.data_ptr(),
          a_scale=scales.data_ptr(), b_scale=scales.data_ptr() + 16)
    torch.cuda.synchronize()
    ref = a_ref @ b_ref.T + (d0.float() if accumulate else 0)
    assert rel(d, ref) < 5e-3  # same fp8 values: only fp32 summation order and the bf16 output differ


def test_fp8_bias_epilogue(blas):
    scales = torch.zeros(8, device="cuda", dtype=torch.float32)
    x, x_ref = quantize(randn(M, K), "e4m3", scales, 0)
    w, w_ref = quantize(randn(N, K), "e4m3", scales, 1)
    bias, y = randn(N), poisoned(M, N)
    g = linear_forward(blas, M, N, K, x_dtype="e4m3", w_dtype="e4m3", bias=True)
    g.run(stream(), x.data_ptr(), w.data_ptr(), y.data_ptr(), a_scale=scales.data_ptr(),
          b_scale=scales.data_ptr() + 16, bias=bias.data_ptr())
    torch.cuda.synchronize()
    assert rel(y, x_ref @ w_ref.T + bias.float()) < 5e-3


def test_fp8_backward_as_tn_on_transposed_copies(blas):
    """dgrad/wgrad in FP8: the same TN GEMM on the transposed operands the quantize kernels write."""
    scales = torch.zeros(12, device="cuda", dtype=torch.float32)
    dy, dy_ref = quantize(randn(M, N), "e5m2", scales, 0)
    wt, w_ref = quantize(randn(K, N), "e4m3", scales, 1)      # W^T [K, N]
    x_t, x_ref = quantize(randn(K, M), "e4m3", scales, 2)     # x^T [K, M]
    dx, dw = poisoned(M, K), torch.zeros(N, K, device="cuda", dtype=torch.bfloat16)
    s = scales.data_ptr()
    linear_forward(blas, M, K, N, x_dtype="e5m2", w_dtype="e4m3").run(
        stream(), dy.data_ptr(), wt.data_ptr(), dx.data_ptr(), a_scale=s, b_scale=s + 16)
    dy_t = dy.float().T.contiguous().to(torch.float8_e5m2)  # exact: same values, transposed
    linear_forward(blas, N, K, M, x_dtype="e5m2", w_dtype="e4m3", accumulate=True).run(
        stream(), dy_t.data_ptr(), x_t.data_ptr(), dw.data_ptr(), a_scale=s, b_scale=s + 32)
    torch.cuda.synchronize()
    assert rel(dx, dy_ref @ w_ref.T) < 5e-3
    assert rel(dw, dy_ref.T @ x_ref.T) < 5e-3


def test_misaligned_scale_pointer_is_refused(blas):
    scales = torch.ones(8, device="cuda", dtype=torch.float32)
    a = torch.zeros(M, K, device="cuda").to(torch.float8_e4m3fn)
    b = torch.zeros(N, K, device="cuda").to(torch.float8_e4m3fn)
    d = poisoned(M, N)
    g = linear_forward(blas, M, N, K, x_dtype="e4m3", w_dtype="e4m3")
    with pytest.raises(ValueError, match="16-byte aligned"):
        g.run(stream(), a.data_ptr(), b.data_ptr(), d.data_ptr(),
              a_scale=scales.data_ptr() + 4, b_scale=scales.data_ptr())


def test_shape_and_dtype_errors(blas):
    with pytest.raises(ValueError, match="TN only"):
        Gemm(blas, M, N, K, a_dtype="e4m3", b_dtype="e4m3", b_trans=True)
    with pytest.raises(ValueError, match="e5m2 x e5m2"):
        Gemm(blas, M, N, K, a_dtype="e5m2", b_dtype="e5m2")
    with pytest.raises(ValueError, match="multiples of 16"):
        Gemm(blas, M, N, 520, a_dtype="e4m3", b_dtype="e4m3")
