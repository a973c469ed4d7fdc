"""llmqgen's config.json reader against transformers 5's own config classes.

For every config.json here (the catalog's models in their published form, and hand-written files with
keys missing, null or spelled the 4.x or the 5.x way) the ModelSpec llmqgen reads must describe the
model transformers builds from the same file: the numbers as transformers' modeling code takes them
from its config object (head_dim as the attention modules take it, rope_theta and the llama3 scaling
from the standardized rope_parameters, the first eos id...). Files transformers refuses, llmqgen
refuses too. Skipped without transformers (the `test` extra installs it); its config classes need no torch.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest

transformers = pytest.importorskip("transformers")

from llmqgen.models.catalog import CATALOG  # noqa: E402
from llmqgen.models.hf_config import read_hf_config  # noqa: E402
from llmqgen.models.spec import ModelSpec, RopeScaling  # noqa: E402

from test_models import LLAMA32_1B, QWEN3_06B, QWEN25_05B  # noqa: E402

_CLASSES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}


def hf_config(cfg: dict, arch: str):
    """transformers' config object for this config.json: AutoConfig where model_type names the class."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "model_type" in cfg:
            return transformers.AutoConfig.for_model(**copy.deepcopy(cfg))
        return getattr(transformers, _CLASSES[arch]).from_dict(copy.deepcopy(cfg))


def hf_view(c) -> dict:
    """ModelSpec's fields as transformers' modeling code reads them off its config object."""
    arch = c.model_type
    rope = c.rope_parameters
    scaling = None
    if rope["rope_type"] == "llama3":
        scaling = RopeScaling(factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                              high_freq_factor=rope["high_freq_factor"],
                              original_max_position_embeddings=rope["original_max_position_embeddings"])
    else:
        assert rope["rope_type"] == "default"
    eos = c.eos_token_id[0] if isinstance(c.eos_token_id, list) else c.eos_token_id
    assert "sliding_attention" not in (getattr(c, "layer_types", None) or [])
    assert getattr(c, "mlp_bias", False) is False or arch != "llama"
    return dict(
        architecture=arch, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
        # modeling_{llama,qwen2,qwen3}.py: getattr(config, "head_dim", hidden_size // num_attention_heads)
        head_dim=getattr(c, "head_dim", c.hidden_size // c.num_attention_heads),
        vocab_size=c.vocab_size, tie_embeddings=c.tie_word_embeddings,
        qkv_bias=arch == "qwen2" or c.attention_bias,   # Qwen2Attention: bias=True on q, k, v
        qk_norm=arch == "qwen3", rope_theta=float(rope["rope_theta"]), rope_scaling=scaling,
        rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings, eos_token_id=eos)


def spec_view(spec: ModelSpec) -> dict:
    d = dict(spec)
    d.pop("name")
    return d


def _write(tmp_path, cfg, name="m"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def read_both(tmp_path, cfg, arch):
    spec = read_hf_config(_write(tmp_path, cfg))
    assert spec.architecture == arch
    return spec_view(spec), hf_view(hf_config(cfg, arch))


# --- the catalog's models as their config.json ------------------------------------------------------
# The key sets of the published files (Qwen/Qwen2.5-*, Qwen/Qwen3-*, meta-llama/Llama-3.x-*: 4.x
# spellings, head_dim only where the Hub file has it), with the catalog's numbers (which copy them).

def published(name: str) -> dict:
    m = CATALOG[name]
    dims = {"hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
            "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
            "num_key_value_heads": m.num_kv_heads, "vocab_size": m.vocab_size,
            "tie_word_embeddings": m.tie_embeddings, "max_position_embeddings": m.max_position_embeddings,
            "rms_norm_eps": m.rms_norm_eps, "eos_token_id": m.eos_token_id}
    if m.architecture == "qwen2":
        return {k: v for k, v in QWEN25_05B.items() if k not in dims} | dims | {
            "max_window_layers": m.num_layers, "sliding_window": m.max_position_embeddings}
    if m.architecture == "qwen3":
        return {k: v for k, v in QWEN3_06B.items() if k not in dims} | dims | {"max_window_layers": m.num_layers}
    base = {k: v for k, v in LLAMA32_1B.items() if k not in dims}
    base["rope_scaling"] = m.rope_scaling.model_dump()
    if name.startswith("llama3.1"):
        base.pop("head_dim")   # Llama 3.1's config.json has none; 3.2's has
    else:
        base["head_dim"] = m.head_dim
    return base | dims


@pytest.mark.parametrize("name", list(CATALOG))
def test_catalog_configs_read_as_transformers_reads_them(tmp_path, name):
    cfg = published(name)
    ours, theirs = read_both(tmp_path, cfg, CATALOG[name].architecture)
    assert ours == theirs
    assert ours == spec_view(CATALOG[name])


@pytest.mark.parametrize("cfg,arch", [(QWEN25_05B, "qwen2"), (QWEN3_06B, "qwen3"), (LLAMA32_1B, "llama")])
def test_verbatim_hub_configs(tmp_path, cfg, arch):
    ours, theirs = read_both(tmp_path, cfg, arch)
    assert ours == theirs


# --- hand-written files: keys missing, null, old and new spellings -----------------------------------

def _drop(cfg, *keys):
    return {k: v for k, v in cfg.items() if k not in keys}


QWEN3_4B = published("qwen3-4b")        # 32 query heads: Qwen's default of 32 kv heads is valid there
QWEN25_7B = published("qwen2.5-7b")
LLAMA31_8B = published("llama3.1-8b")
_V5_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0}

VARIANTS = {
    # head_dim absent: Qwen3 128 whatever the width, Llama and Qwen2 hidden // heads
    "qwen3-no-head-dim": (_drop(QWEN3_06B, "head_dim"), "qwen3"),
    "qwen3-4b-no-head-dim": (_drop(QWEN3_4B, "head_dim"), "qwen3"),
    "llama-no-head-dim": (_drop(LLAMA32_1B, "head_dim"), "llama"),
    "llama-null-head-dim": (LLAMA32_1B | {"head_dim": None}, "llama"),
    "qwen2-explicit-head-dim": (QWEN25_05B | {"head_dim": 128}, "qwen2"),
    # num_key_value_heads: absent -> Llama: the heads, Qwen: 32; null -> the heads
    "llama-no-kv-heads": (_drop(LLAMA32_1B, "num_key_value_heads"), "llama"),
    "llama-null-kv-heads": (LLAMA32_1B | {"num_key_value_heads": None}, "llama"),
    "qwen3-no-kv-heads": (_drop(QWEN3_4B, "num_key_value_heads"), "qwen3"),
    "qwen2-null-kv-heads": (QWEN25_05B | {"num_key_value_heads": None}, "qwen2"),
    # other absent keys take each class's default
    "llama-no-max-pos": (_drop(LLAMA31_8B, "max_position_embeddings"), "llama"),
    "qwen2-no-max-pos": (_drop(QWEN25_7B, "max_position_embeddings"), "qwen2"),
    "qwen3-no-max-pos": (_drop(QWEN3_06B, "max_position_embeddings"), "qwen3"),
    "llama-no-tie": (_drop(LLAMA32_1B, "tie_word_embeddings"), "llama"),
    "qwen2-no-tie": (_drop(QWEN25_05B, "tie_word_embeddings"), "qwen2"),
    "qwen3-no-tie": (_drop(QWEN3_06B, "tie_word_embeddings"), "qwen3"),
    "llama-no-eps": (_drop(LLAMA32_1B, "rms_norm_eps"), "llama"),
    "qwen2-no-eps": (_drop(published("qwen2.5-14b"), "rms_norm_eps"), "qwen2"),
    "llama-no-eos": (_drop(LLAMA32_1B, "eos_token_id"), "llama"),
    "qwen3-no-eos": (_drop(QWEN3_06B, "eos_token_id"), "qwen3"),
    "llama-eos-list": (LLAMA32_1B | {"eos_token_id": [128001, 128008, 128009]}, "llama"),
    "qwen3-null-eos": (QWEN3_06B | {"eos_token_id": None}, "qwen3"),
    "llama-bare": (_drop(LLAMA32_1B, "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size"), "llama"),
    "qwen2-bare": (_drop(QWEN25_05B, "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads", "num_key_value_heads", "vocab_size"), "qwen2"),
    "qwen3-bare": ({"model_type": "qwen3"}, "qwen3"),
    "llama-minimal": ({"model_type": "llama"}, "llama"),
    # RoPE: defaults, 4.x and 5.x spellings, which one wins
    "llama-no-rope-theta": (_drop(LLAMA32_1B, "rope_theta"), "llama"),
    "qwen2-no-rope-theta": (_drop(QWEN25_05B, "rope_theta"), "qwen2"),
    "qwen3-rope-scaling-null": (QWEN3_06B | {"rope_scaling": None}, "qwen3"),
    "llama-v5-rope-parameters": (_drop(LLAMA31_8B, "rope_theta", "rope_scaling") | {"rope_parameters": _V5_ROPE},
                                 "llama"),
    "qwen2-v5-rope-parameters": (_drop(QWEN25_05B, "rope_theta")
                                 | {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, "qwen2"),
    "qwen3-v5-rope-no-theta": (_drop(QWEN3_06B, "rope_scaling") | {"rope_parameters": {"rope_type": "default"}},
                               "qwen3"),
    "qwen3-both-thetas": (_drop(QWEN3_06B, "rope_scaling")
                          | {"rope_parameters": {"rope_type": "default", "rope_theta": 5e6}}, "qwen3"),
    "llama-rope-scaling-beats-parameters": (LLAMA31_8B | {"rope_parameters": {"rope_type": "default",
                                                                              "rope_theta": 1.0}}, "llama"),
    "llama-rope-old-type-key": (LLAMA31_8B | {"rope_scaling": {"type": "llama3", "factor": 8.0,
                                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                               "original_max_position_embeddings": 8192}},
                                "llama"),
    "llama-rope-no-original-max": (LLAMA31_8B | {"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                                  "low_freq_factor": 1.0,
                                                                  "high_freq_factor": 4.0}}, "llama"),
    "llama-rope-int-factors": (LLAMA31_8B | {"rope_scaling": {"rope_type": "llama3", "factor": 8,
                                                              "low_freq_factor": 1, "high_freq_factor": 4,
                                                              "original_max_position_embeddings": 8192}},
                               "llama"),
    "qwen2-llama3-scaling": (QWEN25_7B | {"rope_scaling": dict(_V5_ROPE, rope_theta=1e6)}, "qwen2"),
    "llama-empty-rope-scaling": (LLAMA32_1B | {"rope_scaling": {}}, "llama"),
    "qwen3-rope-default-type": (QWEN3_06B | {"rope_scaling": {"rope_type": "default"}}, "qwen3"),
    # keys transformers ignores for an architecture
    "qwen2-attention-bias-ignored": (QWEN25_05B | {"attention_bias": True, "mlp_bias": True}, "qwen2"),
    "qwen3-mlp-bias-ignored": (QWEN3_06B | {"mlp_bias": True}, "qwen3"),
    "llama-sliding-keys-ignored": (LLAMA32_1B | {"use_sliding_window": True, "sliding_window": 4096,
                                                 "max_window_layers": 0}, "llama"),
    "qwen2-window-past-last-layer": (QWEN25_05B | {"use_sliding_window": True}, "qwen2"),
    "qwen3-window-null": (QWEN3_06B | {"use_sliding_window": True, "max_window_layers": 0,
                                       "sliding_window": None}, "qwen3"),
    "qwen3-layer-types-full": (QWEN3_06B | {"layer_types": ["full_attention"] * 28}, "qwen3"),
    "qwen2-swish": (QWEN25_05B | {"hidden_act": "swish"}, "qwen2"),
    # which class: model_type, else architectures
    "qwen3-no-architectures": (_drop(QWEN3_06B, "architectures"), "qwen3"),
    "llama-no-model-type": (_drop(LLAMA32_1B, "model_type"), "llama"),
    "qwen2-seq-cls-architecture-with-model-type": (QWEN25_05B | {"architectures": ["Qwen2ForCausalLM",
                                                                                   "Qwen2Model"]}, "qwen2"),
}


@pytest.mark.parametrize("case", list(VARIANTS))
def test_hand_written_configs_read_as_transformers_reads_them(tmp_path, case):
    cfg, arch = VARIANTS[case]
    ours, theirs = read_both(tmp_path, cfg, arch)
    assert ours == theirs


def test_some_defaults_by_name(tmp_path):
    """A few of transformers' defaults spelled out, so that a change in either side is seen here."""
    def read(cfg, name):
        return read_hf_config(_write(tmp_path, cfg, name))
    assert read(VARIANTS["qwen3-no-head-dim"][0], "a").head_dim == 128
    assert read(VARIANTS["llama-no-max-pos"][0], "b").max_position_embeddings == 2048
    assert read(VARIANTS["qwen3-no-kv-heads"][0], "c").num_kv_heads == 32
    assert read(VARIANTS["llama-no-kv-heads"][0], "d").num_kv_heads == 32
    assert read(VARIANTS["llama-no-eos"][0], "e").eos_token_id == 2
    assert read(VARIANTS["qwen3-no-eos"][0], "f").eos_token_id is None
    assert read(VARIANTS["qwen2-no-tie"][0], "g").tie_embeddings is False
    assert read(VARIANTS["llama-no-rope-theta"][0], "h").rope_theta == 10000.0
    assert read(VARIANTS["qwen3-both-thetas"][0], "i").rope_theta == 5e6
    assert read(VARIANTS["llama-rope-no-original-max"][0], "j").rope_scaling.original_max_position_embeddings \
        == 131072
    assert read(VARIANTS["qwen3-bare"][0], "k").intermediate_size == 22016


# --- files transformers refuses: llmqgen refuses them too ----------------------------------------------

REFUSED = {
    "float-size": (LLAMA32_1B | {"hidden_size": 2048.0}, "llama", "hidden_size must be an integer"),
    "string-size": (QWEN25_05B | {"vocab_size": "151936"}, "qwen2", "vocab_size must be an integer"),
    "bool-size": (QWEN3_06B | {"num_hidden_layers": True}, "qwen3", "num_hidden_layers must be an integer"),
    "null-max-pos": (QWEN3_06B | {"max_position_embeddings": None}, "qwen3", "max_position_embeddings"),
    "null-tie": (LLAMA32_1B | {"tie_word_embeddings": None}, "llama", "tie_word_embeddings"),
    "int-tie": (QWEN25_05B | {"tie_word_embeddings": 1}, "qwen2", "tie_word_embeddings"),
    "null-eps": (QWEN25_05B | {"rms_norm_eps": None}, "qwen2", "rms_norm_eps"),
    "null-act": (LLAMA32_1B | {"hidden_act": None}, "llama", "hidden_act"),
    "null-bias": (LLAMA32_1B | {"attention_bias": None}, "llama", "attention_bias"),
    "qwen3-null-head-dim": (QWEN3_06B | {"head_dim": None}, "qwen3", "head_dim must be an integer"),
    "llama-hidden-not-multiple-of-heads": (LLAMA32_1B | {"hidden_size": 2056}, "llama",
                                           "hidden_size 2056 is not a multiple of num_attention_heads 32"),
    "odd-head-dim": (QWEN25_05B | {"head_dim": 63}, "qwen2", "head_dim 63 is odd"),
    "llama3-missing-key": (LLAMA31_8B | {"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                         "low_freq_factor": 1.0}}, "llama", "high_freq_factor"),
    "layer-types-length": (QWEN3_06B | {"layer_types": ["full_attention"] * 3}, "qwen3", "layer_types"),
    "llama-zero-heads": (LLAMA32_1B | {"num_attention_heads": 0}, "llama", "num_attention_heads"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_configs_transformers_refuses_are_refused(tmp_path, case):
    cfg, arch, match = REFUSED[case]
    with pytest.raises(Exception):
        hf_config(cfg, arch)
    with pytest.raises(ValueError, match=match):
        read_hf_config(_write(tmp_path, cfg))
