"""Offload and one-GPU weight streaming on CPU: the schedule of every such plan binds, every reference
resolves, host rows are touched inside the block loop only by copies (to and from their device double
buffers), and — replaying the micro-step and the optimizer step symbolically — every device buffer holds
the very layer's data whenever an operation of that layer reads it (the skipped copies included)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
from harness import OFFLOAD_OPTIONS, small_plan  # noqa: E402

from llmqgen.codegen.render import render  # noqa: E402
from llmqgen.plan.schedule import build_schedule, check_schedule, iter_ops  # noqa: E402
from llmqgen.plan.memory import memory_table  # noqa: E402
from llmqgen.plan.schema import Offload, Sharding  # noqa: E402
from llmqgen.plan.refs import parse_ref  # noqa: E402

OPTIONS = {**OFFLOAD_OPTIONS,
           "everything": dict(offload=Offload(master=True, adam_m=True, adam_v=True, residual=True,
                                              quantized_weights=True, gradients=True),
                              sharding=Sharding.from_zero(3), grad_accum=2)}
CASES = [(arch, fp8, name) for arch, fp8 in (("qwen2", True), ("qwen3", False), ("llama", True))
         for name in OPTIONS]


def make(arch, fp8, name, **extra):
    return small_plan(arch, fp8, L=4, **OPTIONS[name], **extra)


def refs(op):
    fields = op.get("args", {}) | {k: v for k, v in op.items() if k not in ("args", "op", "phase")}
    values = [x for v in fields.values() for x in (v if isinstance(v, list) else [v])]
    values = [x[0] if isinstance(x, list) else x for x in values]
    return [v for v in values if isinstance(v, str) and "." in v and not v.startswith(("fp8:", "scalar:", "seed:"))]


@pytest.mark.parametrize("arch,fp8,name", CASES, ids=str)
def test_offload_schedule_binds_and_resolves(arch, fp8, name):
    plan = make(arch, fp8, name)
    sched = build_schedule(plan)
    check_schedule(sched, render(plan, "sm_90").kernels)
    rows = {r.name: r for r in memory_table(plan)}
    for op in iter_ops(sched):
        for ref in refs(op):
            for layer in set(range(plan.model.num_layers)) - set(op.get("skip_layers", ())):
                row, idx, _, _ = parse_ref(ref, layer)
                assert row in rows, (op, ref)
                assert idx is None or rows[row].count == 1 or 0 <= idx < rows[row].count or "[l-1]" in ref, (op, ref, layer)
        if op["op"] == "copy":          # between a row and its device buffer, one instance, equal sizes
            (a, _, _, _), (b, _, _, _) = parse_ref(op["dst"], 1), parse_ref(op["src"], 1)
            assert op["bytes"] <= min(rows[a].bytes, rows[b].bytes), op
            if a.startswith("stage.") or b.startswith("stage."):
                assert op["bytes"] == rows[a].bytes == rows[b].bytes, op
            if op["phase"] != "optimizer" and "host" in (rows[a].place, rows[b].place):   # publish: any
                assert {rows[a].place, rows[b].place} == {"host", "device"}, op
                assert (a if a.startswith("stage.") else b).startswith("stage."), op


@pytest.mark.parametrize("arch,fp8,name", CASES, ids=str)
def test_host_rows_only_through_copies_in_the_block_loop(arch, fp8, name):
    """Inside layer_forward/layer_backward a host row is only ever the end of a copy: the GEMMs, attention
    and pointwise kernels work on device buffers (zero-copy is left to whole-model tensors and the optimizer,
    which read their bytes once). Attention never sees a host row."""
    plan = make(arch, fp8, name)
    sched = build_schedule(plan)
    host = {r.name for r in memory_table(plan) if r.place == "host"}
    ms = sched["micro_step"]
    for section in ("layer_forward", "layer_backward"):
        for op in ms[section]:
            ops = op["first"] + op["rest"] if op["op"] == "branch_on_layer" else [op]
            for o in ops:
                touched = {parse_ref(r, 1)[0] for r in refs(o)} & host
                if o["op"] != "copy":
                    assert not touched, (section, o)
    for op in iter_ops(sched):
        if op["op"].startswith("attention"):
            assert not {parse_ref(r, 1)[0] for r in refs(op)} & host, op
    # the device buffers the table counts for offload are the ones the schedule uses
    used = {parse_ref(r, 1)[0] for op in iter_ops(sched) for r in refs(op)}
    stage = {r.name for r in memory_table(plan) if r.name.startswith("stage.") and r.place == "device"}
    assert stage <= used, stage - used


# --- symbolic replay: what each device buffer instance holds ----------------------------------------------
WRITERS = {("llmq_embedding_forward", "x"), ("llmq_rmsnorm_forward_ln1", "res_out")}
# arguments that update a buffer in place: gradients accumulated, the optimizer's states
UPDATES = {"dw", "dq_norm", "dk_norm", "db", "param", "grad", "m", "v"}


def _replay(plan):
    """Replays a step; asynchronous copies complete only at their copy_wait, when a later copy names
    them in `after`, or at the end of their run (the micro-step, the optimizer step). An operation may
    not read a buffer a copy in flight fills, nor write one a copy in flight reads or fills."""
    sched = build_schedule(plan)
    L, ms, opt = plan.model.num_layers, sched["micro_step"], sched["optimizer_step"]
    rows = {r.name: r for r in memory_table(plan)}
    held: dict[tuple[str, int], tuple] = {}      # (buffer row, instance) -> (what, layer) it holds
    flying: list[tuple[str, tuple, tuple, tuple]] = []     # (tag, dst, src, contents) of copies in flight
    checked = []

    def tag(t, layer):
        name, idx = t[:-1].split("[")
        return f"{name}[{eval(idx, {}, {'l': layer})}]"

    def land(done):
        for f in done:
            flying.remove(f)
            held[f[1]] = f[3]

    def expect(row, layer):     # what an operation of `layer` must find in the buffer `row`
        if row == "stage.res":
            return ("res", layer)
        return (row[len("stage."):], layer)          # stage.weights.qkv -> weights.qkv of this layer

    def free(key, writing):     # no copy in flight fills `key` (nor reads it, when the operation writes it)
        busy = [f for f in flying if f[1] == key or (writing and f[2] == key)]
        assert not busy, (key, busy)

    def run(ops, layer):
        for op in ops:
            if layer in op.get("skip_layers", ()):
                continue
            if op["op"] == "branch_on_layer":
                run(op["first"] if layer == 0 else op["rest"], layer)
                continue
            if op["op"] == "copy_wait":
                land([f for f in flying if f[0] == tag(op["tag"], layer)])
                continue
            if op["op"] == "copy":
                (d, di, _, _), (s, si, _, _) = parse_ref(op["dst"], layer), parse_ref(op["src"], layer)
                dkey, skey = (d, di or 0), (s, si or 0)
                land([f for f in flying if f[0] in {tag(t, layer) for t in op.get("after", ())}])
                free(skey, False)
                free(dkey, True)
                src = held.get(skey) if s.startswith("stage.") else (("res", si) if s == "act.res" else (s, si))
                if s.startswith("stage."):
                    assert src == expect(s, layer), (op, layer, src)
                if "stream" in op:
                    flying.append((tag(op["tag"], layer), dkey, skey, src))
                else:
                    held[dkey] = src
                continue
            args = op.get("args", {}) | {k: v for k, v in op.items() if k not in ("args", "op", "phase")}
            for arg, ref in args.items():
                if not (isinstance(ref, str) and "." in ref) or ref.startswith(("fp8:", "scalar:", "seed:")):
                    continue
                row, idx, _, _ = parse_ref(ref, layer)
                if not ref.startswith("stage."):        # e.g. publish reading a master a copy writes back
                    free((row, idx or 0), False)
                    continue
                if rows[row].place != "device" or row.startswith(("stage.tokens",)):
                    continue
                key = (row, idx or 0)
                if (op.get("kernel"), arg) in WRITERS or op["op"] == "memset":
                    free(key, True)
                    held[key] = ("res", layer if layer is not None else 0) if op["op"] != "memset" else expect(row, layer)
                    continue
                free(key, arg in UPDATES)
                assert held.get(key) == expect(row, layer), (op.get("kernel", op["op"]), arg, ref, layer, held.get(key))
                checked.append(row)

    for _ in range(plan.batch.grad_accum):
        run(ms["prologue"], None)
        for layer in range(L):
            run(ms["layer_forward"], layer)
        run(ms["head"], None)
        for layer in reversed(range(L)):
            run(ms["layer_backward"], layer)
        run(ms["epilogue"], None)
        land(list(flying))      # the micro-step's run ends with its copies
    run(opt["optimizer"], None)
    for layer in range(L):
        run(opt["layer_optimizer"], layer)
    assert not any(f[0].startswith("o_in") for f in flying)
    run(opt["publish"], None)
    for layer in range(L):
        run(opt["layer_publish"], layer)
    return checked


@pytest.mark.parametrize("name", list(OPTIONS), ids=str)
def test_buffers_hold_the_layer_that_reads_them(name):
    for arch, fp8 in (("qwen2", True), ("llama", False)):
        for L in (1, 2, 3, 4):
            plan = small_plan(arch, fp8, L=L, **OPTIONS[name])
            checked = set(_replay(plan))
            o, s = plan.offload, plan.sharding
            if o.residual:
                assert "stage.res" in checked
            if o.quantized_weights or s.weights:
                assert "stage.weights.qkv" in checked
            if o.gradients:
                assert "stage.grads.qkv" in checked
            if o.master:
                assert "stage.master.qkv" in checked


def test_residual_offload_keeps_every_layer_input_on_the_host():
    plan = small_plan("qwen2", True, L=3, offload=Offload(residual=True))
    rows = {r.name: r for r in memory_table(plan)}
    assert rows["act.res"].place == "host" and rows["act.res"].count == 3
    assert rows["stage.res"].place == "device" and rows["stage.res"].count == 2
    fwd = [op for op in build_schedule(plan)["micro_step"]["layer_forward"] if op["op"] == "copy"]
    assert [(op["dst"], op["src"]) for op in fwd] == [("act.res[l]", "stage.res[l%2]")]


def test_plan_rows_of_the_gpu_test_options_are_on_the_host():
    for name, want in (("master", "master.qkv"), ("adam_m", "adam_m.qkv"), ("adam_v", "adam_v.qkv"),
                       ("residual", "act.res"), ("quantized_weights", "weights.qkv"),
                       ("gradients", "grads.qkv"), ("streaming", "weights.qkv")):
        rows = {r.name: r for r in memory_table(make("qwen2", True, name))}
        assert rows[want].place == "host", name
