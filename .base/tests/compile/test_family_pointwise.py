"""embedding, rmsnorm, rope, swiglu, quantize: render through the framework and compile for sm_89,
sm_90 and sm_120 without register spills, on tiny and on real model shapes."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pointwise_support as S  # noqa: E402

from llmqgen.plan.schema import Recompute  # noqa: E402

QWEN25_05B = dict(C=896, F=4864, HQ=14, HKV=2, HD=64, V=151936, B=4, T=1024)
QWEN3_32B = dict(C=5120, F=25600, HQ=64, HKV=8, HD=128, V=151936, B=1, T=4096)
CONFIGS = {
    "qwen2-fp8": ("qwen2", True, {}),
    "qwen3-fp8-recompute": ("qwen3", True, dict(recompute=Recompute(norm=True))),
    "llama-bf16": ("llama", False, {}),
    "qwen2.5-0.5b-e5m2-fp32master": ("qwen2", True, dict(QWEN25_05B, gradient="e5m2", master="fp32")),
    "qwen3-32b-shape": ("qwen3", True, QWEN3_32B),
}


@pytest.mark.parametrize("target", ["sm_89", "sm_90", "sm_120"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_compiles_without_spills(config, target):
    arch, fp8, over = CONFIGS[config]
    res, kernels = S.compile_ctx(S.plan_ctx(arch, fp8, target, **over))
    assert {k.name for k in kernels} == set(res.ptxas), "every launch row is a compiled kernel and back"
    spilled = {k: v for k, v in res.ptxas.items() if v["spill_stores"] or v["spill_loads"] or v["stack_bytes"]}
    assert not spilled, f"register spills / stack: {spilled}"


def test_variants_follow_the_plan():
    names = lambda ctx: {k.name for k in S.render(ctx)[1]}  # noqa: E731
    fp8, bf16 = names(S.plan_ctx("qwen3", True)), names(S.plan_ctx("llama", False))
    assert "llmq_rope_qknorm_dweight" in fp8 and "llmq_rope_qknorm_dweight" not in bf16
    assert any(n.startswith("llmq_quantize_") for n in fp8) and not any("quantize" in n for n in bf16)
    assert not any("recompute" in n for n in fp8)
    rc = names(S.plan_ctx("qwen2", True, recompute=Recompute(norm=True)))
    assert {"llmq_rmsnorm_recompute_ln1", "llmq_rmsnorm_recompute_ln2"} <= rc
    # block recompute reruns the norms' forward (rstd was dropped too): no recompute kernels
    assert not any("recompute" in n for n in names(S.plan_ctx("qwen2", True, recompute=Recompute(block=True))))


def test_scratch_sizes_in_meta():
    ctx = S.plan_ctx("qwen3", True, **QWEN3_32B)
    ks = {k.name: k for k in S.render(ctx)[1]}
    bwd = ks["llmq_rmsnorm_backward_ln1"]
    assert bwd.meta["dw_scratch_floats"] == bwd.grid[0] * ctx["C"] == ks["llmq_rmsnorm_dweight_ln1"].meta["dw_scratch_floats"]
    rope_bwd = ks["llmq_rope_backward"]
    assert rope_bwd.meta["dw_scratch_floats"] == rope_bwd.grid[0] * 2 * ctx["HD"]
    assert bwd.grid[0] <= ctx["SM_COUNT"] * 4 and rope_bwd.grid[0] <= ctx["SM_COUNT"] * 8
