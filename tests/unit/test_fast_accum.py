"""Fast accumulation in FP8 forward GEMMs as a plan option (precision.fast_accum), on the CPU: the plan, the
cost model, the bad inputs. Its algorithm choice and losses: tests/gpu/test_gemm_search.py."""
import pytest

from llmqgen.hardware.catalog import resolve_gpu
from llmqgen.hardware.spec import Inventory
from llmqgen.models.catalog import resolve_model
from llmqgen.plan import calibration as K
from llmqgen.plan.cost import step_cost
from llmqgen.plan.schema import Precision
from llmqgen.plan.solver import solve


def _solve(gpu="h200", **pins):
    inv = Inventory(gpu=resolve_gpu(gpu), count=1, host_mem_bytes=256 << 30)
    return solve(resolve_model("qwen2.5-0.5b"), inv, pins={"batch.micro_batch": 16, **pins})


def test_only_fp8_plans_accumulate_fast():
    with pytest.raises(ValueError, match="fast accumulation is a mode of FP8"):
        Precision(matmul="bf16", gradient="bf16", fast_accum=True)


def test_the_forward_gemms_take_the_measured_fraction_of_their_time():
    head = {"precision.lm_head": "fp8"}
    precise, fast = _solve(**head), _solve(**head, **{"precision.fast_accum": True})
    assert fast.name == precise.name.replace("-mb16", "-fast-accum-mb16")
    a, b = step_cost(precise).breakdown_ms, step_cost(fast).breakdown_ms
    # forward: one of the three passes of each block GEMM (nothing recomputed here) and of the head's
    assert b["matmul"] < a["matmul"] and a["matmul"] - b["matmul"] < (1 - K.FP8_FAST_ACCUM_TIME) * a["matmul"] / 2
    assert b["lm_head"] < a["lm_head"]
    assert "fast accumulation in forward GEMMs (precise accumulation:" in fast.estimate.reasons["precision"]
    assert "--set precision.fast_accum=true" in precise.estimate.reasons["precision"]


def test_geforce_cards_are_not_predicted_faster():
    precise, fast = _solve("4090"), _solve("4090", **{"precision.fast_accum": True})
    assert step_cost(precise).step_ms == step_cost(fast).step_ms
    assert "fast_accum" not in precise.estimate.reasons["precision"]
