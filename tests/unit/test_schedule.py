"""schedule.json: every buffer it names is a row of the memory table, every kernel is in the program,
and recompute operations appear in backward exactly for the plan's recompute set."""
import re
from pathlib import Path

import pytest

from llmqgen.codegen.render import render
from llmqgen.codegen.schedule import build_schedule, iter_ops
from llmqgen.plan.memory import memory_table
from llmqgen.plan.schema import Plan, Recompute

PLANS = sorted((Path(__file__).resolve().parents[2] / "plans").glob("*.json"))


def buffers(op):
    refs = list(op.get("buffers", {}).values()) + [op[k] for k in ("a", "b", "d", "bias") if k in op]
    return [re.sub(r"\[l\]$", "", r) for r in refs]


@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.stem)
def test_names_resolve(path):
    plan = Plan.from_json(path.read_text())
    sched = build_schedule(plan)
    rows = {r.name: r for r in memory_table(plan)}
    kernels = {k.name for k in render(plan, "sm_90").kernels}
    for op in iter_ops(sched):
        for b in buffers(op):
            assert b in rows, (op, b)
        if op["op"] == "kernel":
            assert op["kernel"] in kernels, op
    # per-layer rows are indexed by layer, shared rows are not
    for op in sched["micro_step"]["layer_forward"]:
        for ref in op.get("buffers", {}).values():
            name = ref.removesuffix("[l]")
            assert ref.endswith("[l]") == (rows[name].count > 1 and rows[name].lifetime != "shared"), ref


def _plan(**rc):
    base = Plan.from_json(PLANS[[p.stem for p in PLANS].index("qwen2.5-0.5b-fp8-1xh200")].read_text())
    return base.model_copy(update={"recompute": Recompute(**rc), "estimate": None})


@pytest.mark.parametrize("rc,expect", [
    ({}, set()),
    ({"swiglu": True}, {"llmq_swiglu_forward"}),
    ({"norm": True}, {"llmq_rmsnorm_recompute_ln1", "llmq_rmsnorm_recompute_ln2"}),
    ({"ffn": True}, {"gemm:gate_up", "llmq_swiglu_forward"}),
    ({"attention": True}, {"gemm:qkv", "llmq_rope_forward", "attention_forward"}),
    ({"block": True}, {"gemm:qkv", "gemm:attn_out", "gemm:gate_up", "gemm:down", "attention_forward"}),
])
def test_recompute_ops_open_the_backward(rc, expect):
    sched = build_schedule(_plan(**rc))
    back = sched["micro_step"]["layer_backward"]
    re_ops = [op for op in back if op["phase"] == "recompute"]
    names = {op.get("kernel") or (f"gemm:{op['gemm']}" if op["op"] == "gemm" else op["op"]) for op in re_ops}
    assert expect <= names and (not expect) == (not re_ops)
    first_backward = next(i for i, op in enumerate(back) if op["phase"] == "backward")
    assert all(op["phase"] == "recompute" for op in back[:first_backward])
    assert all(op["phase"] == "backward" for op in back[first_backward:])


def test_weight_gradients_accumulate_over_micro_steps():
    sched = build_schedule(_plan())
    wgrads = [op for op in iter_ops(sched) if op["op"] == "gemm" and op["gemm"].endswith("wgrad")]
    assert len(wgrads) == 5 and all(op["accumulate"] for op in wgrads)
