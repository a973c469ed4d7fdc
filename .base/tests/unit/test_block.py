"""The block table (plan/block.py) and what derives from it agree with the schedule: the cost model's GEMMs
per phase are the schedule's GEMM operations, every compiled kernel is launched by the schedule and every
launched kernel compiled, the saved-activation rows follow the recompute flags, and the recompute of each
flag is the operations that produce what it drops."""
import sys
from collections import Counter
from pathlib import Path

import pytest

from llmqgen.codegen.render import render
from llmqgen.plan.block import SAVED, head_gemms, layer_gemms, recomputed
from llmqgen.plan.memory import memory_table
from llmqgen.plan.schedule import OP_KERNELS, build_schedule, launched_kernels
from llmqgen.plan.schema import Offload, Plan, Recompute, Sharding

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.gpu.harness import OFFLOAD_OPTIONS, small_plan  # noqa: E402

CHECKED_IN = sorted((ROOT / "plans").glob("*.json")) + sorted((ROOT / "bench" / "plans").glob("*.json"))
FLAGS = ("swiglu", "norm", "ffn", "qkv", "attention", "block")


def _variants() -> dict[str, Plan]:
    plans = {p.stem: Plan.from_json(p.read_text()) for p in CHECKED_IN}
    for fp8 in (True, False):
        tag = "fp8" if fp8 else "bf16"
        for flag in FLAGS:
            plans[f"{flag}-{tag}"] = small_plan("qwen3", fp8=fp8, recompute=Recompute(**{flag: True}))
        plans[f"norm+qkv-{tag}"] = small_plan("qwen2", fp8=fp8, recompute=Recompute(norm=True, qkv=True))
        for name, kw in OFFLOAD_OPTIONS.items():
            plans[f"{name}-{tag}"] = small_plan("llama", fp8=fp8, **kw)
        for zero in range(4):
            plans[f"zero{zero}-{tag}"] = small_plan("qwen2", fp8=fp8, gpus=2, sharding=Sharding.from_zero(zero))
        plans[f"zero3-nccl-block-{tag}"] = small_plan("qwen3", fp8=fp8, gpus=4, sharding=Sharding.from_zero(3),
                                                      collectives="nccl", recompute=Recompute(block=True),
                                                      offload=Offload(residual=True), lm_head_chunks=2)
        plans[f"cudnn-{tag}"] = small_plan("llama", fp8=fp8, T=208)     # no flash attention at T % 64 != 0
    return plans


PLANS = _variants()


def _schedule_gemms(plan: Plan) -> Counter:
    """(phase, pass, name, M, N, K, dtype) of every linear operation of a micro-step, layers repeated."""
    s, L = build_schedule(plan), plan.model.num_layers
    out: Counter = Counter()
    for section, times in (("layer_forward", L), ("head", 1), ("layer_backward", L)):
        for op in s["micro_step"][section]:
            if op["op"] == "linear":
                out[(op["phase"], op["pass"], op["layer_name"], op["M"], op["N"], op["K"], op["dtype"])] += times
    return out


@pytest.mark.parametrize("name", sorted(PLANS))
def test_cost_model_gemms_are_the_schedules(name):
    plan = PLANS[name]
    L = plan.model.num_layers
    cost = Counter()
    for g in layer_gemms(plan) * L + head_gemms(plan):
        cost[(g.phase, g.pass_, g.name, g.M, g.N, g.K, g.dtype)] += 1
    assert cost == _schedule_gemms(plan)


def test_block_recompute_charges_what_the_schedule_reruns():
    plan = small_plan("qwen2", recompute=Recompute(block=True))
    rerun = {g.name for g in layer_gemms(plan) if g.phase == "recompute"}
    assert rerun == {"qkv", "attn_out", "gate_up"}          # not down: its output is the next block's input


@pytest.mark.parametrize("name", sorted(PLANS))
def test_every_compiled_kernel_is_launched_and_every_launched_one_compiled(name):
    plan = PLANS[name]
    compiled = {k.name for k in render(plan, plan.inventory.gpu.arch).kernels}
    launched = launched_kernels(build_schedule(plan))
    assert compiled - launched == set()
    flash = set(OP_KERNELS["attention_forward"] + OP_KERNELS["attention_backward"])
    missing = launched - compiled
    if flash & compiled:                       # no flash kernels: the runtime runs attention on cuDNN
        assert missing == set()
    else:
        assert missing <= flash


@pytest.mark.parametrize("flag", FLAGS)
def test_a_flag_drops_its_rows_and_reruns_their_producers(flag):
    plan = small_plan("qwen3", recompute=Recompute(**{flag: True}))
    r, rows = plan.recompute, {row.name: row for row in memory_table(plan)}
    dropped = {s.name for s in SAVED if s.dropped_by and getattr(r, s.dropped_by)}
    for s in SAVED:
        assert rows[f"act.{s.name}"].lifetime == ("shared" if s.name in dropped else "per_layer"), s.name
    written = {v for x in recomputed(r, True) for v in x.op.writes}
    assert dropped <= written
