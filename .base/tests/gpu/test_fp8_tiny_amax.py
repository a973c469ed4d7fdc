"""FP8 quantizers on an operand whose amax is tiny but not zero (a bf16 subnormal), the rest of the tensor
exactly zero (field case fp8-tiny-amax): no NaN byte (0x7F/0xFF in e4m3fn) and a finite, normal descale.
Without the amax floor in scale_from the scale is +inf and every zero becomes 0 * inf = NaN."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pointwise_support as S  # noqa: E402
from harness import KernelProgram, current_device  # noqa: E402

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def prog():
    ctx = S.plan_ctx("qwen2", True, current_device().arch)
    res, kernels = S.compile_ctx(ctx)
    return KernelProgram(res.cubin, kernels)


@pytest.mark.parametrize("variant", ["dual_", ""])
@pytest.mark.parametrize("tiny", [3e-39, 1e-37, 1e-36])
def test_quantize_tiny_amax_gives_no_nan(prog, variant, tiny):
    k = next(k for k in prog.kernels.values() if k.name.startswith("llmq_quantize_dual_") and k.meta["src"] == "bf16"
             and {f"llmq_amax_{k.meta['sites'][0]}", f"llmq_quantize_{k.meta['sites'][0]}"} <= set(prog.kernels))
    R, K, name = k.meta["rows"], k.meta["cols"], k.name.removeprefix("llmq_quantize_dual_")
    x = torch.zeros(R, K, dtype=torch.bfloat16, device="cuda")
    x[0, 3], x[1, 7] = tiny, -tiny / 3
    stats = torch.zeros(8, device="cuda")
    prog.launch(f"llmq_amax_{name}", x, stats)
    assert stats[0].item() > 0
    outs = [torch.zeros(R * K, dtype=torch.uint8, device="cuda") for _ in range(1 + (variant == "dual_"))]
    prog.launch(f"llmq_quantize_{variant}{name}", *outs, x, stats)
    torch.cuda.synchronize()
    for out in outs:
        nan_bytes = ((out & 0x7F) == 0x7F).sum().item()
        print(f"{variant or 'flat'} amax {stats[0].item():.3e} descale {stats[4].item():.3e} "
              f"NaN bytes {nan_bytes} of {R * K}")
        assert nan_bytes == 0
        # the largest input survives: it maps to a non-zero e4m3 value whose dequantised value is the input
        deq = out.view(torch.float8_e4m3fn).float() * stats[4]
        assert deq.abs().max().item() == pytest.approx(abs(x.float()).max().item(), rel=0.07)
    assert torch.isfinite(stats[4]) and stats[4].item() >= 1.17549435e-38
