"""llmqgen's fused parameter layout and the Hugging Face tensor names it is made of.

llmqgen keeps one matrix per fused linear layer (names as ModelSpec.block_matrix_shapes and the
plan's memory table use them), rows in HF's order, so a fused tensor is the row-wise concatenation
of its HF parts:

    layers.{i}.qkv       [QKV, C]   = q_proj | k_proj | v_proj          (self_attn.*.weight)
    layers.{i}.qkv_bias  [QKV]      = q_proj | k_proj | v_proj          (.bias; Qwen2 only)
    layers.{i}.attn_out  [C, QDIM]  = self_attn.o_proj.weight
    layers.{i}.gate_up   [2F, C]    = mlp.gate_proj | mlp.up_proj
    layers.{i}.down      [C, F]     = mlp.down_proj.weight
    layers.{i}.ln1 / ln2 [C]        = input_layernorm / post_attention_layernorm
    layers.{i}.q_norm / k_norm [HD] = self_attn.q_norm / k_norm          (Qwen3 only)
    embedding [V, C] = model.embed_tokens.weight;  final_norm [C] = model.norm.weight
    lm_head   [V, C] = lm_head.weight                                    (absent when tied)

Qwen2, Qwen3 and Llama share these HF names. Q/K rows stay in HF's order (HF's Llama checkpoints
are already permuted for the rotate-half RoPE convention), so RoPE kernels use rotate-half.
"""
from __future__ import annotations

from .spec import ModelSpec

Shape = tuple[int, ...]
# (HF name, shape) parts, concatenated along axis 0, for one llmqgen tensor
Parts = list[tuple[str, Shape]]


def layer_name(i: int, key: str) -> str:
    return f"layers.{i}.{key}"


def name_map(spec: ModelSpec) -> dict[str, Parts]:
    """Every llmqgen parameter, in storage order, with the HF tensors that form it."""
    C, F, HD = spec.hidden_size, spec.intermediate_size, spec.head_dim
    Q, KV = spec.q_dim, spec.kv_dim
    out: dict[str, Parts] = {"embedding": [("model.embed_tokens.weight", (spec.vocab_size, C))]}
    for i in range(spec.num_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        layer = {
            "qkv": [(a + "q_proj.weight", (Q, C)), (a + "k_proj.weight", (KV, C)),
                    (a + "v_proj.weight", (KV, C))],
            "attn_out": [(a + "o_proj.weight", (C, Q))],
            "gate_up": [(m + "gate_proj.weight", (F, C)), (m + "up_proj.weight", (F, C))],
            "down": [(m + "down_proj.weight", (C, F))],
            "ln1": [(f"model.layers.{i}.input_layernorm.weight", (C,))],
            "ln2": [(f"model.layers.{i}.post_attention_layernorm.weight", (C,))],
        }
        if spec.qkv_bias:
            layer["qkv_bias"] = [(a + "q_proj.bias", (Q,)), (a + "k_proj.bias", (KV,)),
                                 (a + "v_proj.bias", (KV,))]
        if spec.qk_norm:
            layer["q_norm"] = [(a + "q_norm.weight", (HD,))]
            layer["k_norm"] = [(a + "k_norm.weight", (HD,))]
        out.update({layer_name(i, k): v for k, v in layer.items()})
    out["final_norm"] = [("model.norm.weight", (C,))]
    if not spec.tie_embeddings:
        out["lm_head"] = [("lm_head.weight", (spec.vocab_size, C))]
    return out


def fused_shape(parts: Parts) -> Shape:
    rows = sum(shape[0] for _, shape in parts)
    return (rows,) + parts[0][1][1:]


def param_shapes(spec: ModelSpec) -> dict[str, Shape]:
    """llmqgen parameter name -> shape (the fused layout)."""
    return {name: fused_shape(parts) for name, parts in name_map(spec).items()}
