"""Packing by lifetime, checked against the whole schedule of several plans (CPU).

The check does not trust the liveness analysis: it replays the step (two micro-steps, the optimizer,
a third micro-step) over the packed arena, treats every touch of a row as a write of all its bytes,
and fails if an operation reads a row whose bytes another row touched since this row's own last touch,
names two rows that share bytes, or touches bytes an overlapped collective still has in flight."""
import pytest

from llmqgen.plan.schedule import build_schedule
from llmqgen.plan.touches import op_touches
from llmqgen.hardware.inventory import parse_inventory
from llmqgen.models.catalog import resolve_model
from llmqgen.plan import lifetimes
from llmqgen.plan.lifetimes import (MICRO, OPTIM, arena_offsets, interference, packed_table, segments,
                                    step_order)
from llmqgen.plan.memory import arena_peak, device_bytes, memory_table
from llmqgen.plan.schema import Plan
from llmqgen.plan.solver import solve
from llmqgen.runtime.arena import arena_bytes, layout
from llmqgen.plan.refs import resolve_tag


def _plan(model, gpus, pins=None, host="256G", **kw) -> Plan:
    return solve(resolve_model(model), parse_inventory(gpus, host_mem=host), pins=pins or {}, **kw)


PLANS = {
    "0.5b-fp8-1gpu": lambda: _plan("qwen2.5-0.5b", "1xH200"),
    "7b-fp8-1x4090-block": lambda: _plan("qwen2.5-7b", "1x4090", {"recompute.block": True,
                                                                  "batch.micro_batch": 16}, host="128G"),
    "0.5b-fp8-2gpu-zero3": lambda: _plan("qwen2.5-0.5b", "2xH200", {"sharding.weights": True}),
    "1.5b-fp8-2x4090-zero2": lambda: _plan("qwen2.5-1.5b", "2x4090", {"sharding.gradients": True}, host="128G"),
    "7b-fp8-1x4090-mb16-offload": lambda: _plan("qwen2.5-7b", "1x4090", {"batch.micro_batch": 16}, host="128G"),
    "7b-fp8-1x4060ti-offload": lambda: _plan("qwen2.5-7b", "1x4060ti", host="128G"),
    "qwen3-0.6b-bf16-recompute": lambda: _plan("qwen3-0.6b", "1x4090", {"recompute.ffn": True, "lm_head_chunks": 4,
                                                                        "recompute.attention": True},
                                               host="64G", dtype="bf16"),
}


@pytest.fixture(scope="module", params=sorted(PLANS))
def planned(request):
    plan = PLANS[request.param]()
    return plan, packed_table(plan)


def _replay(plan: Plan, rows) -> int:
    """Replays micro, micro, optimizer, micro over the packed arena; returns the operations checked."""
    sched = build_schedule(plan)
    span = {r.name: (r.offset, r.offset + r.total) for r in rows if r.place == "device" and r.offset is not None}

    def clash(a, b):
        return a != b and span[a][0] < span[b][1] and span[b][0] < span[a][1]

    ops = list(step_order(sched))
    micro = [o for o in ops if o[0] in MICRO]
    optim = [o for o in ops if o[0] in OPTIM]
    valid = set(span)                 # loaded / zeroed at start: every row holds its value
    flight: list[tuple[str, set[str]]] = []      # (tag, rows) of overlapped collectives and copies in flight
    checked = 0
    for seq in (micro, micro, optim, micro):
        for sec, layer, op in seq:
            if op["op"] in ("await", "copy_wait"):
                tag = resolve_tag(op["tag"], layer)
                flight = [(t, rs) for t, rs in flight if t != tag]
                continue
            if op["op"] == "copy" and op.get("after"):      # those copies have landed before this one starts
                done = {resolve_tag(t, layer) for t in op["after"]}
                flight = [(t, rs) for t, rs in flight if t not in done]
            touched = {n: k for n, k in op_touches(op).items() if n in span}
            for a in touched:          # one operation's rows: read while others are written
                for b in touched:
                    assert not clash(a, b), f"{a} and {b} share bytes in one operation of {sec}[{layer}]"
            for name, kind in touched.items():
                if kind == "r":
                    assert name in valid, f"{op.get('kernel', op['op'])} in {sec}[{layer}] reads {name}, " \
                                          f"whose bytes another row has touched since"
                for _, rs in flight:
                    for f in rs:
                        assert f == name or not clash(f, name), \
                            f"{name} touched in {sec}[{layer}] while {f} is in flight"
            for name in touched:
                valid.add(name)
                valid -= {o for o in valid if clash(o, name)}
            if op.get("overlap") or (op["op"] == "copy" and "stream" in op):
                flight.append((resolve_tag(op["tag"], layer), set(touched)))
            checked += 1
        flight = []                   # a run ends with its copies; the trainer drains the collectives
    return checked


def test_replay_never_reads_clobbered_bytes(planned):
    plan, rows = planned
    assert _replay(plan, rows) > 0


def test_live_rows_never_share_bytes(planned):
    """At every operation of the full step order, the rows live there (their segments, from the whole
    schedule, not the reduced one the packing used) occupy disjoint bytes; every packed row an operation
    names is live at it."""
    plan, rows = planned
    sched = build_schedule(plan)
    segs, n = segments(sched, rows)
    dev = {r.name: r for r in rows if r.place == "device" and r.lifetime != "reserve"}
    _, packed = lifetimes.plan_interference(plan, rows)[1:]
    assert {r for r in packed if r in dev} == {r for r in segs if r in dev}, "reduced and full walks disagree"
    live_at: list[list[str]] = [[] for _ in range(n)]
    for name, ss in segs.items():
        if name in dev:
            for a, b in ss:
                for i in range(a, b + 1):
                    live_at[i].append(name)
    whole = [r for r in dev if r not in segs]
    for i, (sec, layer, op) in enumerate(step_order(sched)):
        for name in op_touches(op):
            if name in segs and name in dev:
                assert name in live_at[i], f"{name} is named by operation {i} ({sec}) but not live there"
        spans = sorted((dev[m].offset, dev[m].offset + dev[m].total, m) for m in live_at[i] + whole)
        for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
            assert a1 <= b0, f"{an} and {bn} are both live at operation {i} ({sec}) and share bytes"


def test_peak_at_most_sum_and_arena_follows_plan(planned):
    plan, rows = planned
    unpacked = memory_table(plan)
    assert arena_peak(rows) <= arena_peak(unpacked)
    assert device_bytes(rows) <= device_bytes(unpacked)
    assert plan.estimate.device_bytes == device_bytes(rows)
    slots = layout(rows, "device")
    assert arena_bytes(slots) == arena_peak(rows)
    for r in rows:
        if r.name in slots:
            assert slots[r.name].offset == r.offset and r.offset % 256 == 0


def test_packing_is_deterministic(planned):
    plan, rows = planned
    lifetimes._CACHE.clear()
    lifetimes._PACKED.clear()
    assert packed_table(plan) == rows
    assert arena_offsets(plan, memory_table(plan)) == arena_offsets(plan, memory_table(plan))


def test_reduced_walk_gives_the_full_interference(planned):
    """The packing reads interference off a schedule of MODEL_LAYERS layers and MODEL_CHUNKS LM-head
    chunks: it must equal the full schedule's, restricted to the device rows."""
    plan, rows = planned
    dev = {r.name for r in rows if r.place == "device"}
    full = interference({n: s for n, s in segments(build_schedule(plan), rows)[0].items() if n in dev})
    _, reduced, _ = lifetimes.plan_interference(plan, rows)
    assert {n: set(v) & dev for n, v in reduced.items() if n in dev} == full


def test_block_recompute_on_a_4090_packs_layer_scratch():
    plan = PLANS["7b-fp8-1x4090-block"]()
    rows = plan.estimate.memory
    assert arena_peak(rows) < arena_peak(memory_table(plan)) - (4 << 30)   # LLMQ runs it in 24 GB
    assert any(r.live for r in rows)


def test_written_kernel_arguments_are_not_const():
    """KERNEL_WRITES names arguments the kernels only write: their C type must be a non-const pointer."""
    from llmqgen.codegen.context import build_context
    from llmqgen.codegen import families as family_names
    from llmqgen.codegen.families import load_families
    from llmqgen.plan.touches import KERNEL_WRITES
    for key in ("0.5b-fp8-1gpu", "qwen3-0.6b-bf16-recompute"):
        plan = PLANS[key]()
        ctx = build_context(plan, plan.inventory.gpu.arch)
        seen = 0
        for fam in load_families(list(family_names.FAMILIES)):
            if hasattr(fam, "enabled") and not fam.enabled(ctx):
                continue
            extra = fam.context(ctx) if hasattr(fam, "context") else {}
            for k in fam.kernels({**ctx, **extra}):
                writes = next((w for p, w in KERNEL_WRITES.items() if k.name.startswith(p)), ())
                for arg, ctype in k.args:
                    if arg in writes:
                        seen += 1
                        assert "*" in ctype and "const" not in ctype, f"{k.name}: {arg} is {ctype}"
        assert seen > 10
