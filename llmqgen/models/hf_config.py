"""Read a Hugging Face config.json into a ModelSpec, and write one back (for exported models).

A config.json means what transformers 5 makes of it, so it is read the way transformers 5 reads it
(models/{llama,qwen2,qwen3}/configuration_*.py, configuration_utils.py, modeling_rope_utils.py):
the class picked by `model_type`; each class's own defaults for absent keys (Qwen3's head_dim is 128
whatever the width, Llama's max_position_embeddings 2048, Qwen2's num_key_value_heads 32...); null
num_key_value_heads (and Llama's null head_dim) derived from the heads; strict types (an integer
field holding 1024.0 is refused); RoPE from `rope_scaling` (4.x, wins when set) or `rope_parameters`
(5.x), whose own rope_theta wins over the top-level one; Qwen2's q/k/v bias whatever attention_bias
says; sliding window only where transformers' layer_types put it. tests/unit/test_hf_config_vs_transformers.py
compares the result with transformers' own config objects. Anything the generated program cannot
reproduce exactly (other biases, sliding-window attention, other activations, rope scalings or
partial rotary embeddings, attention dropout) is refused with the reason, never silently ignored.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pydantic import ValidationError

from .spec import Architecture, ModelSpec, RopeScaling, build_spec, one_line

ARCHITECTURES: dict[str, Architecture] = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
}
_CLASS_OF: dict[Architecture, str] = {a: c for c, a in ARCHITECTURES.items()}

# transformers 5's class defaults, for the keys llmqgen reads (the dataclass fields of LlamaConfig,
# Qwen2Config, Qwen3Config). None: derived in __post_init__ (num_key_value_heads = heads, Llama's
# head_dim = hidden // heads). Qwen2Config has no head_dim field: its attention takes hidden // heads
# unless config.json sets one.
_COMMON: dict[str, Any] = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                               hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False,
                               attention_dropout=0.0)
_QWEN: dict[str, Any] = _COMMON | dict(
    vocab_size=151936, intermediate_size=22016, num_key_value_heads=32, max_position_embeddings=32768,
    eos_token_id=None, use_sliding_window=False, sliding_window=4096, max_window_layers=28, layer_types=None)
DEFAULTS: dict[Architecture, dict[str, Any]] = {
    "llama": _COMMON | dict(vocab_size=32000, intermediate_size=11008, num_key_value_heads=None, head_dim=None,
                            max_position_embeddings=2048, eos_token_id=2, attention_bias=False, mlp_bias=False),
    "qwen2": _QWEN,
    "qwen3": _QWEN | dict(head_dim=128, attention_bias=False),
}
DEFAULT_ROPE_THETA = 10_000.0     # RotaryEmbeddingConfigMixin.default_theta
_ACTIVATIONS = ("silu", "swish")  # transformers' ACT2FN: both are x * sigmoid(x)


def _config_path(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if p.is_dir():
        raise ValueError(f"{p} is a folder, not a file: give the model directory that holds config.json")
    if not p.is_file():
        raise ValueError(f"{p}: not found. Give a Hugging Face model directory holding config.json "
                         f"(or the config.json itself)")
    return p


class _Reader:
    """config.json's values with one architecture's defaults and transformers' strict types."""

    def __init__(self, cfg: dict, arch: Architecture, where: Path):
        self.cfg, self.defaults, self.where = cfg, DEFAULTS[arch], where

    def raw(self, key: str, default: Any = None) -> Any:
        return self.cfg.get(key, self.defaults.get(key, default))

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.where}: {what}")

    def int(self, key: str, value: Any = ..., *, nullable: bool = False) -> Optional[int]:
        v = self.raw(key) if value is ... else value
        if v is None and nullable:
            return None
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.fail(f"{key} must be an integer, got {v!r}")
        return v

    def float(self, key: str, value: Any = ...) -> float:
        v = self.raw(key) if value is ... else value
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise self.fail(f"{key} must be a number, got {v!r}")
        return float(v)

    def bool(self, key: str) -> bool:
        v = self.raw(key)
        if not isinstance(v, bool):
            raise self.fail(f"{key} must be true or false, got {json.dumps(v)}")
        return v


def _architecture(cfg: dict, where: Path) -> Architecture:
    """transformers' AutoConfig picks the class by model_type; `architectures` only when it is absent."""
    supported = ", ".join(ARCHITECTURES)
    names = cfg.get("architectures") or []
    names = [names] if isinstance(names, str) else names
    ours = [ARCHITECTURES[n] for n in names if n in ARCHITECTURES]
    if names and not ours:
        raise ValueError(f"{where}: unsupported architecture {', '.join(map(str, names))}; llmqgen supports "
                         f"{supported}")
    model_type = cfg.get("model_type")
    if model_type is None:
        if ours:
            return ours[0]
        raise ValueError(f"{where}: neither model_type nor architectures is given; llmqgen supports "
                         f"{supported} (model_type {', '.join(_CLASS_OF)})")
    if model_type not in _CLASS_OF:
        raise ValueError(f"{where}: unsupported model_type {model_type!r}; llmqgen supports "
                         f"{', '.join(_CLASS_OF)} ({supported})")
    if ours and model_type not in ours:
        raise ValueError(f"{where}: model_type {model_type!r} contradicts architectures {names}: "
                         f"transformers would build {_CLASS_OF[model_type]}; make the two agree")
    return model_type


def _rope(r: _Reader, max_pos: int) -> tuple[float, Optional[RopeScaling]]:
    """transformers' convert_rope_params_to_dict + standardize_rope_params, for one global RoPE."""
    cfg = r.cfg
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}   # rope_scaling wins when set
    if not isinstance(params, dict):
        raise r.fail(f"rope_parameters must be an object, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise r.fail("rope_parameters per layer type is not supported (one RoPE for all layers)")
    theta = r.float("rope_theta", params.get("rope_theta", cfg.get("rope_theta", DEFAULT_ROPE_THETA)))
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise r.fail(f"partial_rotary_factor {partial!r} is not supported (RoPE rotates the whole head)")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise r.fail(f"rope scaling type {kind!r} is not supported (only Llama-3's 'llama3' scaling "
                     f"is); remove rope_scaling to train at the native context")
    missing = sorted({"factor", "low_freq_factor", "high_freq_factor"} - params.keys())
    if missing:
        raise r.fail(f"llama3 rope scaling lacks {', '.join(missing)}")
    fields = dict(factor=r.float("factor", params["factor"]),
                  low_freq_factor=r.float("low_freq_factor", params["low_freq_factor"]),
                  high_freq_factor=r.float("high_freq_factor", params["high_freq_factor"]),
                  original_max_position_embeddings=r.int("original_max_position_embeddings", params.get(
                      "original_max_position_embeddings", max_pos)))   # absent: max_position_embeddings
    try:
        return theta, RopeScaling(**fields)
    except ValidationError as e:
        raise r.fail(one_line(e)) from None


def _refuse_sliding_window(r: _Reader, arch: Architecture, layers: int) -> None:
    """Qwen2/Qwen3 slide the window on layers >= max_window_layers when use_sliding_window is set (or
    where an explicit layer_types says so); Llama has no sliding window (the keys mean nothing there)."""
    if arch == "llama":
        return
    types = r.raw("layer_types")
    if types is None:
        window = r.raw("sliding_window") if r.bool("use_sliding_window") else None
        first = r.int("max_window_layers")
        if window is not None and layers > first:
            raise r.fail(f"sliding-window attention (use_sliding_window, window {window}) on layers "
                         f"{first}..{layers - 1} is not supported; set use_sliding_window to false")
        return
    if not isinstance(types, list) or len(types) != layers:
        raise r.fail(f"layer_types must list one type per layer ({layers}), got {types!r}")
    other = sorted({str(t) for t in types} - {"full_attention"})
    if other:
        raise r.fail(f"layer_types {', '.join(other)} are not supported (full attention on every layer "
                     f"only; sliding-window attention is not)")


def _refuse_unsupported(r: _Reader, arch: Architecture) -> None:
    act = r.raw("hidden_act")
    if act not in _ACTIVATIONS:
        raise r.fail(f"hidden_act {act!r} is not supported (the MLP is SwiGLU with silu)")
    if arch in ("llama", "qwen3") and r.bool("attention_bias"):  # Qwen2's q/k/v bias is fixed
        raise r.fail(f"attention_bias=true puts a bias on all four attention projections, "
                     f"which llmqgen does not support for {arch}")
    if arch == "llama" and r.bool("mlp_bias"):                   # Qwen's MLP never has one
        raise r.fail("mlp_bias=true is not supported")
    if r.float("attention_dropout") != 0.0:
        raise r.fail(f"attention_dropout {r.raw('attention_dropout')} is not supported (no dropout in "
                     f"the generated program); set it to 0")


def _eos(r: _Reader) -> Optional[int]:
    """eos_token_id may be a list (instruct models); the first is the end-of-text token."""
    v = r.raw("eos_token_id")
    if isinstance(v, list):
        return r.int("eos_token_id", v[0]) if v else None
    return r.int("eos_token_id", v, nullable=True)


def read_hf_config(path: str | Path) -> ModelSpec:
    """A ModelSpec from a local HF config.json or its directory; the name is the directory's name."""
    where = _config_path(path)
    try:
        cfg = json.loads(where.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    except OSError as e:
        raise ValueError(f"cannot read {where}: {e.strerror or e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: not a config.json (a JSON object is expected)")
    arch = _architecture(cfg, where)
    r = _Reader(cfg, arch, where)
    _refuse_unsupported(r, arch)
    C, Hq, L = r.int("hidden_size"), r.int("num_attention_heads"), r.int("num_hidden_layers")
    _refuse_sliding_window(r, arch, L)
    Hkv = r.int("num_key_value_heads", nullable=True) or Hq
    if arch == "qwen3":
        head_dim = r.int("head_dim")  # transformers refuses null here: the field is a plain int
    else:
        head_dim = r.int("head_dim", nullable=True)
        if head_dim is None:
            if Hq < 1:
                raise r.fail(f"num_attention_heads must be positive, got {Hq}")
            head_dim = C // Hq
    max_pos = r.int("max_position_embeddings")
    theta, scaling = _rope(r, max_pos)
    fields = dict(
        name=where.parent.resolve().name, architecture=arch, hidden_size=C,
        intermediate_size=r.int("intermediate_size"), num_layers=L, num_heads=Hq, num_kv_heads=Hkv,
        head_dim=head_dim, vocab_size=r.int("vocab_size"), tie_embeddings=r.bool("tie_word_embeddings"),
        qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3", rope_theta=theta, rope_scaling=scaling,
        rms_norm_eps=r.float("rms_norm_eps"), max_position_embeddings=max_pos, eos_token_id=_eos(r))
    try:
        return build_spec(**fields)
    except ValueError as e:
        raise r.fail(str(e)) from None


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
    cfg["eos_token_id"] = spec.eos_token_id   # null, not absent: Llama's absent eos means 2
    if spec.architecture == "llama":
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=spec.num_layers)
    if spec.architecture == "qwen3":
        cfg["attention_bias"] = False
    return cfg
