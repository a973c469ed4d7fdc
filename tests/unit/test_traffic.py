"""plan/traffic.py: the elementwise bytes of a micro-step, counted over the schedule the runtime runs."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
from harness import small_plan  # noqa: E402

from llmqgen.plan.cost import micro_step_traffic_of  # noqa: E402
from llmqgen.plan.memory import memory_table  # noqa: E402
from llmqgen.plan.schedule import build_schedule  # noqa: E402
from llmqgen.plan.schema import Offload, Plan, Recompute, Sharding  # noqa: E402
from llmqgen.plan.traffic import micro_step_traffic  # noqa: E402

PLANS = sorted((Path(__file__).resolve().parents[2] / "plans").glob("*.json"))


def traffic(plan):
    return micro_step_traffic(plan, build_schedule(plan))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("rc", [{}, {"swiglu": True, "norm": True}, {"ffn": True, "attention": True}, {"block": True}])
def test_every_operation_of_a_micro_step_is_counted(arch, fp8, rc):
    t = traffic(small_plan(arch, fp8, recompute=Recompute(**rc), lm_head_chunks=2))
    assert t.bytes > 0 and t.launches > 0


@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.stem)
def test_the_example_plans_are_counted(path):
    plan = Plan.from_json(path.read_text())
    assert traffic(plan) == micro_step_traffic_of(plan)


@pytest.mark.parametrize("fp8", [True, False])
def test_where_state_sits_leaves_the_count_alone(fp8):
    """The cost model caches the count per step shape: offload and sharding add copies and collectives, and,
    with ZeRO-2 and up, the zeroing of each layer's gradient buffer before its backward."""
    def count(gpus=1, zero=0, **off):
        plan = small_plan("qwen2", fp8, gpus=gpus, sharding=Sharding.from_zero(zero), offload=Offload(**off))
        assert traffic(plan) == micro_step_traffic_of(plan)
        return traffic(plan)
    base = count()
    assert base == count(residual=True, quantized_weights=True, gradients=True) == count(2, 1)
    assert base == count(2, 1, master=True, adam_m=True)
    staged = count(2, 2)
    assert staged == count(2, 3, residual=True)
    zero2 = small_plan("qwen2", fp8, gpus=2, sharding=Sharding.from_zero(2))
    buffers = [r for r in memory_table(zero2) if r.name.startswith("stage.grads.")]    # one instance each
    L = zero2.model.num_layers
    assert staged.bytes - base.bytes == L * sum(r.bytes for r in buffers)
    assert staged.launches - base.launches == L * len(buffers)


def test_recompute_costs_what_the_rerun_kernels_move():
    """SwiGLU recompute reruns the fused FP8 forward's writing pass in backward (gate_up read, e4m3 h
    written), once per layer; not its amax pass: the forward's amax of the same values is in the slot."""
    plain, rerun = small_plan("qwen2", True), small_plan("qwen2", True, recompute=Recompute(swiglu=True))
    BT, F, L = 2 * 128, 512, 2
    assert traffic(rerun).bytes - traffic(plain).bytes == L * BT * (2 * 2 * F + F)
    assert traffic(rerun).launches - traffic(plain).launches == L


def test_an_unknown_kernel_is_an_error_that_names_it():
    plan = small_plan("qwen2", True)
    sched = build_schedule(plan)
    sched["micro_step"]["epilogue"].append({"op": "kernel", "kernel": "llmq_new_thing", "phase": "backward",
                                            "args": {}})
    with pytest.raises(KeyError, match="llmq_new_thing"):
        micro_step_traffic(plan, sched)


@pytest.mark.parametrize("fp8", [True, False])
def test_bytes_per_family_are_the_profiles_families_and_add_up(fp8):
    from llmqgen.plan.cost import step_cost
    from llmqgen.plan import calibration as K
    from llmqgen.runtime.profile import FAMILIES, predicted_family_ms
    plan = small_plan("qwen2", fp8, recompute=Recompute(swiglu=True))
    t = traffic(plan)
    fams = dict(t.by_family)
    assert sum(fams.values()) == t.bytes and set(fams) <= set(FAMILIES)
    assert {"swiglu", "rmsnorm", "rope", "crossentropy"} <= set(fams) and ("quantize" in fams) == fp8
    c = step_cost(plan)
    launches = plan.batch.grad_accum * t.launches * K.KERNEL_LAUNCH_US * 1e-3
    assert sum(c.elementwise_ms.values()) + launches == pytest.approx(c.breakdown_ms["elementwise"])
    pred = predicted_family_ms(c)
    assert pred["gemm"] == c.breakdown_ms["matmul"] and pred["swiglu"] == c.elementwise_ms["swiglu"]
