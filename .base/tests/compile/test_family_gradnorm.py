"""gradnorm family: compiles for sm_89/90/120 without spills, alone and next to the other two."""
from optim_loss_build import check_family, tiny_ctx


def test_compiles_without_spills():
    names = [k.name for k in check_family(["gradnorm"], tiny_ctx())]
    assert names == ["llmq_gradnorm_partial", "llmq_gradnorm_finalize"]


def test_families_share_one_program():
    # constexprs live in per-family namespaces: the three partials must coexist in one program.cu
    check_family(["crossentropy", "adamw", "gradnorm"], tiny_ctx(MASTER_FP32=True), archs=("sm_90",))
