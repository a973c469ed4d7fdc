"""The memory table: every byte a plan needs, per GPU and on the host.

One list of MemRow drives both the planner and the runtime: plan/lifetimes.py gives every device row
its offset in the arena (rows whose lifetimes in the schedule never overlap share bytes), the planner
totals the packed peak and the runtime allocates exactly that, every row at its offset. The per-layer
activations are the block table's (plan/block.py): a recompute flag moves the rows it drops from per-layer
to shared (one layer's worth of scratch).
"""
from __future__ import annotations

from functools import lru_cache
from math import prod

from ..layout import (FP8_SLOT_BYTES, SCALAR_COUNT, align, attention_stats_bytes, flash_unsupported, fp8_slot_count,
                      norm_partials_bytes, staging_elems, token_rows)
from .block import activation_shape, saved_values
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


class _Table:
    def __init__(self, gpus: int = 1):
        self.rows: list[MemRow] = []
        self.gpus = gpus

    def add(self, name, dtype, shape, place="device", lifetime="persistent", count=1, note="", shard=None):
        """shard: None for non-parameter rows, True for this GPU's part of a tensor, False for a whole
        parameter-sized row, which several GPUs pad to gpus*S elements so that collectives split every
        tensor into equal shards."""
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
    return [(s.name, op if s.dtype == "op" else s.dtype, activation_shape(s.name, m, B, T), saved)
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


@lru_cache(maxsize=4096)
def _state_rows(m: ModelSpec, p: Precision, o: Offload, s: Sharding, N: int, collectives: str,
                peer_copies: bool) -> tuple[MemRow, ...]:
    L, fp8 = m.num_layers, p.matmul == "e4m3"
    t = _Table(N)
    P = dict(shard=False)           # a parameter-sized row (padded to equal shards with several GPUs)
    S_ = dict(shard=True)           # this GPU's shard of one

    # Weights: the work copy the matmuls read. FP8 plans keep block matrices in e4m3 (their
    # transposes for dgrad are made per layer in backward); everything else is bf16.
    # On one GPU, sharded weights = streamed from host, like offloaded quantized weights.
    stream_w = o.quantized_weights or (s.weights and N == 1)
    w_shard = s.weights and N > 1
    tensors = _tensors(m)
    for name, shape, per_layer, is_matrix in tensors:
        wdt = "e4m3" if (fp8 and is_matrix) else "bf16"
        streamed = per_layer and stream_w
        t.add(f"weights.{name}", wdt, shape, place="host" if streamed else "device",
              count=L if per_layer else 1, **(S_ if (w_shard and per_layer) else P))
    if stream_w or w_shard:
        # Double buffer: layer l+1's weights arrive (H2D or all-gather) while layer l computes.
        for name, shape, per_layer, is_matrix in tensors:
            if per_layer:
                t.add(f"stage.weights.{name}", "e4m3" if (fp8 and is_matrix) else "bf16", shape,
                      lifetime="shared", count=2, note="layer prefetch double buffer", **P)

    # Master weights: a separate copy unless the bf16 work copy can serve as master.
    opt = S_ if s.optimizer else P
    for name, shape, per_layer, is_matrix in tensors:
        separate = (fp8 and is_matrix) or p.master == "fp32" or o.master or s.optimizer
        if separate:
            t.add(f"master.{name}", p.master, shape, place="host" if o.master else "device",
                  count=L if per_layer else 1, **opt)

    # Gradients (bf16, accumulated over micro-steps) and Adam moments. ZeRO-2 keeps a block's shard:
    # its full gradients pass through a double buffer and are reduce-scattered as backward leaves the
    # block. Embedding, LM head and final norm are written whole by their backward kernels: kept whole.
    for name, shape, per_layer, _ in tensors:
        t.add(f"grads.{name}", "bf16", shape, place="host" if o.gradients else "device",
              count=L if per_layer else 1, **(S_ if (s.gradients and per_layer) else P))
    for name, shape, per_layer, _ in tensors:
        t.add(f"adam_m.{name}", p.adam_m, shape, place="host" if o.adam_m else "device",
              count=L if per_layer else 1, **opt)
        t.add(f"adam_v.{name}", p.adam_v, shape, place="host" if o.adam_v else "device",
              count=L if per_layer else 1, **opt)
    if (s.gradients and N > 1) or o.gradients:
        # One layer's full gradients, double-buffered, before reduce-scatter / D2H.
        for name, shape, per_layer, _ in tensors:
            if per_layer:
                t.add(f"stage.grads.{name}", "bf16", shape, lifetime="shared", count=2,
                      note="layer gradient double buffer", **P)
    if o.master or o.adam_m or o.adam_v:
        # The optimizer streams offloaded states through the GPU one layer at a time.
        for name, shape, per_layer, _ in tensors:
            if per_layer:
                for what, dt, off in (("master", p.master, o.master), ("adam_m", p.adam_m, o.adam_m),
                                      ("adam_v", p.adam_v, o.adam_v)):
                    if off:
                        t.add(f"stage.{what}.{name}", dt, shape, lifetime="shared", count=2,
                              note="optimizer streaming double buffer", **opt)
    if N > 1 and collectives == "copy_engine":
        piece = min(COMM_PIECE, max_piece_bytes(m, N))
        t.add("comm.recv", "uint8", (2 * (N - 1) * piece,), lifetime="shared", shard=None,
              note="reduce-scatter pieces from the other GPUs, double buffer")
        if not peer_copies:
            t.add("comm.host", "uint8", (2 * (N - 1) * piece,), place="host", shard=None,
                  note="host-staged collectives: this GPU's outgoing pieces")
    return tuple(t.rows)


@lru_cache(maxsize=4096)
def _step_rows(m: ModelSpec, p: Precision, B: int, T: int, r: Recompute, offload_residual: bool, N: int,
               gpu: GpuSpec, lm_head_chunks: int, attn_bwd_chunks: int) -> tuple[MemRow, ...]:
    L, fp8 = m.num_layers, p.matmul == "e4m3"
    BT, C, F, V = B * T, m.hidden_size, m.intermediate_size, m.vocab_size
    t = _Table(N)

    # Saved activations: per layer unless recomputed (then one shared instance).
    for name, dt, shape, saved in saved_activations(m, r, B, T, p.matmul):
        if saved and name == "res" and offload_residual:
            t.add("act.res", dt, shape, place="host", count=L, lifetime="per_layer")
            t.add("stage.res", dt, shape, lifetime="shared", count=2, note="residual D2H/H2D buffer")
        else:
            t.add(f"act.{name}", dt, shape, lifetime="per_layer" if saved else "shared",
                  count=L if saved else 1, note="" if saved else "recomputed in backward")

    # One layer's working buffers (forward and backward), shared by all layers.
    QKV, QDIM = m.qkv_dim, m.q_dim
    widest = max(C, QDIM, QKV, 2 * F)
    t.add("work.branch", "bf16", (BT, C), lifetime="shared", note="attn-out / down output")
    if fp8:
        t.add("work.ln", "bf16", (BT, C), lifetime="shared", note="norm output before e4m3")
        t.add("work.h", "bf16", (BT, F), lifetime="shared", note="swiglu output before e4m3")
        t.add("work.att_q", "e4m3", (BT, QDIM), lifetime="shared", note="attention output in e4m3")
        gd = p.gradient
        t.add("work.dy_q", gd, (BT, widest), lifetime="shared", note="e4m3/e5m2 output gradient")
        t.add("work.dy_qt", gd, (widest, BT), lifetime="shared", note="its transpose (wgrad)")
        t.add("work.x_qt", "e4m3", (max(C, QDIM, F), BT), lifetime="shared", note="input transpose")
        t.add("work.w_qt", "e4m3", (max(prod(sh) for sh in m.block_matrix_shapes().values()),),
              lifetime="shared", note="weight transpose (dgrad)")
    t.add("work.d_res", "bf16", (BT, C), lifetime="shared", note="residual-stream gradient")
    if m.qkv_bias:
        t.add("work.ones", "bf16", (BT,), note="ones: the QKV bias gradient is ones . d_qkv")
    t.add("work.d_ln", "bf16", (BT, C), lifetime="shared")
    t.add("work.d_qkv", "bf16", (BT, QKV), lifetime="shared")
    t.add("work.d_att", "bf16", (BT, QDIM), lifetime="shared")
    t.add("work.d_gu", "bf16", (BT, 2 * F), lifetime="shared")
    t.add("work.d_h", "bf16", (BT, F), lifetime="shared")
    # the kernels' grids on this GPU decide the scratch sizes
    t.add("work.norm_partials", "uint8", (norm_partials_bytes(gpu.arch, gpu.sm_count, BT, C, m.num_heads,
                                                              m.num_kv_heads, m.head_dim, m.qk_norm),),
          lifetime="shared", note="deterministic norm-weight gradient partials")
    if flash_unsupported(m.head_dim, T, m.num_heads, m.num_kv_heads, gpu.max_smem_per_block) is None:
        t.add("work.attn_delta", "uint8", (attention_stats_bytes(B, m.num_heads, T),), lifetime="shared",
              note="flash-attention fallback: rowsum(dO*O)")

    # LM head: final norm, a chunk of logits overwritten by its gradient, per-token loss and LSE.
    rows = -(-BT // lm_head_chunks)
    t.add("lmhead.x", "bf16", (BT, C), lifetime="shared", note="final residual")
    t.add("lmhead.ln", "bf16", (BT, C), lifetime="shared")
    t.add("lmhead.rstd", "fp32", (BT,), lifetime="shared")
    t.add("lmhead.logits", "bf16", (rows, V), lifetime="shared", note=f"{lm_head_chunks} chunk(s)")
    t.add("lmhead.losses", "fp32", (BT,), lifetime="shared")
    t.add("lmhead.lse", "fp32", (BT,), lifetime="shared")

    # Small persistent state.
    if fp8:
        t.add("stats.fp8", "uint8", (fp8_slot_count(L) * FP8_SLOT_BYTES,), note="amax / descale slots")
    t.add("stats.scalars", "fp32", (SCALAR_COUNT,), note="loss, norm, clip scale, hyper-parameters")
    t.add("stats.gradnorm", "fp32", (GRADNORM_PARTIALS * N,), shard=None, note="one block of partials per GPU")
    notes = {"tokens.sorted_pos": "embedding backward order", "tokens.segments": "segment starts + unique count"}
    for name, n in token_rows(BT).items():
        t.add(name, "int32", (n,), note=notes.get(name, ""))
    t.add("stage.tokens", "int32", (2, staging_elems(BT)), place="host", note="pinned staging, double buffer")
    t.add("rope.table", "fp32", (T, m.head_dim // 2, 2), note="(cos, sin) pairs")
    t.add("ws.cublas", "uint8", (CUBLAS_WORKSPACE,))
    t.add("ws.attention", "uint8", (attention_workspace(m, B, T, attn_bwd_chunks),), lifetime="shared",
          note="cuDNN SDPA deterministic backward (scratch of each attention operation)")
    t.add("reserve.context", "uint8", (CONTEXT_RESERVE,), lifetime="reserve",
          note="CUDA context, library handles")
    return tuple(t.rows)


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
    """Bytes per table prefix (weights, master, grads, adam_m, act, work, ...) for one place."""
    out: dict[str, int] = {}
    for r in rows:
        if r.place == place:
            key = r.name.split(".")[0]
            out[key] = out.get(key, 0) + r.total
    return out
