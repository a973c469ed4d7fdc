"""An FP8 LM head as a plan option (precision.lm_head=fp8), on the CPU: the plan, memory table, schedule,
program and cost model; the bad inputs. The kernels and gradients: tests/gpu (test_kernels_crossentropy,
test_trainer)."""
import pytest

from llmqgen.codegen.render import render
from llmqgen.hardware.catalog import resolve_gpu
from llmqgen.hardware.spec import Inventory
from llmqgen.layout import FP8_SLOT_BYTES, HEAD_SLOTS, fp8_slot_index
from llmqgen.models.catalog import resolve_model
from llmqgen.plan.block import head_gemms
from llmqgen.plan.cost import step_cost
from llmqgen.plan.memory import memory_table
from llmqgen.plan.schedule import build_schedule, launched_kernels
from llmqgen.plan.schema import Precision
from llmqgen.plan.solver import solve
from llmqgen.plan.traffic import micro_step_traffic


def _solve(model="qwen2.5-0.5b", **pins):
    inv = Inventory(gpu=resolve_gpu("h200"), count=1, host_mem_bytes=256 << 30)
    return solve(resolve_model(model), inv, pins={"batch.micro_batch": 16, "lm_head_chunks": 2, **pins})


@pytest.fixture(scope="module")
def plans():
    return _solve(), _solve(**{"precision.lm_head": "fp8"})


def test_the_plan_names_the_head_and_keeps_everything_else(plans):
    bf16, fp8 = plans
    assert fp8.name == bf16.name.replace("-mb16", "-head-fp8-mb16")
    assert fp8.precision.fp8_head and not bf16.precision.fp8_head
    assert fp8.batch == bf16.batch and fp8.recompute == bf16.recompute


def test_a_bf16_precision_refuses_it():
    with pytest.raises(ValueError, match="FP8 LM head needs FP8"):
        Precision(matmul="bf16", gradient="bf16", lm_head="fp8")


@pytest.mark.parametrize("args,needle", [
    (["--dtype", "bf16", "--set", "precision.lm_head=fp8"],
     "runs the LM head as FP8 matmuls, and this plan has no FP8 matmuls (bf16 matmuls were asked for): drop it or "
     "ask for them with --dtype e4m3"),
    (["--gpus", "1xA100", "--set", "precision.lm_head=fp8"], "(NVIDIA A100-SXM4-80GB has no FP8 tensor cores): drop it"),
    (["--gpus", "1x3090", "--set", "precision.fast_accum=true"],
     "is a mode of FP8 matmuls, and this plan has no FP8 matmuls (NVIDIA GeForce RTX 3090 has no FP8 tensor cores)"),
    (["--set", "precision.lm_head=fp16"], "precision.lm_head takes one of bf16, fp8"),
    (["--set", "precision.fast_accum=maybe"], "takes true or false"),
    (["--set", "lm_head=fp8"], "did you mean precision.lm_head?"),
])
def test_bad_pins_get_one_line(plan_error, args, needle):
    assert needle in plan_error(args)


def test_memory_holds_the_e4m3_and_e5m2_copies(plans):
    bf16, fp8 = plans
    m, rows = fp8.model, {r.name: r for r in memory_table(fp8)}
    RC = fp8.batch.micro_batch * fp8.batch.seq_len // fp8.lm_head_chunks
    want = {"lmhead.w_q": (m.vocab_size, m.hidden_size), "lmhead.w_qt": (m.hidden_size, m.vocab_size),
            "lmhead.x_q": (RC, m.hidden_size), "lmhead.x_qt": (m.hidden_size, RC),
            "lmhead.dlogits_q": (RC, m.vocab_size), "lmhead.dlogits_qt": (m.vocab_size, RC)}
    for name, shape in want.items():
        assert tuple(rows[name].shape) == shape and rows[name].dtype in ("e4m3", "e5m2"), name
    assert not set(want) & {r.name for r in memory_table(bf16)}


def test_each_chunk_runs_fp8_gemms_on_its_e4m3_and_e5m2_copies(plans):
    bf16, fp8 = plans
    sched = build_schedule(fp8)
    head = sched["micro_step"]["head"]
    linears = [op for op in head if op["op"] == "linear"]
    assert len(linears) == 3 * fp8.lm_head_chunks
    assert all(op["dtype"] == "e4m3" for op in linears)
    assert {op.get("grad_dtype") for op in linears if op["pass"] != "forward"} == {"e5m2"}
    fwd, dgrad, wgrad = linears[:3]
    assert (fwd["x"], fwd["w"], fwd["x_scale"], fwd["w_scale"]) == (
        "lmhead.x_q", "lmhead.w_q", "fp8:head_x/descale", "fp8:head_w/descale")
    assert (dgrad["dy"], dgrad["w"], dgrad["dy_scale"]) == ("lmhead.dlogits_q", "lmhead.w_qt", "fp8:head_dy/descale")
    assert (wgrad["dy"], wgrad["x"], wgrad["dw"], wgrad["accumulate"]) == (
        "lmhead.dlogits_qt", "lmhead.x_qt", "grads.embedding", True)
    memset = next(op for op in head if op["op"] == "memset")     # current scaling: zeroed every micro-step
    assert memset["dst"] == f"stats.fp8+{fp8_slot_index(HEAD_SLOTS[0], 0, fp8.model.num_layers) * FP8_SLOT_BYTES}"
    assert memset["bytes"] == len(HEAD_SLOTS) * FP8_SLOT_BYTES
    kernels = launched_kernels(sched)
    assert {"llmq_crossentropy_stats", "llmq_crossentropy_dual"} <= kernels
    assert "llmq_crossentropy_fused" not in kernels
    # evaluation: the forward and the loss, no gradient
    assert [op.get("kernel") for op in sched["eval"]["head"]].count("llmq_crossentropy_dual") == 0
    assert "llmq_crossentropy_stats" in [op.get("kernel") for op in sched["eval"]["head"]]


def test_the_program_compiles_exactly_the_kernels_the_schedule_launches(plans):
    _, fp8 = plans
    program = render(fp8, "sm_90")
    names = {k.name for k in program.kernels}
    assert {"llmq_crossentropy_stats", "llmq_crossentropy_dual"} <= names
    assert "llmq_crossentropy_fused" not in names
    assert launched_kernels(build_schedule(fp8)) <= names


def test_the_cost_model_runs_the_head_at_the_fp8_rate(plans):
    bf16, fp8 = plans
    assert {g.dtype for g in head_gemms(fp8)} == {"e4m3"} and {g.dtype for g in head_gemms(bf16)} == {"bf16"}
    a, b = step_cost(bf16), step_cost(fp8)
    assert b.breakdown_ms["lm_head"] < 0.6 * a.breakdown_ms["lm_head"]
    assert b.tokens_per_s > a.tokens_per_s
    # the cross-entropy pair moves the fused kernel's bytes (two reads of the logits, two bytes written for
    # each), and reads each row's LSE and target again
    fa = dict(micro_step_traffic(bf16, build_schedule(bf16)).by_family)
    fb = dict(micro_step_traffic(fp8, build_schedule(fp8)).by_family)
    assert fb["crossentropy"] - fa["crossentropy"] == fp8.batch.micro_batch * fp8.batch.seq_len * 8


def test_the_precision_reason_names_the_head():
    plan = _solve()
    assert "--set precision.lm_head=fp8" in plan.estimate.reasons["precision"]
    pinned = _solve(**{"precision.lm_head": "fp8"})
    assert "FP8 LM head (BF16 LM head:" in pinned.estimate.reasons["precision"]
