"""The driver layer and the kernel harness on a real GPU (torch only as the allocator and reference)."""
import ctypes

import numpy as np
import pytest

from harness import KernelProgram, current_device, small_plan
from llmqgen.codegen.kernel import Kernel
from llmqgen.runtime import driver

gpu = pytest.mark.gpu

SOURCE = r"""
extern "C" __global__ void llmq_test_axpb(float* y, const float* x, int n, long long shift, float a,
                                          size_t tag) {
    // y[i] = a * x[i] + shift + tag, i < n: one of each parameter type the launcher packs
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + (float)shift + (float)tag;
}
extern "C" __global__ void llmq_test_bigsmem(float* y, int n) {
    // stage x through > 48 KiB of dynamic shared memory: needs the opt-in attribute
    extern __shared__ float buf[];
    for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = (float)i;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = 2.0f * buf[n - 1 - i];
}
"""
AXPB_ARGS = (("y", "float*"), ("x", "const float*"), ("n", "int"), ("shift", "long long"), ("a", "float"),
             ("tag", "size_t"))
BIG_SMEM = 100 * 1024


def compile_cubin(arch: str) -> bytes:
    from cuda.bindings import nvrtc

    def ok(res):
        if res[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"nvrtc: {res[0]}")
        return res[1] if len(res) == 2 else res[1:]

    prog = ok(nvrtc.nvrtcCreateProgram(SOURCE.encode(), b"test.cu", 0, [], []))
    opts = [f"-arch={arch}".encode(), b"-std=c++17"]
    status = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
    if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        log = bytearray(ok(nvrtc.nvrtcGetProgramLogSize(prog)))
        nvrtc.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(log.decode(errors="replace"))
    cubin = bytearray(ok(nvrtc.nvrtcGetCUBINSize(prog)))
    nvrtc.nvrtcGetCUBIN(prog, cubin)
    return bytes(cubin)


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="the GPU tests use torch as allocator and reference")


@pytest.fixture(scope="module")
def dev(torch):
    return current_device()


@pytest.fixture(scope="module")
def program(dev):
    kernels = [Kernel("llmq_test_axpb", (1, 1, 1), (256, 1, 1), AXPB_ARGS),
               Kernel("llmq_test_bigsmem", (1, 1, 1), (256, 1, 1), (("y", "float*"), ("n", "int")),
                      smem=BIG_SMEM)]
    return KernelProgram(compile_cubin(dev.arch), kernels)


# --- CPU: packing and the tiny plan ------------------------------------------------------------
def test_ctype_of_maps_c_types():
    assert driver.ctype_of("const __nv_bfloat16* __restrict__") is ctypes.c_uint64
    assert driver.ctype_of("int") is ctypes.c_int32
    assert driver.ctype_of("long") is ctypes.c_int64 and driver.ctype_of("size_t") is ctypes.c_uint64
    assert driver.ctype_of("float") is ctypes.c_float
    with pytest.raises(TypeError, match="no launch packing"):
        driver.ctype_of("float4")


def test_pack_args_lays_out_values():
    params, values = driver.pack_args([0xDEAD0000, 7, -3, 2.5], ["float*", "int", "long", "float"])
    read = [ctypes.cast(params[i], ctypes.POINTER(t)).contents.value
            for i, t in enumerate([ctypes.c_uint64, ctypes.c_int32, ctypes.c_int64, ctypes.c_float])]
    assert read == [0xDEAD0000, 7, -3, 2.5] and len(values) == 4
    with pytest.raises(TypeError, match="takes 2 arguments"):
        driver.pack_args([1], ["int", "int"])


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_small_plan_shapes_and_overrides(arch):
    p = small_plan(arch, fp8=False, C=512, T=256, HQ=8, lm_head_chunks=2)
    m = p.model
    assert (m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, p.batch.seq_len) == (512, 8, 2, 64, 256)
    assert p.precision.matmul == "bf16" and p.lm_head_chunks == 2 and m.architecture == arch
    assert small_plan(arch).fp8 and m.qkv_bias == (arch == "qwen2") and m.qk_norm == (arch == "qwen3")
    with pytest.raises(TypeError, match="unknown override"):
        small_plan(arch, nonsense=1)


# --- GPU ---------------------------------------------------------------------------------------
@gpu
def test_device_properties_match_torch(torch, dev):
    props = torch.cuda.get_device_properties(dev.ordinal)
    assert dev.name == props.name
    assert dev.compute_capability == (props.major, props.minor)
    assert dev.sm_count == props.multi_processor_count
    assert dev.total_memory == props.total_memory
    free, total = driver.mem_info()
    assert total == dev.total_memory and 0 < free <= total


@gpu
def test_memory_roundtrip_pinned_and_memset(dev):
    n = 1 << 20
    stream = driver.stream_create()
    host, dptr, dptr2 = driver.host_alloc(4 * n), driver.alloc(4 * n), driver.alloc(4 * n)
    try:
        h = driver.host_view(host, 4 * n, np.float32)
        src = np.random.default_rng(0).standard_normal(n).astype(np.float32)
        h[:] = src
        driver.memcpy_htod(dptr, host, 4 * n, stream)
        driver.memcpy_dtod(dptr2, dptr, 4 * n, stream)
        driver.memset_d32(dptr, int(np.float32(-1.5).view(np.uint32)), n // 2, stream)  # first half
        driver.memset_d8(dptr + 2 * n, 0x3F, 4, stream)                               # one float's bytes
        h[:] = np.nan
        driver.memcpy_dtoh(host, dptr, 4 * n, stream)
        driver.stream_synchronize(stream)
        assert np.all(h[: n // 2] == -1.5)
        assert h[n // 2].view(np.uint32) == 0x3F3F3F3F
        np.testing.assert_array_equal(h[n // 2 + 1:], src[n // 2 + 1:])
        driver.memcpy_dtoh(host, dptr2, 4 * n, stream)
        driver.stream_synchronize(stream)
        np.testing.assert_array_equal(h, src)
    finally:
        for p in (dptr, dptr2):
            driver.free(p)
        driver.host_free(host)
        driver.stream_destroy(stream)


@gpu
def test_launch_packs_every_arg_type(torch, program):
    x = torch.randn(1000, device="cuda")
    y = torch.full_like(x, float("nan"))
    program.launch("llmq_test_axpb", y, x, 1000, 3, -0.5, 7, grid=(4, 1, 1))
    torch.testing.assert_close(y, -0.5 * x + 10.0)
    with pytest.raises(TypeError, match="takes 6 arguments"):
        program.launch("llmq_test_axpb", y, x, 1000)
    with pytest.raises(KeyError, match="llmq_test_axpb"):
        program.launch("llmq_nope")


@gpu
def test_dynamic_smem_over_48k_needs_opt_in(torch, program):
    n = BIG_SMEM // 4
    y = torch.full((n,), float("nan"), device="cuda")
    func = driver.function(program.module, "llmq_test_bigsmem")
    stream = torch.cuda.current_stream().cuda_stream
    if program._smem_set.get("llmq_test_bigsmem", 0) < BIG_SMEM:  # not yet opted in: must fail loudly
        with pytest.raises(driver.CudaError, match="cuLaunchKernel"):
            driver.launch(func, (1,), (256,), BIG_SMEM, stream, [y.data_ptr(), n], ["float*", "int"])
    program.launch("llmq_test_bigsmem", y, n)  # the harness opts in from the Kernel row's smem
    torch.testing.assert_close(y, 2.0 * torch.arange(n - 1, -1, -1, device="cuda", dtype=torch.float32))


@gpu
def test_errors_name_the_call(program):
    with pytest.raises(driver.CudaError, match="cuModuleGetFunction failed: CUDA_ERROR_NOT_FOUND"):
        driver.function(program.module, "llmq_missing")


@gpu
def test_events_streams_and_graph_replay(torch, program):
    n = 1 << 16
    x = torch.randn(n, device="cuda")
    y = torch.empty_like(x)
    s1, s2 = driver.stream_create(), driver.stream_create()
    start, done, mid = driver.event_create(timing=True), driver.event_create(timing=True), driver.event_create()
    func = driver.function(program.module, "llmq_test_axpb")
    args = ([y.data_ptr(), x.data_ptr(), n, 1, 2.0, 0], [t for _, t in AXPB_ARGS])
    try:
        driver.event_record(start, s1)
        driver.launch(func, (n // 256,), (256,), 0, s1, *args)
        driver.event_record(mid, s1)
        driver.stream_wait(s2, mid)  # s2's copy must see s1's result
        driver.memcpy_dtod(x.data_ptr(), y.data_ptr(), 4 * n, s2)
        driver.event_record(done, s2)
        driver.event_synchronize(done)
        assert driver.event_elapsed_ms(start, done) >= 0.0
        torch.testing.assert_close(x, y)

        # graph: y = 2x + 1 then x <- y, replayed twice from the captured pointers
        x0 = x.clone()
        driver.capture_begin(s1)
        driver.launch(func, (n // 256,), (256,), 0, s1, *args)
        driver.memcpy_dtod(x.data_ptr(), y.data_ptr(), 4 * n, s1)
        graph = driver.capture_end(s1)
        torch.cuda.synchronize()
        torch.testing.assert_close(x, x0)  # capture ran nothing
        driver.graph_launch(graph, s1)
        driver.graph_launch(graph, s1)
        driver.stream_synchronize(s1)
        torch.testing.assert_close(x, 2.0 * (2.0 * x0 + 1.0) + 1.0)
        driver.graph_destroy(graph)
    finally:
        for e in (start, done, mid):
            driver.event_destroy(e)
        for s in (s1, s2):
            driver.stream_destroy(s)


@gpu
def test_arena_allocates_planned_rows(torch, dev):
    from llmqgen.plan.schema import MemRow
    from llmqgen.runtime.arena import Arena

    rows = [MemRow(name="w", bytes=1 << 20, count=3, place="device", lifetime="per_layer", dtype="bf16",
                   shape=(512, 1024)),
            MemRow(name="stage", bytes=4096, place="host", lifetime="persistent", dtype="fp32", shape=(1024,))]
    free0, _ = driver.mem_info()
    with Arena(rows, "device") as d, Arena(rows, "host") as h:
        assert d.nbytes == 3 << 20 and h.nbytes == 4096
        assert free0 - driver.mem_info()[0] >= 3 << 20  # the allocation is real
        src = h.view("stage", dtype=np.float32)
        src[:] = np.arange(1024, dtype=np.float32)
        stream = torch.cuda.current_stream().cuda_stream
        driver.memcpy_htod(d.ptr("w", 2) + 256, h.ptr("stage"), 4096, stream)
        out = torch.empty(3 << 18, device="cuda", dtype=torch.float32)
        driver.memcpy_dtod(out.data_ptr(), d.ptr("w"), 3 << 20, stream)
        torch.cuda.synchronize()
        second = (2 << 20) + 256
        assert torch.equal(out[second // 4: second // 4 + 1024].cpu(), torch.arange(1024, dtype=torch.float32))
        with pytest.raises(IndexError):
            d.ptr("w", 3)


@gpu
def test_build_program_end_to_end(torch):
    pytest.importorskip("llmqgen.compile.cache", reason="the compile module is not in this tree yet")
    from harness import build_program

    prog = build_program(small_plan("qwen3"))
    assert prog.kernels and all(prog.func(name) for name in prog.kernels)
