"""ModelSpec: the dimensions of a Llama/Qwen decoder, and the parameter counts derived from them.

A ModelSpec is checked when it is made: sizes positive, query heads a multiple of key/value heads, an
even head_dim (RoPE rotates pairs), hidden_size a multiple of the heads for Llama (transformers'
LlamaConfig refuses anything else). `build_spec` gives those errors as one plain ValueError line;
`check_buildable` adds what every generated program assumes of the shapes (the kernels' own rules).
"""
from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

Architecture = Literal["qwen2", "qwen3", "llama"]


class RopeScaling(BaseModel):
    """Llama-3 frequency scaling (HF `rope_scaling` with rope_type "llama3")."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    rope_type: Literal["llama3"] = "llama3"
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    @model_validator(mode="after")
    def _check(self) -> "RopeScaling":
        lo, hi = self.low_freq_factor, self.high_freq_factor
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise ValueError(f"rope scaling factor must be a positive number, got {self.factor}")
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
            raise ValueError(f"llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor, got "
                             f"low_freq_factor {lo} and high_freq_factor {hi}")
        if self.original_max_position_embeddings < 1:
            raise ValueError(f"llama3 rope scaling needs original_max_position_embeddings > 0, got "
                             f"{self.original_max_position_embeddings}")
        return self


# ModelSpec field -> the config.json key users know it by (error messages speak config.json).
_HF_KEY = {"hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
           "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
           "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "vocab_size": "vocab_size",
           "max_position_embeddings": "max_position_embeddings"}


class ModelSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    architecture: Architecture
    hidden_size: int            # C
    intermediate_size: int      # F (SwiGLU width)
    num_layers: int             # L
    num_heads: int              # Hq
    num_kv_heads: int           # Hkv
    head_dim: int               # D (Qwen3 sets it apart from C / Hq)
    vocab_size: int             # V
    tie_embeddings: bool
    qkv_bias: bool              # Qwen2 has a bias on q, k, v
    qk_norm: bool               # Qwen3 RMS-normalises q and k per head before RoPE
    rope_theta: float
    rope_scaling: Optional[RopeScaling] = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    eos_token_id: Optional[int] = None

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        problems = model_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # --- derived widths -------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_dim(self) -> int:
        return self.q_dim + 2 * self.kv_dim

    # --- parameter counts -----------------------------------------------------------------
    def block_matrix_shapes(self) -> dict[str, tuple[int, int]]:
        """The four (fused) linear layers of a block as (out_features, in_features)."""
        C, F = self.hidden_size, self.intermediate_size
        return {"qkv": (self.qkv_dim, C), "attn_out": (C, self.q_dim),
                "gate_up": (2 * F, C), "down": (C, F)}

    def block_matrix_params(self) -> int:
        return sum(o * i for o, i in self.block_matrix_shapes().values())

    def block_vector_params(self) -> int:
        """Norm weights, QKV bias and q/k-norm weights of one block."""
        n = 2 * self.hidden_size
        if self.qkv_bias:
            n += self.qkv_dim
        if self.qk_norm:
            n += 2 * self.head_dim
        return n

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def lm_head_params(self) -> int:
        return 0 if self.tie_embeddings else self.vocab_size * self.hidden_size

    def num_params(self) -> int:
        return (self.num_layers * (self.block_matrix_params() + self.block_vector_params())
                + self.embedding_params() + self.lm_head_params() + self.hidden_size)


def model_problems(m: ModelSpec) -> list[str]:
    """What makes these dimensions no valid decoder (empty when they are one), one phrase each."""
    out = [f"{key} must be positive, got {getattr(m, f)}" for f, key in _HF_KEY.items() if getattr(m, f) < 1]
    if m.num_heads > 0 and m.num_kv_heads > 0 and m.num_heads % m.num_kv_heads:
        out.append(f"num_attention_heads {m.num_heads} is not a multiple of num_key_value_heads "
                   f"{m.num_kv_heads}: grouped-query attention shares each key/value head among a whole "
                   f"number of query heads")
    if m.head_dim > 0 and m.head_dim % 2:
        out.append(f"head_dim {m.head_dim} is odd: RoPE rotates pairs of dimensions")
    if m.architecture == "llama" and m.num_heads > 0 and m.hidden_size % m.num_heads:
        out.append(f"hidden_size {m.hidden_size} is not a multiple of num_attention_heads {m.num_heads}, "
                   f"which Llama requires (transformers' LlamaConfig refuses it)")
    if not (math.isfinite(m.rope_theta) and m.rope_theta > 0):
        out.append(f"rope_theta must be a positive number, got {m.rope_theta}")
    if not (math.isfinite(m.rms_norm_eps) and m.rms_norm_eps >= 0):
        out.append(f"rms_norm_eps must be a finite number >= 0, got {m.rms_norm_eps}")
    return out


def one_line(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        msg = err["msg"].removeprefix("Value error, ")
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def build_spec(**fields) -> ModelSpec:
    """ModelSpec(**fields), its validation errors as one ValueError line (no pydantic report)."""
    try:
        return ModelSpec(**fields)
    except ValidationError as e:
        raise ValueError(one_line(e)) from None


def kernel_problems(m: ModelSpec) -> list[str]:
    """What the generated program's kernels cannot do with these shapes, whatever the plan.

    Mirrors the checks the kernel families make when they render (codegen/families/rope.py,
    rmsnorm.py, embedding.py, swiglu.py), so that a model no program can serve is refused when it is
    read rather than at build time. Plan-dependent rules (FP8's multiples of 16, flash attention's
    head_dim 64/128 else cuDNN) stay with the planner and the renderer."""
    out = []
    hd = m.head_dim
    if hd % 16 or (hd // 16) & (hd // 16 - 1) or hd > 512:
        out.append(f"head_dim {hd}: llmqgen's RoPE kernels need head_dim = 16 * 2^k <= 512 (16, 32, 64, "
                   f"128, 256, 512)")
    if m.hidden_size % 8:
        out.append(f"hidden_size {m.hidden_size}: RMSNorm and the embedding need a multiple of 8 "
                   f"(16-byte vectors)")
    if m.intermediate_size % 8:
        out.append(f"intermediate_size {m.intermediate_size}: SwiGLU needs a multiple of 8 (16-byte vectors)")
    return out


def check_buildable(m: ModelSpec) -> ModelSpec:
    """m, or ValueError (one line) naming every shape the generated kernels cannot serve."""
    problems = kernel_problems(m)
    if problems:
        raise ValueError(f"{m.name}: " + "; ".join(problems))
    return m
