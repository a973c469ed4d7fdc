"""crossentropy family: renders, matches its Kernel rows, compiles for sm_89/90/120 without spills."""
import pytest
from optim_loss_build import check_family, render, tiny_ctx


@pytest.mark.parametrize("shape", [
    dict(V=1024),                                   # 16-byte vector path, 128 threads per row
    dict(V=151936, B=4, T=2048, LM_HEAD_CHUNKS=8),  # Qwen vocabulary: 1024 threads per row
    dict(V=32001, B=1, T=18, LM_HEAD_CHUNKS=2),     # odd V (scalar loads) and BT % 4 != 0 (scalar reduce)
])
def test_compiles_without_spills(shape):
    ctx = tiny_ctx(**shape)
    kernels = check_family(["crossentropy"], ctx)
    fused = next(k for k in kernels if k.name == "llmq_crossentropy_fused")
    assert fused.grid[0] * ctx["LM_HEAD_CHUNKS"] == ctx["BT"]


def test_vector_width_follows_vocab_alignment():
    assert "constexpr int W = 8;" in render(["crossentropy"], tiny_ctx(V=1024))[0]
    assert "constexpr int W = 1;" in render(["crossentropy"], tiny_ctx(V=32001))[0]


def test_chunks_must_divide_tokens():
    with pytest.raises(ValueError, match="must divide"):
        render(["crossentropy"], tiny_ctx(B=1, T=18, LM_HEAD_CHUNKS=4))
