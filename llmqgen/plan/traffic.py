"""Bytes of device memory the non-GEMM, non-attention operations of a micro-step read and write: the cost
model's elementwise time (plan/cost.py) is these bytes over the GPU's bandwidth.

The operations counted are those the schedule runs (plan/schedule.py's micro-step sections, each layer
section once per layer), so fusions, recompute and the FP8 conversions of plan/block.py change the count by
changing the schedule. Each kernel's bytes per launch are written here from what its template reads and
writes (templates/_<family>.cu.j2): whole tensors once each (the fused FP8 kernels' amax passes read their
inputs a second time), per-row statistics, and nothing for small per-block partials.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..layout import FP8_SLOT_BYTES, act_slot_count
from .block import plan_fp8_groups
from .schedule import MICRO_SECTIONS
from .schema import Plan

# Operations the cost model times elsewhere (GEMMs, attention, transfers, collectives) or that move nothing
# worth counting (waits); of those, the ones that launch nothing on the compute stream.
NOT_ELEMENTWISE = {"linear", "attention_forward", "attention_backward", "copy", "copy_wait", "collective", "await",
                   "gradnorm_partials", "gradnorm_finalize"}
NO_LAUNCH = {"copy", "copy_wait", "collective", "await"}


@dataclass(frozen=True)
class MicroStepTraffic:
    """Per micro-step: `bytes` moved by elementwise operations and `launches` of the operations on the compute
    stream (GEMMs and attention included: each costs a launch inside the CUDA graph; copies and collectives run
    on other streams and are timed as transfers); `by_family`: the bytes per kernel family (kernel_family),
    as `bench --profile` groups its measured times."""
    bytes: int
    launches: int
    by_family: tuple[tuple[str, int], ...] = ()


_KERNEL_ALIAS = {"loss": "crossentropy", "ce": "crossentropy"}     # llmq_loss_reduce: the loss's sum


def kernel_family(name: str) -> str:
    """llmq_rmsnorm_forward_ln1 -> rmsnorm; llmq_loss_reduce -> crossentropy; another operation's kind as it is."""
    head = (name[5:] if name.startswith("llmq_") else name).split("_", 1)[0]
    return _KERNEL_ALIAS.get(head, head) if name.startswith("llmq_") else name


def micro_step_traffic(plan: Plan, schedule: dict) -> MicroStepTraffic:
    """Elementwise bytes and launches of one micro-step of `schedule` (build_schedule(plan)).

    Raises:
        KeyError: an operation of the micro-step has no traffic rule here (a new kernel: add its bytes).
    """
    rule = kernel_bytes(plan)
    L = plan.model.num_layers
    launches, fams = 0, {}
    for section, per_layer, _ in MICRO_SECTIONS:
        for op in schedule["micro_step"][section]:
            for o, times in _runs(op, L if per_layer else 1):
                launches += 0 if o["op"] in NO_LAUNCH else times
                n = times * op_bytes(o, rule)
                if n:
                    fam = kernel_family(o["kernel"] if o["op"] == "kernel" else o["op"])
                    fams[fam] = fams.get(fam, 0) + n
    return MicroStepTraffic(sum(fams.values()), launches, tuple(sorted(fams.items())))


def op_bytes(op: dict, rule) -> int:
    """Bytes one schedule operation (not a branch) moves as an elementwise operation: 0 for those timed
    otherwise (NOT_ELEMENTWISE); `rule`: kernel_bytes(plan). Raises KeyError for an operation or kernel
    without a rule."""
    if op["op"] == "kernel":     # the LM head's FP8 slots are scaled currently under every recipe
        return rule(op["kernel"], str(op["args"].get("stats", "")).startswith("fp8:head_"))
    if op["op"] == "bias_grad":             # ones . dy: the gradient read once
        return 2 * op["rows"] * op["cols"]
    if op["op"] == "memset":                # FP8 stats; a layer's gradient buffer (ZeRO-2)
        return op["bytes"]
    if op["op"] in NOT_ELEMENTWISE:
        return 0
    raise KeyError(f"plan/traffic.py has no bytes for schedule operation {op['op']!r}")


def _runs(op: dict, times: int):
    """(operation, how often it runs): a branch_on_layer's `first` at layer 0, its `rest` at the others."""
    if op["op"] != "branch_on_layer":
        yield op, times
        return
    for o in op["first"]:
        yield o, 1
    for o in op["rest"]:
        yield o, times - 1


def kernel_bytes(plan: Plan):
    """(kernel name, cold) -> bytes one launch of that micro-step kernel moves, for the plan's shapes (KeyError
    for a kernel without a rule, e.g. the optimizer's, which plan/cost.py times from the state's size);
    `cold`: an amax pass of a slot that delayed scaling does not cover (the LM head's)."""
    m, b = plan.model, plan.batch
    BT, C, F, QKV, V = b.micro_batch * b.seq_len, m.hidden_size, m.intermediate_size, m.qkv_dim, m.vocab_size
    QK = (m.num_heads + m.num_kv_heads) * m.head_dim          # the rotated part of qkv
    heads = m.num_heads + m.num_kv_heads
    RC = BT // plan.lm_head_chunks
    exact = {
        "llmq_embedding_forward": BT * (2 * 2 * C + 4),       # wte rows read, x written, token ids
        "llmq_embedding_backward": BT * (3 * 2 * C + 12),     # dx read, at most one dwte row read+written a token
        "llmq_rmsnorm_forward_ln1_first": BT * (2 * 2 * C + 4),
        "llmq_rmsnorm_backward_final": BT * (3 * 2 * C + 4),
        "llmq_rope_forward": BT * (2 * 2 * QKV + 4 * heads) if m.qk_norm else BT * 2 * 2 * QK,
        "llmq_rope_backward": BT * (3 * 2 * QKV + 4 * heads) if m.qk_norm else BT * (2 * QKV + 2 * QK),
        "llmq_rope_qknorm_dweight": 0,
        # SwiGLU: bf16 kernels read gate_up (and dh) once; the FP8 ones an amax pass, then the writing pass
        "llmq_swiglu_forward": BT * 2 * (2 * F + F),
        "llmq_swiglu_forward_amax": BT * 2 * 2 * F,
        "llmq_swiglu_forward_fp8": BT * (2 * 2 * F + F),
        "llmq_swiglu_backward": BT * 2 * (3 * F + 2 * F),
        "llmq_swiglu_backward_amax": BT * 2 * 3 * F,
        "llmq_swiglu_backward_dual": BT * (2 * 3 * F + 2 * 2 * F),
        "llmq_crossentropy_fused": RC * (3 * 2 * V + 12),     # read twice, written once
        "llmq_crossentropy_stats": RC * (2 * V + 12),
        "llmq_crossentropy_dual": RC * (2 * V + 2 * V + 8),   # read, written in e5m2 both ways
        "llmq_loss_reduce": BT * 4,
    }
    prefix = (   # longer prefixes first
        ("llmq_rmsnorm_forward_", BT * (4 * 2 * C + 4)),      # res_in, delta, res_out, y; rstd
        ("llmq_rmsnorm_recompute_", BT * (2 * 2 * C + 4)),
        ("llmq_rmsnorm_backward_", BT * (4 * 2 * C + 4)),     # dy, res, d_res, dx; rstd
        ("llmq_rmsnorm_dweight_", 0),                         # per-block partials: kilobytes
    )
    # Delayed scaling, warm slots (every micro-step but the first): the amax passes and the norms' quantize
    # return at once, the norms write y in e4m3, the roll reads and writes each slot and its history.
    if plan.precision.delayed:
        exact.update({"llmq_swiglu_forward_amax": 0, "llmq_swiglu_backward_amax": 0,
                      "llmq_amax_roll": act_slot_count(m.num_layers) * (2 * FP8_SLOT_BYTES
                                                                          + 2 * 4 * plan.precision.amax_history),
                      "llmq_rmsnorm_forward_ln1_first": BT * (2 * C + C + 4),
                      "llmq_rmsnorm_forward_ln1": BT * (3 * 2 * C + C + 4),
                      "llmq_rmsnorm_forward_ln2": BT * (3 * 2 * C + C + 4),
                      "llmq_rmsnorm_recompute_ln1": BT * (2 * C + C + 4),
                      "llmq_rmsnorm_recompute_ln2": BT * (2 * C + C + 4)})
    amax_pass = 0 if plan.precision.delayed else 1
    quant, transpose = plan_fp8_groups(plan)
    fp8, cold_amax = {}, {}
    for g in quant:
        n, s = g["R"] * g["K"], 4 if g["src"] == "float" else 2
        cold_amax[f"llmq_amax_{g['name']}"] = n * s
        fp8.update({f"llmq_amax_{g['name']}": amax_pass * n * s, f"llmq_quantize_{g['name']}": n * (s + 1),
                    f"llmq_quantize_cold_{g['name']}": 0,
                    f"llmq_quantize_t_{g['name']}": n * (s + 1), f"llmq_quantize_dual_{g['name']}": n * (s + 2)})
    fp8.update({f"llmq_transpose_fp8_{g['name']}": 2 * g["R"] * g["K"] for g in transpose})

    def rule(name: str, cold: bool = False) -> int:
        if cold and name in cold_amax:
            return cold_amax[name]
        if name in exact:
            return exact[name]
        if name in fp8:
            return fp8[name]
        for p, n in prefix:
            if name.startswith(p):
                return n
        raise KeyError(f"plan/traffic.py has no bytes for kernel {name}: add what one launch reads and writes")
    return rule
