"""The profiler's pre-roll spin kernel (runtime/profile.py) compiles with NVRTC for every target llmqgen
builds for, without spills."""
import pytest

nvrtc = pytest.importorskip("llmqgen.compile.nvrtc")
try:
    nvrtc.nvrtc_version()
except nvrtc.NvrtcUnavailable as e:  # only when the library itself cannot be loaded
    pytest.skip(f"NVRTC cannot be loaded: {e}", allow_module_level=True)

from llmqgen.runtime.profile import SPIN_SOURCE  # noqa: E402


@pytest.mark.parametrize("arch", ["sm_89", "sm_90", "sm_90a", "sm_120"])
def test_the_spin_kernel_compiles(arch):
    if int(arch[3:].rstrip("a")) not in nvrtc.supported_archs():
        pytest.skip(f"this NVRTC cannot target {arch}")
    r = nvrtc.compile_program(SPIN_SOURCE, "profile_spin.cu", arch)
    assert r.cubin and r.ptxas["llmq_profile_spin"]["spill_stores"] == 0
