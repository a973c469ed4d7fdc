"""Printing a plan: allocator-style memory tables, the choices with their reasons, predicted speed."""
from __future__ import annotations

from ..metrics import plan_throughput
from . import calibration as K
from .memory import arena_peak, group_totals
from .schema import MemRow, Plan
from .solver import usable_device, usable_host

GROUP_TITLES = {
    "weights": "weights (work copy)", "master": "master weights", "grads": "gradients",
    "adam_m": "Adam m", "adam_v": "Adam v", "act": "saved activations", "work": "layer scratch",
    "lmhead": "LM head + loss", "stage": "streaming buffers", "stats": "FP8 stats + scalars",
    "tokens": "token batch", "rope": "RoPE tables", "ws": "cuBLASLt + attention workspaces",
    "reserve": "CUDA context (reserved)",
}


def _fmt(n: float) -> str:
    if n >= K.GiB:
        return f"{n / K.GiB:8.2f} GiB"
    return f"{n / K.MiB:8.1f} MiB"


def _table(rows: list[MemRow], place: str, total_label: str, capacity: int, usable: int,
           multiplier: int = 1) -> list[str]:
    groups = group_totals(rows, place)
    if not groups:
        return []
    out = [f"  {'':<34}{'bytes':>12}   {'%':>5}"]
    total = multiplier * sum(groups.values())
    for key, b in sorted(groups.items(), key=lambda kv: -kv[1]):
        out.append(f"  {GROUP_TITLES.get(key, key):<34}{_fmt(multiplier * b):>12}   {100 * multiplier * b / total:5.1f}")
    out.append(f"  {'-' * 53}")
    dev = [r for r in rows if r.place == place and r.lifetime != "reserve"]
    if place == "device" and dev and all(r.offset is not None for r in dev):
        # rows whose lifetimes never overlap share bytes: the arena is the packed peak
        packed = arena_peak(rows) + sum(r.total for r in rows if r.place == place and r.lifetime == "reserve")
        shared = sum(r.total for r in dev if r.live is not None)
        out.append(f"  {'sum of the rows':<34}{_fmt(total):>12}")
        out.append(f"  {'packed by lifetime':<34}{'-' + _fmt(total - packed).strip():>12}   "
                   f"({sum(r.live is not None for r in dev)} rows of {_fmt(shared).strip()} share bytes)")
        total = packed
    out.append(f"  {total_label:<34}{_fmt(total):>12}   {100 * total / max(usable, 1):.0f}% of {_fmt(usable).strip()} "
               f"usable ({_fmt(capacity).strip()} total)")
    return out


def predicted_block(plan: Plan) -> list[str]:
    """The "Predicted" lines: the cost model's step time in the throughput report `bench` and `run`
    print (llmqgen.metrics.Throughput: tokens/s in total and per GPU, SOL and MFU per GPU)."""
    e = plan.estimate
    r = plan_throughput(plan, e.step_ms / 1e3)
    n = plan.num_gpus
    return ["", "Predicted (cost model: H200 constants from measurements here, GeForce ones fitted to LLMQ's RTX 4090 results):",
            f"  step       {e.step_ms / 1e3:.3f} s per optimizer step of {plan.tokens_per_step:,} tokens"
            + (f" on {n} GPUs" if n > 1 else ""),
            f"  throughput {r.line()}",
            f"  SOL        {'per GPU: ' if n > 1 else ''}against a speed-of-light step of {r.sol_s:.3f} s",
            f"  MFU        {'per GPU: ' if n > 1 else ''}BF16-equivalent, {r.flops_per_token / 1e9:.2f} GFLOP/token"]


def render_plan(plan: Plan, path: str | None = None, written: bool = True) -> str:
    e = plan.estimate
    if e is None:
        raise ValueError("this plan has no estimate: re-solve it with `llmqgen plan`")
    inv, m = plan.inventory, plan.model
    where = "" if not path else f"  ->  {path}" if written else f"  (from {path})"
    lines = [f"Plan {plan.name}" + where,
             f"  model      {m.name}: {m.num_params() / 1e9:.2f}B parameters, {m.num_layers} layers, "
             f"hidden {m.hidden_size}, vocab {m.vocab_size}",
             "  hardware   " + (f"{inv.nodes} machines of " if inv.nodes > 1 else "")
             + f"{inv.count} x {inv.gpu.display_name} ({inv.gpu.memory_bytes / K.GiB:.0f} GiB, "
             f"{inv.gpu.arch}), host RAM {inv.host_mem_bytes / K.GiB:.0f} GiB"
             + (" each" if inv.nodes > 1 else "") + f" ({inv.host_mem_source}"
             + ("; set it with --host-mem" if inv.host_mem_source == "assumed" else "") + ")",
             f"  identity   {plan.inputs_hash()[:16]}", ""]
    lines.append("Device memory, per GPU:")
    lines += _table(e.memory, "device", "total per GPU", inv.gpu.memory_bytes, usable_device(inv))
    host = _table(e.memory, "host", "total pinned host", inv.host_mem_bytes, usable_host(inv),
                  multiplier=inv.count)
    if host:
        lines += ["", "Host memory (pinned, one machine):"] + host
    lines += ["", "Choices:"]
    order = ["precision", "batch", "recompute", "offload", "sharding", "lm_head_chunks", "collectives"]
    for k, v in sorted(e.reasons.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
        lines.append(f"  {k:<15} {v}")
    lines += predicted_block(plan)
    lines += ["  where the time goes: " + ", ".join(
        f"{k} {100 * v / e.step_ms:.0f}%" for k, v in sorted(e.breakdown_ms.items(), key=lambda kv: -kv[1]) if v > 0)]
    if e.runners_up:
        lines += ["", "Runners-up (in the solver's order: predicted speed less the margins that more offload "
                      "and higher ZeRO levels must win by):"]
        width = max(len(c.summary) for c in e.runners_up)
        for c in e.runners_up:
            lines.append(f"  {c.summary:<{width}} {c.tokens_per_s:>10,.0f} tok/s  {c.why_not}")
    return "\n".join(lines)
