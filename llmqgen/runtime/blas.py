"""GEMMs through cuBLASLt (nvmath.bindings.cublasLt: plain int handles, pointers and streams).

Row-major convention used everywhere in llmqgen (weights are [out, in], as in HF):

    D[m, n] (+)= A @ B^T        A = a[m, k]  (or a stored as [k, m] when a_trans)
                                B = b[n, k]  (or b stored as [k, n] when b_trans)

cuBLASLt is column-major, and a row-major [r, c] matrix is the column-major [c, r] one, so D^T = B A^T
is what cuBLASLt computes: its A is our `b`, its B is our `a`, its m/n are our n/m. Our plain case
(no transposes) is therefore cuBLASLt's "TN" — the only layout FP8 supports on Hopper and Ada.

The linear layer's three GEMMs (x[M,K], W[N,K], y[M,N]):
  linear_forward   y[M,N]  = x[M,K] @ W[N,K]^T (+ bias[N])        TN, BF16 or FP8
  linear_dgrad     dx[M,K] = dy[M,N] @ W[N,K]                      NN, BF16
  linear_wgrad     dW[N,K] (+)= dy[M,N]^T @ x[M,K]                 NT, BF16
In FP8 the backward GEMMs are TN too, on the transposed copies the quantize kernels write:
  dgrad = linear_forward(M, K, N) with a = dy[M,N], b = W^T[K,N];
  wgrad = linear_forward(N, K, M) with a = dy^T[N,M], b = x^T[K,M], accumulate=True.

FP8 scales are POINTERS to device floats holding the dequantisation factor (amax / FMAX, the stats
slot's descale): D = a_scale * b_scale * (A @ B^T). They must be 16-byte aligned: cuBLASLt on
Hopper accepts a misaligned scale in the heuristic and then fails the matmul with NOT_SUPPORTED.
One Blas (handle + workspace) per stream: concurrent GEMMs must not share a workspace.
"""
from __future__ import annotations

import numpy as np
from nvmath.bindings import cublas
from nvmath.bindings import cublasLt as lt

# cudaDataType_t values (library_types.h; part of the CUDA ABI).
DTYPES = {"fp32": 0, "bf16": 14, "e4m3": 28, "e5m2": 29}
FP8 = ("e4m3", "e5m2")
SCALE_ALIGN = 16
HEURISTIC_CANDIDATES = 8

Desc = lt.MatmulDescAttribute
Pref = lt.MatmulPreferenceAttribute


def _set(setter, dtype_of, obj: int, attr, value) -> None:
    buf = np.array([value], dtype=dtype_of(attr))
    setter(obj, attr, buf.ctypes.data, buf.nbytes)


class Blas:
    """A cuBLASLt handle and the workspace its GEMMs may use (e.g. an arena row, CUBLAS_WORKSPACE bytes)."""

    def __init__(self, workspace_ptr: int, workspace_bytes: int):
        if workspace_ptr % 256:
            raise ValueError(f"cuBLASLt workspace at {workspace_ptr:#x} must be 256-byte aligned")
        self.handle = lt.create()
        self.version = lt.get_version()     # e.g. 130100 for cuBLAS 13.1.0: GEMM algorithm choices are kept by it
        self.workspace_ptr, self.workspace_bytes = workspace_ptr, workspace_bytes

    def close(self) -> None:
        if self.handle:
            lt.destroy(self.handle)
            self.handle = 0


class Gemm:
    """One GEMM shape and dtype set: descriptors, layouts and the heuristic's algorithm, made once."""

    def __init__(self, blas: Blas, m: int, n: int, k: int, *, a_dtype: str = "bf16", b_dtype: str = "bf16",
                 a_trans: bool = False, b_trans: bool = False, bias: bool = False,
                 accumulate: bool = False, fast_accum: bool = False, align: int = 256):
        fp8 = a_dtype in FP8 or b_dtype in FP8
        if fp8 and not (a_dtype in FP8 and b_dtype in FP8):
            raise ValueError(f"mixed {a_dtype} x {b_dtype} GEMM: FP8 needs both operands in FP8")
        if a_dtype == b_dtype == "e5m2":
            raise ValueError("e5m2 x e5m2 is not supported by cuBLASLt: quantize one operand to e4m3")
        if fp8 and (a_trans or b_trans):
            raise ValueError("FP8 GEMMs are TN only: pass the transposed copy the quantize kernel wrote")
        if fp8 and (k % 16 or n % 16):
            raise ValueError(f"FP8 GEMM {m}x{n}x{k}: k and n must be multiples of 16 (16-byte rows)")
        self.blas, self.m, self.n, self.k, self.fp8, self.align = blas, m, n, k, fp8, align
        self.a_dtype, self.b_dtype = a_dtype, b_dtype
        self.bias, self.accumulate = bias, accumulate
        self.label = (f"{m}x{n}x{k} {a_dtype}{'^T' if a_trans else ''} x {b_dtype}{'^T' if b_trans else ''}"
                      f"{' +bias' if bias else ''}{' +=' if accumulate else ''}{' fast-accum' if fast_accum else ''}")
        self.alpha = np.ones(1, np.float32)
        self.beta = np.array([1.0 if accumulate else 0.0], np.float32)

        self.desc = lt.matmul_desc_create(int(cublas.ComputeType.COMPUTE_32F), DTYPES["fp32"])
        op = lambda t: int(cublas.Operation.T if t else cublas.Operation.N)  # noqa: E731
        # cuBLASLt's A is our b (transposed unless b is stored [k, n]); its B is our a.
        self._desc(Desc.TRANSA, op(not b_trans))
        self._desc(Desc.TRANSB, op(a_trans))
        if bias:
            self._desc(Desc.EPILOGUE, int(lt.Epilogue.BIAS))
            self._desc(Desc.BIAS_DATA_TYPE, DTYPES["bf16"])
        if fp8:
            self._desc(Desc.FAST_ACCUM, int(fast_accum))
        layout = lambda dt, rows, cols: lt.matrix_layout_create(DTYPES[dt], rows, cols, rows)  # noqa: E731
        self.a_layout = layout(b_dtype, *((n, k) if b_trans else (k, n)))    # cuBLASLt A (our b)
        self.b_layout = layout(a_dtype, *((m, k) if a_trans else (k, m)))    # cuBLASLt B (our a)
        self.d_layout = layout("bf16", n, m)                                  # C and D: our D[m, n]
        self._choose_algorithm()

    def _desc(self, attr, value) -> None:
        _set(lt.matmul_desc_set_attribute, lt.get_matmul_desc_attribute_dtype, self.desc, attr, value)

    def _choose_algorithm(self) -> None:
        pref = lt.matmul_preference_create()
        try:
            setp = lambda a, v: _set(lt.matmul_preference_set_attribute,  # noqa: E731
                                     lt.get_matmul_preference_attribute_dtype, pref, a, v)
            setp(Pref.MAX_WORKSPACE_BYTES, self.blas.workspace_bytes)
            for a in (Pref.MIN_ALIGNMENT_A_BYTES, Pref.MIN_ALIGNMENT_B_BYTES,
                      Pref.MIN_ALIGNMENT_C_BYTES, Pref.MIN_ALIGNMENT_D_BYTES):
                setp(a, self.align)
            self.results = np.zeros(HEURISTIC_CANDIDATES, dtype=lt.matmul_heuristic_result_dtype)
            found = np.zeros(1, np.int32)
            lt.matmul_algo_get_heuristic(self.blas.handle, self.desc, self.a_layout, self.b_layout,
                                         self.d_layout, self.d_layout, pref, HEURISTIC_CANDIDATES,
                                         self.results.ctypes.data, found.ctypes.data)
        finally:
            lt.matmul_preference_destroy(pref)
        if found[0] == 0:
            raise RuntimeError(f"cuBLASLt has no algorithm for GEMM {self.label} within "
                               f"{self.blas.workspace_bytes} workspace bytes: give it more workspace "
                               f"or check the shape's alignment")
        # The best candidate comes first; `algo` is the struct's first field, so its address is the row's.
        self.found = int(found[0])
        self.use(0)

    def use(self, i: int) -> None:
        """Run the heuristic's candidate `i` (0: its first pick; runtime/gemm_search.py times them all)."""
        if not 0 <= i < self.found:
            raise ValueError(f"GEMM {self.label}: the heuristic found {self.found} algorithms, not {i + 1}")
        self.algo_index = i
        self.algo_ptr = self.results.ctypes.data + i * self.results.dtype.itemsize
        self.workspace_bytes = int(self.results["workspace_size"][i])

    def run(self, stream: int, a: int, b: int, d: int, *, a_scale: int = 0, b_scale: int = 0,
            bias: int = 0) -> None:
        """D = a_scale*b_scale * A @ B^T (+ bias) (+ D if accumulate), enqueued on `stream`."""
        for name, p in (("a", a), ("b", b), ("d", d)):
            if p % self.align:
                raise ValueError(f"GEMM {self.label}: operand {name} at {p:#x} is not {self.align}-byte "
                                 f"aligned; build the Gemm with align= the operands' real alignment")
        if self.bias != bool(bias):
            raise ValueError(f"GEMM {self.label}: bias pointer {'missing' if self.bias else 'given'} "
                             f"but the Gemm was built with bias={self.bias}")
        if self.bias:
            self._desc(Desc.BIAS_POINTER, bias)
        if self.fp8:
            for name, p in (("a_scale", a_scale), ("b_scale", b_scale)):
                if not p or p % SCALE_ALIGN:
                    raise ValueError(f"FP8 GEMM {self.label}: {name} pointer {p:#x} must be a non-null, "
                                     f"{SCALE_ALIGN}-byte aligned device float (cuBLASLt fails the matmul "
                                     f"with NOT_SUPPORTED otherwise): point it at a stats slot's descale")
            self._desc(Desc.A_SCALE_POINTER, b_scale)  # cuBLASLt's A is our b
            self._desc(Desc.B_SCALE_POINTER, a_scale)
        try:
            lt.matmul(self.blas.handle, self.desc, self.alpha.ctypes.data, b, self.a_layout, a,
                      self.b_layout, self.beta.ctypes.data, d, self.d_layout, d, self.d_layout,
                      self.algo_ptr, self.blas.workspace_ptr, self.blas.workspace_bytes, stream)
        except lt.cuBLASLtError as e:
            raise RuntimeError(f"cuBLASLt matmul {self.label} failed: {e}") from e

    def close(self) -> None:
        for destroy, h in ((lt.matrix_layout_destroy, self.a_layout), (lt.matrix_layout_destroy, self.b_layout),
                           (lt.matrix_layout_destroy, self.d_layout), (lt.matmul_desc_destroy, self.desc)):
            destroy(h)
        self.a_layout = self.b_layout = self.d_layout = self.desc = 0


def linear_forward(blas: Blas, M: int, N: int, K: int, *, x_dtype: str = "bf16", w_dtype: str = "bf16",
                   bias: bool = False, accumulate: bool = False, fast_accum: bool = False) -> Gemm:
    """y[M,N] (+)= x[M,K] @ W[N,K]^T (+ bias[N]); run(stream, x, W, y, ...). TN: BF16 or FP8."""
    return Gemm(blas, M, N, K, a_dtype=x_dtype, b_dtype=w_dtype, bias=bias, accumulate=accumulate,
                fast_accum=fast_accum)


def linear_dgrad(blas: Blas, M: int, N: int, K: int) -> Gemm:
    """dx[M,K] = dy[M,N] @ W[N,K]; run(stream, dy, W, dx). BF16 (NN)."""
    return Gemm(blas, M, K, N, b_trans=True)


def linear_wgrad(blas: Blas, M: int, N: int, K: int, *, accumulate: bool = True) -> Gemm:
    """dW[N,K] (+)= dy[M,N]^T @ x[M,K]; run(stream, dy, x, dW). BF16 (NT)."""
    return Gemm(blas, N, K, M, a_trans=True, b_trans=True, accumulate=accumulate)
