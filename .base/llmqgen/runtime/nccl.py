"""NCCL's C API (libnccl.so.2) through ctypes, without torch: every call's result checked.

Like driver.py, buffers and streams are plain ints (device pointers, CUstream handles). A Comm is
made with ncclCommInitRank on the CUDA device current at that moment (the caller makes it current),
from a unique id that rank 0 made with unique_id() and shared (dist.share_bytes).

In place: NCCL skips copying a rank's own part, and the callers rely on it, when
  all_gather:     send == recv + rank * count * elem_size        (send is this rank's slot of recv)
  reduce_scatter: recv == send + rank * recv_count * elem_size   (recv is this rank's slot of send)
  all_reduce:     send == recv
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import lru_cache
from pathlib import Path

UNIQUE_ID_BYTES = 128  # NCCL_UNIQUE_ID_BYTES

# ncclDataType_t and ncclRedOp_t, as in nccl.h (checked against NCCL 2.32's header).
DTYPES = {"uint8": 1, "int32": 2, "fp32": 7, "bf16": 9}  # ncclUint8, ncclInt32, ncclFloat32, ncclBfloat16
OPS = {"sum": 0, "prod": 1, "max": 2, "min": 3, "avg": 4}
RESULTS = {0: "ncclSuccess", 1: "ncclUnhandledCudaError", 2: "ncclSystemError", 3: "ncclInternalError",
           4: "ncclInvalidArgument", 5: "ncclInvalidUsage", 6: "ncclRemoteError", 7: "ncclInProgress",
           8: "ncclTimeout"}
_HINTS = {  # what to try next, per result; NCCL_DEBUG=WARN makes NCCL print its own reason
    1: "a CUDA call inside NCCL failed: is the right GPU current, are the buffers on it, and does the driver "
       "suit the wheel (nvidia-nccl-cu13 needs a CUDA 13 driver; take nvidia-nccl-cu12 for CUDA 12)?",
    2: "a system call failed (sockets, shared memory): NCCL_DEBUG=INFO shows which; "
       "in containers, give /dev/shm more space",
    6: "a peer rank failed or the network dropped: check the other ranks' logs; "
       "NCCL_SOCKET_IFNAME picks the network interface",
}


class NcclError(RuntimeError):
    def __init__(self, call: str, code: int, message: str):
        self.call, self.code = call, code
        super().__init__(message)


class NcclUnavailable(RuntimeError):
    pass


class UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_ubyte * UNIQUE_ID_BYTES)]


def _wheel_libraries() -> list[Path]:
    """libnccl.so.2 from the nvidia-nccl-cu12/-cu13 wheels, if one is installed."""
    try:
        import nvidia.nccl
    except ImportError:
        return []
    # nvidia.nccl is a namespace package in some wheels: no __file__, but __path__ lists its folders.
    return [p for root in nvidia.nccl.__path__ if (p := Path(root) / "lib" / "libnccl.so.2").is_file()]


def _search() -> list[str]:
    """Where NCCL may be, in order: the pip wheel, then whatever the system's loader finds."""
    found = [str(p) for p in _wheel_libraries()] + [ctypes.util.find_library("nccl") or "", "libnccl.so.2"]
    return [p for i, p in enumerate(found) if p and p not in found[:i]]


_INSTALL = "pip install nvidia-nccl-cu13 (nvidia-nccl-cu12 for CUDA 12 drivers) or set LLMQGEN_NCCL_LIBRARY"


@lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL:
    """libnccl.so.2, with the prototypes of the calls used here set."""
    explicit = os.environ.get("LLMQGEN_NCCL_LIBRARY")
    # A path the user named is the only one tried: silently loading another NCCL would hide their mistake.
    tried: list[str] = []
    for path in [explicit] if explicit else _search():
        try:
            lib = ctypes.CDLL(path)
            break
        except OSError as e:
            tried.append(f"{path}: {e}")
    else:
        where = f"LLMQGEN_NCCL_LIBRARY={explicit} cannot be loaded" if explicit else "NCCL (libnccl.so.2) not found"
        raise NcclUnavailable(f"{where}: {_INSTALL} to the path of a libnccl.so.2. Tried: " + "; ".join(tried))

    i, p, size_t = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
    protos = {
        "ncclGetVersion": [ctypes.POINTER(i)],
        "ncclGetUniqueId": [ctypes.POINTER(UniqueId)],
        "ncclCommInitRank": [ctypes.POINTER(p), i, UniqueId, i],
        "ncclCommDestroy": [p],
        "ncclAllGather": [p, p, size_t, i, p, p],
        "ncclReduceScatter": [p, p, size_t, i, i, p, p],
        "ncclAllReduce": [p, p, size_t, i, i, p, p],
        "ncclGroupStart": [],
        "ncclGroupEnd": [],
    }
    for name, args in protos.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, i
    lib.ncclGetErrorString.argtypes, lib.ncclGetErrorString.restype = [i], ctypes.c_char_p
    if hasattr(lib, "ncclGetLastError"):  # NCCL >= 2.13
        lib.ncclGetLastError.argtypes, lib.ncclGetLastError.restype = [p], ctypes.c_char_p
    return lib


def _check(call: str, code: int, comm: ctypes.c_void_p | None = None) -> None:
    if code == 0:
        return
    lib = load_library()
    name = RESULTS.get(code, f"ncclResult {code}")
    text = (lib.ncclGetErrorString(code) or b"").decode(errors="replace")
    last = (lib.ncclGetLastError(comm) or b"").decode(errors="replace") if hasattr(lib, "ncclGetLastError") else ""
    detail = "; ".join(s for s in (text, last) if s)
    hint = _HINTS.get(code, "rerun with NCCL_DEBUG=WARN for NCCL's own reason")
    raise NcclError(call, code, f"{call} failed: {name} ({detail}). {hint}")


def _lookup(table: dict[str, int], key: str, what: str) -> int:
    if key not in table:
        raise ValueError(f"NCCL {what} {key!r} is not one of {', '.join(table)}")
    return table[key]


def version() -> int:
    """NCCL_VERSION_CODE of the loaded library: 23203 is 2.32.3."""
    v = ctypes.c_int()
    _check("ncclGetVersion", load_library().ncclGetVersion(ctypes.byref(v)))
    return v.value


def unique_id() -> bytes:
    """A fresh id for one communicator: made on rank 0, handed to every rank before Comm()."""
    uid = UniqueId()
    _check("ncclGetUniqueId", load_library().ncclGetUniqueId(ctypes.byref(uid)))
    return bytes(uid.internal)


def group_start() -> None:
    _check("ncclGroupStart", load_library().ncclGroupStart())


def group_end() -> None:
    _check("ncclGroupEnd", load_library().ncclGroupEnd())


class Comm:
    """One rank's communicator; ncclCommInitRank blocks until all `world` ranks have called it."""

    def __init__(self, uid: bytes, world: int, rank: int):
        if len(uid) != UNIQUE_ID_BYTES:
            raise ValueError(f"an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {len(uid)}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, world {world})")
        self.world, self.rank = world, rank
        handle = ctypes.c_void_p()
        _check("ncclCommInitRank",
               load_library().ncclCommInitRank(ctypes.byref(handle), world, UniqueId.from_buffer_copy(uid), rank))
        self._handle: ctypes.c_void_p | None = handle

    def _call(self, name: str, *args, stream: int) -> None:
        if self._handle is None:
            raise RuntimeError(f"{name} on a closed NCCL communicator")
        _check(name, getattr(load_library(), name)(*args, self._handle, stream), self._handle)

    def all_gather(self, send: int, recv: int, count: int, dtype: str, stream: int) -> None:
        """recv[r * count : (r + 1) * count] = rank r's send[:count], for every rank r."""
        self._call("ncclAllGather", send, recv, count, _lookup(DTYPES, dtype, "dtype"), stream=stream)

    def reduce_scatter(self, send: int, recv: int, recv_count: int, dtype: str, op: str, stream: int) -> None:
        """recv[:recv_count] = op over ranks of send[rank * recv_count : (rank + 1) * recv_count]."""
        self._call("ncclReduceScatter", send, recv, recv_count, _lookup(DTYPES, dtype, "dtype"),
                   _lookup(OPS, op, "op"), stream=stream)

    def all_reduce(self, send: int, recv: int, count: int, dtype: str, op: str, stream: int) -> None:
        """recv[:count] = op over ranks of send[:count]."""
        self._call("ncclAllReduce", send, recv, count, _lookup(DTYPES, dtype, "dtype"), _lookup(OPS, op, "op"),
                   stream=stream)

    def close(self) -> None:
        """ncclCommDestroy; closing again does nothing."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            _check("ncclCommDestroy", load_library().ncclCommDestroy(handle))
