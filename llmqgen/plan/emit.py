"""The emitter the schedule is built with (plan/schedule.py): the plan's choices that name rows (where a
block's weights, gradients and residual sit), the operations of the section being built, and the check that
every reference names a row of the memory table. Operations hold typed references (plan/refs.py) until
they are emitted, then the strings of schedule.json."""
from __future__ import annotations

from ..layout import ACT_SLOTS, WEIGHT_SLOTS
from .block import HEAD_SITES, plan_fp8_groups, sharded_optimizer, site_of
from .memory import memory_table, param_tensors
from .refs import Fp8Ref, Ref, Scalar, Seed
from .schema import Plan


class Emitter:
    """One plan's schedule under construction: `kernel` and `add` append operations to the current
    section, `take` ends it."""

    def __init__(self, plan: Plan):
        m, sh, off, N = plan.model, plan.sharding, plan.offload, plan.num_gpus
        self.plan, self.m, self.fp8, self.L = plan, m, plan.fp8, m.num_layers
        self.delayed, self.fp8_head = plan.precision.delayed, plan.precision.fp8_head
        self.C, self.BT = m.hidden_size, plan.batch.micro_batch * plan.batch.seq_len
        self.rows = {r.name: r for r in memory_table(plan)}   # from the inputs: a saved estimate may predate us
        self.ops: list[dict] = []
        self.zero2, self.zero3 = N > 1 and sh.gradients, N > 1 and sh.weights
        self.opt_shard = sharded_optimizer(plan)
        # Offload (pinned host rows, mapped: kernels and GEMMs may address them, but block weights, block
        # gradients and residuals go through their device double buffers by asynchronous copies):
        # streamed block weights (one GPU's sharded weights, or offloaded work copies without ZeRO-3) are
        # fetched a layer ahead; block gradients are fetched a layer ahead of the backward and leave after it.
        self.stream_w = not self.zero3 and (off.quantized_weights or (sh.weights and N == 1))
        self.stream_g = not self.zero2 and off.gradients
        self.offload_residual = off.residual
        self.layer_tensors = [n for n, _, per_layer, _ in param_tensors(plan) if per_layer]
        quant, transpose = plan_fp8_groups(plan)
        q = {s: g["name"] for g in quant for s in g["sites"]}
        t = {s: g["name"] for g in transpose for s in g["sites"]}
        slots = ACT_SLOTS + tuple(f"w_{n}" for n in WEIGHT_SLOTS) + HEAD_SITES
        self.site = {s: q[site_of(s)] for s in slots if site_of(s) in q}       # slot -> its quantize kernels
        self.tsite = {s: t[site_of(s)] for s in slots if site_of(s) in t}      # slot -> its transpose kernel

    # --- where the plan keeps a block's tensors -----------------------------------------------------
    def weight(self, n: str) -> Ref:
        """A block weight as layer l reads it: its row, or (ZeRO-3, streamed) its double buffer."""
        if self.zero3 or self.stream_w:
            return Ref(f"stage.weights.{n}", "l%2")
        return Ref(f"weights.{n}", "l")

    def grad(self, n: str) -> Ref:
        """A block gradient as layer l's backward writes it (ZeRO-2, offloaded: a double buffer)."""
        if self.zero2 or self.stream_g:
            return Ref(f"stage.grads.{n}", "l%2")
        return Ref(f"grads.{n}", "l")

    @property
    def res(self) -> Ref:
        """Layer l's block input (offloaded: its device double buffer while the layer runs)."""
        return Ref("stage.res", "l%2") if self.offload_residual else Ref("act.res", "l")

    def amax(self, slot: str) -> dict:
        """The amax argument of a kernel that produces an FP8 matmul operand (none in BF16 plans)."""
        return {"amax": Fp8Ref(slot)} if self.fp8 else {}

    def sink(self) -> dict:
        """The amax argument of a kernel whose output feeds no FP8 matmul."""
        return {"amax": Fp8Ref("sink", None)} if self.fp8 else {}

    def norm_out(self, which: str) -> dict:
        """Where a norm writes (its y argument): bf16 scratch before e4m3 in FP8 plans; under delayed scaling
        also y_q, the e4m3 row it writes instead once the slot is warm."""
        if not self.fp8:
            return {"y": Ref(f"act.{which}", "l")}
        return {"y": Ref("work.ln"), **({"y_q": Ref(f"act.{which}", "l")} if self.delayed else {})}

    # --- operations ----------------------------------------------------------------------------------
    def value(self, v):
        """A value of schedule.json: references as strings, checked against the memory table."""
        if isinstance(v, Ref):
            if v.row not in self.rows:
                raise KeyError(f"schedule names {v.row!r}, which the memory table lacks")
            return str(v)
        if isinstance(v, (Fp8Ref, Scalar, Seed)):
            return str(v)
        if isinstance(v, list):
            return [self.value(x) for x in v]
        if isinstance(v, dict):
            return {k: self.value(x) for k, x in v.items()}
        return v

    def kernel(self, name: str, phase: str, **args) -> None:
        self.ops.append({"op": "kernel", "kernel": name, "phase": phase, "args": self.value(args)})

    def add(self, op: str, phase: str, **fields) -> None:
        self.ops.append({"op": op, "phase": phase, **self.value(fields)})

    def take(self) -> list[dict]:
        """The operations of the section just built."""
        out, self.ops = self.ops, []
        return out

    def copy(self, phase: str, dst: Ref, src: Ref, stream: str, tag: str, after=(), skip=()) -> None:
        """An asynchronous copy between a host row and its device buffer on the `stream` ("h2d"/"d2h") copy
        engine: it starts when the computation issued before it is done (and the copies tagged `after`),
        and the computation waits for it at `copy_wait` of its tag."""
        a, b = self.rows[dst.row], self.rows[src.row]
        if a.bytes != b.bytes:
            raise ValueError(f"rows {dst.row} ({a.bytes} bytes) and {src.row} ({b.bytes} bytes) differ: "
                             f"the memory table must size a host row and its device buffer alike")
        self.add("copy", phase, dst=dst, src=src, bytes=a.bytes, stream=stream, tag=tag, after=list(after),
                 skip_layers=list(skip))
