"""Model constraints are checked when the model is read, each refused in one line naming the values.

ModelSpec itself refuses what is no valid decoder (sizes, GQA grouping, odd head_dim, Llama's
hidden % heads, rope numbers); resolve_model also refuses shapes no generated program serves (the
kernels' head_dim, hidden and intermediate multiples); the CLI prints `error: ...` and exits non-zero.
"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from llmqgen.cli import main
from llmqgen.models.catalog import CATALOG, resolve_model
from llmqgen.models.hf_config import read_hf_config
from llmqgen.models.spec import ModelSpec, RopeScaling, build_spec, check_buildable, kernel_problems

from test_models import QWEN25_05B, QWEN3_06B

BASE = dict(name="t", architecture="qwen2", hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=64, vocab_size=1024, tie_embeddings=True, qkv_bias=True, qk_norm=False,
            rope_theta=1e6)


def refused(match: str, **change) -> str:
    with pytest.raises(ValueError, match=match) as e:
        build_spec(**(BASE | change))
    msg = str(e.value)
    assert "\n" not in msg and "validation error" not in msg and "pydantic" not in msg
    with pytest.raises(ValidationError):      # the plain constructor refuses it too
        ModelSpec(**(BASE | change))
    return msg


@pytest.mark.parametrize("field,key", [
    ("hidden_size", "hidden_size"), ("intermediate_size", "intermediate_size"), ("num_layers", "num_hidden_layers"),
    ("num_heads", "num_attention_heads"), ("num_kv_heads", "num_key_value_heads"), ("head_dim", "head_dim"),
    ("vocab_size", "vocab_size"), ("max_position_embeddings", "max_position_embeddings")])
@pytest.mark.parametrize("value", [0, -8])
def test_sizes_must_be_positive(field, key, value):
    assert f"{key} must be positive, got {value}" in refused(f"{key} must be positive", **{field: value})


def test_query_heads_a_multiple_of_kv_heads():
    msg = refused("num_attention_heads 14 is not a multiple of num_key_value_heads 4",
                  num_heads=14, num_kv_heads=4, hidden_size=896)
    assert "grouped-query" in msg
    refused("num_attention_heads 4 is not a multiple of num_key_value_heads 8", num_kv_heads=8)
    for hq, hkv in ((14, 2), (14, 7), (14, 14), (14, 1)):
        build_spec(**(BASE | dict(num_heads=hq, num_kv_heads=hkv, hidden_size=896)))


def test_head_dim_even_for_rope():
    refused("head_dim 63 is odd: RoPE rotates pairs", head_dim=63)


def test_llama_hidden_a_multiple_of_heads_qwen_not():
    llama = dict(architecture="llama", qkv_bias=False)
    refused("hidden_size 250 is not a multiple of num_attention_heads 4", hidden_size=250, **llama)
    # Llama with an explicit head_dim other than hidden/heads is valid (transformers checks hidden % heads only)
    assert build_spec(**(BASE | llama | dict(head_dim=128))).q_dim == 512
    # Qwen2/Qwen3 need neither: q_dim != hidden is served by the kernels (QDIM apart from C)
    assert build_spec(**(BASE | dict(hidden_size=250))).hidden_size == 250
    q3 = build_spec(**(BASE | dict(architecture="qwen3", qkv_bias=False, qk_norm=True, head_dim=128)))
    assert q3.q_dim == 512 != q3.hidden_size


@pytest.mark.parametrize("theta", [0.0, -1.0, float("inf"), float("nan")])
def test_rope_theta_positive(theta):
    refused("rope_theta must be a positive number", rope_theta=theta)


def test_rms_norm_eps():
    refused("rms_norm_eps must be a finite number >= 0", rms_norm_eps=-1e-6)
    assert build_spec(**(BASE | dict(rms_norm_eps=0.0))).rms_norm_eps == 0.0


@pytest.mark.parametrize("change,match", [
    (dict(factor=0.0), "factor must be a positive number"),
    (dict(low_freq_factor=4.0, high_freq_factor=4.0), "0 < low_freq_factor < high_freq_factor"),
    (dict(low_freq_factor=0.0), "0 < low_freq_factor < high_freq_factor"),
    (dict(original_max_position_embeddings=0), "original_max_position_embeddings > 0"),
])
def test_llama3_rope_scaling_numbers(change, match):
    good = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    RopeScaling(**good)
    with pytest.raises(ValueError, match=match):
        RopeScaling(**(good | change))


def test_several_problems_in_one_line():
    msg = refused("vocab_size must be positive", vocab_size=0, num_kv_heads=3)
    assert "num_key_value_heads 3" in msg and "; " in msg


def test_catalog_is_valid_and_buildable():
    for spec in CATALOG.values():
        assert kernel_problems(spec) == [] and check_buildable(spec) is spec


# --- read from config.json -----------------------------------------------------------------------------

def _write(tmp_path, cfg, name="m"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


GQA_14_4 = QWEN25_05B | {"num_key_value_heads": 4}


def test_config_with_indivisible_heads_is_refused_when_read(tmp_path):
    d = _write(tmp_path, GQA_14_4)
    for read in (read_hf_config, resolve_model):
        with pytest.raises(ValueError) as e:
            read(str(d))
        msg = str(e.value)
        assert "\n" not in msg and str(d / "config.json") in msg
        assert "num_attention_heads 14 is not a multiple of num_key_value_heads 4" in msg


def test_qwen_default_kv_heads_of_32_must_divide(tmp_path):
    """Qwen2Config's num_key_value_heads is 32 when absent (not the heads): 14 heads cannot use it."""
    cfg = {k: v for k, v in QWEN25_05B.items() if k != "num_key_value_heads"}
    with pytest.raises(ValueError, match="num_attention_heads 14 is not a multiple of num_key_value_heads 32"):
        read_hf_config(_write(tmp_path, cfg))


@pytest.mark.parametrize("change,match", [
    ({"head_dim": 96, "hidden_size": 1536, "num_attention_heads": 16, "num_key_value_heads": 2},
     "head_dim 96: llmqgen's RoPE kernels need head_dim = 16 \\* 2\\^k"),
    ({"head_dim": 1024}, "head_dim 1024: llmqgen's RoPE kernels"),
    ({"hidden_size": 900, "head_dim": 64}, "hidden_size 900: RMSNorm and the embedding need a multiple of 8"),
    ({"intermediate_size": 4860}, "intermediate_size 4860: SwiGLU needs a multiple of 8"),
])
def test_shapes_no_kernel_serves_are_refused_by_resolve_model(tmp_path, change, match):
    d = _write(tmp_path, QWEN25_05B | change)
    read_hf_config(d)                          # a valid model...
    with pytest.raises(ValueError, match=match) as e:
        resolve_model(str(d))                  # ...that no generated program can train
    assert "\n" not in str(e.value)


def test_qwen3_head_dim_apart_from_width_is_fine(tmp_path):
    spec = resolve_model(str(_write(tmp_path, QWEN3_06B | {"hidden_size": 768})))
    assert spec.head_dim == 128 and spec.q_dim == 2048


def test_cli_plan_refuses_in_one_line(tmp_path):
    d = _write(tmp_path, GQA_14_4, "tiny-14q-4kv")
    r = CliRunner().invoke(main, ["plan", "--model", str(d), "--gpus", "1xH200", "--out", str(tmp_path / "plans")])
    assert r.exit_code != 0 and isinstance(r.exception, SystemExit)
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output
    assert "num_attention_heads 14 is not a multiple of num_key_value_heads 4" in lines[0]
    assert not (tmp_path / "plans").exists() or not any((tmp_path / "plans").iterdir())
