"""The solver: enumerate plans, keep those that fit device and host memory, pick the fastest.

Candidates vary micro-batch, sharding (several GPUs), an offload ladder and a recompute ladder;
for each combination only the least recompute and the fewest LM-head chunks that fit are kept
(more of either never makes a step faster). Deterministic: ties break on the candidate's order.
Users pin any input with `pins` ({"recompute.ffn": True, "batch.micro_batch": 8, ...}).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..models.spec import ModelSpec
from . import calibration as K
from .cost import StepCost, step_cost
from .lifetimes import TRANSIENT, arena_offsets, live_spans, packed_table
from .memory import memory_table
from .schema import Batch, Candidate, Estimate, Inventory, MemRow, Plan, Precision

RECOMPUTE_LADDER = [
    {}, {"swiglu": True}, {"swiglu": True, "norm": True}, {"ffn": True, "norm": True},
    {"ffn": True, "norm": True, "qkv": True}, {"ffn": True, "norm": True, "attention": True},
    {"block": True},
]
OFFLOAD_LADDER = [
    {}, {"adam_m": True, "adam_v": True}, {"master": True, "adam_m": True, "adam_v": True},
    {"master": True, "adam_m": True, "adam_v": True, "residual": True},
    {"master": True, "adam_m": True, "adam_v": True, "gradients": True},
    {"master": True, "adam_m": True, "adam_v": True, "quantized_weights": True},
    {"master": True, "adam_m": True, "adam_v": True, "quantized_weights": True, "gradients": True},
    {"master": True, "adam_m": True, "adam_v": True, "quantized_weights": True, "gradients": True,
     "residual": True},
]
MICRO_BATCHES = [1, 2, 4, 8, 16, 32, 64]
LM_HEAD_CHUNKS = [1, 2, 4, 8, 16, 32, 64]


class NoFitError(ValueError):
    """Nothing fits: the message names the smallest shortfall and what would make it fit."""


@dataclass
class Scored:
    plan: Plan
    rows: list[MemRow]
    cost: StepCost
    host: int
    device_max: int = 0       # no packing: the rows end to end
    device_min: int = 0       # a bound packing cannot beat: the rows that may not share bytes, and the largest that may
    _device: Optional[int] = None

    @property
    def device(self) -> int:
        """Per GPU: the arena packed by lifetime plus the reserve (computed when first asked)."""
        if self._device is None:
            _, arena = arena_offsets(self.plan, self.rows)
            self._device = arena + sum(r.total for r in self.rows if r.place == "device" and r.lifetime == "reserve")
        return self._device


def usable_device(inv: Inventory) -> int:
    return int(inv.gpu.memory_bytes * (1 - K.DEVICE_MARGIN))


def usable_host(inv: Inventory) -> int:
    return int(inv.host_mem_bytes * K.HOST_USABLE)


def _set(d: dict, path: str, value: Any) -> None:
    keys = path.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def _score(fields: dict) -> Scored:
    plan = Plan.model_validate(fields)
    rows = memory_table(plan)
    fixed = transient = largest = host = 0      # one pass: this runs for every candidate
    for r in rows:
        n = r.bytes * r.count
        if r.place == "host":
            host += n
        elif r.lifetime in TRANSIENT:
            transient += n
            largest = n if n > largest else largest
        else:
            fixed += n
    return Scored(plan, rows, step_cost(plan), plan.inventory.count * host,    # = memory.host_bytes
                  device_max=fixed + transient, device_min=fixed + largest)


def _fits(s: Scored) -> bool:
    """Packing by lifetime is asked only where the bounds cannot tell."""
    inv = s.plan.inventory
    usable = usable_device(inv)
    if s.host > usable_host(inv) or s.device_min > usable:
        return False
    return s.device_max <= usable or s.device <= usable


def solve(model: ModelSpec, inventory: Inventory, *, seq_len: int = 1024,
          tokens_per_step: int = 524288, dtype: Optional[str] = None,
          pins: Optional[dict[str, Any]] = None, name: Optional[str] = None, runners_up: int = 4) -> Plan:
    pins = dict(pins or {})
    gpu, N = inventory.gpu, inventory.count * inventory.nodes
    if dtype is None:
        dtype = "e4m3" if gpu.fp8_tflops else "bf16"
    if dtype == "e4m3" and not gpu.fp8_tflops:
        raise ValueError(f"{gpu.display_name} has no FP8 tensor cores: use --dtype bf16")
    seq_len = pins.pop("batch.seq_len", seq_len)
    per_micro = seq_len * N
    if tokens_per_step % per_micro:
        raise ValueError(f"--tokens-per-step {tokens_per_step} is not a multiple of seq_len x GPUs "
                         f"= {per_micro}: pick e.g. {max(1, tokens_per_step // per_micro) * per_micro}")
    seqs = tokens_per_step // per_micro
    micros = [mb for mb in MICRO_BATCHES if seqs % mb == 0]
    zeros = [0] if N == 1 else [1, 2, 3, 0]
    # Copy engines reach the GPUs of one machine (peer copies where the driver allows P2P, else
    # through pinned host memory); across machines NCCL is the transport.
    collectives = "nccl" if inventory.nodes > 1 else "copy_engine"
    name = name or f"{model.name}-{dtype}-{inventory.label}".lower()

    seen: dict[str, bool] = {}         # inputs hash -> fits (pins can make candidates coincide)
    fitting: list[Scored] = []
    closest: Optional[Scored] = None
    for mb in micros:
        for zero in zeros:
            for off in OFFLOAD_LADDER:
                for rc in RECOMPUTE_LADDER:
                    found = None
                    for chunks in LM_HEAD_CHUNKS:
                        if (mb * seq_len) % chunks:
                            continue
                        fields = {
                            "name": name, "model": model.model_dump(), "inventory": inventory.model_dump(),
                            "precision": Precision(matmul=dtype, gradient="e4m3" if dtype == "e4m3" else "bf16").model_dump(),
                            "batch": {"micro_batch": mb, "seq_len": seq_len, "grad_accum": seqs // mb},
                            "recompute": dict(rc), "offload": dict(off),
                            "sharding": {"optimizer": zero >= 1, "gradients": zero >= 2, "weights": zero >= 3},
                            "lm_head_chunks": chunks,
                            "collectives": collectives,
                            "peer_copies": gpu.peer_access,
                        }
                        for path, value in pins.items():
                            _set(fields, path, value)
                        if fields["batch"]["micro_batch"] != mb:   # a pinned micro-batch fixes grad_accum
                            pm = fields["batch"]["micro_batch"]
                            if seqs % pm:
                                raise ValueError(f"--micro-batch {pm} does not divide the {seqs} sequences "
                                                 f"of a step per GPU: choose a divisor of {seqs}")
                            fields["batch"]["grad_accum"] = seqs // pm
                        s = _score(fields)
                        key = s.plan.inputs_hash()
                        if key in seen:
                            if seen[key]:
                                found = True
                                break
                            continue
                        seen[key] = _fits(s)
                        if seen[key]:
                            fitting.append(s)
                            found = s
                            break
                        if closest is None or (_shortfall(s, bound=True) < _shortfall(closest)
                                               and _shortfall(s) < _shortfall(closest)):
                            closest = s
                    if found:
                        break          # least recompute that fits for this (micro, zero, offload)
    if not fitting:
        raise NoFitError(_no_fit_message(model, inventory, seq_len, closest))
    # ZeRO-2 and -3 must win by more than the cost model's error on overlapped collectives: they add
    # per-layer transfers whose hiding is only estimated, so near-ties go to ZeRO-1 (no more bytes than
    # plain data parallelism, less memory).
    fitting.sort(key=lambda s: s.cost.step_ms * (1 + K.SHARDING_MARGIN * max(0, s.plan.sharding.zero - 1)))
    best = fitting[0]
    others = _distinct(fitting[1:], best, runners_up)
    return _with_estimate(best, others, pins)


def _shortfall(s: Scored, bound: bool = False) -> int:
    """Bytes over the usable memory; bound: a lower bound, without packing."""
    inv = s.plan.inventory
    return max(0, (s.device_min if bound else s.device) - usable_device(inv)) + max(0, s.host - usable_host(inv))


def _distinct(cands: list[Scored], best: Scored, n: int) -> list[Scored]:
    out, seen = [], {_summary(best.plan)}
    for c in cands:
        sm = _summary(c.plan)
        if sm not in seen:
            seen.add(sm)
            out.append(c)
        if len(out) == n:
            break
    return out


def _summary(p: Plan) -> str:
    parts = [f"mb={p.batch.micro_batch}x{p.batch.grad_accum}"]
    if p.num_gpus > 1:
        parts.append(f"zero={p.sharding.zero}")
    parts.append("recompute=" + ("+".join(p.recompute.names()) or "none"))
    parts.append("offload=" + ("+".join(p.offload.names()) or "none"))
    parts.append(f"lm_chunks={p.lm_head_chunks}")
    return " ".join(parts)


def _gib(n: float) -> str:
    return f"{n / K.GiB:.1f} GiB"


def _with_estimate(best: Scored, others: list[Scored], pins: dict[str, Any]) -> Plan:
    p, c = best.plan, best.cost
    runners = [Candidate(summary=_summary(o.plan), step_ms=o.cost.step_ms, tokens_per_s=o.cost.tokens_per_s,
                         device_bytes=o.device,
                         why_not=f"{100 * (o.cost.step_ms / c.step_ms - 1):.1f}% slower")
               for o in others]
    est = Estimate(memory=live_spans(p, packed_table(p, best.rows)), device_bytes=best.device, host_bytes=best.host, step_ms=c.step_ms,
                   tokens_per_s=c.tokens_per_s, flops_per_token=c.flops_per_token, sol_ms=c.sol_ms,
                   sol_pct=c.sol_pct, mfu_pct=c.mfu_pct, breakdown_ms=c.breakdown_ms,
                   reasons=_reasons(best, pins), runners_up=runners)
    return p.model_copy(update={"estimate": est})


def _reasons(best: Scored, pins: dict[str, Any]) -> dict[str, str]:
    p = best.plan
    gpu = p.inventory.gpu
    act = sum(r.total for r in best.rows if r.name.startswith("act.") and r.place == "device")
    why = {
        "precision": (f"e4m3 matmuls: {gpu.fp8_tflops:.0f} vs {gpu.bf16_tflops:.0f} TFLOP/s BF16 on "
                      f"{gpu.display_name}" if p.fp8 else
                      f"bf16 matmuls" + ("" if gpu.fp8_tflops else f": {gpu.display_name} has no FP8 tensor cores")),
        "batch": (f"{p.batch.micro_batch} x {p.batch.seq_len} tokens per micro-step, {p.batch.grad_accum} "
                  f"micro-steps: {p.tokens_per_step:,} tokens per optimizer step"),
        "recompute": ("none: every activation fits" if not p.recompute.names() else
                      "+".join(p.recompute.names()) + f": the least recompute that fits (saved activations {_gib(act)})"),
        "offload": ("none: optimizer state and weights fit on the GPU" if not p.offload.names() else
                    "+".join(p.offload.names()) + " to pinned host memory: the device is too small otherwise"),
        "lm_head_chunks": (f"{p.lm_head_chunks}: logits buffer "
                           f"{_gib(next(r.total for r in best.rows if r.name == 'lmhead.logits'))}"),
        "collectives": ("none: one GPU" if p.num_gpus == 1 else
                        f"NCCL: {p.inventory.nodes} machines" if p.collectives == "nccl" else
                        "copy engines, peer copies (no SMs spent)" if p.peer_copies else
                        f"copy engines through pinned host memory: {gpu.display_name} has no peer access"),
    }
    if p.num_gpus > 1:
        why["sharding"] = f"ZeRO-{p.sharding.zero}: fastest sharding that fits"
    for path in pins:                      # a pinned choice was the user's, not the solver's
        key = path.split(".")[0]
        if key in why:
            why[key] = why[key].split(":")[0] + ": pinned by the user"
    return why


def _no_fit_message(model: ModelSpec, inv: Inventory, seq_len: int, s: Optional[Scored]) -> str:
    head = f"{model.name} does not fit {inv.label}"
    if s is None:
        return head + "."
    dev_short = s.device - usable_device(inv)
    host_short = s.host - usable_host(inv)
    lines = [f"{head}: the closest plan ({_summary(s.plan)}) needs"]
    lines.append(f"  {_gib(s.device)} per GPU, {_gib(usable_device(inv))} usable"
                 + (f" (short {_gib(dev_short)})" if dev_short > 0 else ""))
    lines.append(f"  {_gib(s.host)} pinned host RAM, {_gib(usable_host(inv))} usable of {_gib(inv.host_mem_bytes)}"
                 + (f" (short {_gib(host_short)})" if host_short > 0 else ""))
    hints = []
    if dev_short > 0:
        hints.append(f"more or larger GPUs (e.g. --gpus {inv.count * 2}x{inv.gpu.name})")
        if seq_len > 256:
            hints.append(f"shorter sequences (--seq-len {seq_len // 2})")
    if host_short > 0:
        hints.append(f"more host RAM (--host-mem {int((s.host / K.HOST_USABLE) / K.GiB) + 1}G)")
    lines.append("What would make it fit: " + "; ".join(hints or ["a larger machine"]))
    return "\n".join(lines)
