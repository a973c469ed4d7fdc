"""ModelSpec: the dimensions of a Llama/Qwen decoder, and the parameter counts derived from them."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict

Architecture = Literal["qwen2", "qwen3", "llama"]


class RopeScaling(BaseModel):
    """Llama-3 frequency scaling (HF `rope_scaling` with rope_type "llama3")."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    rope_type: Literal["llama3"] = "llama3"
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


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
