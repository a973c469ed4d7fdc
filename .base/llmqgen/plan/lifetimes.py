"""Lifetimes of the memory table's rows, read off the schedule, and the device arena packed by them.

The step order is the schedule's sections as the runtime issues them: a micro-step (prologue,
layer_forward for l = 0..L-1, head, layer_backward for l = L-1..0, epilogue), then the optimizer step
(optimizer, layer_optimizer, publish, layer_publish, gather). Micro-steps repeat and the step repeats,
so a value that crosses the end of this order (gradients, weights, anything the host writes) lives
for the whole step.

Every operation touches rows (its references, touches.op_touches): a *write* of a whole row that the
operation does not also read kills the row's old value; any other touch reads it. A transient row
(lifetime shared or per_layer, on the device) is live in segments, each from a killing write to the
last read before the next killing write; an overlapped collective or an asynchronous copy (other
streams) keeps what it touches live until the computation awaits its tag (or to the end of its run:
the micro-step's end, where the trainer drains the rest, or the optimizer step's). Rows of several instances (per-layer activations, double buffers) get one segment
from their first touch to their last. Where the analysis cannot tell (a row read before any write in
the step, a row no operation names), the row lives for the whole step: correctness first.

Packing: rows that live for the whole step are laid out first, in table order; then the other rows,
largest first (ties: table order), each at the best-fitting gap among the rows whose segments
overlap its own (256-byte aligned: every row's size is). The arena is the packed peak.

Interference is computed on the schedule of the same plan with MODEL_LAYERS layers: every middle
layer repeats the same pattern, so fewer layers give the same pairs (tests/unit/test_lifetimes.py walks
the full schedule of several plans and checks the packing at every operation). It is cached per
structure: candidates that differ only in batch size share it.
"""
from __future__ import annotations

import json
from bisect import bisect_right

from .memory import device_bytes, memory_table
from .refs import resolve_tag
from .schedule import build_schedule
from .schema import MemRow, Plan
from .touches import op_touches

MODEL_LAYERS = 6          # layers of the schedule whose interference stands for any number of layers
MODEL_CHUNKS = 2          # LM-head chunks likewise
TRANSIENT = ("shared", "per_layer")
MICRO = ("prologue", "layer_forward", "head", "layer_backward", "epilogue")
OPTIM = ("optimizer", "layer_optimizer", "publish", "layer_publish", "gather")


def step_order(sched: dict):
    """(section, layer, op) of every operation of a training step, in issue order (one micro-step)."""
    L = sched["layers"]
    layers = {"layer_forward": range(L), "layer_backward": range(L - 1, -1, -1), "layer_optimizer": range(L),
              "layer_publish": range(L)}
    for group, secs in (("micro_step", MICRO), ("optimizer_step", OPTIM)):
        for sec in secs:
            for layer in layers.get(sec, [None]):
                for op in sched[group][sec]:
                    if op["op"] == "branch_on_layer":
                        yield from ((sec, layer, o) for o in (op["first"] if layer == 0 else op["rest"]))
                    elif layer in op.get("skip_layers", ()):
                        continue
                    else:
                        yield sec, layer, op


def segments(sched: dict, rows: list[MemRow]) -> tuple[dict[str, list[list[int]]], int]:
    """Live segments [first, last] (positions in step_order) of every transient row; rows that live
    for the whole step are absent. Also the number of positions."""
    by_name = {r.name: r for r in rows}
    cand = {r.name for r in rows if r.lifetime in TRANSIENT}        # a host row's too: callers filter
    ops = list(step_order(sched))
    micro_end = max(i for i, (sec, _, _) in enumerate(ops) if sec in MICRO)
    # An overlapped collective's rows stay live until its tag is awaited, an asynchronous copy's until
    # its copy_wait; else to the end of the run that issued it (the micro-step, or the optimizer step).
    waits = {"collective": "await", "copy": "copy_wait"}
    waited: dict[tuple[str, str], list[int]] = {}        # (wait kind, resolved tag) -> its positions
    for j, (_, layer, op) in enumerate(ops):
        if op["op"] in ("await", "copy_wait"):
            waited.setdefault((op["op"], resolve_tag(op["tag"], layer)), []).append(j)
    until: dict[int, int] = {}
    for i, (sec, layer, op) in enumerate(ops):
        if op.get("overlap") or (op["op"] == "copy" and "stream" in op):
            end = micro_end if i <= micro_end else len(ops) - 1
            at = waited.get((waits[op["op"]], resolve_tag(op["tag"], layer)), [])
            k = bisect_right(at, i)
            until[i] = at[k] if k < len(at) and at[k] <= end else end
    segs: dict[str, list[list[int]]] = {}
    whole: set[str] = set()
    touches: dict[int, dict[str, str]] = {}              # by operation: the same dict serves every layer
    for i, (_, _, op) in enumerate(ops):
        end = until.get(i, i)
        if id(op) not in touches:
            touches[id(op)] = op_touches(op)
        for name, kind in touches[id(op)].items():
            if name not in cand or name in whole:
                continue
            s = segs.setdefault(name, [])
            if by_name[name].count > 1:       # several instances: one segment, first touch to last
                if not s:
                    if kind != "w":
                        whole.add(name)
                        continue
                    s.append([i, end])
                s[-1][1] = max(s[-1][1], end)
            elif kind in ("w", "s"):          # a killing write (s: scratch, written and read by this op)
                s.append([i, end])
            elif not s:                       # read before any write: the value crosses the step's end
                whole.add(name)
            else:
                s[-1][1] = max(s[-1][1], end)
    return {n: s for n, s in segs.items() if n not in whole and s}, len(ops)


def interference(segs: dict[str, list[list[int]]]) -> dict[str, set[str]]:
    """Rows whose segments share at least one operation."""
    events = sorted((a, b, n) for n, ss in segs.items() for a, b in ss)
    out: dict[str, set[str]] = {n: set() for n in segs}
    active: list[tuple[int, str]] = []             # (end, name) of segments still open
    for a, b, n in events:
        active = [(e, m) for e, m in active if e >= a]
        for _, m in active:
            if m != n:
                out[n].add(m)
                out[m].add(n)
        active.append((b, n))
    return out


def _reduced(plan: Plan) -> Plan:
    """The plan with MODEL_LAYERS layers and at most MODEL_CHUNKS LM-head chunks: the same pattern of
    lifetimes, repeated fewer times."""
    L = min(plan.model.num_layers, MODEL_LAYERS)
    return plan.model_copy(update={"model": plan.model.model_copy(update={"num_layers": L}), "estimate": None,
                                   "lm_head_chunks": min(plan.lm_head_chunks, MODEL_CHUNKS)})


_CACHE: dict[str, tuple[dict[str, frozenset[str]], frozenset[str]]] = {}


def _compute(plan: Plan) -> tuple[dict[str, frozenset[str]], frozenset[str]]:
    small = _reduced(plan)
    rows = memory_table(small)
    segs, _ = segments(build_schedule(small), rows)
    inter = interference(segs)
    return {n: frozenset(v) for n, v in inter.items()}, frozenset(segs)


def plan_interference(plan: Plan, rows: list[MemRow]) -> tuple[str, dict[str, frozenset[str]], frozenset[str]]:
    """(cache key, rows each packed row may not share bytes with, the rows that may be packed) of a
    plan. Cached on what shapes the schedule: not the batch size, nor the layers or LM-head chunks
    beyond the reduced plan's. The offload choices do shape it (their copies through `stage.*` rows)."""
    d = plan.model_dump(mode="json", exclude={"estimate", "name", "inventory", "batch", "lm_head_chunks"})
    d["model"]["num_layers"] = min(plan.model.num_layers, MODEL_LAYERS)
    d["shape"] = [plan.batch.seq_len, min(plan.lm_head_chunks, MODEL_CHUNKS), plan.inventory.gpu.name, plan.num_gpus]
    key = json.dumps(d, sort_keys=True)
    if key not in _CACHE:
        if len(_CACHE) > 4096:
            _CACHE.clear()
        _CACHE[key] = _compute(plan)
    return (key, *_CACHE[key])


_PACKED: dict[tuple, tuple[dict[str, int], int]] = {}


def pack(items: list[tuple[str, int]], inter: dict[str, frozenset[str]] | dict[str, set[str]]
         ) -> tuple[dict[str, int], int]:
    """Offsets (from 0) of rows (name, bytes) given in table order, and the top: largest first (ties:
    table order), each at the smallest gap that holds it among the rows it may not share bytes with
    (the lowest such gap; above them all if none)."""
    order = sorted(range(len(items)), key=lambda i: (-items[i][1], i))
    offsets: dict[str, int] = {}
    placed: list[tuple[int, int, str]] = []            # (offset, end, name)
    top = 0
    for i in order:
        name, size = items[i]
        avoid = inter.get(name, ())
        busy = sorted((a, b) for a, b, n in placed if n in avoid)
        best, best_gap, cur = None, None, 0
        for a, b in busy:
            if a - cur >= size and (best_gap is None or a - cur < best_gap):
                best, best_gap = cur, a - cur
            cur = max(cur, b)
        off = cur if best is None else best
        offsets[name] = off
        placed.append((off, off + size, name))
        top = max(top, off + size)
    return offsets, top


def arena_offsets(plan: Plan, rows: list[MemRow]) -> tuple[dict[str, int], int]:
    """Every device row's offset (reserve rows excepted) and the arena's size: rows that live for the
    whole step first, in table order, then the packed rows above them."""
    key, inter, packed = plan_interference(plan, rows)
    offsets: dict[str, int] = {}
    base = 0
    items = []
    for r in rows:
        if r.place != "device" or r.lifetime == "reserve":
            continue
        if r.name in packed and r.lifetime in TRANSIENT:
            items.append((r.name, r.total))
        else:
            offsets[r.name] = base
            base += r.total
    pkey = (key, tuple(items))
    if pkey not in _PACKED:
        if len(_PACKED) > 65536:
            _PACKED.clear()
        _PACKED[pkey] = pack(items, inter)
    rel, top = _PACKED[pkey]
    offsets.update({n: base + o for n, o in rel.items()})
    return offsets, base + top


def packed_table(plan: Plan, rows: list[MemRow] | None = None) -> list[MemRow]:
    """The memory table with every device row's arena offset: what the planner totals and the
    runtime allocates."""
    rows = memory_table(plan) if rows is None else rows
    offsets, _ = arena_offsets(plan, rows)
    return [r.model_copy(update={"offset": offsets[r.name]}) if r.name in offsets else r for r in rows]


def packed_device_bytes(plan: Plan) -> int:
    """One GPU's planned total: the packed arena plus the reserve (what `llmqgen plan` prints per GPU)."""
    return device_bytes(packed_table(plan))


def live_spans(plan: Plan, rows: list[MemRow]) -> list[MemRow]:
    """Rows with `live` = (first, last) operation of the full step order for the packed rows (the
    plan file shows them; the packing itself does not need the full walk)."""
    segs, _ = segments(build_schedule(plan), rows)
    return [r.model_copy(update={"live": (segs[r.name][0][0], max(b for _, b in segs[r.name]))})
            if r.name in segs and r.place == "device" else r for r in rows]
