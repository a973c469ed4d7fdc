"""The flash-attention family renders and compiles with NVRTC for every target arch, without register
spills, and exports exactly the kernels (and signatures) its launch rows name."""
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import attention_support as sup  # noqa: E402

pytest.importorskip("cuda.bindings.nvrtc")

SHAPES = {
    "gqa-hd64": dict(HQ=4, HKV=2, HD=64, B=2, T=128),
    "gqa-hd128": dict(HQ=28, HKV=4, HD=128, B=1, T=2048),
    "mha-hd128": dict(HQ=8, HKV=8, HD=128, B=4, T=512),
}
ARCHS = ("sm_89", "sm_90", "sm_120")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", SHAPES)
def test_compiles_without_spills(shape, arch):
    src, kernels = sup.render(sup.make_ctx(**SHAPES[shape], ARCH=arch))
    cubin, log = sup.compile_cubin(src, arch)
    assert cubin[:4] == b"\x7fELF"
    assert not sup.spills(log), "\n".join(sup.spills(log))
    compiled = set(re.findall(r"Compiling entry function '(\w+)'", log))
    assert compiled == {k.name for k in kernels}


def test_signatures_match_launch_rows():
    src, kernels = sup.render(sup.make_ctx(**SHAPES["gqa-hd64"]))
    for k in kernels:
        m = re.search(rf'void\s+{k.name}\(([^)]*)\)', src)
        assert m, k.name
        params = [" ".join(p.replace("__restrict__", "").split()) for p in m.group(1).split(",")]
        want = [f"{ctype.replace('__nv_bfloat16', 'bf16')} {name}" for name, ctype in k.args]
        assert [p.replace(" *", "*") for p in params] == want
