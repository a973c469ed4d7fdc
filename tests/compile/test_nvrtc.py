"""NVRTC compilation on the CPU: CUBIN per arch, header lookup, error mapping, ptxas report, cache and lock."""
import threading

import pytest


nvrtc = pytest.importorskip("llmqgen.compile.nvrtc")
try:
    nvrtc.nvrtc_version()
except nvrtc.NvrtcUnavailable as e:  # only when the library itself cannot be loaded
    pytest.skip(f"NVRTC cannot be loaded: {e}", allow_module_level=True)

from llmqgen.codegen import render as R  # noqa: E402
from llmqgen.compile import cache  # noqa: E402
from llmqgen.compile.ptxas import parse_ptxas, spilling  # noqa: E402
from llmqgen.hardware.spec import GpuSpec, Inventory  # noqa: E402
from llmqgen.models.spec import ModelSpec  # noqa: E402
from llmqgen.plan.schema import Batch, Plan  # noqa: E402

SMALL = """#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda/std/cstdint>
extern "C" __global__ void __launch_bounds__(256) llmq_test_scale(__nv_bfloat16* x, float a, uint32_t n) {
    __shared__ float s[256];
    uint32_t i = blockIdx.x * 256 + threadIdx.x;
    s[threadIdx.x] = i < n ? __bfloat162float(x[i]) : 0.0f;
    __syncthreads();
    if (i < n) x[i] = __float2bfloat16_rn(expf(a * s[threadIdx.x ^ 1]));
}
"""


@pytest.mark.parametrize("arch", ["sm_89", "sm_90", "sm_90a", "sm_100", "sm_120"])
def test_cubin_for_each_arch(arch):
    if int(arch[3:].rstrip("a")) not in nvrtc.supported_archs():
        pytest.skip(f"NVRTC {nvrtc.nvrtc_version()} does not support {arch}")
    r = nvrtc.compile_program(SMALL, "program.cu", arch)
    assert r.cubin[:4] == b"\x7fELF"  # a CUBIN, not PTX text
    assert f"for '{arch}'" in r.log and f"-arch={arch}" in r.options
    info = r.ptxas["llmq_test_scale"]
    assert info["registers"] > 0 and info["barriers"] == 1 and info["smem_bytes"] == 1024


def test_toolkit_headers_from_cuda_home(tmp_path):
    inc = tmp_path / "cuda" / "include"
    (inc / "cccl" / "cuda" / "std").mkdir(parents=True)
    (inc / "cccl" / "cuda" / "std" / "cstdint").write_text("")
    (inc / "cuda_fp8.h").write_text("")
    opts = nvrtc.header_options((13, 0), {"CUDA_HOME": str(tmp_path / "cuda")})
    assert opts == [f"-I{inc}", f"-I{inc / 'cccl'}"]
    (inc / "cccl").rename(tmp_path / "away")          # CUDA 12's layout: cuda/std beside cuda_fp8.h
    (tmp_path / "away" / "cuda").rename(inc / "cuda")
    assert nvrtc.header_options((13, 0), {"CUDA_HOME": str(tmp_path / "cuda")}) == [f"-I{inc}"]


def test_a_header_folder_without_cccl_is_passed_over(tmp_path, monkeypatch):
    """A bare cudart include folder (e.g. one a PyTorch wheel brings) has cuda_fp8.h but not CCCL's
    cuda/std: every build would then fail on <cuda/std/cstdint>; the search goes on, then says what to do."""
    pathfinder = pytest.importorskip("cuda.pathfinder")
    monkeypatch.setattr(pathfinder, "locate_nvidia_header_directory", lambda name: None)
    monkeypatch.setattr(nvrtc, "SYSTEM_CUDA_INCLUDE", tmp_path / "none")
    (tmp_path / "cudart" / "include").mkdir(parents=True)
    (tmp_path / "cudart" / "include" / "cuda_fp8.h").write_text("")
    with pytest.raises(nvrtc.NvrtcUnavailable, match="cuda_fp8.h and CCCL's cuda/std.*nvidia-cuda-nvrtc>=13.3"):
        nvrtc.header_options((13, 0), {"CUDA_HOME": str(tmp_path / "cudart")})
    assert nvrtc.header_options((13, 3), {"LLMQGEN_CACHE_DIR": str(tmp_path)}) == [
        f"--use-bundled-headers={tmp_path / 'nvrtc-headers' / '13.3'}"]


def test_no_headers_anywhere_says_what_to_do(tmp_path, monkeypatch):
    pathfinder = pytest.importorskip("cuda.pathfinder")
    monkeypatch.setattr(pathfinder, "locate_nvidia_header_directory", lambda name: None)
    monkeypatch.setattr(nvrtc, "SYSTEM_CUDA_INCLUDE", tmp_path / "none")
    with pytest.raises(nvrtc.NvrtcUnavailable, match="nvidia-cuda-nvrtc>=13.3.*CUDA_HOME"):
        nvrtc.header_options((13, 0), {"CUDA_HOME": str(tmp_path / "nothing")})


def test_compile_with_toolkit_headers(monkeypatch):
    """The NVRTC < 13.3 path (the GPU test machine's) for real, when a toolkit is installed here."""
    try:
        nvrtc.toolkit_include_dirs()
    except nvrtc.NvrtcUnavailable:
        pytest.skip("no CUDA toolkit include folder on this machine")
    monkeypatch.setattr(nvrtc, "BUNDLED_HEADERS_SINCE", (99, 0))
    r = nvrtc.compile_program(SMALL, "program.cu", "sm_90")
    assert r.cubin[:4] == b"\x7fELF" and any(o.startswith("-I") for o in r.options)


BROKEN = """{#- A template with a compile error on its line 6. Context: N. -#}
constexpr int N = {{ N }};
{% for i in range(2) %}
extern "C" __global__ void llmq_broken_k{{ i }}(float* x) {
    x[threadIdx.x] = N;
    x[0] = not_declared_{{ i }};
}
{% endfor %}
"""


def test_compile_error_points_at_template_line(tmp_path):
    (tmp_path / "_broken.cu.j2").write_text(BROKEN)
    source, smap = R.render_template("_broken.cu.j2", {"N": 3}, tmp_path)
    with pytest.raises(nvrtc.CompileError) as e:
        nvrtc.compile_program(source, "program.cu", "sm_90", smap)
    msg = str(e.value)
    assert msg.count("_broken.cu.j2:6: error") == 2
    assert "x[0] = not_declared_0;" in msg and "x[0] = not_declared_1;" in msg
    assert [err["origin"] for err in e.value.errors] == ["_broken.cu.j2:6", "_broken.cu.j2:6"]


def test_unsupported_arch_is_refused():
    with pytest.raises(nvrtc.CompileError, match="cannot target sm_20"):
        nvrtc.compile_program(SMALL, "program.cu", "sm_20")


# Captured from NVRTC 13.5 (-Xptxas=-v; the first with -maxrregcount=24, the second on sm_89).
LOG_SPILL = """ptxas info    : Overriding maximum register limit 256 for 'llmq_reg_spill' with  24 of maxrregcount option
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'llmq_reg_spill' for 'sm_90'
ptxas info    : Function properties for llmq_reg_spill
ptxas         .     1296 bytes stack frame, 1284 bytes spill stores, 2624 bytes spill loads
ptxas info    : Used 24 registers, used 0 barriers, 1296 bytes cumulative stack size
ptxas info    : Compile time = 38.589 ms
"""
LOG_MIXED = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'llmq_dyn_smem' for 'sm_89'
ptxas info    : Function properties for llmq_dyn_smem
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 1 barriers, 360 bytes cmem[0]
ptxas info    : Compile time = 1.852 ms
ptxas info    : Compiling entry function 'llmq_smem_bar' for 'sm_89'
ptxas info    : Function properties for llmq_smem_bar
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 1 barriers, 4096 bytes smem, 360 bytes cmem[0]
ptxas info    : Compile time = 2.145 ms
ptxas info    : Function properties for _Z6helperPfi
ptxas         .     64 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
"""


def test_ptxas_parse():
    info = parse_ptxas(LOG_SPILL + LOG_MIXED)
    assert info["llmq_reg_spill"] == {"registers": 24, "barriers": 0, "smem_bytes": 0, "stack_bytes": 1296,
                                      "spill_stores": 1284, "spill_loads": 2624}
    assert info["llmq_smem_bar"] == {"registers": 10, "barriers": 1, "smem_bytes": 4096, "stack_bytes": 0,
                                     "spill_stores": 0, "spill_loads": 0}
    assert set(info) == {"llmq_reg_spill", "llmq_dyn_smem", "llmq_smem_bar"}  # device functions left out
    assert spilling(info) == ["llmq_reg_spill"]


def test_cache_hit_and_miss(tmp_path):
    first = cache.compile_cached(SMALL, "sm_90", root=tmp_path)
    second = cache.compile_cached(SMALL, "sm_90", root=tmp_path)
    assert (first.hit, second.hit) == (False, True)
    assert first.cubin_path == second.cubin_path and first.cubin_path.read_bytes()[:4] == b"\x7fELF"
    assert second.meta["ptxas"]["llmq_test_scale"]["barriers"] == 1 and second.meta["arch"] == "sm_90"
    assert not cache.compile_cached(SMALL, "sm_89", root=tmp_path).hit
    assert not cache.compile_cached(SMALL + "// changed\n", "sm_90", root=tmp_path).hit


def test_lock_compiles_once(tmp_path, monkeypatch):
    calls, real = [], nvrtc.compile_program
    monkeypatch.setattr(cache, "compile_program", lambda *a: calls.append(1) or real(*a))
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.compile_cached(SMALL, "sm_90", root=tmp_path)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(r.hit for r in results) == [False, True, True, True]
    assert len({r.cubin_path.read_bytes() for r in results}) == 1


TINY = """{#- Context: C. -#}
extern "C" __global__ void llmq_tiny_scale(bf16* x, float a) {
    for (int i = threadIdx.x; i < {{ C }}; i += blockDim.x) x[blockIdx.x * {{ C }} + i] *= __float2bfloat16_rn(a);
}
"""


def test_build_twice_is_a_cache_hit(tmp_path, monkeypatch):
    # The whole program (every family): a build always writes a schedule of the full training step.
    monkeypatch.setenv("LLMQGEN_CACHE_DIR", str(tmp_path / "cache"))
    gpu = GpuSpec(name="4090", display_name="NVIDIA GeForce RTX 4090", compute_capability=(8, 9), sm_count=128,
                  memory_bytes=25_393_692_672, bf16_tflops=165.2, fp8_tflops=330.3, mem_bandwidth_gbs=1008.0,
                  l2_bytes=72 * 2**20, max_smem_per_block=101376, pcie_gen=4, pcie_lanes=16, consumer=True)
    model = ModelSpec(name="tiny", architecture="llama", hidden_size=256, intermediate_size=512, num_layers=2,
                      num_heads=4, num_kv_heads=4, head_dim=64, vocab_size=1024, tie_embeddings=False,
                      qkv_bias=False, qk_norm=False, rope_theta=5e5)
    plan = Plan(name="tiny", model=model, inventory=Inventory(gpu=gpu, count=1, host_mem_bytes=2**36),
                batch=Batch(micro_batch=1, seq_len=64, grad_accum=1))
    a = cache.build(plan, out_root=tmp_path / "build")
    mtimes = {p.name: p.stat().st_mtime_ns for p in a.path.iterdir()}
    b = cache.build(plan, out_root=tmp_path / "build")
    assert (a.cache_hit, b.cache_hit) == (False, True) and a.path == b.path and "_1x4090_sm89_" in a.path.name
    assert {"program.cu", "program.cubin", "meta.json", "kernels.json", "plan.json", "schedule.json"} <= set(mtimes)
    assert {p.name: p.stat().st_mtime_ns for p in b.path.iterdir()} == mtimes  # nothing rewritten
    assert b.cubin_path.read_bytes()[:4] == b"\x7fELF" and b.cubin_bytes == b.cubin_path.stat().st_size
    assert b.spills == [] and b.compile_seconds == a.compile_seconds > 0
