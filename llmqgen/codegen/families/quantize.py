"""Quantize family (FP8 plans): per-tensor current scaling of the FP8 matmul operands.

Per distinct (rows, cols, source dtype, fp8 dtype) of the sites of plan/block.py (fp8_sites), the kernels of
the conversions those sites make, named by the first site holding that shape: `llmq_amax_<s>`;
`llmq_quantize_<s>` bf16|f32 [R,K] -> fp8 [R,K]; `llmq_quantize_t_<s>` -> fp8 [K,R] (tiled through shared
memory, coalesced both ways); `llmq_quantize_dual_<s>` both from one read; and per distinct (R, K) holding a
transposed site `llmq_transpose_fp8_<s>` fp8 [R,K] -> fp8 [K,R].
Each quantizer reads amax from the tensor's stats slot (float 0), scales by FMAX/amax with saturation
and writes the descale amax/FMAX (1 when amax == 0) at float 4 (byte 16) for cuBLASLt. A non-zero amax
below FMAX * FLT_MIN is raised to it, so that the scale stays finite (the torchao float8 recipe floors
amax likewise; without it a bf16-subnormal amax gives scale +inf and 0 * inf = NaN bytes).

Delayed scaling (precision.scaling): `llmq_amax_roll` closes each micro-step, pushing every activation
slot's amax into its history, putting the history's max at float 1 and zeroing the amax; `llmq_amax_clear`
closes an evaluation, dropping the amaxes it recorded. A slot with a non-zero max is warm:
its quantizers scale by that max and record the amax of what they read at float 0, and its amax-only
kernels return at once. A cold slot (no history yet: the first micro-step, after a resume) is scaled
currently, as above."""
from __future__ import annotations

from ...layout import grid_stride_blocks
from ...plan.block import WEIGHT_SITES, fp8_groups, fp8_sites
from ...plan.memory import shard_elems
from ..kernel import Kernel, cdiv

TEMPLATE = "_quantize.cu.j2"
TILE = 64            # transposing kernels: 64x64 tiles, 256 threads
TILE_THREADS = 256
FLAT_THREADS = 256   # non-transposing kernel: 16 elements per thread per iteration
FMAX = {"e4m3": 448.0, "e5m2": 57344.0}


def enabled(ctx: dict) -> bool:
    return bool(ctx["FP8"])


def _sharded(ctx: dict) -> bool:
    return ctx["NUM_GPUS"] > 1 and ctx["ZERO"] >= 1


def site_shapes(ctx: dict) -> list[tuple[str, int, int, str, str, tuple[str, ...]]]:
    """plan/block.py's fp8_sites of the plan: (site, rows, cols, source dtype, fp8 dtype, conversions)."""
    head = (ctx["BT"] // ctx["LM_HEAD_CHUNKS"], ctx["V"]) if ctx["FP8_HEAD"] else None
    return fp8_sites(ctx["BT"], ctx["C"], ctx["F"], ctx["QDIM"], ctx["QKV"], ctx["GRAD_DTYPE"],
                     "fp32" if ctx["MASTER_FP32"] else "bf16", _sharded(ctx), ctx["FP8_DELAYED"], head)


def _groups(ctx: dict) -> tuple[list[dict], list[dict]]:
    rows = site_shapes(ctx)
    for site, R, K, *_ in rows:
        if R % 16 or K % 16:
            raise ValueError(f"FP8 quantize of '{site}' [{R}, {K}] needs both dims divisible by 16 (TN FP8 "
                             f"matmuls do too): pick micro_batch*seq_len and model widths that are multiples of 16")
    return fp8_groups(rows)


def quant_sites(ctx: dict) -> list[dict]:
    return _groups(ctx)[0]


def transpose_sites(ctx: dict) -> list[dict]:
    return _groups(ctx)[1]


def shard_sites(ctx: dict) -> list[dict]:
    """ZeRO-1+ on several GPUs: each GPU quantizes its shard of the new master weights (flat, S elements)."""
    if not _sharded(ctx):
        return []
    return [dict(name=site, n=shard_elems(R * K, ctx["NUM_GPUS"]), src=src)
            for site, R, K, src, _, _ in site_shapes(ctx) if site in WEIGHT_SITES.values()]


def context(ctx: dict) -> dict:
    return dict(QUANT_SITES=quant_sites(ctx), TRANSPOSE_SITES=transpose_sites(ctx), QUANT_SHARD_SITES=shard_sites(ctx),
                QUANT_TILE=TILE, QUANT_TILE_THREADS=TILE_THREADS, QUANT_FLAT_THREADS=FLAT_THREADS)


def kernels(ctx: dict) -> list[Kernel]:
    out = []
    flat = lambda items: (grid_stride_blocks(ctx["GPU_ARCH"], ctx["SM_COUNT"], items, FLAT_THREADS), 1, 1)  # noqa: E731
    for s in quant_sites(ctx):
        R, K, name = s["R"], s["K"], s["name"]
        src = "const float*" if s["src"] == "float" else "const bf16*"
        meta = dict(sites=s["sites"], rows=R, cols=K, src=s["src"], dst=s["dst"], fmax=FMAX[s["dst"]])
        tiles = (cdiv(K, TILE), cdiv(R, TILE), 1)
        variants = {
            "amax": Kernel(f"llmq_amax_{name}", flat(R * K // 8),
                           (FLAT_THREADS, 1, 1), (("in", src), ("stats", "float*")),
                           doc="stats[0] = max(stats[0], amax(in)) for a tensor no kernel of ours produced", meta=meta),
            "quantize": Kernel(f"llmq_quantize_{name}", flat(R * K // 16),
                               (FLAT_THREADS, 1, 1), (("out", "uint8_t*"), ("in", src), ("stats", "float*")),
                               doc=f"out = sat_{s['dst']}(in * FMAX/amax) [R,K]; stats[4] = amax/FMAX", meta=meta),
            "quantize_cold": Kernel(f"llmq_quantize_cold_{name}", flat(R * K // 16),
                                    (FLAT_THREADS, 1, 1), (("out", "uint8_t*"), ("in", src), ("stats", "float*")),
                                    doc="quantize while the slot is cold (delayed scaling: warm, the producer wrote "
                                        "out itself)", meta=meta),
            "quantize_t": Kernel(f"llmq_quantize_t_{name}", tiles, (TILE_THREADS, 1, 1),
                                 (("out_t", "uint8_t*"), ("in", src), ("stats", "float*")),
                                 doc=f"out_t = sat_{s['dst']}(in * FMAX/amax)^T [K,R]; stats[4] = amax/FMAX",
                                 meta=meta),
            "dual": Kernel(f"llmq_quantize_dual_{name}", tiles, (TILE_THREADS, 1, 1),
                           (("out", "uint8_t*"), ("out_t", "uint8_t*"), ("in", src), ("stats", "float*")),
                           doc="quantize and quantize_t from one read of in", meta=meta),
        }
        out += [k for v, k in variants.items() if v in s["conversions"]]   # template order
    for s in shard_sites(ctx):
        src = "const float*" if s["src"] == "float" else "const bf16*"
        meta = dict(shard_elems=s["n"], src=s["src"], dst="e4m3", fmax=FMAX["e4m3"])
        out += [
            Kernel(f"llmq_amax_shard_{s['name']}", flat(s["n"] // 8),
                   (FLAT_THREADS, 1, 1), (("in", src), ("stats", "float*")),
                   doc="stats[0] = max(stats[0], amax(in)) over this GPU's master shard", meta=meta),
            Kernel(f"llmq_quantize_shard_{s['name']}", flat(s["n"] // 16),
                   (FLAT_THREADS, 1, 1), (("out", "uint8_t*"), ("in", src), ("stats", "float*")),
                   doc="out = sat_e4m3(in * FMAX/amax) over this GPU's shard; stats[4] = amax/FMAX", meta=meta),
        ]
    if ctx["FP8_DELAYED"]:
        n = ctx["FP8_ACT_SLOTS"]
        out.append(Kernel("llmq_amax_roll", (cdiv(n, FLAT_THREADS), 1, 1), (FLAT_THREADS, 1, 1),
                          (("stats", "float*"), ("history", "float*")),
                          doc=f"per activation slot (of {n}): history <- [amax, history[:-1]] (a non-finite amax "
                              "as 0), history max -> stats[1], amax -> 0",
                          meta=dict(slots=n, history=ctx["AMAX_HISTORY"])))
        out.append(Kernel("llmq_amax_clear", (cdiv(n, FLAT_THREADS), 1, 1), (FLAT_THREADS, 1, 1),
                          (("stats", "float*"),), doc=f"per activation slot (of {n}): amax -> 0, the history kept",
                          meta=dict(slots=n)))
    for s in transpose_sites(ctx):
        out.append(Kernel(f"llmq_transpose_fp8_{s['name']}", (cdiv(s["K"], TILE), cdiv(s["R"], TILE), 1),
                          (TILE_THREADS, 1, 1), (("out_t", "uint8_t*"), ("in", "const uint8_t*")),
                          doc="out_t [K,R] = in [R,K]^T, fp8 bytes",
                          meta=dict(sites=s["sites"], rows=s["R"], cols=s["K"])))
    return out
