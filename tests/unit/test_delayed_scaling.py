"""Delayed scaling as a plan option (precision.scaling=delayed), on the CPU: what the plan, memory table,
schedule, program and cost model hold; the bad inputs. The kernels and training: tests/gpu/test_delayed_scaling.py."""
import pytest

from llmqgen.codegen.render import render
from llmqgen.hardware.catalog import resolve_gpu
from llmqgen.hardware.spec import Inventory
from llmqgen.layout import FP8_SLOT_BYTES, act_slot_count
from llmqgen.models.catalog import resolve_model
from llmqgen.plan.memory import memory_table
from llmqgen.plan.schedule import build_schedule
from llmqgen.plan.schema import Precision
from llmqgen.plan.solver import solve
from llmqgen.plan.traffic import kernel_bytes, micro_step_traffic


def _plans(history=16):
    inv = Inventory(gpu=resolve_gpu("h200"), count=1, host_mem_bytes=256 << 30)
    model = resolve_model("qwen2.5-0.5b")
    pins = {"batch.micro_batch": 16}
    current = solve(model, inv, pins=pins)
    delayed = solve(model, inv, pins={**pins, "precision.scaling": "delayed",
                                      "precision.amax_history": history})
    return current, delayed


@pytest.fixture(scope="module")
def plans():
    return _plans(history=8)


def test_the_plan_names_its_recipe_and_keeps_everything_else(plans):
    current, delayed = plans
    assert delayed.name == current.name.replace("-mb16", "-delayed-ah8-mb16")
    assert delayed.precision.scaling == "delayed" and current.precision.scaling == "current"
    assert delayed.batch == current.batch and delayed.recompute == current.recompute


def test_memory_holds_the_history(plans):
    current, delayed = plans
    rows = {r.name: r for r in memory_table(delayed)}
    L = delayed.model.num_layers
    assert rows["stats.amax_history"].bytes == act_slot_count(L) * 8 * 4
    assert "stats.amax_history" not in {r.name for r in memory_table(current)}


def test_the_micro_step_closes_by_rolling_the_history_and_eval_leaves_it(plans):
    current, delayed = plans
    d, c = build_schedule(delayed), build_schedule(current)
    assert d["micro_step"]["epilogue"][-1] == {"op": "kernel", "kernel": "llmq_amax_roll", "phase": "backward",
                                                "args": {"stats": "stats.fp8", "history": "stats.amax_history"}}
    assert not any(op["op"] == "memset" for op in d["micro_step"]["prologue"])
    assert d["eval"]["head"][-1] == {"op": "kernel", "kernel": "llmq_amax_clear", "phase": "forward",
                                     "args": {"stats": "stats.fp8"}}
    assert d["eval"]["head"][:-1] == [op for op in d["micro_step"]["head"] if op["phase"] == "forward"]
    memset = c["micro_step"]["prologue"][0]      # current scaling: zeroed as each micro-step opens
    assert memset["op"] == "memset" and memset["bytes"] == act_slot_count(current.model.num_layers) * FP8_SLOT_BYTES
    assert c["eval"]["head"] == [op for op in c["micro_step"]["head"] if op["phase"] == "forward"]


def test_the_program_has_the_roll_and_the_warm_paths(plans):
    current, delayed = plans
    d, c = render(delayed, "sm_90"), render(current, "sm_90")
    assert "constexpr bool DELAYED = true;" in d.source and "constexpr bool DELAYED = false;" in c.source
    assert {"llmq_amax_roll", "llmq_amax_clear"} <= {k.name for k in d.kernels}
    assert not {"llmq_amax_roll", "llmq_amax_clear"} & {k.name for k in c.kernels}
    roll = next(k for k in d.kernels if k.name == "llmq_amax_roll")
    assert roll.meta == {"slots": act_slot_count(delayed.model.num_layers), "history": 8}
    assert "scaling=delayed (amax history 8)" in "\n".join(d.source.splitlines()[:12])


def test_the_cost_model_drops_exactly_the_amax_passes_and_the_norms_quantize(plans):
    current, delayed = plans
    t_cur = micro_step_traffic(current, build_schedule(current))
    t_del = micro_step_traffic(delayed, build_schedule(delayed))
    rule = kernel_bytes(current)
    sched = build_schedule(current)["micro_step"]
    layer_ops = [op for sec in ("layer_forward", "layer_backward") for op in sched[sec] if op["op"] == "kernel"]
    layer_kernels = [op["kernel"] for op in layer_ops]
    passes = [k for k in layer_kernels if "amax" in k]
    assert sorted(passes) == sorted(["llmq_swiglu_forward_amax", "llmq_swiglu_backward_amax",
                                     *(k for k in passes if k.startswith("llmq_amax_"))])
    assert len([k for k in passes if k.startswith("llmq_amax_")]) == 2      # attention output, d_down
    m, b = current.model, current.batch
    L, BT, C = m.num_layers, b.micro_batch * b.seq_len, m.hidden_size
    ln_quantize = [op["kernel"] for op in layer_ops if op["args"].get("out") in ("act.ln1[l]", "act.ln2[l]")]
    assert len(ln_quantize) == 2
    removed = sum(rule(k) for k in passes + ln_quantize) + 2 * BT * C       # norms: y in 1 byte, not 2
    roll = kernel_bytes(delayed)("llmq_amax_roll")
    assert t_cur.bytes - L * removed + roll - act_slot_count(L) * FP8_SLOT_BYTES == t_del.bytes
    assert t_del.launches == t_cur.launches          # the skipped kernels still launch (and return at once)
    assert delayed.estimate.tokens_per_s > 1.05 * current.estimate.tokens_per_s


def test_warm_norms_write_e4m3_and_their_quantize_runs_cold_only(plans):
    _, delayed = plans
    layer = build_schedule(delayed)["micro_step"]["layer_forward"]
    kernels = [op for op in layer if op["op"] == "kernel"]
    ln2 = next(op for op in kernels if op["kernel"] == "llmq_rmsnorm_forward_ln2")
    assert ln2["args"]["y"] == "work.ln" and ln2["args"]["y_q"] == "act.ln2[l]"
    assert any(op["kernel"].startswith("llmq_quantize_cold_") and op["args"]["out"] == "act.ln2[l]" for op in kernels)
    assert not any(op["kernel"].startswith("llmq_quantize_") and not op["kernel"].startswith("llmq_quantize_cold_")
                   and op["args"].get("out", "").startswith("act.ln") for op in kernels)


def test_bf16_plans_have_no_recipe():
    with pytest.raises(ValueError, match="delayed scaling is a recipe for FP8 matmuls"):
        Precision(matmul="bf16", scaling="delayed")


@pytest.mark.parametrize("args,needle", [
    (["--set", "precision.amax_history=8"], "add --set precision.scaling=delayed"),
    (["--dtype", "bf16", "--set", "precision.scaling=delayed"],
     "scales FP8 matmuls, and this plan has no FP8 matmuls (bf16 matmuls were asked for): drop it or ask for them "
     "with --dtype e4m3"),
    (["--gpus", "1x3090", "--set", "precision.scaling=delayed"],
     "has no FP8 matmuls (NVIDIA GeForce RTX 3090 has no FP8 tensor cores): drop it"),
    (["--set", "precision.scaling=delayed", "--set", "precision.amax_history=0"], "takes an integer 1..1024"),
    (["--set", "precision.scaling=delayed", "--set", "precision.amax_history=2000"], "takes an integer 1..1024"),
    (["--set", "precision.scaling=late"], "precision.scaling takes one of current, delayed"),
    (["--set", "scaling=delayed"], "did you mean precision.scaling?"),
])
def test_bad_recipe_pins_get_one_line(plan_error, args, needle):
    assert needle in plan_error(args)


def test_each_recipe_names_the_other_and_its_predicted_difference(plans):
    current, delayed = plans
    gain = 100 * (current.estimate.step_ms / _estimate_with(current, "delayed") - 1)
    assert (f"; current scaling (--set precision.scaling=delayed: {gain:.1f}% faster predicted, amax from history)"
            in current.estimate.reasons["precision"])
    slower = -100 * (delayed.estimate.step_ms / _estimate_with(delayed, "current") - 1)
    assert (f"pinned by the user, the rest chosen (1979 vs 989 TFLOP/s BF16 on NVIDIA H200); delayed scaling, amax "
            f"history 8 micro-steps (current scaling: {slower:.1f}% slower predicted)"
            in delayed.estimate.reasons["precision"])


def _estimate_with(plan, scaling):
    from llmqgen.plan.cost import step_cost
    return step_cost(plan.model_copy(update={"precision": plan.precision.model_copy(update={"scaling": scaling})})
                     ).step_ms


def test_pinning_current_scaling_suggests_nothing():
    inv = Inventory(gpu=resolve_gpu("h200"), count=1, host_mem_bytes=256 << 30)
    plan = solve(resolve_model("qwen2.5-0.5b"), inv, pins={"precision.scaling": "current"})
    assert "delayed" not in plan.estimate.reasons["precision"] and "current" not in plan.name  # the default
