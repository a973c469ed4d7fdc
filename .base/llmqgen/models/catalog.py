"""Built-in model catalog: the published Hugging Face config.json dimensions of the supported models.

Each entry copies the base model's config.json (Qwen/Qwen2.5-*, Qwen/Qwen3-*, meta-llama/Llama-3.x-*).
Instruct variants share the dimensions (their eos token and context length may differ); a local
HF directory gives the exact config of any variant.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path

from .hf_config import read_hf_config
from .spec import ModelSpec, RopeScaling, check_buildable

QWEN_VOCAB = 151936          # Qwen2.5 0.5B/1.5B/3B and all Qwen3
QWEN_VOCAB_PADDED = 152064   # Qwen2.5 7B and up store a larger (padded) embedding
LLAMA3_VOCAB = 128256


def _qwen25(name: str, C: int, F: int, L: int, Hq: int, Hkv: int, *, tie: bool, vocab: int,
            max_pos: int, eps: float = 1e-6) -> ModelSpec:
    return ModelSpec(name=name, architecture="qwen2", hidden_size=C, intermediate_size=F,
                     num_layers=L, num_heads=Hq, num_kv_heads=Hkv, head_dim=C // Hq, vocab_size=vocab,
                     tie_embeddings=tie, qkv_bias=True, qk_norm=False, rope_theta=1_000_000.0,
                     rms_norm_eps=eps, max_position_embeddings=max_pos, eos_token_id=151643)


def _qwen3(name: str, C: int, F: int, L: int, Hq: int, Hkv: int, *, tie: bool) -> ModelSpec:
    return ModelSpec(name=name, architecture="qwen3", hidden_size=C, intermediate_size=F,
                     num_layers=L, num_heads=Hq, num_kv_heads=Hkv, head_dim=128, vocab_size=QWEN_VOCAB,
                     tie_embeddings=tie, qkv_bias=False, qk_norm=True, rope_theta=1_000_000.0,
                     rms_norm_eps=1e-6, max_position_embeddings=40960, eos_token_id=151645)


def _llama3(name: str, C: int, F: int, L: int, Hq: int, Hkv: int, *, tie: bool,
            factor: float) -> ModelSpec:
    scaling = RopeScaling(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)
    return ModelSpec(name=name, architecture="llama", hidden_size=C, intermediate_size=F,
                     num_layers=L, num_heads=Hq, num_kv_heads=Hkv, head_dim=C // Hq,
                     vocab_size=LLAMA3_VOCAB, tie_embeddings=tie, qkv_bias=False, qk_norm=False,
                     rope_theta=500_000.0, rope_scaling=scaling, rms_norm_eps=1e-5,
                     max_position_embeddings=131072, eos_token_id=128001)


_MODELS = [
    # Qwen2.5 base: the small three tie embeddings; 7B+ pad the vocabulary to 152064.
    _qwen25("qwen2.5-0.5b", 896, 4864, 24, 14, 2, tie=True, vocab=QWEN_VOCAB, max_pos=32768),
    _qwen25("qwen2.5-1.5b", 1536, 8960, 28, 12, 2, tie=True, vocab=QWEN_VOCAB, max_pos=131072),
    _qwen25("qwen2.5-3b", 2048, 11008, 36, 16, 2, tie=True, vocab=QWEN_VOCAB, max_pos=32768),
    _qwen25("qwen2.5-7b", 3584, 18944, 28, 28, 4, tie=False, vocab=QWEN_VOCAB_PADDED, max_pos=131072),
    _qwen25("qwen2.5-14b", 5120, 13824, 48, 40, 8, tie=False, vocab=QWEN_VOCAB_PADDED,
            max_pos=131072, eps=1e-5),
    _qwen25("qwen2.5-32b", 5120, 27648, 64, 40, 8, tie=False, vocab=QWEN_VOCAB_PADDED,
            max_pos=131072, eps=1e-5),
    _qwen25("qwen2.5-72b", 8192, 29568, 80, 64, 8, tie=False, vocab=QWEN_VOCAB_PADDED,
            max_pos=131072, eps=1e-5),
    # Qwen3: head_dim 128 whatever the width; 0.6B/1.7B/4B tie embeddings.
    _qwen3("qwen3-0.6b", 1024, 3072, 28, 16, 8, tie=True),
    _qwen3("qwen3-1.7b", 2048, 6144, 28, 16, 8, tie=True),
    _qwen3("qwen3-4b", 2560, 9728, 36, 32, 8, tie=True),
    _qwen3("qwen3-8b", 4096, 12288, 36, 32, 8, tie=False),
    _qwen3("qwen3-14b", 5120, 17408, 40, 40, 8, tie=False),
    _qwen3("qwen3-32b", 5120, 25600, 64, 64, 8, tie=False),
    # Llama 3.2 ties embeddings (rope factor 32), 3.1 does not (rope factor 8).
    _llama3("llama3.2-1b", 2048, 8192, 16, 32, 8, tie=True, factor=32.0),
    _llama3("llama3.2-3b", 3072, 8192, 28, 24, 8, tie=True, factor=32.0),
    _llama3("llama3.1-8b", 4096, 14336, 32, 32, 8, tie=False, factor=8.0),
    _llama3("llama3.1-70b", 8192, 28672, 80, 64, 8, tie=False, factor=8.0),
]

CATALOG: dict[str, ModelSpec] = {m.name: m for m in _MODELS}

# Bare sizes name Qwen2.5, the paper's model family.
SIZE_ALIASES: dict[str, str] = {s: f"qwen2.5-{s}" for s in ("0.5b", "1.5b", "3b", "7b", "14b", "32b", "72b")}

_VARIANT_SUFFIX = re.compile(r"-(instruct|base|chat|it|hf)$")


def list_models() -> list[ModelSpec]:
    return list(CATALOG.values())


def _canonical(name: str) -> str:
    """"Qwen/Qwen2.5-7B-Instruct", "meta-llama/Meta-Llama-3.1-8B" -> catalog spelling."""
    key = name.strip().lower().rsplit("/", 1)[-1].replace("_", "-")
    while (stripped := _VARIANT_SUFFIX.sub("", key)) != key:
        key = stripped
    key = re.sub(r"^(meta-)?llama-?3", "llama3", key)
    return SIZE_ALIASES.get(key, key)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".json") or name.count("/") > 1


def resolve_model(name_or_path: str) -> ModelSpec:
    """A catalog name, HF id or size alias ("7b" -> Qwen2.5-7B), or a local HF directory/config.json.

    The model is checked here, before any planning: a ModelSpec is a valid decoder by construction,
    and check_buildable refuses shapes the generated kernels cannot serve (ValueError, one line)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return check_buildable(read_hf_config(path))
    if _looks_like_path(name_or_path):
        raise ValueError(f"{name_or_path}: no such file or directory (give a local Hugging Face model "
                         f"directory holding config.json, or a catalog name such as qwen2.5-0.5b)")
    key = _canonical(name_or_path)
    if key in CATALOG:
        return CATALOG[key]
    close = difflib.get_close_matches(key, [*CATALOG, *SIZE_ALIASES], n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ValueError(f"unknown model {name_or_path!r}: {hint}Known models: {', '.join(CATALOG)} "
                     f"(or a size: {', '.join(SIZE_ALIASES)}). A local Hugging Face model directory "
                     f"with a config.json works too.")
