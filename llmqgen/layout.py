"""Layouts every layer agrees on: where values sit inside rows of the memory table, and the scratch
sizes that kernel launch geometry decides.

A leaf module (it imports nothing of llmqgen), so that the planner (plan/memory.py sizes the rows),
the generator (codegen/context.py hands these constants to the templates: no .j2 file spells them),
the schedule and the runtime (which address into the rows) all read one definition.

- Arena: every row starts on ARENA_ALIGN bytes (cuBLASLt and cuDNN assume 256-byte aligned operands).
- FP8 stats (row stats.fp8): one FP8_SLOT_BYTES slot per FP8 tensor, amax at byte 0, descale at byte 16;
  under delayed scaling the max of the slot's amax history at byte 4 (0 until the history holds one),
  the history itself in row stats.amax_history (amax_history floats per activation slot, newest first).
  The descale is a cuBLASLt A/B scale pointer, which must be 16-byte aligned: cuBLASLt on Hopper
  (cuBLAS 13) accepts a misaligned one in the heuristic query and then fails the matmul with
  NOT_SUPPORTED (found on the H200). Slots: ACT_SLOTS of every layer, then WEIGHT_SLOTS of every
  layer, then HEAD_SLOTS (an FP8 LM head's input, weight and logit gradient; current scaling always),
  then one sink for amaxes nobody reads.
- Scalars (row stats.scalars): SCALAR_COUNT fp32 values the CUDA graphs read from device memory, so a
  replay picks up new values; SCALARS names them.
- Tokens: the four int32 token rows of a micro-batch, and their pinned staging copy (the rows back to back).
- Scratch: the deterministic norm-weight gradient partials (one fp32 row per block of the RMSNorm and
  RoPE q/k-norm backward kernels) and flash attention's rowsum(dO*O); their sizes follow from the
  kernels' grids, which are defined here so that the planner and the kernel families share them.
"""
from __future__ import annotations

# --- arena --------------------------------------------------------------------------------------------
ARENA_ALIGN = 256


def align(n: int) -> int:
    """n bytes rounded up to ARENA_ALIGN."""
    return -(-n // ARENA_ALIGN) * ARENA_ALIGN


# --- FP8 stats slots (row stats.fp8) ------------------------------------------------------------------
FP8_SLOT_BYTES = 32
FP8_AMAX_OFFSET = 0
FP8_DESCALE_OFFSET = 16
FP8_HISTORY_MAX_OFFSET = 4
ACT_SLOTS = ("ln1", "att", "ln2", "h", "d_down", "d_gu", "d_att_out", "d_qkv")
WEIGHT_SLOTS = ("qkv", "attn_out", "gate_up", "down")
HEAD_SLOTS = ("head_x", "head_w", "head_dy")


def fp8_slot_count(num_layers: int) -> int:
    """Activation/gradient slots per layer, weight slots per layer, the LM head's, and one sink for unused amax."""
    return (len(ACT_SLOTS) + len(WEIGHT_SLOTS)) * num_layers + len(HEAD_SLOTS) + 1


def act_slot_count(num_layers: int) -> int:
    """The activation/gradient slots, which come first (the amax history covers these)."""
    return len(ACT_SLOTS) * num_layers


def fp8_slot_index(name: str, layer: int, num_layers: int) -> int:
    """Slot of tensor `name` ("ln1", "w_qkv", "head_x", "sink") of `layer` (the head's and the sink: no
    layer); ValueError for an unknown name."""
    if name == "sink":
        return fp8_slot_count(num_layers) - 1
    if name in HEAD_SLOTS:
        return (len(ACT_SLOTS) + len(WEIGHT_SLOTS)) * num_layers + HEAD_SLOTS.index(name)
    if name.startswith("w_"):
        return act_slot_count(num_layers) + layer * len(WEIGHT_SLOTS) + WEIGHT_SLOTS.index(name[2:])
    return layer * len(ACT_SLOTS) + ACT_SLOTS.index(name)


# --- scalars (row stats.scalars) ----------------------------------------------------------------------
# norm..sumsq are the gradient norm's output, in llmq_gradnorm_finalize's order; hyper is AdamW's
# hyper-parameter array (codegen/families/adamw.HYPER); flag is the runtime's graph-branch flag.
SCALAR_COUNT = 64
SCALARS = {"loss": 0, "grad_scale": 1, "norm": 4, "clip_scale": 5, "nonfinite": 6, "sumsq": 7, "hyper": 8,
           "flag": 63}


# --- tokens -------------------------------------------------------------------------------------------
def token_rows(bt: int) -> dict[str, int]:
    """int32 elements of each token row of a micro-batch of `bt` tokens, in staging order: inputs,
    targets, the embedding backward's sorted positions and its segments (bt + 1 segment starts, then
    the number of unique token ids, at element `num_unique_index(bt)`)."""
    return {"tokens.inputs": bt, "tokens.targets": bt, "tokens.sorted_pos": bt, "tokens.segments": bt + 2}


def num_unique_index(bt: int) -> int:
    """Element of tokens.segments holding the number of unique token ids (valid segments)."""
    return bt + 1


def token_staging(bt: int) -> list[tuple[str, int, int]]:
    """(row, first element, elements) of each token row in one slot of the pinned staging buffer
    (stage.tokens: two slots of `staging_elems(bt)` int32, a double buffer)."""
    out, first = [], 0
    for row, n in token_rows(bt).items():
        out.append((row, first, n))
        first += n
    return out


def staging_elems(bt: int) -> int:
    """int32 elements of one slot of stage.tokens: the token rows back to back."""
    return sum(token_rows(bt).values())


# --- launch geometry that sizes scratch rows ----------------------------------------------------------
# Resident threads per SM by architecture (CUDA occupancy tables); unknown archs get the small value.
THREADS_PER_SM = {"sm_80": 2048, "sm_90": 2048, "sm_90a": 2048, "sm_100": 2048}
THREADS_PER_SM_DEFAULT = 1536
ROPE_THREADS = 256
FLASH_BLOCK = 64            # flash attention: query rows = key rows of a tile
FLASH_HEAD_DIMS = (64, 128)


def resident_blocks(arch: str, sm_count: int, threads: int) -> int:
    """Blocks of `threads` that fill every SM once: the grid of a grid-stride kernel."""
    return sm_count * max(1, THREADS_PER_SM.get(arch, THREADS_PER_SM_DEFAULT) // threads)


def grid_stride_blocks(arch: str, sm_count: int, items: int, threads: int) -> int:
    """Grid for `items` work items, one per thread per iteration: no more than one resident wave."""
    return max(1, min(-(-items // threads), resident_blocks(arch, sm_count, threads)))


def row_threads(n_vec: int) -> tuple[int, int]:
    """(threads, vectors per thread) for one block per row of `n_vec` 16-byte vectors."""
    threads = min(512, -(-n_vec // 32) * 32)
    return threads, -(-n_vec // threads)


def norm_backward_blocks(arch: str, sm_count: int, bt: int, c: int) -> int:
    """Grid of the RMSNorm backward (one block per row, at most one resident wave); each block writes
    one fp32 row of `c` weight-gradient partials."""
    return min(bt, resident_blocks(arch, sm_count, row_threads(c // 8)[0]))


def rope_lanes(hd: int) -> int:
    """Threads per head of the RoPE kernels: each owns 8 rotation pairs (i, i + HD/2), two 16-byte vectors."""
    return hd // 16


def rope_backward_heads(hq: int, hkv: int, fp8: bool, qk_norm: bool) -> int:
    """Heads the RoPE backward visits per token: v heads only to copy them (q/k-norm) or for their amax (FP8)."""
    return hq + (2 if fp8 or qk_norm else 1) * hkv


def rope_backward_blocks(arch: str, sm_count: int, bt: int, heads: int, hd: int) -> int:
    """Grid of the RoPE backward; with q/k-norm each block writes 2*hd fp32 weight-gradient partials."""
    return grid_stride_blocks(arch, sm_count, bt * heads * rope_lanes(hd), ROPE_THREADS)


def norm_partials_bytes(arch: str, sm_count: int, bt: int, c: int, hq: int, hkv: int, hd: int,
                        qk_norm: bool) -> int:
    """Bytes of work.norm_partials: the larger of the RMSNorm backward's partials and (q/k-norm) the
    RoPE backward's, which never live at once."""
    floats = norm_backward_blocks(arch, sm_count, bt, c) * c
    if qk_norm:
        heads = rope_backward_heads(hq, hkv, False, True)
        floats = max(floats, rope_backward_blocks(arch, sm_count, bt, heads, hd) * 2 * hd)
    return 4 * floats


def flash_smem(hd: int) -> dict[str, int]:
    """Dynamic shared memory (bytes) of the flash-attention forward and backward kernels."""
    tile = FLASH_BLOCK * (hd + 8) * 2  # bf16 rows padded by 16 bytes: conflict-free fragment loads
    return {"forward": 2 * tile, "backward": 4 * tile + 2 * FLASH_BLOCK * 4}


def flash_unsupported(hd: int, t: int, hq: int, hkv: int, max_smem: int) -> str | None:
    """Why a plan cannot use the generated flash attention (then it needs cuDNN), or None."""
    if hd not in FLASH_HEAD_DIMS:
        return f"flash attention supports head_dim {FLASH_HEAD_DIMS}, the model has {hd}: use cuDNN attention"
    if t % FLASH_BLOCK:
        return (f"flash attention needs the sequence length to be a multiple of {FLASH_BLOCK}, got {t}: "
                f"pick --seq-len {-(-t // FLASH_BLOCK) * FLASH_BLOCK} or use cuDNN attention")
    if hq % hkv:
        return f"query heads ({hq}) must be a multiple of key/value heads ({hkv})"
    need = flash_smem(hd)["backward"]
    if need > max_smem:
        return (f"flash attention backward needs {need} bytes of shared memory per block, "
                f"the GPU allows {max_smem}: use cuDNN attention")
    return None


def attention_stats_bytes(b: int, hq: int, t: int) -> int:
    """One fp32 per (sequence, query head, position): the LSE, and flash attention's delta = rowsum(dO*O)."""
    return b * hq * t * 4


# --- the gradient norm's partials (stats.gradnorm): one fp32 sum of squares per block of each gradient
# tensor's launch, a grid fixed by the tensor's size alone (never the GPU: the norm is bit-identical anywhere)
GRADNORM_MIN_ELEMS = 256 * 8 * 4     # 256 threads, at least four 16-byte loads each
GRADNORM_MAX_BLOCKS = 512            # per tensor: ~4 blocks per SM on the largest GPUs


def gradnorm_blocks(n: int) -> int:
    """Blocks (partials) of the gradient norm over a tensor of n elements."""
    if n < 1:
        raise ValueError(f"gradient tensor of {n} elements: every gradient tensor must be non-empty")
    return min(GRADNORM_MAX_BLOCKS, -(-n // GRADNORM_MIN_ELEMS))


def gradnorm_partials(sizes: list[int]) -> tuple[list[int], list[int], int]:
    """Per gradient tensor (in schedule order): its grid, its first partial's index; and the partial count."""
    grids = [gradnorm_blocks(n) for n in sizes]
    offsets, total = [], 0
    for g in grids:
        offsets.append(total)
        total += g
    return grids, offsets, total
