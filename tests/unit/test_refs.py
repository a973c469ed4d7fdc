"""Schedule references and index expressions, as the runtime resolves them (no GPU needed)."""
import pytest

from llmqgen.plan import refs


@pytest.mark.parametrize("ref,layer,want", [
    ("lmhead.ln+4096", None, ("lmhead.ln", None, 4096, False)),
    ("act.res[l]", 3, ("act.res", 3, 0, False)),
    ("act.res2[l-1]", 3, ("act.res2", 2, 0, False)),
    ("weights.qkv[l+1]", 3, ("weights.qkv", 4, 0, False)),
    ("stage.weights.qkv[(l+1)%2]", 3, ("stage.weights.qkv", 0, 0, False)),
    ("stage.grads.down[l%2]", 5, ("stage.grads.down", 1, 0, False)),
    ("grads.qkv[2]@shard", None, ("grads.qkv", 2, 0, True)),
    ("grads.embedding@shard", None, ("grads.embedding", None, 0, True)),
    ("act.res[l]+512", 1, ("act.res", 1, 512, False)),
])
def test_parse_ref(ref, layer, want):
    assert refs.parse_ref(ref, layer) == want


def test_tags_and_bad_expressions():
    assert refs.resolve_tag("w[l+1]", 3) == "w[4]"
    assert refs.resolve_tag("g[l]", 0) == "g[0]"
    with pytest.raises(ValueError, match="index expression"):
        refs.layer_index("__import__('os')", 1)
