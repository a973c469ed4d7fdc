"""The solver: the issue's must-fit cases, pins, determinism and the no-fit message."""
import json

import pytest

from llmqgen.hardware.catalog import resolve_gpu
from llmqgen.models.catalog import resolve_model
from llmqgen.plan.schema import Inventory, Plan
from llmqgen.plan.solver import NoFitError, solve, usable_device, usable_host

GiB = 2**30


def inv(gpu, count=1, host_gib=None):
    return Inventory(gpu=resolve_gpu(gpu), count=count,
                     host_mem_bytes=(host_gib or 128 * count) * GiB, host_mem_source="user")


def fits(p: Plan) -> bool:
    e = p.estimate
    return e.device_bytes <= usable_device(p.inventory) and e.host_bytes <= usable_host(p.inventory)


def test_05b_on_h200_needs_no_offload_and_no_recompute():
    p = solve(resolve_model("0.5b"), inv("h200"))
    assert fits(p) and p.fp8
    assert p.recompute.names() == [] and p.offload.names() == []
    assert p.tokens_per_step == 524288


def test_7b_fits_one_4060ti():
    p = solve(resolve_model("7b"), inv("4060ti"))
    assert fits(p) and p.fp8
    assert p.estimate.device_bytes <= 16 * GiB


def test_32b_fits_four_4090s_with_offload_and_sharding():
    p = solve(resolve_model("32b"), inv("4090", 4, host_gib=512))
    assert fits(p) and p.fp8
    assert p.sharding.zero >= 2
    assert {"master", "adam_m", "adam_v"} <= set(p.offload.names())
    assert p.recompute.names()


def test_pins_are_respected():
    p = solve(resolve_model("0.5b"), inv("h200"), pins={"recompute.ffn": True, "batch.micro_batch": 4},
              dtype="bf16", seq_len=2048, tokens_per_step=262144)
    assert p.recompute.ffn and p.recompute.swiglu          # ffn implies swiglu
    assert p.batch.micro_batch == 4 and p.batch.grad_accum == 32 and p.batch.seq_len == 2048
    assert p.precision.matmul == "bf16" and p.precision.gradient == "bf16"


def test_deterministic_and_hash_ignores_estimate():
    a = solve(resolve_model("1.5b"), inv("4090"))
    b = solve(resolve_model("1.5b"), inv("4090"))
    assert a.to_json() == b.to_json()
    assert a.inputs_hash() == a.model_copy(update={"estimate": None}).inputs_hash()
    assert Plan.from_json(a.to_json()) == a
    assert json.loads(a.to_json())["schema"] == 1


def test_no_fit_names_the_shortfall():
    with pytest.raises(NoFitError) as e:
        solve(resolve_model("72b"), inv("4060ti", 1, host_gib=32))
    msg = str(e.value)
    assert "does not fit 1x4060ti" in msg and "short" in msg and "--host-mem" in msg


def test_fp8_on_a_gpu_without_fp8_is_refused():
    with pytest.raises(ValueError, match="no FP8"):
        solve(resolve_model("0.5b"), inv("3090"), dtype="e4m3")
    assert solve(resolve_model("0.5b"), inv("3090")).precision.matmul == "bf16"


def test_tokens_per_step_must_divide():
    with pytest.raises(ValueError, match="multiple of seq_len"):
        solve(resolve_model("0.5b"), inv("h200"), tokens_per_step=1000)
