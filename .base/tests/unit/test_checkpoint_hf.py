"""HF interop: name map, import (single file and sharded) and export round trips, shape errors."""
import json

import ml_dtypes
import numpy as np
import pytest

from llmqgen.checkpoint.hf import HFCheckpointError, export_hf, import_hf, split_hf
from llmqgen.checkpoint.safetensors import INDEX, read_dir, write_sharded
from llmqgen.models.hf_config import read_hf_config
from llmqgen.models.hf_names import name_map, param_shapes
from llmqgen.models.spec import ModelSpec

BF16 = ml_dtypes.bfloat16


def tiny(arch, tie):
    return ModelSpec(name=f"tiny-{arch}", architecture=arch, hidden_size=32, intermediate_size=48,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8 if arch != "qwen3" else 16,
                     vocab_size=64, tie_embeddings=tie, qkv_bias=arch == "qwen2",
                     qk_norm=arch == "qwen3", rope_theta=10000.0, eos_token_id=3)


SPECS = [tiny("qwen2", True), tiny("qwen3", False), tiny("llama", False), tiny("llama", True)]


def hf_tensors(spec, dtype=BF16):
    rng = np.random.default_rng(0)
    return {hf: rng.standard_normal(shape).astype(dtype)
            for parts in name_map(spec).values() for hf, shape in parts}


def test_name_map_counts_match_spec():
    for spec in SPECS:
        shapes = param_shapes(spec)
        assert sum(int(np.prod(s)) for s in shapes.values()) == spec.num_params()
        assert shapes["layers.0.qkv"] == (spec.qkv_dim, spec.hidden_size)
        assert shapes["layers.1.attn_out"] == (spec.hidden_size, spec.q_dim)
        assert shapes["layers.1.gate_up"] == (2 * spec.intermediate_size, spec.hidden_size)
        assert ("lm_head" in shapes) == (not spec.tie_embeddings)
        assert ("layers.0.qkv_bias" in shapes) == spec.qkv_bias
        assert ("layers.0.q_norm" in shapes) == spec.qk_norm


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.architecture}-tie{s.tie_embeddings}")
@pytest.mark.parametrize("sharded", [False, True])
def test_import_fuses_hf_rows(tmp_path, spec, sharded):
    hf = hf_tensors(spec)
    write_sharded(tmp_path, hf, shard_bytes=4000 if sharded else 1 << 30)
    assert (tmp_path / INDEX).is_file() == sharded
    got = import_hf(tmp_path, spec)
    assert got.keys() == param_shapes(spec).keys()
    Q, KV, F = spec.q_dim, spec.kv_dim, spec.intermediate_size
    qkv = got["layers.1.qkv"]
    np.testing.assert_array_equal(qkv[:Q], hf["model.layers.1.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(qkv[Q:Q + KV], hf["model.layers.1.self_attn.k_proj.weight"])
    np.testing.assert_array_equal(qkv[Q + KV:], hf["model.layers.1.self_attn.v_proj.weight"])
    np.testing.assert_array_equal(got["layers.0.gate_up"][F:], hf["model.layers.0.mlp.up_proj.weight"])
    np.testing.assert_array_equal(got["embedding"], hf["model.embed_tokens.weight"])
    if spec.qkv_bias:
        np.testing.assert_array_equal(got["layers.0.qkv_bias"][Q:Q + KV],
                                      hf["model.layers.0.self_attn.k_proj.bias"])
    assert all(a.dtype == BF16 and not isinstance(a, np.memmap) for a in got.values())
    assert import_hf(tmp_path, spec, dtype=np.float32)["final_norm"].dtype == np.float32


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.architecture}-tie{s.tie_embeddings}")
def test_export_round_trip(tmp_path, spec):
    hf = hf_tensors(spec)
    write_sharded(tmp_path / "in", hf)
    fused = import_hf(tmp_path / "in", spec, dtype=np.float32)
    export_hf(fused, spec, tmp_path / "out", shard_bytes=5000)
    back = read_dir(tmp_path / "out")
    assert back.keys() == hf.keys()
    for k in hf:
        assert back[k].dtype == BF16
        np.testing.assert_array_equal(back[k], hf[k])      # bf16 -> f32 -> bf16 is exact
    assert read_hf_config(tmp_path / "out") == spec.model_copy(update={"name": read_hf_config(
        tmp_path / "out").name})
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"


def test_import_errors(tmp_path):
    spec = SPECS[1]
    hf = hf_tensors(spec)
    write_sharded(tmp_path / "a", {k: v for k, v in hf.items() if k != "lm_head.weight"})
    with pytest.raises(HFCheckpointError, match="lm_head.weight is missing.*ties"):
        import_hf(tmp_path / "a", spec)
    bigger = spec.model_copy(update={"hidden_size": 64})
    write_sharded(tmp_path / "b", hf)
    with pytest.raises(HFCheckpointError, match="another model size"):
        import_hf(tmp_path / "b", bigger)
    with pytest.raises(HFCheckpointError, match="has 2 layers"):
        import_hf(tmp_path / "b", spec.model_copy(update={"num_layers": 3}))
    write_sharded(tmp_path / "c", {k: v.astype(ml_dtypes.float8_e4m3fn) for k, v in hf.items()})
    with pytest.raises(HFCheckpointError, match="dequantize"):
        import_hf(tmp_path / "c", spec)


def test_split_errors():
    spec = SPECS[0]
    fused = {k: np.zeros(s, np.float32) for k, s in param_shapes(spec).items()}
    assert split_hf(fused, spec)["model.layers.0.self_attn.v_proj.bias"].shape == (spec.kv_dim,)
    del fused["final_norm"]
    with pytest.raises(HFCheckpointError, match="final_norm"):
        split_hf(fused, spec)
