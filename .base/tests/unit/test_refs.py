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


@pytest.mark.parametrize("ref,text", [
    (refs.Ref("act.res", "l"), "act.res[l]"),
    (refs.Ref("lmhead.ln", offset=0), "lmhead.ln+0"),
    (refs.Ref("act.res", "l", offset=512), "act.res[l]+512"),
    (refs.Ref("grads.qkv", "l", shard=True), "grads.qkv[l]@shard"),
    (refs.Ref("grads.embedding", shard=True), "grads.embedding@shard"),
    (refs.Ref("stage.weights.qkv", "(l+1)%2"), "stage.weights.qkv[(l+1)%2]"),
    (refs.Fp8Ref("ln1", descale=True), "fp8:ln1[l]/descale"),
    (refs.Fp8Ref("sink", None), "fp8:sink"),
    (refs.Scalar("grad_scale"), "scalar:grad_scale"),
    (refs.Seed("qkv"), "seed:qkv"),
])
def test_typed_references_write_schedule_strings(ref, text):
    assert str(ref) == text
    if isinstance(ref, refs.Ref):
        assert refs.Ref.parse(text) == ref and refs.row_ref(text) == ref
    else:
        assert refs.row_ref(text) is None


@pytest.mark.parametrize("expr,layer,want", [("l+1-2", 0, -1), ("0-2", None, -2), ("(l-1)%2", 0, 1), ("7", None, 7)])
def test_index_expressions(expr, layer, want):
    assert refs.layer_index(expr, layer) == want


@pytest.mark.parametrize("expr", ["l*2", "(l+1", "l+1)%2", "", "l%", "m+1"])
def test_other_index_expressions_are_refused(expr):
    with pytest.raises(ValueError, match="index expression"):
        refs.layer_index(expr, 1)
