"""The runtime's binding of a build folder, on the CPU: the real Trainer, Ranks and copy-engine collectives
load the golden build (tests/golden_build.py) over a stand-in driver (tests/standin_driver.py) and issue
whole steps. Checked: every schedule operation binds; the arenas are the folder's layout; every pointer
lies in its rank's arenas and each kernel argument at its row's planned offset; launches name kernels of
kernels.json with their signature's arguments; copies stay within rows; one micro-step issues the
schedule's operations in its order, and its CUDA graph replays the same calls."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import standin_driver  # noqa: E402  (before the runtime: it stubs nvmath)
from golden_build import GOLDEN, golden_plan  # noqa: E402

from llmqgen.compile.build_folder import load  # noqa: E402
from llmqgen.data.loader import TokenBatch, embedding_backward_index  # noqa: E402
from llmqgen.plan.lifetimes import MICRO, OPTIM, step_order  # noqa: E402
from llmqgen.plan.memory import DTYPE_BYTES  # noqa: E402
from llmqgen.plan.refs import parse_ref  # noqa: E402
from llmqgen.runtime.trainer import Trainer  # noqa: E402

COPIES = ("memcpy", "memcpy_htod", "memcpy_dtoh", "memcpy_dtod", "memset_d8", "memset_d32")


@pytest.fixture
def run(monkeypatch):
    drv = standin_driver.install(monkeypatch)
    folder = load(GOLDEN, golden_plan(), compiled=False)
    tr = Trainer(folder.plan, build=folder, devices=[0, 1], attention="flash")
    yield tr, drv, folder
    tr.close()


def batch(plan, seed=0) -> TokenBatch:
    B, T = plan.batch.micro_batch, plan.batch.seq_len
    tokens = np.random.default_rng(seed).integers(0, plan.model.vocab_size, (B, T + 1), dtype=np.int32)
    inputs, targets = np.ascontiguousarray(tokens[:, :-1]), np.ascontiguousarray(tokens[:, 1:])
    return TokenBatch(inputs, targets, *embedding_backward_index(inputs))


def whole_step(tr):
    """Load, a training step (one micro-batch per rank), the optimizer step and an evaluation."""
    plan = tr.plan
    tr._execute([rk.load_program() for rk in tr.ranks])
    tr.accumulate([batch(plan, r) for r in range(plan.num_gpus)])
    assert tr.optimizer_step(1e-3) == 0.0          # the stand-in's kernels compute nothing: a zero norm
    tr.eval_loss([batch(plan, r) for r in range(plan.num_gpus)])


def rank_of(tr):
    """Every stream of every rank -> the rank."""
    return {s: rk for rk in tr.ranks
            for s in (rk.stream, rk.comm_stream, rk.send_stream, *rk.copy_streams.values())}


def row_spans(rk):
    """(start, end) of every row of the rank's arenas, as the GPU addresses them."""
    return [(arena.device_base + s.offset, arena.device_base + s.offset + s.total)
            for arena in (rk.mem, rk.host) for s in arena.slots.values()]


def in_arenas(rk, p, n=1):
    return any(a.device_base <= p and p + n <= a.device_base + a.nbytes for a in (rk.mem, rk.host))


def planned_ptr(folder, rk, ref, layer):
    """A row reference's address from the folder's layout alone: row offset, instance, byte offset, shard."""
    name, idx, off, shard = parse_ref(ref, layer)
    row = folder.rows[name]
    arena = rk.mem if row.place == "device" else rk.host
    offset = row.offset if row.place == "device" else arena.slots[name].offset   # host rows: table order
    p = arena.device_base + offset + (idx if idx is not None and row.count > 1 else 0) * row.bytes + off
    return p + (rk.rank * folder.shard_elems[name.rsplit(".", 1)[1]] * DTYPE_BYTES[row.dtype] if shard else 0)


def is_row_ref(v):
    return isinstance(v, str) and "." in v and not v.startswith(("fp8:", "scalar:"))


def expected_calls(folder, op):
    """(kind, kernel) of the driver calls a schedule operation issues on its rank's own streams."""
    kind = op["op"]
    if kind == "kernel":
        return [("launch", op["kernel"])]
    if kind.startswith("attention_"):                    # flash attention: the kernels of the operation's role
        return [("launch", k.name) for k in folder.by_role(kind)]
    return {"linear": [("gemm", "")], "bias_grad": [("gemm", "")], "memset": [("memset_d8", "")],
            "copy": [("memcpy", "")]}.get(kind, [])      # waits, collectives: no call of their own here


def test_every_operation_binds_and_the_arenas_are_the_folders_layout(run):
    tr, drv, folder = run
    order = list(step_order(folder.schedule))
    branch = {id(o): op for _, ops in folder.schedule["micro_step"].items() for op in ops      # a layer's branch
              if op["op"] == "branch_on_layer" for o in op["first"] + op["rest"]}            # is one bound op
    for rk in tr.ranks:
        for name, row in folder.rows.items():
            if row.lifetime == "reserve":
                continue
            arena = rk.mem if row.place == "device" else rk.host
            slot = arena.slot(name)
            assert (slot.bytes, slot.count) == (row.bytes, row.count)
            if row.place == "device":
                assert slot.offset == row.offset, name
        assert rk.mem.nbytes == max(r.offset + r.total for r in folder.rows.values() if r.offset is not None)
        gradnorm = folder.schedule["optimizer_step"]["gradnorm"]
        for program, want in ((rk.micro, [branch.get(id(op), op) for sec, _, op in order if sec in MICRO]),
                              (rk.optimizer_program, [op for sec, _, op in order if sec in OPTIM]),
                              (rk.norm_program, gradnorm)):
            bound = [op for item in program for op in (item[2] if item[0] == "ops" else [item[1]])]
            assert [id(op) for op in bound] == [id(op) for op in want] and want
        rk.eval_program(), rk.load_program()


def test_one_micro_step_issues_the_schedule_in_order_at_the_planned_offsets(run):
    tr, drv, folder = run
    drv.calls.clear()
    tr.accumulate([batch(tr.plan, r) for r in range(tr.plan.num_gpus)])
    micro = [(layer, op) for sec, layer, op in step_order(folder.schedule) if sec in MICRO]
    for rk in tr.ranks:
        own = {rk.stream, *rk.copy_streams.values()}
        warm = [c for c in drv.calls if c.stream in own and not c.captured
                and c.kind in ("launch", "gemm", "memcpy", "memset_d8")]
        want = [(layer, op, call) for layer, op in micro for call in expected_calls(folder, op)]
        assert [(c.kind, c.name) for c in warm] == [call for _, _, call in want]
        captured = [c for c in drv.calls if c.stream in own and c.captured]
        assert [(c.kind, c.name, c.args) for c in captured] == [(c.kind, c.name, c.args) for c in warm]
        for c, (layer, op, _) in zip(warm, want):
            if op["op"] == "kernel":
                k = folder.kernels[op["kernel"]]
                for (arg, _), value in zip(k.args, c.args):
                    ref = op["args"][arg]
                    if is_row_ref(ref):
                        assert value == planned_ptr(folder, rk, ref, layer), (op["kernel"], arg, ref, layer)
                    elif isinstance(ref, str) and ref.startswith(("fp8:", "scalar:")):
                        stats = "stats.fp8" if ref.startswith("fp8:") else "stats.scalars"
                        lo = planned_ptr(folder, rk, stats, None)
                        assert lo <= value < lo + folder.rows[stats].total, (op["kernel"], ref)
            elif op["op"] in ("copy", "memset"):
                assert (c.dst, c.nbytes) == (planned_ptr(folder, rk, op["dst"], layer), op["bytes"])
                if op["op"] == "copy":
                    assert c.src == planned_ptr(folder, rk, op["src"], layer)
    drv.calls.clear()                                    # the next micro-step replays the captured graphs
    tr.accumulate([batch(tr.plan, r) for r in range(tr.plan.num_gpus)])
    again = [c for c in drv.calls if c.kind in ("launch", "gemm") and c.stream == tr.ranks[0].stream]
    assert again and all(c.replayed for c in again)


def test_launches_copies_and_pointers_of_a_whole_step(run):
    tr, drv, folder = run
    drv.calls.clear()
    whole_step(tr)
    owner = rank_of(tr)
    launched = set()
    for c in drv.calls:
        rk = owner[c.stream]
        if c.kind == "launch":
            k = folder.kernels[c.name]
            assert list(c.types) == [t for _, t in k.args] and len(c.args) == len(k.args), c.name
            for value, ctype in zip(c.args, c.types):
                if ctype.endswith("*") and value:            # null: an argument the kernel ignores
                    assert in_arenas(rk, value), (c.name, ctype)
            launched.add(c.name)
        elif c.kind == "gemm":
            assert all(in_arenas(rk, p) for p in c.args if p), c.args
        elif c.kind in COPIES:
            spans = row_spans(rk)
            sides = [c.dst] + ([c.src] if c.kind.startswith("memcpy") else [])
            for p in sides:
                if in_arenas(rk, p) or c.kind in ("memcpy", "memcpy_dtod"):   # else a numpy array of the host
                    assert any(a <= p and p + c.nbytes <= b for a, b in spans), (c.kind, c.nbytes)
    roles = ("reduce_scatter", "all_reduce_max", "gradnorm_partials", "gradnorm_finalize", "attention_forward",
             "attention_backward", "adamw")
    assert {k.name for role in roles for k in folder.by_role(role)} <= launched
    scheduled = {op["kernel"] for _, _, op in step_order(folder.schedule) if op["op"] == "kernel"}
    assert scheduled <= launched


def test_a_trainer_refuses_the_folder_of_another_plan(monkeypatch):
    standin_driver.install(monkeypatch)
    folder = load(GOLDEN, golden_plan(), compiled=False)
    other = golden_plan().model_copy(update={"name": "another"})
    with pytest.raises(ValueError, match="holds plan tiny-qwen2-fp8, not plan another: pass the folder of this plan"):
        Trainer(other, build=folder, devices=[0, 1], attention="flash")
