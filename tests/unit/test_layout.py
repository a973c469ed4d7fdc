"""llmqgen/layout.py: the row layouts agree with themselves, the memory table and the kernel families."""
from pathlib import Path

import pytest

from llmqgen import layout as Y
from llmqgen.codegen.context import build_context
from llmqgen.codegen.families import adamw, gradnorm, load_families
from llmqgen.plan.memory import memory_table
from llmqgen.plan.schema import load_plan

PLANS = sorted((Path(__file__).resolve().parents[2] / "plans").glob("*.json"))


def test_fp8_slots_are_distinct_and_in_the_row():
    L = 3
    names = [*Y.ACT_SLOTS, *(f"w_{w}" for w in Y.WEIGHT_SLOTS)]
    idx = [Y.fp8_slot_index(n, layer, L) for n in names for layer in range(L)]
    idx += [Y.fp8_slot_index(n, 0, L) for n in (*Y.HEAD_SLOTS, "sink")]
    assert sorted(idx) == list(range(Y.fp8_slot_count(L)))
    # cuBLASLt reads the descale as a scale pointer: 16-byte aligned, inside the slot, apart from the amax
    assert Y.FP8_DESCALE_OFFSET % 16 == 0 and Y.FP8_SLOT_BYTES % 16 == 0
    assert Y.FP8_AMAX_OFFSET + 4 <= Y.FP8_DESCALE_OFFSET and Y.FP8_DESCALE_OFFSET + 4 <= Y.FP8_SLOT_BYTES
    with pytest.raises(ValueError):
        Y.fp8_slot_index("nope", 0, L)


def test_scalars_leave_room_for_the_arrays_kernels_write():
    s = Y.SCALARS
    # llmq_gradnorm_finalize writes its outputs in gradnorm.SLOT order from scalar:norm on
    assert [s["norm"], s["clip_scale"], s["nonfinite"], s["sumsq"]] == [s["norm"] + i for i in range(len(gradnorm.SLOT))]
    spans = sorted((i, len(adamw.HYPER) if n == "hyper" else 1) for n, i in s.items())
    assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:])), spans
    assert spans[-1][0] + spans[-1][1] <= Y.SCALAR_COUNT


def test_token_staging_is_the_rows_back_to_back():
    bt = 96
    rows = Y.token_rows(bt)
    staging = Y.token_staging(bt)
    assert [r for r, _, _ in staging] == list(rows)
    assert all(first == sum(n for _, _, n in staging[:i]) for i, (_, first, _) in enumerate(staging))
    assert Y.staging_elems(bt) == sum(rows.values())
    assert Y.num_unique_index(bt) == rows["tokens.segments"] - 1


@pytest.mark.parametrize("path,seq_len", [(p, None) for p in PLANS] + [(PLANS[0], 80)],
                         ids=lambda v: v.stem if isinstance(v, Path) else f"T={v}")
def test_scratch_rows_hold_what_the_kernels_need(path, seq_len):
    """work.norm_partials is the largest norm-weight partials a kernel writes; work.attn_delta exists
    exactly when the program has the flash-attention kernels (not for T=80: no multiple of its tile),
    and holds their delta."""
    plan = load_plan(path)
    if seq_len:
        plan = plan.model_copy(update={"batch": plan.batch.model_copy(update={"seq_len": seq_len})})
    rows = {r.name: r for r in memory_table(plan)}
    ctx = build_context(plan, plan.inventory.gpu.arch)
    metas = []
    for fam in load_families():
        if getattr(fam, "enabled", lambda c: True)(ctx):
            metas += [k.meta for k in fam.kernels({**ctx, **(fam.context(ctx) if hasattr(fam, "context") else {})})]
    partials = max(m["dw_scratch_bytes"] for m in metas if "dw_scratch_bytes" in m)
    assert rows["work.norm_partials"].bytes == Y.align(partials)
    delta = [m["delta_bytes"] for m in metas if "delta_bytes" in m]
    assert ("work.attn_delta" in rows) == bool(delta)
    if delta:
        assert rows["work.attn_delta"].bytes == Y.align(delta[0])


def test_align():
    assert [Y.align(n) for n in (0, 1, Y.ARENA_ALIGN, Y.ARENA_ALIGN + 1)] == [0, Y.ARENA_ALIGN, Y.ARENA_ALIGN,
                                                                          2 * Y.ARENA_ALIGN]
