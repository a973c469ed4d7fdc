"""Read a Hugging Face config.json into a ModelSpec, and write one back (for exported models).

Reads both the transformers 4.x keys (`rope_theta`, `rope_scaling`) and the 5.x `rope_parameters`.
Anything the generated program cannot reproduce exactly (biases on other layers, sliding-window
attention, other activations or rope scalings) is refused with the reason, never silently ignored.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from .spec import Architecture, ModelSpec, RopeScaling

ARCHITECTURES: dict[str, Architecture] = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
}
_CLASS_OF: dict[Architecture, str] = {a: c for c, a in ARCHITECTURES.items()}


def _config_path(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ValueError(f"{p}: not found. Give a Hugging Face model directory holding config.json "
                         f"(or the config.json itself)")
    return p


def _architecture(cfg: dict, where: Path) -> Architecture:
    names = cfg.get("architectures") or []
    for n in names:
        if n in ARCHITECTURES:
            return ARCHITECTURES[n]
    if not names and cfg.get("model_type") in _CLASS_OF:  # model_type is the architecture's name
        return cfg["model_type"]
    found = ", ".join(names) or f"model_type {cfg.get('model_type')!r}"
    raise ValueError(f"{where}: unsupported architecture {found}; llmqgen supports "
                     f"{', '.join(ARCHITECTURES)}")


def _rope(cfg: dict, where: Path) -> tuple[float, Optional[RopeScaling]]:
    params = cfg.get("rope_parameters")
    if params:  # transformers >= 5: theta and scaling in one dict
        theta, scaling = params.get("rope_theta", 10000.0), params
    else:
        theta, scaling = cfg.get("rope_theta", 10000.0), cfg.get("rope_scaling")
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise ValueError(f"{where}: rope scaling type {kind!r} is not supported (only Llama-3's "
                         f"'llama3' scaling is); remove rope_scaling to train at the native context")
    return float(theta), RopeScaling(
        factor=scaling["factor"], low_freq_factor=scaling["low_freq_factor"],
        high_freq_factor=scaling["high_freq_factor"],
        original_max_position_embeddings=scaling["original_max_position_embeddings"])


def _refuse_unsupported(cfg: dict, arch: Architecture, where: Path) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act {act!r} is not supported (the MLP is SwiGLU with silu)")
    if arch in ("llama", "qwen3") and cfg.get("attention_bias", False):
        raise ValueError(f"{where}: attention_bias=true puts a bias on all four attention projections, "
                         f"which llmqgen does not support for {arch}")
    if cfg.get("mlp_bias", False):
        raise ValueError(f"{where}: mlp_bias=true is not supported")
    if cfg.get("use_sliding_window", False):
        raise ValueError(f"{where}: sliding-window attention is not supported; "
                         f"set use_sliding_window to false")


def _first_id(value: Any) -> Optional[int]:
    """eos_token_id may be a list (instruct models); the first is the end-of-text token."""
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def read_hf_config(path: str | Path) -> ModelSpec:
    """A ModelSpec from a local HF config.json or its directory; the name is the directory's name."""
    where = _config_path(path)
    try:
        cfg = json.loads(where.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    arch = _architecture(cfg, where)
    _refuse_unsupported(cfg, arch, where)
    try:
        C, Hq = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        theta, scaling = _rope(cfg, where)
        head_dim = cfg.get("head_dim") or C // Hq
        if cfg.get("head_dim") is None and C % Hq:
            raise ValueError(f"{where}: hidden_size {C} is not a multiple of num_attention_heads {Hq} "
                             f"and head_dim is not given")
        return ModelSpec(
            name=where.parent.resolve().name, architecture=arch, hidden_size=C,
            intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
            num_heads=Hq, num_kv_heads=int(cfg.get("num_key_value_heads") or Hq),
            head_dim=int(head_dim), vocab_size=int(cfg["vocab_size"]),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3", rope_theta=theta, rope_scaling=scaling,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            eos_token_id=_first_id(cfg.get("eos_token_id")))
    except KeyError as e:
        raise ValueError(f"{where}: missing key {e.args[0]!r} in config.json") from None


def to_hf_config(spec: ModelSpec) -> dict:
    """The config.json transformers loads for this model (torch_dtype bfloat16), for exports."""
    if spec.qkv_bias != (spec.architecture == "qwen2") or spec.qk_norm != (spec.architecture == "qwen3"):
        raise ValueError(f"{spec.name}: qkv_bias={spec.qkv_bias}, qk_norm={spec.qk_norm} has no "
                         f"{_CLASS_OF[spec.architecture]} equivalent in transformers")
    cfg: dict[str, Any] = {
        "architectures": [_CLASS_OF[spec.architecture]],
        "model_type": spec.architecture,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "tie_word_embeddings": spec.tie_embeddings,
        "rope_theta": spec.rope_theta,
        "rope_scaling": None if spec.rope_scaling is None else spec.rope_scaling.model_dump(),
        "rms_norm_eps": spec.rms_norm_eps,
        "max_position_embeddings": spec.max_position_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }
    if spec.eos_token_id is not None:
        cfg["eos_token_id"] = spec.eos_token_id
    if spec.architecture == "llama":
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=spec.num_layers)
    if spec.architecture == "qwen3":
        cfg["attention_bias"] = False
    return cfg
