"""The render context: every number a template needs, computed once in Python from the plan.

Templates only spell these out (as constexprs) and choose code paths; they never do arithmetic on
shapes. Names are UPPER_SNAKE. Families add their own variables through `context(ctx)`.

The LM head is chunked over token rows (LLMQ does the same): a chunk is BT / LM_HEAD_CHUNKS rows of
full-vocabulary logits, so the softmax of a row never straddles chunks. There is therefore no vocab
chunk (VCHUNK); the crossentropy family derives the rows per chunk.
"""
from __future__ import annotations

import re

from ..hardware.spec import GpuSpec
from ..layout import FP8_AMAX_OFFSET, FP8_DESCALE_OFFSET, FP8_HISTORY_MAX_OFFSET, FP8_SLOT_BYTES, act_slot_count
from ..plan.schema import Plan

_ARCH_RE = re.compile(r"^sm_(\d+)(\d)(a|f)?$")

# C type names of the typedefs in _common.cu.j2, per plan dtype.
_CTYPE = {"e4m3": "e4m3", "e5m2": "e5m2", "bf16": "bf16", "fp32": "float"}


def parse_arch(arch: str) -> tuple[int, int, str]:
    """'sm_90a' -> (9, 0, 'a')."""
    m = _ARCH_RE.match(arch)
    if not m:
        raise ValueError(f"target arch {arch!r} is not of the form sm_<major><minor>[a|f] (e.g. sm_90, sm_90a)")
    return int(m.group(1)), int(m.group(2)), m.group(3) or ""


def check_arch(arch: str, gpu: GpuSpec) -> None:
    """A CUBIN loads on GPUs of its major version with an equal or higher minor version."""
    major, minor, suffix = parse_arch(arch)
    g_major, g_minor = gpu.compute_capability
    exact = suffix == "a"  # arch-specific features: only the very same compute capability
    if major != g_major or minor > g_minor or (exact and minor != g_minor):
        raise ValueError(f"a CUBIN for {arch} does not run on {gpu.display_name} (compute capability "
                         f"{g_major}.{g_minor}): build for {gpu.arch} instead")


def summary_lines(plan: Plan, arch: str) -> list[str]:
    """The plan in a few lines, for the header comment of program.cu."""
    m, b, p, gpu = plan.model, plan.batch, plan.precision, plan.inventory.gpu
    lines = [
        f"plan {plan.name}  (inputs {plan.inputs_hash()[:12]})",
        f"model {m.name} [{m.architecture}]: C={m.hidden_size} F={m.intermediate_size} L={m.num_layers} "
        f"Hq={m.num_heads} Hkv={m.num_kv_heads} D={m.head_dim} V={m.vocab_size}",
        f"gpus {plan.inventory.label} ({gpu.display_name}, {gpu.sm_count} SMs), target {arch}",
        f"precision matmul={p.matmul} grad={p.gradient} master={p.master} adam_m={p.adam_m} adam_v={p.adam_v}"
        + (f" scaling=delayed (amax history {p.amax_history})" if p.delayed else "")
        + (" lm_head=fp8" if p.fp8_head else "") + (" fast_accum" if p.fast_accum else ""),
        f"batch B={b.micro_batch} T={b.seq_len} accum={b.grad_accum} -> {plan.tokens_per_step} tokens/step",
        f"recompute {','.join(plan.recompute.names()) or 'none'}; offload {','.join(plan.offload.names()) or 'none'}; "
        f"ZeRO-{plan.sharding.zero}; collectives {plan.collectives}",
        f"lm_head_chunks={plan.lm_head_chunks} attn_bwd_chunks={plan.attn_bwd_chunks}",
    ]
    if plan.estimate is not None:
        e = plan.estimate
        lines.append(f"predicted {e.step_ms:.1f} ms/step, {e.tokens_per_s:,.0f} tokens/s, "
                     f"SOL {e.sol_pct:.0f}%, MFU {e.mfu_pct:.0f}%")
    return lines


def build_context(plan: Plan, arch: str) -> dict:
    """The base context of every template; a plain dict that families extend. Any supported arch
    renders (CI compiles every plan for every GPU family); loading checks `check_arch`."""
    major, minor, _ = parse_arch(arch)
    m, b, p, gpu = plan.model, plan.batch, plan.precision, plan.inventory.gpu
    rs = m.rope_scaling
    return {
        # model
        "C": m.hidden_size,
        "F": m.intermediate_size,
        "L": m.num_layers,
        "HQ": m.num_heads,
        "HKV": m.num_kv_heads,
        "HD": m.head_dim,
        "QDIM": m.q_dim,
        "KVDIM": m.kv_dim,
        "QKV": m.qkv_dim,
        "V": m.vocab_size,
        "EPS": float(m.rms_norm_eps),
        "ROPE_THETA": float(m.rope_theta),
        "ROPE_SCALING": None if rs is None else rs.model_dump(),
        "QK_NORM": m.qk_norm,
        "QKV_BIAS": m.qkv_bias,
        "TIED": m.tie_embeddings,
        # batch
        "B": b.micro_batch,
        "T": b.seq_len,
        "BT": b.micro_batch * b.seq_len,
        "GRAD_ACCUM": b.grad_accum,
        "NUM_GPUS": plan.num_gpus,
        # precision; *_T are the C type names of _common.cu.j2's typedefs
        "FP8": plan.fp8,
        "MATMUL_DTYPE": p.matmul,
        "GRAD_DTYPE": p.gradient,
        "MASTER_FP32": p.master == "fp32",
        "ADAM_M_FP32": p.adam_m == "fp32",
        "ADAM_V_FP32": p.adam_v == "fp32",
        "MATMUL_T": _CTYPE[p.matmul],
        "GRAD_T": _CTYPE[p.gradient],
        "MASTER_T": _CTYPE[p.master],
        "ADAM_M_T": _CTYPE[p.adam_m],
        "ADAM_V_T": _CTYPE[p.adam_v],
        # FP8 stats slot layout (kernels get a slot's amax address and find its descale this many floats on)
        "FP8_SLOT_BYTES": FP8_SLOT_BYTES,
        "FP8_DESCALE_OFFSET": FP8_DESCALE_OFFSET,
        "FP8_DESCALE_FLOAT": (FP8_DESCALE_OFFSET - FP8_AMAX_OFFSET) // 4,
        # delayed scaling: the activation slots' amax history (its max this many floats on in a slot)
        "FP8_DELAYED": p.delayed,
        "FP8_HEAD": p.fp8_head,
        "FP8_HISTORY_MAX_FLOAT": (FP8_HISTORY_MAX_OFFSET - FP8_AMAX_OFFSET) // 4,
        "AMAX_HISTORY": p.amax_history,
        "FP8_ACT_SLOTS": act_slot_count(m.num_layers),
        # memory-saving choices
        "RECOMPUTE": plan.recompute.model_dump(),
        "OFFLOAD": plan.offload.model_dump(),
        "ZERO": plan.sharding.zero,
        "LM_HEAD_CHUNKS": plan.lm_head_chunks,
        "ATTN_BWD_CHUNKS": plan.attn_bwd_chunks,
        # target: code paths follow the compile target; launch sizes (grids, scratch) the plan's GPU, so
        # that they match the memory table on any target (a plan run on a GPU that stands in for its own)
        "ARCH": arch,
        "SM": 10 * major + minor,
        "GPU_ARCH": gpu.arch,
        "SM_COUNT": gpu.sm_count,
        "MAX_SMEM": gpu.max_smem_per_block,
        # header comment
        "PLAN_NAME": plan.name,
        "PLAN_SUMMARY": summary_lines(plan, arch),
    }
