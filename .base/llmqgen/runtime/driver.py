"""The CUDA driver API, thinly (cuda.bindings.driver): every call's status checked and raised by name.

Modelled on tinygrad's ops_cuda.py. Handles are kept as plain ints so that they mix freely with
torch (`tensor.data_ptr()`, `stream.cuda_stream`), cuBLASLt and cuDNN, which all take ints. The
primary context is used (retained and made current), so the CUDA runtime inside those libraries,
and torch in the tests, share one context with this layer.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
from cuda.bindings import driver as cu


class CudaError(RuntimeError):
    def __init__(self, call: str, status):
        self.call, self.status = call, status
        name = cu.cuGetErrorName(status)[1] if status is not None else None
        text = cu.cuGetErrorString(status)[1] if status is not None else None
        name = name.decode() if isinstance(name, bytes) else str(status)
        text = text.decode() if isinstance(text, bytes) else ""
        super().__init__(f"{call} failed: {name} ({text})")


def check(call: str, result):
    """Unpack a cuda.bindings result tuple `(status, *values)`, raising CudaError(call, status)."""
    status, *values = result
    if status != cu.CUresult.CUDA_SUCCESS:
        raise CudaError(call, status)
    return values[0] if len(values) == 1 else tuple(values) if values else None


def _call(fn, *args):
    return check(fn.__name__, fn(*args))


# --- device and context -------------------------------------------------------------------------
@dataclass(frozen=True)
class Device:
    ordinal: int
    handle: int                    # CUdevice
    context: int                   # the primary CUcontext (retained)
    name: str
    compute_capability: tuple[int, int]
    sm_count: int
    total_memory: int
    max_smem_optin: int            # per block, after raising a kernel's dynamic smem attribute
    own_context: bool = False      # created for this user (ranks sharing a GPU), not the primary one

    @property
    def arch(self) -> str:
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"

    def make_current(self) -> None:
        _call(cu.cuCtxSetCurrent, cu.CUcontext(self.context))

    def synchronize(self) -> None:
        _call(cu.cuCtxSynchronize)

    def release(self) -> None:
        """Destroy a context of our own (the primary one stays: libraries and torch share it)."""
        if self.own_context:
            _call(cu.cuCtxDestroy, cu.CUcontext(self.context))


def device_count() -> int:
    _call(cu.cuInit, 0)
    return _call(cu.cuDeviceGetCount)


def open_device(ordinal: int = 0, own_context: bool = False) -> Device:
    """Init the driver, retain `ordinal`'s primary context (or create a context of its own, for ranks
    that share a GPU and must not share a context, as ranks on separate GPUs do not) and make it current."""
    n = device_count()
    if not 0 <= ordinal < n:
        raise ValueError(f"GPU {ordinal} does not exist: the driver sees {n} GPU(s)")
    dev = _call(cu.cuDeviceGet, ordinal)
    attr = lambda a: _call(cu.cuDeviceGetAttribute, a, dev)  # noqa: E731
    A = cu.CUdevice_attribute
    ctx = _call(cu.cuCtxCreate, None, 0, dev) if own_context else _call(cu.cuDevicePrimaryCtxRetain, dev)
    _call(cu.cuCtxSetCurrent, ctx)
    name = _call(cu.cuDeviceGetName, 256, dev)
    return Device(
        ordinal=ordinal, handle=int(dev), context=int(ctx),
        name=name.split(b"\0", 1)[0].decode(),
        compute_capability=(attr(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                            attr(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)),
        sm_count=attr(A.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
        total_memory=_call(cu.cuDeviceTotalMem, dev),
        max_smem_optin=attr(A.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN), own_context=own_context)


def pci_bus_id(dev: Device) -> str:
    """The GPU's PCI address, "0000:1b:00.0": how NVML finds it (NVML's indices need not be CUDA's)."""
    raw = _call(cu.cuDeviceGetPCIBusId, 32, cu.CUdevice(dev.handle))
    return raw.split(b"\0", 1)[0].decode()


def mem_info() -> tuple[int, int]:
    """(free, total) bytes of the current context's device."""
    return tuple(_call(cu.cuMemGetInfo))


# --- streams and events -------------------------------------------------------------------------
def stream_create() -> int:
    return int(_call(cu.cuStreamCreate, cu.CUstream_flags.CU_STREAM_NON_BLOCKING))


def stream_destroy(stream: int) -> None:
    _call(cu.cuStreamDestroy, stream)


def stream_synchronize(stream: int) -> None:
    _call(cu.cuStreamSynchronize, stream)


def event_create(timing: bool = False) -> int:
    flags = cu.CUevent_flags.CU_EVENT_DEFAULT if timing else cu.CUevent_flags.CU_EVENT_DISABLE_TIMING
    return int(_call(cu.cuEventCreate, flags))


def event_destroy(event: int) -> None:
    _call(cu.cuEventDestroy, event)


def event_record(event: int, stream: int) -> None:
    _call(cu.cuEventRecord, event, stream)


def stream_wait(stream: int, event: int) -> None:
    _call(cu.cuStreamWaitEvent, stream, event, 0)


def event_synchronize(event: int) -> None:
    _call(cu.cuEventSynchronize, event)


def event_elapsed_ms(start: int, end: int) -> float:
    return float(_call(cu.cuEventElapsedTime, start, end))


# --- modules, functions, launches -----------------------------------------------------------------
def module_load(cubin: bytes) -> int:
    """Load a CUBIN into the current context (a CUBIN for another arch fails with NO_BINARY_FOR_GPU)."""
    image = ctypes.create_string_buffer(bytes(cubin))  # a stable address for the driver to read
    return int(_call(cu.cuModuleLoadData, ctypes.addressof(image)))


def module_unload(module: int) -> None:
    _call(cu.cuModuleUnload, module)


def function(module: int, name: str) -> int:
    return int(_call(cu.cuModuleGetFunction, module, name.encode()))


def set_max_dynamic_smem(func: int, smem: int) -> None:
    """Kernels asking for more than 48 KiB of dynamic shared memory must opt in first."""
    A = cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    _call(cu.cuFuncSetAttribute, func, A, smem)


# C type of a kernel parameter (as written in Kernel.args) -> the ctypes value it is passed as.
_SCALARS = {
    "int": ctypes.c_int32, "int32_t": ctypes.c_int32, "unsigned": ctypes.c_uint32,
    "unsigned int": ctypes.c_uint32, "uint32_t": ctypes.c_uint32,
    "long": ctypes.c_int64, "long long": ctypes.c_int64, "int64_t": ctypes.c_int64,
    "size_t": ctypes.c_uint64, "uint64_t": ctypes.c_uint64, "unsigned long long": ctypes.c_uint64,
    "float": ctypes.c_float, "double": ctypes.c_double,
}


def ctype_of(c_type: str):
    """ctypes type for a C parameter type: any pointer -> uint64, scalars by name (const ignored)."""
    t = " ".join(w for w in c_type.replace("*", " * ").split()
                 if w not in ("const", "__restrict__", "volatile"))
    if t.endswith("*"):
        return ctypes.c_uint64
    if t not in _SCALARS:
        raise TypeError(f"kernel parameter type {c_type!r} has no launch packing: use a pointer or one "
                        f"of {sorted(_SCALARS)}")
    return _SCALARS[t]


def pack_args(args, arg_types) -> tuple[ctypes.Array, list]:
    """void*[] of kernel parameters; the second value keeps the packed scalars alive."""
    if len(args) != len(arg_types):
        raise TypeError(f"kernel takes {len(arg_types)} arguments ({', '.join(arg_types)}), got {len(args)}")
    values = []
    for a, t in zip(args, arg_types):
        ct = ctype_of(t)
        values.append(ct(float(a) if ct in (ctypes.c_float, ctypes.c_double) else int(a)))
    return (ctypes.c_void_p * max(1, len(values)))(*[ctypes.addressof(v) for v in values]), values


def launch(func: int, grid, block, smem: int, stream: int, args=(), arg_types=()) -> None:
    """Launch `func`; `args` are ints (pointers/integers) and floats packed by their C `arg_types`."""
    params, _keep = pack_args(args, arg_types)
    gx, gy, gz = (tuple(grid) + (1, 1))[:3]
    bx, by, bz = (tuple(block) + (1, 1))[:3]
    _call(cu.cuLaunchKernel, func, gx, gy, gz, bx, by, bz, smem, stream, ctypes.addressof(params), 0)


# --- memory -------------------------------------------------------------------------------------
def alloc(nbytes: int) -> int:
    return int(_call(cu.cuMemAlloc, max(1, nbytes)))


def free(ptr: int) -> None:
    _call(cu.cuMemFree, ptr)


def host_alloc(nbytes: int) -> int:
    """Pinned (page-locked) host memory, mapped into the device address space of every context: async
    copies to and from it run at full PCIe speed, and kernels, GEMMs and copies can address it directly
    (zero-copy) through host_device_pointer."""
    flags = cu.CU_MEMHOSTALLOC_PORTABLE | cu.CU_MEMHOSTALLOC_DEVICEMAP
    return int(_call(cu.cuMemHostAlloc, max(1, nbytes), flags))


def host_device_pointer(ptr: int) -> int:
    """The device address of mapped pinned memory (with unified addressing, 64-bit Linux: `ptr` itself)."""
    return int(_call(cu.cuMemHostGetDevicePointer, ptr, 0))


def host_free(ptr: int) -> None:
    _call(cu.cuMemFreeHost, ptr)


def host_view(ptr: int, nbytes: int, dtype=np.uint8) -> np.ndarray:
    """A numpy view (no copy) of pinned host memory; valid until host_free(ptr)."""
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))
    return raw.view(dtype)


def memcpy_htod(dst: int, src_host: int, nbytes: int, stream: int) -> None:
    _call(cu.cuMemcpyHtoDAsync, dst, src_host, nbytes, stream)


def memcpy_dtoh(dst_host: int, src: int, nbytes: int, stream: int) -> None:
    _call(cu.cuMemcpyDtoHAsync, dst_host, src, nbytes, stream)


def memcpy_dtod(dst: int, src: int, nbytes: int, stream: int) -> None:
    _call(cu.cuMemcpyDtoDAsync, dst, src, nbytes, stream)


def memcpy(dst: int, src: int, nbytes: int, stream: int) -> None:
    """A copy between any two addresses of the unified space (device memory, mapped pinned memory): the
    driver infers the direction from the pointers."""
    _call(cu.cuMemcpyAsync, dst, src, nbytes, stream)


def memset_d8(ptr: int, value: int, count: int, stream: int) -> None:
    _call(cu.cuMemsetD8Async, ptr, value, count, stream)


def memset_d32(ptr: int, value: int, count: int, stream: int) -> None:
    """`count` 32-bit words set to `value` (pass a float's bit pattern for floats)."""
    _call(cu.cuMemsetD32Async, ptr, value, count, stream)


# --- CUDA graphs --------------------------------------------------------------------------------
def capture_begin(stream: int) -> None:
    # Thread-local: work other threads put on legacy streams during capture is not an error here.
    mode = cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
    _call(cu.cuStreamBeginCapture, stream, mode)


def capture_end(stream: int) -> int:
    """End capture on `stream` and instantiate the graph; returns the executable graph."""
    graph = _call(cu.cuStreamEndCapture, stream)
    try:
        return int(_call(cu.cuGraphInstantiate, graph, 0))
    finally:
        _call(cu.cuGraphDestroy, graph)


def graph_launch(graph_exec: int, stream: int) -> None:
    _call(cu.cuGraphLaunch, graph_exec, stream)


def graph_destroy(graph_exec: int) -> None:
    _call(cu.cuGraphExecDestroy, graph_exec)
