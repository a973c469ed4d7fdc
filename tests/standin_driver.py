"""A stand-in for runtime/driver.py (and the cuBLASLt GEMMs of runtime/blas.py) on the CPU: the runtime
binds and issues a whole schedule without a GPU, and a test reads what it did.

Device memory is host memory (numpy buffers that stay alive), so uploads, downloads, copies and memsets
really move bytes; kernels and GEMMs do nothing but are recorded. Every call that a GPU would queue on a
stream is a `Call` in `calls`, in issue order, marked `captured` between capture_begin and capture_end;
launching a captured graph replays its copies and memsets and records its calls again (`replayed`).

    drv = install(monkeypatch)          # runtime.driver's functions and runtime.rank's GEMMs replaced
    tr = Trainer(plan, build=folder, devices=[0, 1], attention="flash")
    drv.calls.clear(); tr._execute(...); drv.launches()
"""
from __future__ import annotations

import ctypes
import itertools
import sys
import types
from dataclasses import dataclass, field

import numpy as np

# nvmath (cuBLASLt bindings, the [gpu] extra) is imported by runtime/blas.py at import time only.
for _mod in ("nvmath", "nvmath.bindings", "nvmath.bindings.cublas", "nvmath.bindings.cublasLt"):
    sys.modules.setdefault(_mod, types.ModuleType(_mod))
sys.modules["nvmath"].bindings = sys.modules["nvmath.bindings"]
sys.modules["nvmath.bindings"].cublas = sys.modules["nvmath.bindings.cublas"]
sys.modules["nvmath.bindings"].cublasLt = sys.modules["nvmath.bindings.cublasLt"]
for _attr in ("MatmulDescAttribute", "MatmulPreferenceAttribute"):
    if not hasattr(sys.modules["nvmath.bindings.cublasLt"], _attr):
        setattr(sys.modules["nvmath.bindings.cublasLt"], _attr, types.SimpleNamespace())

from llmqgen.runtime import driver, rank  # noqa: E402


@dataclass
class Call:
    kind: str                   # launch, gemm, memcpy, memcpy_htod, memcpy_dtoh, memcpy_dtod, memset_d8, memset_d32
    stream: int
    name: str = ""              # launch: the kernel
    args: tuple = ()            # launch: argument values; gemm: (a, b, d, a_scale, b_scale, bias)
    types: tuple = ()           # launch: argument C types
    dst: int = 0
    src: int = 0
    nbytes: int = 0
    captured: bool = False
    replayed: bool = False


class StandinDevice:
    """An H200 as the driver describes it."""
    name, arch, compute_capability, sm_count = "NVIDIA H200", "sm_90", (9, 0), 132
    total_memory, max_smem_optin = 150_109_880_320, 227 * 1024

    def __init__(self, ordinal: int):
        self.ordinal, self.handle, self.context = ordinal, ordinal, ordinal

    def make_current(self):
        pass

    def synchronize(self):
        pass

    def release(self):
        pass


@dataclass
class StandinDriver:
    gpus: int = 2
    calls: list[Call] = field(default_factory=list)
    functions: dict[int, str] = field(default_factory=dict)     # function handle -> kernel name
    buffers: dict[int, np.ndarray] = field(default_factory=dict)  # allocations by address
    graphs: dict[int, list[Call]] = field(default_factory=dict)
    capturing: int | None = None                                  # the stream under capture
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    # --- devices, streams, events, modules -------------------------------------------------------
    def device_count(self):
        return self.gpus

    def open_device(self, ordinal=0, own_context=False):
        return StandinDevice(ordinal)

    def handle(self, *_, **__):
        return next(self._ids)

    def nothing(self, *_):
        pass

    def function(self, module, name):
        f = next(self._ids)
        self.functions[f] = name
        return f

    # --- memory: host buffers that stay alive ----------------------------------------------------------
    def alloc(self, nbytes):
        buf = np.zeros(nbytes + 256, np.uint8)
        ptr = -(-buf.ctypes.data // 256) * 256      # the driver's 256-byte alignment
        self.buffers[ptr] = buf
        return ptr

    def free(self, ptr):
        self.buffers.pop(ptr)

    def host_view(self, ptr, nbytes, dtype=np.uint8):
        return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr)).view(dtype)

    # --- work queued on streams -------------------------------------------------------------------------
    def _queue(self, call: Call) -> None:
        # under capture every call belongs to the graph: other streams join it through the events they wait on
        call.captured = self.capturing is not None
        self.calls.append(call)
        if call.captured:
            self.graphs[self.capturing].append(call)
        else:
            self._do(call)

    @staticmethod
    def _do(call: Call) -> None:
        if call.kind.startswith("memcpy"):
            ctypes.memmove(call.dst, call.src, call.nbytes)
        elif call.kind == "memset_d8":
            ctypes.memset(call.dst, call.src, call.nbytes)

    def launch(self, func, grid, block, smem, stream, args=(), arg_types=()):
        self._queue(Call("launch", stream, self.functions[func], tuple(args), tuple(arg_types)))

    def copier(self, kind):
        return lambda dst, src, nbytes, stream: self._queue(Call(kind, stream, dst=dst, src=src, nbytes=nbytes))

    def memset_d8(self, ptr, value, count, stream):
        self._queue(Call("memset_d8", stream, dst=ptr, src=value, nbytes=count))

    def memset_d32(self, ptr, value, count, stream):
        self._queue(Call("memset_d32", stream, dst=ptr, src=value, nbytes=4 * count))

    def gemm(self, stream, a, b, d, a_scale=0, b_scale=0, bias=0):
        self._queue(Call("gemm", stream, args=(a, b, d, a_scale, b_scale, bias)))

    # --- graphs ---------------------------------------------------------------------------------------
    def capture_begin(self, stream):
        assert self.capturing is None, "nested capture"
        self.capturing, self.graphs[stream] = stream, []

    def capture_end(self, stream):
        assert self.capturing == stream
        self.capturing = None
        g = next(self._ids)
        self.graphs[g] = self.graphs.pop(stream)
        return g

    def graph_launch(self, graph, stream):
        for call in self.graphs[graph]:
            again = Call(**{**call.__dict__, "captured": False, "replayed": True})
            self.calls.append(again)
            self._do(again)

    # --- what the test reads ------------------------------------------------------------------------------
    def launches(self, stream=None, captured=False):
        return [c for c in self.calls if c.kind == "launch" and c.captured == captured
                and (stream is None or c.stream == stream)]


class StandinGemm:
    """A GEMM with one algorithm: runtime/gemm_search.py has nothing to time or keep."""
    def __init__(self, drv: StandinDriver):
        self.run, self.close = drv.gemm, lambda: None
        self.label, self.found, self.algo_index = "standin", 1, 0

    def use(self, i):
        assert i == 0


def install(monkeypatch, gpus: int = 2) -> StandinDriver:
    """runtime.driver's surface and runtime.rank's cuBLASLt GEMMs replaced by a StandinDriver's."""
    drv = StandinDriver(gpus)
    surface = {
        "device_count": drv.device_count, "open_device": drv.open_device, "module_load": drv.handle,
        "module_unload": drv.nothing, "function": drv.function, "set_max_dynamic_smem": drv.nothing,
        "stream_create": drv.handle, "stream_destroy": drv.nothing, "stream_synchronize": drv.nothing,
        "event_create": drv.handle, "event_destroy": drv.nothing, "event_record": drv.nothing,
        "stream_wait": drv.nothing, "event_synchronize": drv.nothing, "event_elapsed_ms": lambda a, b: 0.0,
        "launch": drv.launch, "alloc": drv.alloc, "free": drv.free, "host_alloc": drv.alloc,
        "host_free": drv.free, "host_device_pointer": lambda p: p, "host_view": drv.host_view,
        "memcpy": drv.copier("memcpy"), "memcpy_htod": drv.copier("memcpy_htod"),
        "memcpy_dtoh": drv.copier("memcpy_dtoh"), "memcpy_dtod": drv.copier("memcpy_dtod"),
        "memset_d8": drv.memset_d8, "memset_d32": drv.memset_d32, "capture_begin": drv.capture_begin,
        "capture_end": drv.capture_end, "graph_launch": drv.graph_launch, "graph_destroy": drv.nothing,
    }
    for name, fn in surface.items():
        assert hasattr(driver, name), f"runtime.driver has no {name}: update the stand-in"
        monkeypatch.setattr(driver, name, fn)
    monkeypatch.setattr(rank, "Blas", lambda ws, nbytes: types.SimpleNamespace(close=lambda: None, version=0,
                                                                                 workspace_bytes=nbytes))
    for name in ("Gemm", "linear_forward", "linear_dgrad", "linear_wgrad"):
        monkeypatch.setattr(rank, name, lambda *a, **k: StandinGemm(drv))
    return drv
