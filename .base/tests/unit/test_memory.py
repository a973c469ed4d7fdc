"""The memory table against hand-computed byte counts, and its monotonicity."""
import pytest

from llmqgen.hardware.catalog import resolve_gpu
from llmqgen.hardware.spec import Inventory
from llmqgen.models.catalog import resolve_model
from llmqgen.plan.memory import RowKind, device_bytes, group_totals, host_bytes, memory_table, row_kind
from llmqgen.plan.schema import Batch, Offload, Plan, Recompute, Sharding

MiB = 2**20


def make_plan(model="0.5b", gpu="h200", count=1, mb=8, T=1024, **kw) -> Plan:
    return Plan(name="t", model=resolve_model(model),
                inventory=Inventory(gpu=resolve_gpu(gpu), count=count, host_mem_bytes=1 << 40),
                batch=Batch(micro_batch=mb, seq_len=T, grad_accum=1), **kw)


def test_llmq_reported_sizes_qwen25_05b_fp8():
    # LLMQ's printout for Qwen2.5-0.5B FP8 on one GPU: BF16 master of the matrix params 682 MiB,
    # FP8 + BF16 weights 601 MiB, BF16 gradients and Adam m, v 942 MiB each.
    g = group_totals(memory_table(make_plan()), "device")
    assert round(g["master"] / MiB) == 682            # 357,826,560 x 2 B = 682.49 MiB
    assert round(g["weights"] / MiB) == 601
    for k in ("grads", "adam_m", "adam_v"):
        assert round(g[k] / MiB) == 942


def test_hand_computed_rows_qwen25_05b():
    rows = {r.name: r for r in memory_table(make_plan(mb=4, T=512))}
    BT, C = 4 * 512, 896
    assert rows["weights.qkv"].bytes == 1152 * 896 and rows["weights.qkv"].count == 24  # e4m3, 256-aligned
    assert rows["weights.embedding"].bytes == 151936 * 896 * 2
    assert rows["act.res"].bytes == BT * C * 2 and rows["act.res"].lifetime == "per_layer"
    assert rows["act.ln1"].dtype == "e4m3" and rows["act.ln1"].bytes == BT * C
    assert rows["act.gu"].bytes == BT * 2 * 4864 * 2
    assert rows["act.lse"].bytes == 4 * 14 * 512 * 4
    assert rows["lmhead.logits"].bytes == BT * 151936 * 2
    assert all(r.bytes % 256 == 0 for r in rows.values())
    assert "master.embedding" not in rows          # bf16 embedding is its own master


def test_bf16_plan_keeps_no_separate_master():
    from llmqgen.plan.schema import Precision
    rows = {r.name for r in memory_table(make_plan(precision=Precision(matmul="bf16")))}
    assert not any(n.startswith("master.") for n in rows)
    assert not any(n.startswith("work.dy_q") for n in rows)


RECOMPUTE_STEPS = [{}, {"swiglu": True}, {"swiglu": True, "norm": True}, {"ffn": True, "norm": True},
                   {"ffn": True, "norm": True, "qkv": True}, {"ffn": True, "norm": True, "attention": True},
                   {"block": True}]


@pytest.mark.parametrize("model", ["0.5b", "qwen3-0.6b", "llama3.2-1b"])
def test_more_recompute_saves_activation_memory(model):
    acts = []
    for rc in RECOMPUTE_STEPS:
        rows = memory_table(make_plan(model, recompute=Recompute(**rc)))
        acts.append(sum(r.total for r in rows if r.name.startswith("act.")))
    assert all(a > b for a, b in zip(acts, acts[1:])), acts


def test_block_recompute_keeps_only_the_residual():
    rows = memory_table(make_plan(recompute=Recompute(block=True)))
    assert [r.name for r in rows if r.lifetime == "per_layer"] == ["act.res"]


@pytest.mark.parametrize("what", ["master", "adam_m", "adam_v", "residual", "quantized_weights", "gradients"])
def test_offload_moves_bytes_to_host(what):
    base = memory_table(make_plan())
    off = memory_table(make_plan(offload=Offload(**{what: True})))
    assert device_bytes(off) < device_bytes(base)
    assert host_bytes(off, 1) > host_bytes(base, 1)


def test_zero_levels_divide_by_gpu_count():
    full = group_totals(memory_table(make_plan("7b", count=4)), "device")
    z1 = group_totals(memory_table(make_plan("7b", count=4, sharding=Sharding.from_zero(1))), "device")
    z3 = group_totals(memory_table(make_plan("7b", count=4, sharding=Sharding.from_zero(3))), "device")
    assert z1["adam_m"] == pytest.approx(full["adam_m"] / 4, rel=1e-3)
    rows = lambda plan: {r.name: r for r in memory_table(plan)}  # noqa: E731
    assert rows(make_plan("7b", count=4, sharding=Sharding.from_zero(1)))["master.qkv"].total == \
        pytest.approx(rows(make_plan("7b", count=4))["master.qkv"].total / 4, rel=1e-3)
    assert z1["grads"] == full["grads"]
    # block gradients sharded (+ a 2-layer staging buffer); embedding and LM head stay whole
    assert z3["grads"] < full["grads"] / 2.5
    assert z3["weights"] < full["weights"]


def test_planned_total_is_the_sum_of_rows():
    rows = memory_table(make_plan())
    assert device_bytes(rows) == sum(r.bytes * r.count for r in rows if r.place == "device")


def test_every_row_has_a_kind_and_staging_names_what_it_stages():
    plan = make_plan("7b", count=2, sharding=Sharding.from_zero(3), recompute=Recompute(block=True),
                     offload=Offload(residual=True, master=True, adam_m=True, adam_v=True, gradients=True))
    names = {r.name for r in memory_table(plan)}
    for name in names:
        kind = row_kind(name)          # raises for a name of no kind
        if kind is RowKind.STAGE and name != "stage.tokens":
            staged = name.removeprefix("stage.")
            assert staged in names or f"act.{staged}" in names, name
