"""Model catalog, name resolution, and the HF config.json reader/writer."""
import json

import pytest

from llmqgen.models.catalog import CATALOG, SIZE_ALIASES, list_models, resolve_model
from llmqgen.models.hf_config import read_hf_config, to_hf_config

# Parameter counts as published (HF model pages / safetensors totals). They pin hidden, FFN, layer,
# head, kv-head and vocab sizes, biases, q/k-norms and embedding tying all at once.
PUBLISHED_PARAMS = {
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-3b": 3_085_938_688,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-14b": 14_770_033_664,
    "qwen2.5-32b": 32_763_876_352,
    "qwen2.5-72b": 72_706_203_648,
    "qwen3-0.6b": 596_049_920,
    "qwen3-4b": 4_022_468_096,
    "qwen3-8b": 8_190_735_360,
    "qwen3-14b": 14_768_307_200,
    "qwen3-32b": 32_762_123_264,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
    "llama3.1-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
}


@pytest.mark.parametrize("name,count", PUBLISHED_PARAMS.items())
def test_param_counts_equal_published(name, count):
    assert CATALOG[name].num_params() == count


def test_qwen3_1_7b_checkpoint_stores_its_tied_head():
    # The published 2,031,739,904 counts lm_head.weight, which the checkpoint stores although tied.
    m = CATALOG["qwen3-1.7b"]
    assert m.tie_embeddings
    assert m.num_params() + m.vocab_size * m.hidden_size == 2_031_739_904


def test_catalog_names_and_listing():
    assert list(CATALOG) == [
        "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b",
        "qwen2.5-72b", "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b",
        "llama3.2-1b", "llama3.2-3b", "llama3.1-8b", "llama3.1-70b"]
    assert [m.name for m in list_models()] == list(CATALOG)


@pytest.mark.parametrize("name,tied,vocab", [
    ("qwen2.5-0.5b", True, 151936), ("qwen2.5-1.5b", True, 151936), ("qwen2.5-3b", True, 151936),
    ("qwen2.5-7b", False, 152064), ("qwen2.5-14b", False, 152064), ("qwen2.5-32b", False, 152064),
    ("qwen2.5-72b", False, 152064),
    ("qwen3-0.6b", True, 151936), ("qwen3-1.7b", True, 151936), ("qwen3-4b", True, 151936),
    ("qwen3-8b", False, 151936), ("qwen3-14b", False, 151936), ("qwen3-32b", False, 151936),
    ("llama3.2-1b", True, 128256), ("llama3.2-3b", True, 128256), ("llama3.1-8b", False, 128256),
    ("llama3.1-70b", False, 128256)])
def test_tying_and_vocab(name, tied, vocab):
    m = CATALOG[name]
    assert (m.tie_embeddings, m.vocab_size) == (tied, vocab)


def test_family_traits():
    for m in CATALOG.values():
        assert (m.qkv_bias, m.qk_norm) == {"qwen2": (True, False), "qwen3": (False, True),
                                           "llama": (False, False)}[m.architecture]
        if m.architecture == "qwen3":
            assert m.head_dim == 128 and m.rope_scaling is None
        else:
            assert m.head_dim * m.num_heads == m.hidden_size
    assert CATALOG["qwen3-0.6b"].q_dim == 2048 != CATALOG["qwen3-0.6b"].hidden_size


@pytest.mark.parametrize("name,factor", [("llama3.2-1b", 32.0), ("llama3.2-3b", 32.0),
                                         ("llama3.1-8b", 8.0), ("llama3.1-70b", 8.0)])
def test_llama3_rope_scaling(name, factor):
    m = CATALOG[name]
    s = m.rope_scaling
    assert (s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_position_embeddings) == \
        (factor, 1.0, 4.0, 8192)
    assert (m.rope_theta, m.rms_norm_eps, m.max_position_embeddings) == (500000.0, 1e-5, 131072)


@pytest.mark.parametrize("given,expected", [
    ("qwen2.5-7b", "qwen2.5-7b"), ("Qwen/Qwen2.5-7B", "qwen2.5-7b"), ("qwen2.5-7b-instruct", "qwen2.5-7b"),
    ("Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-0.5b"), ("Qwen/Qwen3-8B-Base", "qwen3-8b"),
    ("QWEN3-0.6B", "qwen3-0.6b"), ("meta-llama/Llama-3.1-8B", "llama3.1-8b"),
    ("meta-llama/Meta-Llama-3.1-70B-Instruct", "llama3.1-70b"), ("Llama-3.2-1B", "llama3.2-1b"),
    ("0.5b", "qwen2.5-0.5b"), ("7B", "qwen2.5-7b"), (" 72b ", "qwen2.5-72b")])
def test_resolve_names(given, expected):
    assert resolve_model(given) is CATALOG[expected]


def test_size_aliases_name_qwen25():
    assert all(resolve_model(a).name == f"qwen2.5-{a}" for a in SIZE_ALIASES)


def test_unknown_model_suggests_and_mentions_directories():
    with pytest.raises(ValueError) as e:
        resolve_model("qwen2.5-8b")
    msg = str(e.value)
    assert "did you mean" in msg and "qwen2.5-7b" in msg and "Hugging Face model directory" in msg


def test_missing_path_is_reported_as_a_path(tmp_path):
    with pytest.raises(ValueError, match="no such file or directory"):
        resolve_model(str(tmp_path / "nope" / "config.json"))


# --- HF config.json -------------------------------------------------------------------------------
# Verbatim keys of the published config.json files (Qwen/Qwen2.5-0.5B, Qwen/Qwen3-0.6B,
# meta-llama/Llama-3.2-1B), so the reader is tested on the real format.
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24,
    "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True, "use_mrope": False,
    "use_sliding_window": False, "vocab_size": 151936}
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936}
LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0,
                                            "low_freq_factor": 1.0,
                                            "original_max_position_embeddings": 8192,
                                            "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256}


def _write(tmp_path, name, cfg):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("cfg,catalog_name", [(QWEN25_05B, "qwen2.5-0.5b"), (QWEN3_06B, "qwen3-0.6b"),
                                              (LLAMA32_1B, "llama3.2-1b")])
def test_reading_published_configs_gives_the_catalog_entry(tmp_path, cfg, catalog_name):
    d = _write(tmp_path, "my-model", cfg)
    spec = read_hf_config(d)
    assert spec.name == "my-model"
    assert spec.model_copy(update={"name": catalog_name}) == CATALOG[catalog_name]
    assert read_hf_config(d / "config.json") == spec
    assert resolve_model(str(d)) == spec


def test_head_dim_defaults_to_hidden_over_heads_and_eos_list(tmp_path):
    cfg = {k: v for k, v in LLAMA32_1B.items() if k != "head_dim"} | {"eos_token_id": [128001, 128009]}
    spec = read_hf_config(_write(tmp_path, "m", cfg))
    assert spec.head_dim == 2048 // 32 and spec.eos_token_id == 128001


def test_transformers5_rope_parameters(tmp_path):
    cfg = {k: v for k, v in LLAMA32_1B.items() if k not in ("rope_theta", "rope_scaling")}
    cfg["rope_parameters"] = dict(LLAMA32_1B["rope_scaling"], rope_theta=500000.0)
    spec = read_hf_config(_write(tmp_path, "m", cfg))
    assert spec.rope_theta == 500000.0 and spec.rope_scaling == CATALOG["llama3.2-1b"].rope_scaling


@pytest.mark.parametrize("change,match", [
    ({"architectures": ["MistralForCausalLM"]}, "Qwen2ForCausalLM, Qwen3ForCausalLM, LlamaForCausalLM"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"intermediate_size": 8192.0}, "intermediate_size must be an integer"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"attention_dropout": 0.1}, "attention_dropout"),
    ({"model_type": "qwen2"}, "contradicts architectures"),
    ({"architectures": None, "model_type": "mistral"}, "unsupported model_type 'mistral'"),
])
def test_unsupported_configs_are_refused(tmp_path, change, match):
    cfg = {k: v for k, v in (LLAMA32_1B | change).items() if v is not None}
    with pytest.raises(ValueError, match=match):
        read_hf_config(_write(tmp_path, "m", cfg))


def test_sliding_window_refused(tmp_path):
    # transformers slides the window on layers >= max_window_layers only
    with pytest.raises(ValueError, match="sliding-window attention .* on layers 12..23"):
        read_hf_config(_write(tmp_path, "m", QWEN25_05B | {"use_sliding_window": True, "max_window_layers": 12}))
    with pytest.raises(ValueError, match="layer_types sliding_attention"):
        read_hf_config(_write(tmp_path, "t", QWEN25_05B | {"layer_types": ["sliding_attention"] * 24}))
    # max_window_layers = num_hidden_layers: no layer slides, as the published Qwen2.5 configs say
    assert read_hf_config(_write(tmp_path, "f", QWEN25_05B | {"use_sliding_window": True})).name == "f"


def test_qwen3_without_head_dim_reads_128(tmp_path):
    """transformers' Qwen3Config defaults head_dim to 128 whatever hidden_size / heads (here 64)."""
    cfg = {k: v for k, v in QWEN3_06B.items() if k != "head_dim"}
    spec = resolve_model(str(_write(tmp_path, "qwen3-no-head-dim", cfg)))
    assert spec.head_dim == 128 and spec.num_params() == 596_049_920
    assert spec.model_copy(update={"name": "qwen3-0.6b"}) == CATALOG["qwen3-0.6b"]


def test_missing_config_tells_what_to_give(tmp_path):
    with pytest.raises(ValueError, match="holding config.json"):
        read_hf_config(tmp_path)


@pytest.mark.parametrize("name", list(CATALOG))
def test_to_hf_config_round_trips(tmp_path, name):
    spec = CATALOG[name]
    cfg = to_hf_config(spec)
    assert cfg["torch_dtype"] == "bfloat16" and cfg["model_type"] == spec.architecture
    assert read_hf_config(_write(tmp_path, name, json.loads(json.dumps(cfg)))) == spec


def test_to_hf_config_refuses_specs_transformers_cannot_express():
    bad = CATALOG["llama3.1-8b"].model_copy(update={"qkv_bias": True})
    with pytest.raises(ValueError, match="no LlamaForCausalLM equivalent"):
        to_hf_config(bad)


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen3-0.6b", "llama3.2-1b"])
def test_transformers_loads_the_exported_config(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    d = _write(tmp_path, name, to_hf_config(CATALOG[name]))
    cfg = transformers.AutoConfig.from_pretrained(d)
    spec = CATALOG[name]
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.tie_word_embeddings) == \
        (spec.hidden_size, spec.num_layers, spec.num_kv_heads, spec.tie_embeddings)
