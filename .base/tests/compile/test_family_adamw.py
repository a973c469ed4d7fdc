"""adamw family: every (master, m, v) dtype variant compiles for sm_89/90/120 without spills."""
import itertools

import pytest
from optim_loss_build import check_family, tiny_ctx


@pytest.mark.parametrize("master,m,v", list(itertools.product([False, True], repeat=3)))
def test_variant_compiles_without_spills(master, m, v):
    ctx = tiny_ctx(MASTER_FP32=master, ADAM_M_FP32=m, ADAM_V_FP32=v)
    (k,) = check_family(["adamw"], ctx, archs=("sm_89", "sm_90", "sm_120") if master == m == v else ("sm_90",))
    names = ["bf16", "fp32"]
    assert k.name == f"llmq_adamw_p{names[master]}_m{names[m]}_v{names[v]}"
    assert k.grid == (ctx["SM_COUNT"] * 4, 1, 1)
