"""The transformer block's operations, in one table: what the memory table, the schedule, the kernel
families and the cost model read about the block.

    res  = res_prev + delta            ln1 = rmsnorm(res)            [FP8: ln1 -> e4m3]
    qkv  = ln1 @ Wqkv^T (+bias), rope  att = sdpa(qkv), lse
    res2 = res + att @ Wo^T            ln2 = rmsnorm(res2)           [FP8: ln2 -> e4m3]
    gu   = ln2 @ Wgu^T                 h = swiglu(gu)                [FP8: h -> e4m3]
    delta = h @ Wd^T

SAVED lists the activations backward reads, in memory-table order, each with the recompute flag that drops
it (it is then recomputed in backward, into one shared row). OPS lists the operations in forward order with
the values they read and write. What backward recomputes follows from the two (`recomputed`): an operation
reruns when it writes a dropped value, or a value a rerun operation reads that is never saved (the
attention-out GEMM's output, which the ln2 residual add reads). Adding a recompute flag: a field of
`schema.Recompute`, and the values it drops here.

GEMMs are y[M,N] = x[M,K] . W[N,K]^T (runtime/blas.py's convention), M the micro-batch's tokens; each one's
forward, dgrad and wgrad use the same (M, N, K). In FP8 plans their operands are converted in the slots of
FP8_CONVERSIONS: `quantize` bf16 -> fp8, `quantize_t` into the transpose (wgrad's x), `dual` both from one
read (the output gradient: dgrad's dy and wgrad's dy^T), `transpose` of an fp8 tensor, `amax` of a tensor
no kernel of ours produced. The quantize family compiles exactly these.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable
from functools import lru_cache

from ..models.spec import ModelSpec
from .schema import Plan, Recompute


@dataclass(frozen=True)
class Saved:
    """An activation backward reads: one layer's instance has `shape(model, B, T)` for B sequences of T tokens;
    dtype "op": the matmul operand dtype (e4m3 in FP8 plans)."""
    name: str
    dtype: str
    shape: Callable[[ModelSpec, int, int], tuple[int, ...]]
    dropped_by: str | None          # the Recompute flag that drops it; None: always saved
    qk_norm: bool = False           # exists only for models with q/k norms


@dataclass(frozen=True)
class Op:
    """One forward operation of the block: the values it reads and writes ("branch": the shared
    attention-out / down output, never saved). `from_saved`: a norm recomputes its output alone from these
    values when they are all saved (no residual add, no new rstd)."""
    name: str
    kind: str                        # norm | gemm | rope | attention | swiglu
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    from_saved: tuple[str, ...] = ()


def _tokens_by(width: Callable[[ModelSpec], int]) -> Callable[[ModelSpec, int, int], tuple[int, ...]]:
    return lambda m, B, T: (B * T, width(m))


def _per_token(m: ModelSpec, B: int, T: int) -> tuple[int, ...]:
    return (B * T,)


_C = _tokens_by(lambda m: m.hidden_size)
SAVED = (
    Saved("res", "bf16", _C, None),               # the block input: always kept
    Saved("rstd1", "fp32", _per_token, "block"),
    Saved("ln1", "op", _C, "norm"),
    Saved("qkv", "bf16", _tokens_by(lambda m: m.qkv_dim), "qkv"),
    # pre-norm q/k and their per-head rstd
    Saved("qkv_pre", "bf16", _tokens_by(lambda m: m.qkv_dim), "qkv", qk_norm=True),
    Saved("qk_rstd", "fp32", _tokens_by(lambda m: m.num_heads + m.num_kv_heads), "qkv", qk_norm=True),
    # bf16: cuDNN's backward reads O; its e4m3 transpose is made from it
    Saved("att", "bf16", _tokens_by(lambda m: m.q_dim), "attention"),
    Saved("lse", "fp32", lambda m, B, T: (B, m.num_heads, T), "attention"),
    Saved("res2", "bf16", _C, "block"),
    Saved("rstd2", "fp32", _per_token, "block"),
    Saved("ln2", "op", _C, "norm"),
    Saved("gu", "bf16", _tokens_by(lambda m: 2 * m.intermediate_size), "ffn"),
    Saved("h", "op", _tokens_by(lambda m: m.intermediate_size), "swiglu"),
)

OPS = (
    Op("ln1", "norm", ("res",), ("rstd1", "ln1"), from_saved=("res", "rstd1")),
    Op("qkv", "gemm", ("ln1",), ("qkv_pre",)),          # models without q/k norms: see block_ops
    Op("rope", "rope", ("qkv_pre",), ("qkv", "qk_rstd")),
    Op("attention", "attention", ("qkv",), ("att", "lse")),
    Op("attn_out", "gemm", ("att",), ("branch",)),
    Op("ln2", "norm", ("res", "branch"), ("res2", "rstd2", "ln2"), from_saved=("res2", "rstd2")),
    Op("gate_up", "gemm", ("ln2",), ("gu",)),
    Op("swiglu", "swiglu", ("gu",), ("h",)),
    Op("down", "gemm", ("h",), ("branch",)),
)


@dataclass(frozen=True)
class Linear:
    """A GEMM of the block: its input value and the FP8 slots of its input and output gradient."""
    name: str
    x: str
    x_slot: str
    dy_slot: str


LINEARS = {"qkv": Linear("qkv", "ln1", "ln1", "d_qkv"), "attn_out": Linear("attn_out", "att", "att", "d_att_out"),
           "gate_up": Linear("gate_up", "ln2", "ln2", "d_gu"), "down": Linear("down", "h", "h", "d_down")}

# FP8 slot -> (the quantize family's site, the conversions the step makes). Input slots: the forward's copy
# (ln1, ln2: quantized after their norm; att: amax then quantize, cuDNN gives no amax) and wgrad's transpose;
# output-gradient slots: dual (d_down's amax too: the layer above's residual gradient has none). SwiGLU writes
# h and d_gu in fp8 itself (codegen/families/swiglu.py): those slots convert nothing but h's transpose.
# Site order is the quantize family's: the first site of a shape names its kernels. Under delayed scaling the
# norms write ln1 and ln2 in e4m3 themselves once their slot is warm: their quantize runs only while it is cold
# ("quantize_cold"; DELAYED_CONVERSIONS).
FP8_CONVERSIONS = {
    "ln1": ("ln1", ("quantize", "transpose")), "att": ("att", ("amax", "quantize", "quantize_t")),
    "ln2": ("ln2", ("quantize", "transpose")), "h": ("swiglu", ("transpose",)),
    "d_qkv": ("d_qkv", ("dual",)), "d_att_out": ("d_att_out", ("dual",)), "d_gu": ("d_gate_up", ()),
    "d_down": ("d_down", ("amax", "dual")),
}
DELAYED_CONVERSIONS = {"ln1": ("quantize_cold", "transpose"), "ln2": ("quantize_cold", "transpose")}
WEIGHT_SITES = {"w_qkv": "qkv", "w_attn_out": "att_out", "w_gate_up": "gate_up", "w_down": "down"}
# An FP8 LM head (precision.lm_head): the input's amax over the micro-step (slot head_x), each chunk's e4m3
# copy and transpose (site head_xc, slot head_x), the weight's amax, copy and transpose, made each micro-step
# from the bf16 work copy (slot head_w). The cross-entropy kernels write the e5m2 logit gradient both ways.
HEAD_SITES = ("head_x", "head_xc", "head_w")


def weight_conversions(sharded_optimizer: bool) -> tuple[str, ...]:
    """A block weight's: dgrad's transpose; the initial amax and the publish's quantize, of the whole
    master (one GPU's shard when the optimizer is sharded: the shard kernels, not these)."""
    return ("transpose",) if sharded_optimizer else ("amax", "quantize", "transpose")


def site_of(slot: str) -> str:
    """FP8 slot -> the quantize family's site ("h" -> "swiglu", "w_down" -> "down", "head_x" -> "head_x")."""
    if slot in HEAD_SITES:
        return slot
    return WEIGHT_SITES.get(slot) or FP8_CONVERSIONS[slot][0]


def fp8_sites(BT: int, C: int, F: int, QDIM: int, QKV: int, grad: str, master: str, sharded_optimizer: bool,
              delayed: bool = False, head: tuple[int, int] | None = None
              ) -> list[tuple[str, int, int, str, str, tuple[str, ...]]]:
    """(site, rows, cols, source dtype, fp8 dtype, conversions) of every tensor an FP8 matmul reads;
    source dtypes "bf16" or "float" (an fp32 master), fp8 dtypes "e4m3"/"e5m2" (grad: the gradients');
    `delayed`: delayed scaling's conversions; `head`: (chunk rows, vocabulary) of an FP8 LM head."""
    w = "float" if master == "fp32" else "bf16"
    shapes = {"ln1": (BT, C, "bf16", "e4m3"), "att": (BT, QDIM, "bf16", "e4m3"), "ln2": (BT, C, "bf16", "e4m3"),
              "h": (BT, F, "bf16", "e4m3"), "d_qkv": (BT, QKV, "bf16", grad), "d_att_out": (BT, C, "bf16", grad),
              "d_gu": (BT, 2 * F, "bf16", grad), "d_down": (BT, C, "bf16", grad),
              "w_qkv": (QKV, C, w, "e4m3"), "w_attn_out": (C, QDIM, w, "e4m3"),
              "w_gate_up": (2 * F, C, w, "e4m3"), "w_down": (C, F, w, "e4m3")}
    conv = {slot: c for slot, (_, c) in FP8_CONVERSIONS.items()}
    conv.update(DELAYED_CONVERSIONS if delayed else {})
    conv.update({slot: weight_conversions(sharded_optimizer) for slot in WEIGHT_SITES})
    if head:
        rows, V = head
        shapes.update({"head_x": (BT, C, "bf16", "e4m3"), "head_xc": (rows, C, "bf16", "e4m3"),
                       "head_w": (V, C, "bf16", "e4m3")})
        conv.update({"head_x": ("amax",), "head_xc": ("dual",), "head_w": ("amax", "dual")})
    return [(site_of(slot), *shape, conv[slot]) for slot, shape in shapes.items()]


def saved_values(m: ModelSpec, r: Recompute) -> list[tuple[Saved, bool]]:
    """(activation, saved per layer?) of the model's block, in memory-table order."""
    return [(s, s.dropped_by is None or not getattr(r, s.dropped_by)) for s in SAVED if m.qk_norm or not s.qk_norm]


@lru_cache(maxsize=2)
def block_ops(qk_norm: bool) -> tuple[Op, ...]:
    """OPS of a model; without q/k norms the QKV GEMM writes qkv and RoPE rotates it in place."""
    if qk_norm:
        return OPS
    plain = {"qkv_pre": ("qkv",), "qk_rstd": ()}
    fix = lambda vs: tuple(w for v in vs for w in plain.get(v, (v,)))  # noqa: E731
    return tuple(Op(op.name, op.kind, fix(op.reads), fix(op.writes), op.from_saved) for op in OPS)


@dataclass(frozen=True)
class Rerun:
    """An operation of the block's backward recompute; `from_saved`: a norm's output alone, from its saved
    residual and rstd (else the operation as in forward)."""
    op: Op
    from_saved: bool = False


@lru_cache(maxsize=64)
def recomputed(r: Recompute, qk_norm: bool) -> tuple[Rerun, ...]:
    """The operations backward reruns for the recompute set `r`: norms recomputed from their saved residual
    and rstd first (they read saved values only), then the others in forward order."""
    saved = {s.name for s in SAVED if s.dropped_by is None or not getattr(r, s.dropped_by)}
    dropped = {s.name for s in SAVED} - saved
    needed: set[str] = set()          # values a rerun operation reads that are not saved
    out: list[Rerun] = []
    for op in reversed(block_ops(qk_norm)):
        if not any(v in needed or v in dropped for v in op.writes):
            continue
        from_saved = bool(op.from_saved) and set(op.from_saved) <= saved
        out.append(Rerun(op, from_saved))
        reads = op.from_saved if from_saved else op.reads
        needed = (needed - set(op.writes)) | {v for v in reads if v not in saved}
    return tuple(sorted(reversed(out), key=lambda x: not x.from_saved))


@dataclass(frozen=True)
class Gemm:
    """One GEMM of a micro-step: phase forward | recompute | backward, pass forward | dgrad | wgrad;
    dtype: the operands' ("e4m3" or "bf16")."""
    phase: str
    pass_: str
    name: str
    M: int
    N: int
    K: int
    dtype: str


def layer_gemms(plan: Plan) -> list[Gemm]:
    """One layer's GEMMs in a micro-step: every block matrix forward, the recomputed ones, and the
    backward's dgrad and wgrad of each."""
    return list(_layer_gemms(plan.model, plan.batch.micro_batch * plan.batch.seq_len, plan.recompute,
                             plan.precision.matmul))


@lru_cache(maxsize=4096)
def _layer_gemms(m: ModelSpec, BT: int, r: Recompute, dt: str) -> tuple[Gemm, ...]:
    shapes = m.block_matrix_shapes()
    rerun = {x.op.name for x in recomputed(r, m.qk_norm)}
    out = [Gemm("forward", "forward", n, BT, *shapes[n], dt) for n in LINEARS]
    out += [Gemm("recompute", "forward", n, BT, *shapes[n], dt) for n in LINEARS if n in rerun]
    out += [Gemm("backward", p, n, BT, *shapes[n], dt) for n in LINEARS for p in ("dgrad", "wgrad")]
    return tuple(out)


def head_gemms(plan: Plan) -> list[Gemm]:
    """The LM head's GEMMs of a micro-step (BF16, or e4m3 with precision.lm_head "fp8"): forward, dgrad and
    wgrad of each chunk of token rows."""
    return list(_head_gemms(plan.model, plan.batch.micro_batch * plan.batch.seq_len, plan.lm_head_chunks,
                            "e4m3" if plan.precision.fp8_head else "bf16"))


@lru_cache(maxsize=4096)
def _head_gemms(m: ModelSpec, BT: int, chunks: int, dt: str) -> tuple[Gemm, ...]:
    return tuple(Gemm(phase, p, "lm_head", BT // chunks, m.vocab_size, m.hidden_size, dt)
                 for _ in range(chunks)
                 for phase, p in (("forward", "forward"), ("backward", "dgrad"), ("backward", "wgrad")))


def fp8_groups(sites: list[tuple[str, int, int, str, str, tuple[str, ...]]]) -> tuple[list[dict], list[dict]]:
    """The FP8 kernels of `fp8_sites`: quantize groups, one per distinct (rows, cols, source, fp8 dtype), and
    transpose groups, one per distinct (rows, cols); each {name (its first site), R, K, src, dst, sites,
    conversions (those its sites make; a group making none has no kernels)}."""
    def dedupe(key, kinds):
        out: dict = {}
        for site, R, K, src, dst, conv in sites:
            g = out.setdefault(key(R, K, src, dst), dict(name=site, R=R, K=K, src=src, dst=dst, sites=[],
                                                        conversions=[]))
            g["sites"].append(site)
            g["conversions"] += [c for c in conv if c in kinds and c not in g["conversions"]]
        return [g for g in out.values() if g["conversions"]]
    return (dedupe(lambda R, K, s, d: (R, K, s, d), ("amax", "quantize", "quantize_cold", "quantize_t", "dual")),
            dedupe(lambda R, K, s, d: (R, K), ("transpose",)))


def plan_fp8_groups(plan: Plan) -> tuple[list[dict], list[dict]]:
    """fp8_groups of a plan (empty for BF16 plans)."""
    if not plan.fp8:
        return [], []
    m, p = plan.model, plan.precision
    BT = plan.batch.micro_batch * plan.batch.seq_len
    head = (BT // plan.lm_head_chunks, m.vocab_size) if p.fp8_head else None
    return fp8_groups(fp8_sites(BT, m.hidden_size, m.intermediate_size, m.q_dim, m.qkv_dim, p.gradient, p.master,
                                sharded_optimizer(plan), p.delayed, head))


def sharded_optimizer(plan: Plan) -> bool:
    """Each GPU updates its shard of the optimizer state (ZeRO-1 and up, on several GPUs)."""
    return plan.num_gpus > 1 and plan.sharding.optimizer
