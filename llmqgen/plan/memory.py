"""The memory table: every byte a plan needs, per GPU and on the host.

One list of MemRow drives both the planner and the runtime: plan/lifetimes.py gives every device row
its offset in the arena (rows whose lifetimes in the schedule never overlap share bytes), the planner
totals the packed peak and the runtime allocates exactly that, every row at its offset. The per-layer
activations are the block table's (plan/block.py): a recompute flag moves the rows it drops from per-layer
to shared (one layer's worth of scratch).
"""
from __future__ import annotations

from enum import Enum
from functools import lru_cache
from math import prod

from ..layout import (FP8_SLOT_BYTES, SCALAR_COUNT, act_slot_count, align, attention_stats_bytes, flash_unsupported,
                      fp8_slot_count, norm_partials_bytes, staging_elems, token_rows)
from .block import saved_values
from .calibration import ATTN_WORKSPACE_MIN, COMM_PIECE, CONTEXT_RESERVE, CUBLAS_WORKSPACE, GRADNORM_PARTIALS
from ..hardware.spec import GpuSpec
from ..models.spec import ModelSpec
from .schema import MemRow, Offload, Plan, Precision, Recompute, Sharding

DTYPE_BYTES = {"bf16": 2, "fp32": 4, "e4m3": 1, "e5m2": 1, "int32": 4, "uint8": 1}


SHARD_GRAIN = 16     # shard sizes are multiples of this (16-byte vectors, FP8 quantize blocks)


def shard_elems(n: int, gpus: int) -> int:
    """Elements of one GPU's shard of an n-element tensor: rank r owns [r*S, (r+1)*S) of the tensor
    padded with zeros to gpus*S elements."""
    return -(-n // (SHARD_GRAIN * gpus)) * SHARD_GRAIN


@lru_cache(maxsize=1 << 16)
def _row(name, nbytes, count, place, lifetime, dtype, shape, note, sharded) -> MemRow:
    """Rows are frozen: the solver's candidates share equal ones (most rows recur across candidates,
    and validating ~10^6 new ones was most of a solve's time)."""
    return MemRow(name=name, bytes=nbytes, count=count, place=place, lifetime=lifetime, dtype=dtype, shape=shape,
                  note=note, sharded=sharded)


class RowKind(str, Enum):
    """What a row holds. A row's name is "<kind>.<what>" ("grads.qkv", "act.res"); a device double buffer of
    host-side rows is a STAGE row named for them ("stage.grads.qkv", "stage.res")."""
    WEIGHTS = "weights"      # the work copy the matmuls read
    MASTER = "master"        # the optimizer's copy, where the work copy cannot serve
    GRADS = "grads"
    ADAM_M = "adam_m"
    ADAM_V = "adam_v"
    STAGE = "stage"          # device double buffers of streamed rows, pinned token staging
    COMM = "comm"            # the copy-engine collectives' buffers
    ACT = "act"              # the block's saved activations (plan/block.py)
    WORK = "work"            # one layer's scratch, shared by all layers
    LMHEAD = "lmhead"
    STATS = "stats"          # FP8 slots, scalars, gradient-norm partials
    TOKENS = "tokens"
    ROPE = "rope"
    WS = "ws"                # library workspaces
    RESERVE = "reserve"      # what the CUDA context and libraries take


def row_kind(name: str) -> RowKind:
    """The kind of a row of the memory table, by its name."""
    return RowKind(name.split(".", 1)[0])


class _Table:
    def __init__(self, gpus: int = 1):
        self.rows: list[MemRow] = []
        self.gpus = gpus

    def add(self, kind: RowKind, what, dtype, shape, place="device", lifetime="persistent", count=1, note="",
            shard=None):
        """A row named "<kind>.<what>". shard: None for non-parameter rows, True for this GPU's part of a
        tensor, False for a whole parameter-sized row, which several GPUs pad to gpus*S elements so that
        collectives split every tensor into equal shards."""
        name = f"{kind.value}.{what}"
        elems = prod(shape)
        sharded = bool(shard) and self.gpus > 1
        if shard is not None and self.gpus > 1:
            S = shard_elems(elems, self.gpus)
            elems, shape = (S, (S,)) if shard else (S * self.gpus, shape)
        self.rows.append(_row(name, align(elems * DTYPE_BYTES[dtype]), count, place, lifetime, dtype,
                              tuple(shape), note, sharded))


def param_tensors(plan: Plan) -> list[tuple[str, tuple[int, ...], bool, bool]]:
    """(name, shape, per_layer, is_matrix) for every trainable tensor, in storage order."""
    return list(_tensors(plan.model))


@lru_cache(maxsize=64)
def _tensors(m: ModelSpec) -> tuple[tuple[str, tuple[int, ...], bool, bool], ...]:
    C, HD = m.hidden_size, m.head_dim
    out = [(f"{k}", shape, True, True) for k, shape in m.block_matrix_shapes().items()]
    out += [("ln1", (C,), True, False), ("ln2", (C,), True, False)]
    if m.qkv_bias:
        out.append(("qkv_bias", (m.qkv_dim,), True, False))
    if m.qk_norm:
        out += [("q_norm", (HD,), True, False), ("k_norm", (HD,), True, False)]
    out.append(("embedding", (m.vocab_size, C), False, False))
    if not m.tie_embeddings:
        out.append(("lm_head", (m.vocab_size, C), False, False))
    out.append(("final_norm", (C,), False, False))
    return tuple(out)


def saved_activations(m: ModelSpec, r: Recompute, B: int, T: int, op: str
                      ) -> list[tuple[str, str, tuple[int, ...], bool]]:
    """(name, dtype, shape, saved_per_layer) of the block activations backward reads (plan/block.py's SAVED),
    for micro-batches of B sequences of T tokens; op: the dtype a matmul operand is kept in (the plan's matmul
    dtype)."""
    return [(s.name, op if s.dtype == "op" else s.dtype, s.shape(m, B, T), saved)
            for s, saved in saved_values(m, r)]


def memory_table(plan: Plan) -> list[MemRow]:
    """Every row of the plan, in table order: the model's state (weights, master copies, gradients, Adam
    moments, their streaming buffers, the collectives' buffers), then what one micro-step needs
    (activations, scratch, LM head, stats, tokens, workspaces). Each part is built from, and cached on,
    only the inputs it reads: the solver's candidates share most parts."""
    b = plan.batch
    return [*_state_rows(plan.model, plan.precision, plan.offload, plan.sharding, plan.num_gpus,
                         plan.collectives, plan.peer_copies),
            *_step_rows(plan.model, plan.precision, b.micro_batch, b.seq_len, plan.recompute, plan.offload.residual,
                        plan.num_gpus, plan.inventory.gpu, plan.lm_head_chunks, plan.attn_bwd_chunks)]


def estimate_is_current(plan: Plan) -> bool:
    """Whether the plan's estimate was made for its inputs: the estimate is not hashed, so a plan file
    edited by hand (model.num_layers 24 -> 2, batch.grad_accum 8 -> 3) keeps the old one; its memory rows
    or its step time then differ from what these inputs give (this table, plan/cost.py's step_cost). True
    for a plan without an estimate (nothing stale to show)."""
    if plan.estimate is None:
        return True
    from .cost import step_cost     # cost.py reads this module's tables

    def rows(table: list[MemRow]) -> list[tuple]:
        return sorted((r.name, r.bytes, r.count, r.place) for r in table)
    return (rows(plan.estimate.memory) == rows(memory_table(plan))
            and abs(step_cost(plan).step_ms / plan.estimate.step_ms - 1) < 1e-9)


P = dict(shard=False)           # a parameter-sized row (padded to equal shards with several GPUs)
S_ = dict(shard=True)           # this GPU's shard of one
W, M, G, AM, AV, STAGE = RowKind.WEIGHTS, RowKind.MASTER, RowKind.GRADS, RowKind.ADAM_M, RowKind.ADAM_V, RowKind.STAGE


@lru_cache(maxsize=4096)
def _state_rows(m: ModelSpec, p: Precision, o: Offload, s: Sharding, N: int, collectives: str,
                peer_copies: bool) -> tuple[MemRow, ...]:
    t = _Table(N)
    _weights(t, m, p, o, s, N)
    _masters(t, m, p, o, s)
    _gradients_and_moments(t, m, p, o, s, N)
    _optimizer_streams(t, m, p, o, s)
    _collective_buffers(t, m, N, collectives, peer_copies)
    return tuple(t.rows)


def _weights(t: _Table, m: ModelSpec, p: Precision, o: Offload, s: Sharding, N: int) -> None:
    """The work copy the matmuls read. FP8 plans keep block matrices in e4m3 (their transposes for dgrad
    are made per layer in backward); everything else is bf16. On one GPU, sharded weights = streamed from
    host, like offloaded quantized weights."""
    L, fp8 = m.num_layers, p.matmul == "e4m3"
    stream_w = o.quantized_weights or (s.weights and N == 1)
    w_shard = s.weights and N > 1
    for name, shape, per_layer, is_matrix in _tensors(m):
        wdt = "e4m3" if (fp8 and is_matrix) else "bf16"
        streamed = per_layer and stream_w
        t.add(W, name, wdt, shape, place="host" if streamed else "device",
              count=L if per_layer else 1, **(S_ if (w_shard and per_layer) else P))
    if stream_w or w_shard:
        # Double buffer: layer l+1's weights arrive (H2D or all-gather) while layer l computes.
        for name, shape, per_layer, is_matrix in _tensors(m):
            if per_layer:
                t.add(STAGE, f"weights.{name}", "e4m3" if (fp8 and is_matrix) else "bf16", shape,
                      lifetime="shared", count=2, note="layer prefetch double buffer", **P)


def _masters(t: _Table, m: ModelSpec, p: Precision, o: Offload, s: Sharding) -> None:
    """Master weights: a separate copy unless the bf16 work copy can serve as master."""
    fp8 = p.matmul == "e4m3"
    for name, shape, per_layer, is_matrix in _tensors(m):
        if (fp8 and is_matrix) or p.master == "fp32" or o.master or s.optimizer:
            t.add(M, name, p.master, shape, place="host" if o.master else "device",
                  count=m.num_layers if per_layer else 1, **(S_ if s.optimizer else P))


def _gradients_and_moments(t: _Table, m: ModelSpec, p: Precision, o: Offload, s: Sharding, N: int) -> None:
    """Gradients (bf16, accumulated over micro-steps) and Adam moments. ZeRO-2 keeps a block's shard: its
    full gradients pass through a double buffer and are reduce-scattered as backward leaves the block.
    Embedding, LM head and final norm are written whole by their backward kernels: kept whole."""
    L, opt = m.num_layers, S_ if s.optimizer else P
    for name, shape, per_layer, _ in _tensors(m):
        t.add(G, name, "bf16", shape, place="host" if o.gradients else "device",
              count=L if per_layer else 1, **(S_ if (s.gradients and per_layer) else P))
    for name, shape, per_layer, _ in _tensors(m):
        t.add(AM, name, p.adam_m, shape, place="host" if o.adam_m else "device", count=L if per_layer else 1, **opt)
        t.add(AV, name, p.adam_v, shape, place="host" if o.adam_v else "device", count=L if per_layer else 1, **opt)
    if (s.gradients and N > 1) or o.gradients:
        # One layer's full gradients, double-buffered, before reduce-scatter / D2H.
        for name, shape, per_layer, _ in _tensors(m):
            if per_layer:
                t.add(STAGE, f"grads.{name}", "bf16", shape, lifetime="shared", count=2,
                      note="layer gradient double buffer", **P)


def _optimizer_streams(t: _Table, m: ModelSpec, p: Precision, o: Offload, s: Sharding) -> None:
    """The optimizer streams offloaded states through the GPU one layer at a time."""
    if not (o.master or o.adam_m or o.adam_v):
        return
    for name, shape, per_layer, _ in _tensors(m):
        if per_layer:
            for kind, dt, off in ((M, p.master, o.master), (AM, p.adam_m, o.adam_m), (AV, p.adam_v, o.adam_v)):
                if off:
                    t.add(STAGE, f"{kind.value}.{name}", dt, shape, lifetime="shared", count=2,
                          note="optimizer streaming double buffer", **(S_ if s.optimizer else P))


def _collective_buffers(t: _Table, m: ModelSpec, N: int, collectives: str, peer_copies: bool) -> None:
    """Copy-engine collectives: the pieces received from the other GPUs (and sent through the host)."""
    if N > 1 and collectives == "copy_engine":
        piece = min(COMM_PIECE, max_piece_bytes(m, N))
        t.add(RowKind.COMM, "recv", "uint8", (2 * (N - 1) * piece,), lifetime="shared", shard=None,
              note="reduce-scatter pieces from the other GPUs, double buffer")
        if not peer_copies:
            t.add(RowKind.COMM, "host", "uint8", (2 * (N - 1) * piece,), place="host", shard=None,
                  note="host-staged collectives: this GPU's outgoing pieces")


@lru_cache(maxsize=4096)
def _step_rows(m: ModelSpec, p: Precision, B: int, T: int, r: Recompute, offload_residual: bool, N: int,
               gpu: GpuSpec, lm_head_chunks: int, attn_bwd_chunks: int) -> tuple[MemRow, ...]:
    t = _Table(N)
    _activations(t, m, p, B, T, r, offload_residual)
    _layer_scratch(t, m, p, B, T, gpu)
    _lm_head(t, m, p, B * T, lm_head_chunks)
    _small_state(t, m, p, B, T, N, attn_bwd_chunks)
    return tuple(t.rows)


def _activations(t: _Table, m: ModelSpec, p: Precision, B: int, T: int, r: Recompute, offload_residual: bool
                 ) -> None:
    """Saved activations: per layer unless recomputed (then one shared instance)."""
    L = m.num_layers
    for name, dt, shape, saved in saved_activations(m, r, B, T, p.matmul):
        if saved and name == "res" and offload_residual:
            t.add(RowKind.ACT, "res", dt, shape, place="host", count=L, lifetime="per_layer")
            t.add(RowKind.STAGE, "res", dt, shape, lifetime="shared", count=2, note="residual D2H/H2D buffer")
        else:
            t.add(RowKind.ACT, name, dt, shape, lifetime="per_layer" if saved else "shared",
                  count=L if saved else 1, note="" if saved else "recomputed in backward")


def _layer_scratch(t: _Table, m: ModelSpec, p: Precision, B: int, T: int, gpu: GpuSpec) -> None:
    """One layer's working buffers (forward and backward), shared by all layers."""
    BT, C, F, QKV, QDIM = B * T, m.hidden_size, m.intermediate_size, m.qkv_dim, m.q_dim
    widest = max(C, QDIM, QKV, 2 * F)
    work = lambda *a, lifetime="shared", **kw: t.add(RowKind.WORK, *a, lifetime=lifetime, **kw)  # noqa: E731
    work("branch", "bf16", (BT, C), note="attn-out / down output")
    if p.matmul == "e4m3":
        work("ln", "bf16", (BT, C), note="norm output before e4m3")
        work("att_q", "e4m3", (BT, QDIM), note="attention output in e4m3")
        work("dy_q", p.gradient, (BT, widest), note="e4m3/e5m2 output gradient")
        work("dy_qt", p.gradient, (widest, BT), note="its transpose (wgrad)")
        work("x_qt", "e4m3", (max(C, QDIM, F), BT), note="input transpose")
        work("w_qt", "e4m3", (max(prod(sh) for sh in m.block_matrix_shapes().values()),),
             note="weight transpose (dgrad)")
    work("d_res", "bf16", (BT, C), note="residual-stream gradient")
    if m.qkv_bias:
        work("ones", "bf16", (BT,), lifetime="persistent", note="ones: the QKV bias gradient is ones . d_qkv")
    work("d_ln", "bf16", (BT, C))
    work("d_qkv", "bf16", (BT, QKV))
    work("d_att", "bf16", (BT, QDIM))
    if p.matmul != "e4m3":     # FP8: the SwiGLU backward writes d_gu's fp8 copies (dy_q, dy_qt) itself
        work("d_gu", "bf16", (BT, 2 * F))
    work("d_h", "bf16", (BT, F))
    # the kernels' grids on this GPU decide the scratch sizes
    work("norm_partials", "uint8", (norm_partials_bytes(gpu.arch, gpu.sm_count, BT, C, m.num_heads,
                                                        m.num_kv_heads, m.head_dim, m.qk_norm),),
         note="deterministic norm-weight gradient partials")
    if flash_unsupported(m.head_dim, T, m.num_heads, m.num_kv_heads, gpu.max_smem_per_block) is None:
        work("attn_delta", "uint8", (attention_stats_bytes(B, m.num_heads, T),),
             note="flash-attention fallback: rowsum(dO*O)")


def _lm_head(t: _Table, m: ModelSpec, p: Precision, BT: int, chunks: int) -> None:
    """LM head: final norm, a chunk of logits overwritten by its gradient, per-token loss and LSE. An FP8 head
    (precision.lm_head): the e4m3 weight, a chunk's e4m3 input and its e5m2 logit gradient, each with its
    transpose (the gradient's are written while the logits are read: beside them)."""
    C, V, H = m.hidden_size, m.vocab_size, RowKind.LMHEAD
    rows = -(-BT // chunks)
    t.add(H, "x", "bf16", (BT, C), lifetime="shared", note="final residual")
    t.add(H, "ln", "bf16", (BT, C), lifetime="shared")
    t.add(H, "rstd", "fp32", (BT,), lifetime="shared")
    t.add(H, "logits", "bf16", (rows, V), lifetime="shared", note=f"{chunks} chunk(s)")
    if p.fp8_head:
        t.add(H, "w_q", "e4m3", (V, C), lifetime="shared", note="made each micro-step from the bf16 weight")
        t.add(H, "w_qt", "e4m3", (C, V), lifetime="shared")
        t.add(H, "x_q", "e4m3", (rows, C), lifetime="shared", note="a chunk's input")
        t.add(H, "x_qt", "e4m3", (C, rows), lifetime="shared")
        t.add(H, "dlogits_q", "e5m2", (rows, V), lifetime="shared", note="a chunk's logit gradient")
        t.add(H, "dlogits_qt", "e5m2", (V, rows), lifetime="shared")
    t.add(H, "losses", "fp32", (BT,), lifetime="shared")
    t.add(H, "lse", "fp32", (BT,), lifetime="shared")


def _small_state(t: _Table, m: ModelSpec, p: Precision, B: int, T: int, N: int, attn_bwd_chunks: int) -> None:
    """Stats, tokens, the RoPE table, library workspaces and the context's reserve."""
    BT = B * T
    if p.matmul == "e4m3":
        t.add(RowKind.STATS, "fp8", "uint8", (fp8_slot_count(m.num_layers) * FP8_SLOT_BYTES,),
              note="amax / descale slots")
    if p.delayed:
        t.add(RowKind.STATS, "amax_history", "fp32", (act_slot_count(m.num_layers) * p.amax_history,),
              note=f"the last {p.amax_history} micro-steps' amaxes")
    t.add(RowKind.STATS, "scalars", "fp32", (SCALAR_COUNT,), note="loss, norm, clip scale, hyper-parameters")
    t.add(RowKind.STATS, "gradnorm", "fp32", (GRADNORM_PARTIALS * N,), shard=None,
          note="one block of partials per GPU")
    notes = {"sorted_pos": "embedding backward order", "segments": "segment starts + unique count"}
    for name, n in token_rows(BT).items():
        what = name.removeprefix("tokens.")
        t.add(RowKind.TOKENS, what, "int32", (n,), note=notes.get(what, ""))
    t.add(RowKind.STAGE, "tokens", "int32", (2, staging_elems(BT)), place="host", note="pinned staging, double buffer")
    t.add(RowKind.ROPE, "table", "fp32", (T, m.head_dim // 2, 2), note="(cos, sin) pairs")
    t.add(RowKind.WS, "cublas", "uint8", (CUBLAS_WORKSPACE,))
    t.add(RowKind.WS, "attention", "uint8", (attention_workspace(m, B, T, attn_bwd_chunks),), lifetime="shared",
          note="cuDNN SDPA deterministic backward (scratch of each attention operation)")
    t.add(RowKind.RESERVE, "context", "uint8", (CONTEXT_RESERVE,), lifetime="reserve",
          note="CUDA context, library handles")


def attention_workspace(m: ModelSpec, B: int, T: int, chunks: int) -> int:
    """cuDNN SDPA's deterministic backward workspace, fitted to sizes measured on an H200 (cuDNN 9.19):
    B*T*Hq*D*4 * (T/128 + 1) for D=64, (T/256 + 1) for D=128; split by attn_bwd_chunks (`chunks`)."""
    per_tile = 128 if m.head_dim <= 64 else 256
    ws = B * T * m.num_heads * m.head_dim * 4 * (T // per_tile + 1)
    return ATTN_WORKSPACE_MIN + -(-ws // chunks)


def device_bytes(rows: list[MemRow]) -> int:
    """One GPU's total: the arena (the packed peak where rows carry offsets, else the sum of the rows)
    plus the reserve."""
    reserve = sum(r.total for r in rows if r.place == "device" and r.lifetime == "reserve")
    return arena_peak(rows) + reserve


def arena_peak(rows: list[MemRow]) -> int:
    """Bytes of the device arena: the end of its highest row (rows without offsets: their sum)."""
    dev = [r for r in rows if r.place == "device" and r.lifetime != "reserve"]
    if any(r.offset is None for r in dev):
        return sum(r.total for r in dev)
    return max((r.offset + r.total for r in dev), default=0)


def host_bytes(rows: list[MemRow], gpus_per_machine: int) -> int:
    """Pinned host memory of one machine: per-GPU host rows times the GPUs of the machine."""
    return gpus_per_machine * sum(r.total for r in rows if r.place == "host")


def max_piece_bytes(m: ModelSpec, N: int) -> int:
    """The largest shard a collective moves over N GPUs: a bigger piece buffer would never fill."""
    return max(shard_elems(prod(shape), N) * 4 for _, shape, _, _ in _tensors(m))


def group_totals(rows: list[MemRow], place: str) -> dict[str, int]:
    """Bytes per row kind (weights, master, grads, adam_m, act, work, ...) for one place."""
    out: dict[str, int] = {}
    for r in rows:
        if r.place == place:
            key = row_kind(r.name).value
            out[key] = out.get(key, 0) + r.total
    return out
