"""The solver: enumerate plans, keep those that fit device and host memory, pick the fastest.

Candidates vary micro-batch, sharding (several GPUs), an offload ladder and every recompute choice (a
lattice: the choices are not ordered by cost, e.g. swiglu+norm+qkv vs swiglu+ffn); for each combination only
the recompute choices that fit without recomputing a superset of another that fits, each with the fewest
LM-head chunks that fit, are kept (more of either never makes a step faster). A pin therefore narrows the
same set of candidates the unpinned search weighs, rather than opening others. Deterministic: ties break on
the candidate's order.
Users pin any input with `pins` ({"recompute.ffn": True, "batch.micro_batch": 8, ...}).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from math import gcd, isqrt
from typing import Any, Callable, Literal, Optional, get_args, get_origin

from pydantic import ValidationError

from ..hardware.inventory import human_bytes
from ..hardware.spec import Inventory
from ..models.spec import ModelSpec
from . import calibration as K
from .cost import StepCost, step_cost
from .lifetimes import TRANSIENT, arena_offsets, live_spans, packed_table
from .memory import RowKind, memory_table, row_kind
from .schema import (Batch, Candidate, Estimate, MemRow, Offload, Plan, Precision, Recompute, Sharding,
                     check_plan_name, validation_summary)

def _recompute_lattice() -> list[dict[str, bool]]:
    """Every recompute choice (Recompute's implications applied), fewest flags first: the FFN side (none,
    swiglu, ffn), the norms, the attention side (none, qkv, attention), and the whole block."""
    out = []
    for ffn in ({}, {"swiglu": True}, {"ffn": True}):
        for norm in ({}, {"norm": True}):
            for att in ({}, {"qkv": True}, {"attention": True}):
                out.append({**ffn, **norm, **att})
    out.append({"block": True})
    return sorted(out, key=lambda r: len(Recompute(**r).names()))


RECOMPUTE_LATTICE = _recompute_lattice()
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
# FP8 matmuls (cuBLASLt TN) and the quantize kernels want every dimension in multiples of 16: the
# token rows of a micro-step (micro_batch x seq_len) and the model's widths.
FP8_GRAIN = 16

# What `pins` (--set KEY=VALUE) may name: the plan's inputs, not its identity (name, model, inventory).
_PIN_SECTIONS = {"precision": Precision, "batch": Batch, "recompute": Recompute, "offload": Offload,
                 "sharding": Sharding}
_PIN_TOP = ("lm_head_chunks", "attn_bwd_chunks", "collectives", "peer_copies", "cuda_graphs")


class NoFitError(ValueError):
    """Nothing fits: the message names the smallest shortfall and what would make it fit."""


@dataclass
class Scored:
    plan: Plan
    rows: list[MemRow]
    host: int
    device_max: int = 0       # no packing: the rows end to end
    device_min: int = 0       # a bound packing cannot beat: the rows that may not share bytes, and the largest that may
    _device: Optional[int] = None
    _cost: Optional[StepCost] = None

    @property
    def cost(self) -> StepCost:
        """The cost model's step (computed when first asked: most candidates that do not fit never are)."""
        if self._cost is None:
            self._cost = step_cost(self.plan)
        return self._cost

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
    return Scored(plan, rows, plan.inventory.count * host,    # = memory.host_bytes
                  device_max=fixed + transient, device_min=fixed + largest)


def _fits(s: Scored) -> bool:
    """Packing by lifetime is asked only where the bounds cannot tell."""
    inv = s.plan.inventory
    usable = usable_device(inv)
    if s.host > usable_host(inv) or s.device_min > usable:
        return False
    return s.device_max <= usable or s.device <= usable


def pin_fields() -> dict:
    """Every key `pins` may name ("recompute.ffn", "lm_head_chunks", ...) -> its pydantic field."""
    out = {f"{sec}.{k}": f for sec, cls in _PIN_SECTIONS.items() for k, f in cls.model_fields.items()}
    out.update({k: Plan.model_fields[k] for k in _PIN_TOP})
    return out


def _valid_keys() -> str:
    groups: dict[str, list[str]] = {}
    for key in pin_fields():
        sec, _, leaf = key.rpartition(".")
        groups.setdefault(sec, []).append(leaf)
    return ", ".join(f"{sec}.{{{','.join(leaves)}}}" if sec else ", ".join(leaves) for sec, leaves in groups.items())


def _takes(field) -> str:
    ann = field.annotation
    if ann is bool:
        return "true or false"
    if get_origin(ann) is Literal:
        return "one of " + ", ".join(map(str, get_args(ann)))
    ge, le = _bounds(field)
    return (f"an integer {ge}..{le}" if le is not None else f"an integer >= {ge}") if ge is not None else "an integer"


def _bounds(field) -> tuple[Any, Any]:
    """(ge, le) of an integer plan input's Field constraints (None where unbounded)."""
    ge = next((m.ge for m in field.metadata if getattr(m, "ge", None) is not None), None)
    return ge, next((m.le for m in field.metadata if getattr(m, "le", None) is not None), None)


def check_pins(pins: dict[str, Any], typed: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Pins checked against the plan's inputs, with one-line errors that name the valid keys and values
    (and repeat each value as `typed` holds it, where given: the command line's text). A boolean input takes
    True/False or 1/0."""
    fields, out = pin_fields(), {}
    for key, value in pins.items():
        field = fields.get(key)
        shown = (typed or {}).get(key, str(value).lower() if isinstance(value, bool) else value)
        if field is None:
            leaf = key.rpartition(".")[2]
            close = ([k for k in fields if k.rpartition(".")[2] == leaf]
                     or difflib.get_close_matches(key, list(fields), n=3, cutoff=0.6))
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise ValueError(f"--set {key}={shown}: {key!r} is not a plan input; {hint}valid keys: {_valid_keys()}")
        ann = field.annotation
        if ann is bool:
            ok = isinstance(value, bool) or (type(value) is int and value in (0, 1))
            value = bool(value) if ok else value
        elif get_origin(ann) is Literal:
            ok = isinstance(value, str) and value.lower() in get_args(ann)
            value = value.lower() if ok else value
        else:
            ge, le = _bounds(field)
            ok = (isinstance(value, int) and not isinstance(value, bool) and (ge is None or value >= ge)
                  and (le is None or value <= le))
        if not ok:
            raise ValueError(f"--set {key}={shown}: {key} takes {_takes(field)}")
        out[key] = value
    return out


def check_agrees(given: str, value: Any, key: str, pins: dict[str, Any]) -> None:
    """An input given two ways (an option and --set KEY=VALUE, or --set KEY twice) must say one thing:
    refused in one line rather than one of them silently winning. `given`: the first, as typed."""
    if value is not None and key in pins and pins[key] != value:
        shown = str(pins[key]).lower() if isinstance(pins[key], bool) else pins[key]
        raise ValueError(f"{given} and --set {key}={shown} disagree: give one of them")


def implied_by(flag: str) -> set[str]:
    """The recompute flags that `flag` switches on as well (Recompute's implications: ffn -> swiglu,
    attention -> qkv, block -> all)."""
    return set(Recompute(**{flag: True}).names()) - {flag}


def check_pin_conflicts(pins: dict[str, Any]) -> None:
    """Refuse pins that contradict each other through the recompute implications, and an amax history
    without the delayed scaling that reads it, in one line."""
    if "precision.amax_history" in pins and pins.get("precision.scaling") != "delayed":
        raise ValueError("--set precision.amax_history is the length of delayed scaling's amax history (FP8 "
                         "plans): add --set precision.scaling=delayed, or drop it")
    for flag in Recompute.model_fields:
        if pins.get(f"recompute.{flag}") is not True:
            continue
        for other in sorted(implied_by(flag)):
            if pins.get(f"recompute.{other}") is False:
                raise ValueError(f"--set recompute.{flag}=true and --set recompute.{other}=false conflict: "
                                 f"recompute.{flag} implies recompute.{other}; drop one of them")


def _recompute_with_pins(rung: dict[str, bool], pins: dict[str, Any]) -> dict[str, bool]:
    """A recompute choice with its implications applied, then the pins: a flag pinned false also switches
    off every flag that implies it (so that the plan keeps the pin)."""
    flags = Recompute(**rung).model_dump()
    for path, value in pins.items():
        sec, _, flag = path.partition(".")
        if sec == "recompute":
            flags[flag] = value
    for path, value in pins.items():
        sec, _, flag = path.partition(".")
        if sec == "recompute" and value is False:
            for other in flags:
                if flag in implied_by(other):
                    flags[other] = False
    return flags


def _keeps_pins(plan: Plan, pins: dict[str, Any]) -> bool:
    """Whether a candidate plan has every pinned value (pins are constraints, never overridden)."""
    for path, value in pins.items():
        obj = plan
        for key in path.split("."):
            obj = getattr(obj, key)
        if obj != value:
            return False
    return True


# Short forms of pins in plan names (qwen2.5-0.5b-e4m3-1xh200-mb16-rc-block).
_NAME_SHORT = {"batch.micro_batch": "mb", "batch.grad_accum": "ga", "batch.seq_len": "seq",
               "lm_head_chunks": "lmc", "attn_bwd_chunks": "abc", "precision.amax_history": "ah",
               "precision.scaling": "", "precision.lm_head": "head-"}       # -delayed, -current; -head-fp8
_NAME_GROUPS = {"recompute": "rc", "offload": "off"}


@dataclass(frozen=True)
class Fp8Option:
    """An opt-in precision choice of FP8 plans: the field and its value when on, what it does (for the refusal
    on plans without FP8), its name in the precision reason when on and off, and how it works (the hint)."""
    field: str
    on: Any
    what: str
    named: Callable[[Precision], str]
    off_named: str
    how: str = ""


FP8_OPTIONS = (
    Fp8Option("scaling", "delayed", "scales FP8 matmuls",
              lambda p: f"delayed scaling, amax history {p.amax_history} micro-step{'s' if p.amax_history != 1 else ''}",
              "current scaling", ", amax from history"),
    Fp8Option("lm_head", "fp8", "runs the LM head as FP8 matmuls", lambda p: "FP8 LM head", "BF16 LM head"),
    Fp8Option("fast_accum", True, "is a mode of FP8 matmuls", lambda p: "fast accumulation in forward GEMMs",
              "precise accumulation"),
)


def pins_suffix(pins: dict[str, Any], seq_len: int = 1024, tokens_per_step: int = 524288) -> str:
    """The plan name's tail naming its non-default choices: pins (in the order of the plan's inputs),
    a sequence length other than 1024 and a step other than 524,288 tokens; "" for none.

        {"batch.micro_batch": 16, "recompute.block": True}  ->  "-mb16-rc-block"
    """
    parts: list[str] = []
    if "batch.seq_len" not in pins and seq_len != 1024:
        parts.append(f"seq{seq_len}")
    if tokens_per_step != 524288:
        parts.append(f"tok{tokens_per_step}")
    groups: dict[str, list[str]] = {}
    for path in pin_fields():
        if path not in pins or path == "precision.matmul":     # the dtype is in the name already
            continue
        value, (sec, _, leaf) = pins[path], path.rpartition(".")
        if sec in _NAME_GROUPS:
            groups.setdefault(_NAME_GROUPS[sec] if value else "no-" + _NAME_GROUPS[sec], []).append(leaf)
        elif path == "sharding.weights" and value:
            parts.append("zero3")
        elif path == "sharding.gradients" and value:
            parts.append("zero2")
        elif path == "sharding.optimizer" and value:
            parts.append("zero1")
        elif isinstance(value, bool):
            parts.append(leaf.replace("_", "-") if value else "no-" + leaf.replace("_", "-"))
        elif path in _NAME_SHORT:
            parts.append(f"{_NAME_SHORT[path]}{value}")
        else:
            parts.append(f"{leaf.replace('_', '-')}-{value}")
    parts += [f"{g}-{'+'.join(leaves)}" for g, leaves in groups.items()]
    return "".join(f"-{x}" for x in parts)


def _fp8_bad_widths(model: ModelSpec) -> list[str]:
    widths = {"hidden_size": model.hidden_size, "intermediate_size": model.intermediate_size,
              "q width (heads x head_dim)": model.q_dim, "qkv width": model.qkv_dim}
    return [f"{k} {v}" for k, v in widths.items() if v % FP8_GRAIN]


def _lcm(a: int, b: int) -> int:
    return a * b // gcd(a, b)


def micro_batch_unit(seq_len: int, fp8: bool, lm_head_chunks: Optional[int] = None) -> int:
    """The smallest micro-batch whose token rows (micro_batch x seq_len) satisfy the row rules (FP8:
    multiples of 16; a pinned LM-head chunk count divides them); the valid ones are its multiples."""
    rule = _lcm(FP8_GRAIN if fp8 else 1, lm_head_chunks or 1)
    return rule // gcd(rule, seq_len)


def _batch_rules(fp8: bool, chunks: Optional[int], attn_chunks: int, seq_len: int,
                 micro_batch: Optional[int] = None) -> str:
    """The rules a micro-batch must meet, as one phrase; given a micro-batch, only those it breaks."""
    rows = None if micro_batch is None else micro_batch * seq_len
    on_rows = ([f"a multiple of {FP8_GRAIN} for FP8 matmuls"] if fp8 and (rows is None or rows % FP8_GRAIN) else []) + (
        [f"divisible by lm_head_chunks={chunks}"] if chunks and chunks > 1 and (rows is None or rows % chunks) else [])
    on_batch = attn_chunks > 1 and (micro_batch is None or micro_batch % attn_chunks)
    rows_text = "the token rows of a micro-step, micro_batch x {0}, must be " if rows is None else \
        f"{rows} token rows per micro-step must be "
    return "; ".join(([rows_text.format(seq_len) + " and ".join(on_rows)] if on_rows else [])
                     + ([f"the micro-batch must be divisible by attn_bwd_chunks={attn_chunks}"] if on_batch else []))


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _or(values: list[int], most: int = 6) -> str:
    v = [str(x) for x in values[:most]] + (["..."] if len(values) > most else [])
    return v[0] if len(v) == 1 else ", ".join(v[:-1]) + " or " + v[-1]


def _tokens_hint(tokens: int, unit: int) -> str:
    """The multiples of `unit` nearest `tokens`, as a --tokens-per-step suggestion."""
    lo = tokens // unit * unit
    return f"--tokens-per-step {lo} (or {lo + unit})" if lo > 0 else f"--tokens-per-step {unit}"


def solve(model: ModelSpec, inventory: Inventory, *, seq_len: int = 1024,
          tokens_per_step: int = 524288, dtype: Optional[str] = None,
          pins: Optional[dict[str, Any]] = None, name: Optional[str] = None, runners_up: int = 4,
          _hints: bool = True, _collect: Optional[list] = None) -> Plan:
    """The fastest plan for `model` on `inventory` that fits device memory and pinned host memory.

    Enumerates micro-batches (multiples of the FP8 row rule dividing the step), ZeRO levels (several
    GPUs), the offload ladder and the recompute lattice; for each combination keeps the recompute choices
    that fit and recompute no superset of another that does, with the fewest LM-head chunks that fit; ranks
    by `step_cost` (ZeRO-2/3 must win by more than `calibration.SHARDING_MARGIN`, more offload by
    `calibration.OFFLOAD_MARGIN`). Deterministic.

    Args:
        model: the model's dimensions (models.catalog.resolve_model).
        inventory: GPU spec, GPUs per node, nodes, host RAM in bytes (hardware.inventory.parse_inventory).
        seq_len: tokens per sequence, 16 .. model.max_position_embeddings.
        tokens_per_step: tokens per optimizer step over all GPUs; a multiple of seq_len x GPUs
            (x the micro-batch unit that makes micro_batch x seq_len a multiple of 16 for FP8).
        dtype: matmul precision, "e4m3" or "bf16"; None: e4m3 where the GPU has FP8 tensor cores and
            the model's widths are multiples of 16, else bf16 (the plan's reasons say why).
        pins: plan inputs fixed by the user, {"recompute.ffn": False, "batch.micro_batch": 8, ...}
            (keys: solver.pin_fields()). Pins are constraints: applied after the recompute implications
            (ffn -> swiglu, attention -> qkv, block -> all), kept by the plan and every runner-up.
        name: the plan's (file) name; default <model>-<dtype>-<inventory> plus `pins_suffix` (the pins,
            a non-default seq_len or tokens_per_step), e.g. qwen2.5-0.5b-e4m3-1xh200-mb16-rc-block.
        runners_up: how many distinct slower plans to keep in `estimate.runners_up`.
        _hints, _collect: internal (the no-fit hints re-solve without hints of their own; `_collect`
            receives every fitting candidate).
    Returns:
        Plan with `estimate` set: the memory table (bytes per row), step_ms, tokens/s, SOL/MFU percent,
        one reason per choice, runners-up.
    Raises:
        NoFitError (a ValueError): nothing fits; the message names the closest plan, its shortfall in
            GiB and what would make it fit (several lines; every hint shown was solved and fits).
        ValueError: a bad input, in one line: unknown pin key or value, conflicting pins, --dtype vs a
            pinned precision.matmul, FP8 on a GPU or model that cannot, seq_len out of range,
            tokens_per_step not divisible as above, a bad name, or pins that make no valid Plan.
    """
    pins = check_pins(dict(pins or {}))
    check_pin_conflicts(pins)
    asked = dict(pins)          # as given, for the no-fit hints' re-solves
    gpu, N = inventory.gpu, inventory.count * inventory.nodes
    check_agrees(f"--dtype {dtype}", dtype, "precision.matmul", pins)
    dtype = pins.get("precision.matmul", dtype)
    notes: dict[str, str] = {}
    auto_dtype = dtype is None
    if dtype is None:
        dtype = "e4m3" if gpu.fp8_tflops else "bf16"
    if dtype == "e4m3" and not gpu.fp8_tflops:
        raise ValueError(f"{gpu.display_name} has no FP8 tensor cores: use --dtype bf16")
    bad = _fp8_bad_widths(model)
    if dtype == "e4m3" and bad:
        if not auto_dtype:
            raise ValueError(f"{model.name}: FP8 matmuls need widths that are multiples of {FP8_GRAIN}, and its "
                             f"{', '.join(bad)} are not: use --dtype bf16")
        dtype = "bf16"
        notes["precision"] = (f"bf16 matmuls: {model.name}'s {', '.join(bad)} are not multiples of "
                              f"{FP8_GRAIN}, as FP8 matmuls need")
    fp8 = dtype == "e4m3"
    if pins.get("peer_copies") and not gpu.peer_access:
        raise ValueError(f"--set peer_copies=true: {gpu.display_name} has no peer access (GPUs of its kind cannot "
                         f"copy to each other directly): drop it, the copies go through pinned host memory")
    fp8_asked = [(o.field, o.what) for o in FP8_OPTIONS if pins.get(f"precision.{o.field}") == o.on]
    if not fp8 and fp8_asked:
        field, what = fp8_asked[0]
        key = f"precision.{field}"
        why = (f"{model.name}'s widths are not multiples of {FP8_GRAIN}" if bad and gpu.fp8_tflops else
               f"{gpu.display_name} has no FP8 tensor cores" if not gpu.fp8_tflops else "bf16 matmuls were asked for")
        raise ValueError(f"--set {key}={str(pins[key]).lower()} {what}, and this plan has no FP8 matmuls ({why}): "
                         f"drop it" + (" or ask for them with --dtype e4m3" if why.startswith("bf16") else ""))
    seq_len = pins.pop("batch.seq_len", seq_len)
    if seq_len < 16:
        raise ValueError(f"--seq-len {seq_len}: a sequence needs at least 16 tokens")
    if seq_len > model.max_position_embeddings:
        raise ValueError(f"--seq-len {seq_len} exceeds {model.name}'s max_position_embeddings "
                         f"{model.max_position_embeddings}: use at most {model.max_position_embeddings}")
    # Inputs the search never varies; a pin equal to their value is no choice, so the name leaves it out.
    precision = Precision(matmul=dtype).model_dump()
    # Copy engines reach the GPUs of one machine (peer copies where the driver allows P2P, else
    # through pinned host memory); across machines NCCL is the transport.
    collectives = "nccl" if inventory.nodes > 1 else "copy_engine"
    fixed = {**{f"precision.{k}": v for k, v in precision.items()}, "collectives": collectives,
             "peer_copies": gpu.peer_access, "cuda_graphs": Plan.model_fields["cuda_graphs"].default,
             "attn_bwd_chunks": Plan.model_fields["attn_bwd_chunks"].default}
    named = {k: v for k, v in pins.items() if k not in fixed or fixed[k] != v}
    name = check_plan_name(name or (f"{model.name}-{dtype}-{inventory.label}".lower()
                                    + pins_suffix(named, seq_len, tokens_per_step)))
    reason_pins = dict(pins)
    kept = {k: v for k, v in pins.items() if k != "batch.grad_accum"}     # checked on every candidate
    chunks_pin = pins.pop("lm_head_chunks", None)
    mb_pin = pins.pop("batch.micro_batch", None)
    ga_pin = pins.pop("batch.grad_accum", None)
    attn_chunks = pins.get("attn_bwd_chunks") or 1         # the attention backward's parts divide the micro-batch
    unit = _lcm(micro_batch_unit(seq_len, fp8, chunks_pin), attn_chunks)   # valid micro-batches: its multiples
    per_micro = seq_len * N
    gpus = f"{N} GPU{'s' if N > 1 else ''}"
    if tokens_per_step < per_micro:
        raise ValueError(f"--tokens-per-step {tokens_per_step} is less than one sequence per GPU (seq_len "
                         f"{seq_len} x {gpus} = {per_micro}): use {_tokens_hint(per_micro, per_micro * unit)}")
    seqs = tokens_per_step // per_micro if tokens_per_step % per_micro == 0 else None  # per GPU per step
    valid = [d for d in _divisors(seqs) if d % unit == 0] if seqs else []
    if ga_pin is not None and mb_pin is None:
        if not seqs or seqs % ga_pin:
            raise ValueError(f"--set batch.grad_accum={ga_pin} does not divide the sequences per GPU of a step "
                             f"({tokens_per_step} tokens / seq_len {seq_len} / {gpus}): pin batch.micro_batch "
                             f"instead, or choose --tokens-per-step {per_micro * ga_pin * unit}")
        mb_pin = seqs // ga_pin
    if mb_pin is not None:
        if mb_pin % unit:
            near = max(unit, round(mb_pin / unit) * unit)       # the valid micro-batch nearest the one asked for
            fix = (f"--micro-batch {_or(valid)}" if valid else
                   f"--micro-batch {near} with {_tokens_hint(tokens_per_step, per_micro * near)}")
            raise ValueError(f"--micro-batch {mb_pin}: {_batch_rules(fp8, chunks_pin, attn_chunks, seq_len, mb_pin)}: "
                             f"use {fix}")
        need = per_micro * mb_pin
        if tokens_per_step % need or (ga_pin is not None and tokens_per_step != need * ga_pin):
            alt = f", or --micro-batch {_or(valid)}" if valid and ga_pin is None else ""
            raise ValueError(f"--tokens-per-step {tokens_per_step} is not "
                             + (f"micro_batch x grad_accum x seq_len x GPUs = {need * ga_pin}: use --tokens-per-step "
                                f"{need * ga_pin}" + (f", or --set batch.grad_accum={tokens_per_step // need}"
                                                      if tokens_per_step % need == 0 else "")
                                if ga_pin is not None
                                else f"a multiple of micro_batch x seq_len x GPUs = {mb_pin} x {seq_len} x {N} "
                                     f"= {need}: use {_tokens_hint(tokens_per_step, need)}{alt}"))
        micros = [mb_pin]
    else:
        step_unit = per_micro * unit
        if tokens_per_step % step_unit:
            why = "" if unit == 1 else (f" ({_batch_rules(fp8, chunks_pin, attn_chunks, seq_len)}, so micro-batches "
                                        f"are multiples of {unit})")
            raise ValueError(f"--tokens-per-step {tokens_per_step} is not a multiple of seq_len x GPUs"
                             + (f" x {unit}" if unit > 1 else "") + f" = {step_unit}{why}: pick e.g. "
                             + _tokens_hint(tokens_per_step, step_unit).split(" ", 1)[1])
        micros = ([mb for mb in MICRO_BATCHES if mb in valid] or [d for d in valid if d <= MICRO_BATCHES[-1]]
                  or valid[:3])
    chunk_choices = [chunks_pin] if chunks_pin else LM_HEAD_CHUNKS
    zeros = [0] if N == 1 else [1, 2, 3, 0]

    seen: dict[str, Optional[Scored]] = {}     # inputs hash -> the candidate if it fits (pins can make them coincide)
    fitting: list[Scored] = []
    listed: set[str] = set()
    closest: Optional[Scored] = None

    def attempt(mb: int, zero: int, off: dict, flags: dict, probe: bool = False) -> bool:
        """Whether (mb, zero, off, recompute flags) fits at some LM-head chunk count; the first that does joins
        `fitting` (unless this is a `probe`), and the nearest miss is kept for the no-fit message."""
        nonlocal closest
        for chunks in chunk_choices:
            if (mb * seq_len) % chunks:
                continue
            fields = {
                "name": name, "model": model.model_dump(), "inventory": inventory.model_dump(),
                "precision": precision,
                "batch": {"micro_batch": mb, "seq_len": seq_len, "grad_accum": seqs // mb},
                "recompute": flags, "offload": dict(off),
                "sharding": {"optimizer": zero >= 1, "gradients": zero >= 2, "weights": zero >= 3},
                "lm_head_chunks": chunks,
                "collectives": collectives,
                "peer_copies": gpu.peer_access,
            }
            for path, value in pins.items():
                if not path.startswith("recompute."):
                    _set(fields, path, value)
            try:
                s = _score(fields)
            except ValidationError as e:
                raise ValueError(f"the pinned inputs make no valid plan: {validation_summary(e)}") from None
            if not _keeps_pins(s.plan, kept):
                continue
            key = s.plan.inputs_hash()
            if key not in seen:
                seen[key] = s if _fits(s) else None
                if seen[key] is None and (closest is None or (_shortfall(s, bound=True) < _shortfall(closest)
                                                              and _shortfall(s) < _shortfall(closest))):
                    closest = s
            if seen[key] is None:
                continue
            if not probe and key not in listed:
                fitting.append(seen[key])
                listed.add(key)
            return True
        return False

    # For each (micro-batch, ZeRO stage, offload): the recompute choices that fit and recompute no more than
    # needed (a superset of a fitting choice only adds work). The most recompute is tried first: when even
    # it does not fit, nothing less will (less recompute keeps more activations).
    most = _recompute_with_pins(RECOMPUTE_LATTICE[-1], pins)
    for mb in micros:
        for zero in zeros:
            for off in OFFLOAD_LADDER:
                if not attempt(mb, zero, off, most, probe=True):
                    continue
                fit_sets: list[set[str]] = []
                for rc in RECOMPUTE_LATTICE:
                    flags = _recompute_with_pins(rc, pins)
                    names = {k for k, v in flags.items() if v}
                    if not any(names >= f for f in fit_sets) and attempt(mb, zero, off, flags):
                        fit_sets.append(names)
    if _collect is not None:
        _collect.extend(fitting)
    if not fitting:
        hints = None
        if _hints:
            again = dict(model=model, seq_len=seq_len, tokens_per_step=tokens_per_step, dtype=dtype, pins=asked)
            hints = _fit_hints(inventory, again, fp8, chunks_pin)
        raise NoFitError(_no_fit_message(model, inventory, seq_len, tokens_per_step, fp8, chunks_pin, closest, hints))
    fitting.sort(key=_rank)
    best = _prefer_less_offload(fitting)
    others = _distinct([c for c in fitting if c is not best], best, runners_up)
    return _with_estimate(best, others, reason_pins, notes, fitting)


def _rank(s: Scored) -> float:
    """Step time, with ZeRO-2 and -3 handicapped: they must win by more than the cost model's error on
    overlapped collectives (per-layer transfers whose hiding is only estimated), so near-ties go to
    ZeRO-1 (no more bytes than plain data parallelism, less memory)."""
    return s.cost.step_ms * (1 + K.SHARDING_MARGIN * max(0, s.plan.sharding.zero - 1))


def _prefer_less_offload(fitting: list[Scored]) -> Scored:
    """The fastest plan, unless a plan that offloads less (a strict subset) is within
    `calibration.OFFLOAD_MARGIN` of it: then that one (the fastest such, repeatedly). Offload's gain is
    only as good as the estimated overlap of its PCIe streams, and it pins host RAM; recompute is not
    handicapped (its cost is GEMM and elementwise time, which the cost model predicts like the rest)."""
    top = fitting[0]
    best = top
    while best.plan.offload.names():
        mine = set(best.plan.offload.names())
        alt = next((c for c in fitting if set(c.plan.offload.names()) < mine), None)   # fitting is sorted
        if alt is None or _rank(alt) > _rank(top) * (1 + K.OFFLOAD_MARGIN):
            break
        best = alt
    return best


def _shortfall(s: Scored, bound: bool = False) -> tuple[int, int]:
    """(bytes over the usable device memory, bytes over the usable host RAM), compared in that order: the
    closest plan is the one nearest fitting the GPU, which a user cannot add to, then the host RAM, which the
    no-fit hints suggest adding; bound: a lower bound of the device's, without packing."""
    inv = s.plan.inventory
    return max(0, (s.device_min if bound else s.device) - usable_device(inv)), max(0, s.host - usable_host(inv))


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


def _head_fp8_bytes(rows, prefix: str) -> int:
    """Bytes of an FP8 LM head's e4m3/e5m2 rows among `rows` whose names start with `prefix` (0 without)."""
    return sum(r.total for r in rows if r.name.startswith(prefix) and r.dtype in ("e4m3", "e5m2"))


def _margin(o: Scored, best: Scored) -> str:
    """Why `best` won over the faster `o`: the handicaps that applied between them, summed and itemised,
    e.g. "under the 4% margin (2% per ZeRO level above 1, 2% for more offload)"."""
    levels = max(0, o.plan.sharding.zero - 1) - max(0, best.plan.sharding.zero - 1)
    parts, total = [], 0.0
    if levels > 0:          # _rank's handicap
        parts.append(f"{100 * K.SHARDING_MARGIN:.0f}% per ZeRO level above 1")
        total += levels * K.SHARDING_MARGIN
    if _rank(o) < _rank(best):      # ranked ahead, so best won by _prefer_less_offload's margin
        parts.append(f"{100 * K.OFFLOAD_MARGIN:.0f}% for more offload")
        total += K.OFFLOAD_MARGIN
    return f"under the {100 * total:.0f}% margin ({', '.join(parts)})"


def _why_not(o: Scored, best: Scored) -> str:
    pct = 100 * (o.cost.step_ms / best.cost.step_ms - 1)
    if pct >= 0:
        return f"{pct:.1f}% slower"
    more = set(o.plan.offload.names()) > set(best.plan.offload.names())
    return (f"{-pct:.1f}% faster" + (", with more offload" if more else "")
            + (f", with ZeRO-{o.plan.sharding.zero}" if o.plan.sharding.zero > best.plan.sharding.zero else "")
            + f": {_margin(o, best)}")


def _with_estimate(best: Scored, others: list[Scored], pins: dict[str, Any],
                   notes: Optional[dict[str, str]] = None, fitting: Optional[list[Scored]] = None) -> Plan:
    p, c = best.plan, best.cost
    runners = [Candidate(summary=_summary(o.plan), step_ms=o.cost.step_ms, tokens_per_s=o.cost.tokens_per_s,
                         device_bytes=o.device, why_not=_why_not(o, best))
               for o in others]
    est = Estimate(memory=live_spans(p, packed_table(p, best.rows)), device_bytes=best.device, host_bytes=best.host, step_ms=c.step_ms,
                   tokens_per_s=c.tokens_per_s, flops_per_token=c.flops_per_token, sol_ms=c.sol_ms,
                   sol_pct=c.sol_pct, mfu_pct=c.mfu_pct, breakdown_ms=c.breakdown_ms,
                   reasons={**_reasons(best, pins, fitting or [best]), **(notes or {})}, runners_up=runners)
    return p.model_copy(update={"estimate": est})


def _gains(a: Plan, b: Plan, skip: str = "") -> str:
    """What memory buys `a` over `b`, in words: "micro-batch 32 (not 8), recompute swiglu (not ffn+...)".
    Only gains (a larger micro-batch, less recompute, a lower ZeRO level, fewer LM-head chunks): where `a`
    differs the other way, freed memory did not buy that."""
    out = []
    if a.batch.micro_batch > b.batch.micro_batch:
        out.append(f"micro-batch {a.batch.micro_batch} (not {b.batch.micro_batch})")
    ra, rb = a.recompute.names(), b.recompute.names()
    if set(ra) < set(rb) and skip != "recompute":
        out.append(f"recompute {'+'.join(ra) or 'none'} (not {'+'.join(rb)})")
    if a.sharding.zero < b.sharding.zero:
        out.append(f"ZeRO-{a.sharding.zero} (not {b.sharding.zero})")
    if a.lm_head_chunks < b.lm_head_chunks:
        out.append(f"{a.lm_head_chunks} LM-head chunks (not {b.lm_head_chunks})")
    return ", ".join(out)


def _faster(best: Scored, alt: Scored) -> str:
    """How much faster `best` is than `alt`, e.g. "3.2% faster" (or "0.8% slower", when a margin kept it)."""
    gain = 100 * (alt.cost.step_ms / best.cost.step_ms - 1)
    return f"{gain:.1f}% faster" if gain >= 0 else f"{-gain:.1f}% slower"


def _offload_reason(best: Scored, fitting: list[Scored]) -> str:
    names = best.plan.offload.names()
    top = fitting[0] if fitting else best
    if not names:
        p = best.plan
        why = ("none but the block weights, streamed from pinned host memory (sharded weights on one GPU)"
               if p.num_gpus == 1 and p.sharding.weights else "none: everything fits on the GPU")
        if top is not best and top.plan.offload.names():
            why += (f"; offloading {'+'.join(top.plan.offload.names())} would be {_faster(top, best)}, "
                    f"under the {100 * K.OFFLOAD_MARGIN:.0f}% margin that offload must win by")
        return why
    mine = set(names)
    less = next((c for c in fitting if set(c.plan.offload.names()) < mine), None)
    head = "+".join(names) + " to pinned host memory: "
    if less is None:
        return head + "needed to fit (no plan that offloads less fits)"
    gained = _gains(best.plan, less.plan)
    return (head + f"{_faster(best, less)} than the fastest plan offloading less "
            f"({'+'.join(less.plan.offload.names()) or 'nothing'}"
            + (f"): the device memory it frees buys {gained}" if gained else ")"))


def _recompute_reason(best: Scored, fitting: list[Scored], act: int) -> str:
    names = best.plan.recompute.names()
    if not names:
        return "none: every activation fits"
    mine = set(names)
    less = [c for c in fitting if set(c.plan.recompute.names()) < mine]
    head = "+".join(names) + f" (saved activations {_gib(act)}): "
    if not less:
        return head + "the least recompute that fits"
    alt = less[0]
    gained = _gains(best.plan, alt.plan, skip="recompute")
    return (head + f"{_faster(best, alt)} than the fastest plan recomputing less "
            f"({'+'.join(alt.plan.recompute.names()) or 'none'})"
            + (f": the memory it saves buys {gained}" if gained else ""))


def _sharding_reason(best: Scored, fitting: list[Scored]) -> str:
    z = best.plan.sharding.zero
    others = [c for c in fitting if c.plan.sharding.zero != z]
    if not others:
        return f"ZeRO-{z}: the only sharding that fits"
    alt = others[0]
    if alt.cost.step_ms < best.cost.step_ms:
        return (f"ZeRO-{z}: ZeRO-{alt.plan.sharding.zero} would be {_faster(alt, best)}, {_margin(alt, best)}; "
                f"the margins cover the estimated overlap of collectives and offload streams")
    slower = 100 * (alt.cost.step_ms / best.cost.step_ms - 1)
    return f"ZeRO-{z}: fastest sharding that fits (ZeRO-{alt.plan.sharding.zero} {slower:.1f}% slower)"


def _reasons(best: Scored, pins: dict[str, Any], fitting: list[Scored]) -> dict[str, str]:
    p = best.plan
    gpu = p.inventory.gpu
    act = sum(r.total for r in best.rows if row_kind(r.name) is RowKind.ACT and r.place == "device")
    why = {
        "precision": (f"e4m3 matmuls: {gpu.fp8_tflops:.0f} vs {gpu.bf16_tflops:.0f} TFLOP/s BF16 on "
                      f"{gpu.display_name}" if p.fp8 else
                      "bf16 matmuls" + ("" if gpu.fp8_tflops else f": {gpu.display_name} has no FP8 tensor cores")),
        "batch": (f"{p.batch.micro_batch} x {p.batch.seq_len} tokens per micro-step, {p.batch.grad_accum} "
                  f"micro-step{'s' if p.batch.grad_accum != 1 else ''}: {p.tokens_per_step:,} tokens per optimizer "
                  f"step"),
        "recompute": _recompute_reason(best, fitting, act),
        "offload": _offload_reason(best, fitting),
        "lm_head_chunks": (f"{p.lm_head_chunks}: logits buffer "
                           f"{_gib(next(r.total for r in best.rows if r.name == 'lmhead.logits'))}"
                           + (f", its e5m2 gradient both ways {_gib(_head_fp8_bytes(best.rows, 'lmhead.dlogits'))}"
                              if p.precision.fp8_head else "")),
        "collectives": (f"{'nccl' if p.collectives == 'nccl' else 'none'}: one GPU, nothing to exchange"
                        if p.num_gpus == 1 else
                        f"NCCL: {p.inventory.nodes} machines" if p.collectives == "nccl" else
                        "copy engines, peer copies (no SMs spent)" if p.peer_copies else
                        "copy engines through pinned host memory: peer copies off (--set peer_copies=false)"
                        if gpu.peer_access else
                        f"copy engines through pinned host memory: {gpu.display_name} has no peer access"),
    }
    if p.num_gpus > 1:
        why["sharding"] = _sharding_reason(best, fitting)
    for key in why:                        # a pinned choice was the user's, not the solver's
        mine = {path: v for path, v in pins.items() if path.split(".")[0] == key}
        if not mine:
            continue
        head, _, rest = why[key].partition(":")
        section = _PIN_SECTIONS.get(key)
        said = ", ".join(f"{path}={str(v).lower() if isinstance(v, bool) else v}" for path, v in mine.items())
        whole = section is None or len(mine) == len(section.model_fields)
        why[key] = f"{head}: {said} pinned by the user" + ("" if whole or not rest.strip() else
                                                            f", the rest chosen ({rest.strip()})")
    for o in FP8_OPTIONS:
        if o.field == "fast_accum" and gpu.consumer:
            if p.precision.fast_accum:      # calibration.FP8_FAST_ACCUM_TIME: measured on an H200 only
                why["precision"] += f"; {o.named(p.precision)} (no gain predicted: measured on H200s only)"
            continue
        if getattr(p.precision, o.field) == o.on:
            off = _precision_gain(best, **{o.field: Precision.model_fields[o.field].default})
            why["precision"] += f"; {o.named(p.precision)} ({o.off_named}: {_faster_or_slower(off)} predicted)"
        elif p.fp8 and f"precision.{o.field}" not in pins and (gain := _precision_gain(best, **{o.field: o.on})) >= 0.05:
            alt = _score(p.model_copy(update={"precision": p.precision.model_copy(update={o.field: o.on})}).model_dump())
            more = _head_fp8_bytes(alt.rows, "lmhead.") - _head_fp8_bytes(best.rows, "lmhead.")   # beside the logits
            why["precision"] += (f"; {o.off_named} (--set precision.{o.field}={str(o.on).lower()}: {gain:.1f}% "
                                 f"faster predicted{o.how}" + (f", {_gib(more)} more for its FP8 copies" if more else "")
                                 + ("" if _fits(alt) else ": not at this plan's shape, which it has to change to fit")
                                 + ")")
    return why


def _faster_or_slower(gain: float) -> str:
    return f"{gain:.1f}% faster" if gain >= 0.05 else f"{-gain:.1f}% slower" if gain <= -0.05 else "the same"


def _precision_gain(best: Scored, **update) -> float:
    """How much faster (%) the cost model predicts the same plan with another FP8 recipe (`update`: precision
    fields, e.g. scaling="delayed" or lm_head="fp8")."""
    p = best.plan
    alt = step_cost(p.model_copy(update={"precision": p.precision.model_copy(update=update)}))
    return 100 * (best.cost.step_ms / alt.step_ms - 1)


def _plans(inv: Inventory, again: dict) -> bool:
    """Whether solve() finds a plan for `inv` with `again`'s other inputs (no hints of its own)."""
    try:
        solve(inventory=inv, _hints=False, runners_up=0, **again)
        return True
    except NoFitError:
        return False
    except ValueError:
        return False


def _host_needed(inv: Inventory, again: dict) -> Optional[int]:
    """The least host RAM (whole GiB, per machine) with which some plan fits `inv`'s GPUs; verified
    by solving again with it. None: no host RAM is enough."""
    fitting: list[Scored] = []
    try:
        solve(inventory=inv.model_copy(update={"host_mem_bytes": 1 << 50}), _hints=False, runners_up=0,
              _collect=fitting, **again)
    except ValueError:
        return None
    need = min((c.host for c in fitting), default=None)
    if need is None:
        return None
    gib = max(1, -(-need // int(K.HOST_USABLE * K.GiB)))        # usable = HOST_USABLE of the total
    for extra in (0, 1, 2, 4):                                  # rounding of usable bytes: verify
        trial = inv.model_copy(update={"host_mem_bytes": (gib + extra) * K.GiB, "host_mem_source": "user"})
        if _plans(trial, again):
            return gib + extra
    return None


def _fit_hints(inv: Inventory, again: dict, fp8: bool, chunks: Optional[int]) -> list[str]:
    """What would make it fit, each hint solved and kept only if a plan fits with it: more host RAM (the
    least with which a plan fits); 2x or 4x the GPUs, then half the sequence length, each alone or with
    host RAM, shown only where they need less host RAM than the first hint."""
    seq, tokens = again["seq_len"], again["tokens_per_step"]

    def tokens_for(seq_len: int, gpus: int) -> tuple[int, str]:
        """A --tokens-per-step the suggested seq_len and GPUs can divide (the user's where it can)."""
        step_unit = seq_len * gpus * micro_batch_unit(seq_len, fp8, chunks)
        if tokens % step_unit == 0:
            return tokens, ""
        lo = tokens // step_unit * step_unit or step_unit
        return lo, f" with {_tokens_hint(tokens, step_unit)}"

    base = _host_needed(inv, again)

    def with_host(trial: Inventory, args: dict) -> Optional[str]:
        """"" when `trial` fits with the host RAM given, " --host-mem NG" when it needs more (and less than
        the plain host-RAM hint: else that hint says it all), None when neither."""
        gib = _host_needed(trial, args)
        if gib is None:
            return None
        if gib * K.GiB <= trial.host_mem_bytes:
            return ""
        return None if base is not None and gib >= base else f" --host-mem {gib}G"

    hints = []
    pins = again.get("pins") or {}
    if "batch.micro_batch" in pins:     # the user's micro-batch: the cheapest change, where another fits
        free = {k: v for k, v in pins.items() if k not in ("batch.micro_batch", "batch.grad_accum")}
        try:
            mb = solve(inventory=inv, _hints=False, runners_up=0, **{**again, "pins": free}).batch.micro_batch
            hints.append(f"{'a smaller' if mb < pins['batch.micro_batch'] else 'another'} micro-batch "
                         f"(--micro-batch {mb})")
        except ValueError:
            pass
    if base is not None and base * K.GiB > inv.host_mem_bytes:
        hints.append(f"more host RAM (--host-mem {base}G)")
    N = inv.count * inv.nodes
    for k in (2, 4):
        trial = (inv.model_copy(update={"nodes": inv.nodes * k}) if inv.nodes > 1
                 else inv.model_copy(update={"count": inv.count * k}))
        if trial.count > 8 and inv.nodes == 1:
            trial = inv.model_copy(update={"nodes": trial.count // 8, "count": 8})
        step, tail = tokens_for(seq, N * k)
        args = {**again, "tokens_per_step": step}
        host = with_host(trial, args)
        if host is not None:
            hints.append(f"more GPUs (--gpus {trial.label}{host}{tail})")
            break
    if seq > 256 and seq % 2 == 0 and "batch.seq_len" not in (again.get("pins") or {}):
        step, tail = tokens_for(seq // 2, N)
        host = with_host(inv, {**again, "seq_len": seq // 2, "tokens_per_step": step})
        if host is not None:
            hints.append(f"shorter sequences (--seq-len {seq // 2}{host}{tail})")
    return hints


def _no_fit_message(model: ModelSpec, inv: Inventory, seq_len: int, tokens_per_step: int, fp8: bool,
                    chunks: Optional[int], s: Optional[Scored], hints: Optional[list[str]] = None) -> str:
    head = f"{model.name} does not fit {inv.label}"
    if s is None:
        return head + "."
    dev_short = s.device - usable_device(inv)
    host_short = s.host - usable_host(inv)
    lines = [f"{head}: the closest plan ({_summary(s.plan)}) needs"]
    size = human_bytes          # KiB and MiB where GiB would round a small shortfall to 0.0
    lines.append(f"  {size(s.device)} per GPU, {size(usable_device(inv))} usable"
                 + (f" (short {size(dev_short)})" if dev_short > 0 else ""))
    lines.append(f"  {size(s.host)} pinned host RAM, {size(usable_host(inv))} usable of {size(inv.host_mem_bytes)}"
                 + (f" (short {size(host_short)})" if host_short > 0 else ""))
    if hints is None:
        return "\n".join(lines)
    if hints:
        lines.append("What would make it fit (each solved and fits): " + "; ".join(hints))
    else:
        lines.append("What would make it fit: nothing llmqgen tried (more host RAM, 2x or 4x the GPUs, half the "
                     "sequence length) fits; a GPU with more memory")
    return "\n".join(lines)
