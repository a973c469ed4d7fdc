"""schedule.json: every reference is a row of the memory table, every kernel launch binds exactly the
kernel's arguments, and recompute operations open a layer's backward exactly for the recompute set."""
from pathlib import Path

import pytest

from llmqgen.codegen.render import render
from llmqgen.plan.schedule import build_schedule, check_schedule, iter_ops
from llmqgen.plan.memory import memory_table
from llmqgen.plan.schema import Plan, Recompute
from llmqgen.plan.refs import parse_ref

PLANS = sorted((Path(__file__).resolve().parents[2] / "plans").glob("*.json"))


def refs(op):
    fields = op.get("args", {}) | {k: v for k, v in op.items() if k not in ("args", "op", "phase")}
    values = [x for v in fields.values() for x in (v if isinstance(v, list) else [v])]
    values = [x[0] if isinstance(x, list) else x for x in values]      # [row, per_layer] entries
    for v in values:
        if isinstance(v, str) and "." in v and not v.startswith(("fp8:", "scalar:", "seed:")):
            yield v


@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.stem)
def test_references_and_arguments_resolve(path):
    plan = Plan.from_json(path.read_text())
    sched = build_schedule(plan)
    check_schedule(sched, render(plan, "sm_90").kernels)
    rows = {r.name: r for r in memory_table(plan)}
    L = plan.model.num_layers
    for op in iter_ops(sched):
        for ref in refs(op):
            for layer in range(L):          # the runtime's reading of the reference, at every layer
                name, idx, _, _ = parse_ref(ref, layer)     # ("[l-1]" at 0 sits in a branch never taken)
                assert name in rows, (op, ref)
            if ref.endswith("[l]"):      # layer l's instance, or the one shared row of a recomputed tensor
                assert rows[name].count == plan.model.num_layers or rows[name].lifetime == "shared", ref


def _plan(**rc):
    base = Plan.from_json(next(p for p in PLANS if p.stem == "qwen2.5-0.5b-fp8-1xh200").read_text())
    return base.model_copy(update={"recompute": Recompute(**rc), "estimate": None})


def _label(op):
    if op["op"] == "kernel":
        return op["kernel"]
    return f"linear:{op['layer_name']}" if op["op"] == "linear" else op["op"]


@pytest.mark.parametrize("rc,expect", [
    ({}, set()),
    ({"swiglu": True}, {"llmq_swiglu_forward_fp8"}),   # an FP8 plan: the forward's amax serves the rerun
    ({"norm": True}, {"llmq_rmsnorm_recompute_ln1", "llmq_rmsnorm_recompute_ln2"}),
    ({"ffn": True}, {"linear:gate_up", "llmq_swiglu_forward_fp8"}),
    ({"attention": True}, {"linear:qkv", "llmq_rope_forward", "attention_forward"}),
    ({"block": True}, {"llmq_rmsnorm_forward_ln1_first", "linear:qkv", "linear:attn_out", "linear:gate_up",
                       "attention_forward", "llmq_rmsnorm_forward_ln2"}),
])
def test_recompute_ops_open_the_backward(rc, expect):
    back = build_schedule(_plan(**rc))["micro_step"]["layer_backward"]
    recomputed = {_label(op) for op in back if op["phase"] == "recompute"}
    assert recomputed >= expect and bool(recomputed) == bool(expect)
    first = next(i for i, op in enumerate(back) if op["phase"] == "backward")
    assert all(op["phase"] == "recompute" for op in back[:first])
    assert all(op["phase"] == "backward" for op in back[first:])


@pytest.mark.parametrize("rc", [{"swiglu": True}, {"attention": True, "ffn": True}, {"block": True}])
def test_recompute_takes_no_amax_pass(rc):
    """Recompute is bit-identical and the FP8 slots are zeroed only as a micro-step starts: the forward's amax
    of a layer serves its rerun, and no amax-only kernel runs again in backward."""
    back = build_schedule(_plan(**rc))["micro_step"]["layer_backward"]
    rerun = [op["kernel"] for op in back if op["phase"] == "recompute" and op["op"] == "kernel"]
    assert rerun and not [k for k in rerun if k.startswith("llmq_amax_") or k.endswith("_amax")]


def test_weight_gradients_accumulate_and_scales_are_aligned_slots():
    sched = build_schedule(_plan())
    wgrads = [op for op in iter_ops(sched) if op["op"] == "linear" and op["pass"] == "wgrad"]
    assert len(wgrads) == 5 and all(op["accumulate"] for op in wgrads)
    for op in iter_ops(sched):
        for k, v in op.items():
            if k.endswith("_scale") and v is not None:
                assert v.startswith("fp8:") and v.endswith("/descale")
