"""Causal GQA attention through cuDNN SDPA (nvidia-cudnn-frontend's pygraph), on raw device pointers.

Layouts (row-major, bf16 unless noted), matching the generated kernels:
  qkv   [B, T, HQ + 2*HKV, HD]  q heads, then k heads, then v heads (the QKV GEMM's output)
  o     [B, T, HQ, HD]          = [B*T, HQ*HD], the attention-out GEMM's input
  lse   [B, HQ, T] fp32         log-sum-exp of the scaled, masked scores (natural log), saved for backward
  dqkv  like qkv                backward writes dq, dk, dv straight into the packed gradient
cuDNN reads q, k, v and writes dq, dk, dv through strided [B, H, T, HD] views of the packed buffers,
so no transpose or split kernel runs. The graphs are built once per shape (build takes ~100 ms);
execute() only fills a variant pack, so it can be captured into a CUDA graph once built.

The backward is deterministic (bitwise repeatable) by default, as the plan's recompute-equivalence
tests need. That costs workspace: measured on an H200 (cuDNN 9.19) the deterministic backward takes
about B*T*HQ*HD*4 * (T/128 + 1) bytes for HD=64 and B*T*HQ*HD*4 * (T/256 + 1) for HD=128 (fp32
partial dQ per key tile: 1.18 GB for 7B heads at B=16, T=1024); the forward needs 256 bytes.
`workspace_bytes` is the exact figure for a shape; chunking the backward over the batch
(plan.attn_bwd_chunks: the backward graph built for B/chunks sequences and run once per chunk, each
sequence's gradient computed alone either way) divides it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

BF16_BYTES = 2


@dataclass(frozen=True)
class AttnShape:
    B: int
    T: int
    HQ: int
    HKV: int
    HD: int

    @property
    def heads(self) -> int:
        return self.HQ + 2 * self.HKV


def _cudnn():
    try:
        import cudnn
    except ImportError as e:
        raise ImportError("cuDNN attention needs nvidia-cudnn-frontend and cuDNN 9: "
                          "pip install 'llmqgen[gpu]' (or choose the generated flash-attention kernel)") from e
    return cudnn


class Attention:
    """Forward and backward SDPA graphs of one shape; `workspace_bytes` is what the caller must reserve.
    bwd_chunks: the backward runs over B/bwd_chunks sequences at a time (less workspace); must divide B."""

    def __init__(self, shape: AttnShape, handle=None, deterministic: bool = True, bwd_chunks: int = 1):
        if shape.HQ % shape.HKV:
            raise ValueError(f"GQA needs HQ ({shape.HQ}) to be a multiple of HKV ({shape.HKV})")
        if bwd_chunks < 1 or shape.B % bwd_chunks:
            raise ValueError(f"attention backward chunks ({bwd_chunks}) must divide the micro-batch ({shape.B})")
        self.cudnn = _cudnn()
        self.shape, self.deterministic, self.bwd_chunks = shape, deterministic, bwd_chunks
        self.handle = handle if handle is not None else self.cudnn.create_handle()
        self.fwd = self._build(shape, backward=False)
        self.bwd = self._build(replace(shape, B=shape.B // bwd_chunks), backward=True)
        self.workspace_bytes = max(self.fwd.workspace, self.bwd.workspace)
        self._own_handle = handle is None

    def close(self) -> None:
        """Destroy the cuDNN handle made here (before its CUDA context goes)."""
        if self._own_handle and self.handle is not None:
            self.cudnn.destroy_handle(self.handle)
            self.handle = None

    # --- graph building ------------------------------------------------------------------------
    @staticmethod
    def _strides(s: AttnShape):
        qkv = [s.T * s.heads * s.HD, s.HD, s.heads * s.HD, 1]      # [B, h, T, HD] view of packed qkv
        o = [s.T * s.HQ * s.HD, s.HD, s.HQ * s.HD, 1]              # [B, HQ, T, HD] view of o
        lse = [s.HQ * s.T, s.T, 1, 1]                              # [B, HQ, T, 1]
        return qkv, o, lse

    def _build(self, s: AttnShape, backward: bool):
        cudnn = self.cudnn
        BF, FP = cudnn.data_type.BFLOAT16, cudnn.data_type.FLOAT
        sq, so, sl = self._strides(s)
        # Preferred causal spelling first; the deprecated flag for frontends that lack the former.
        masks = [dict(diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT, diagonal_band_right_bound=0),
                 dict(use_causal_mask=True)]
        errors = []
        for mask in masks:
            try:
                g = cudnn.pygraph(io_data_type=BF, intermediate_data_type=FP, compute_data_type=FP,
                                  handle=self.handle)
                q, k, v = (g.tensor(name=n, dim=[s.B, h, s.T, s.HD], stride=sq, data_type=BF)
                           for n, h in (("q", s.HQ), ("k", s.HKV), ("v", s.HKV)))
                kw = dict(attn_scale=1.0 / math.sqrt(s.HD), **mask)
                if not backward:
                    o, lse = g.sdpa(q, k, v, name="fwd", generate_stats=True, **kw)
                    o.set_output(True).set_dim([s.B, s.HQ, s.T, s.HD]).set_stride(so).set_data_type(BF)
                    lse.set_output(True).set_dim([s.B, s.HQ, s.T, 1]).set_stride(sl).set_data_type(FP)
                    tensors = dict(q=q, k=k, v=v, o=o, lse=lse)
                else:
                    o, do = (g.tensor(name=n, dim=[s.B, s.HQ, s.T, s.HD], stride=so, data_type=BF)
                             for n in ("o", "do"))
                    lse = g.tensor(name="lse", dim=[s.B, s.HQ, s.T, 1], stride=sl, data_type=FP)
                    dq, dk, dv = g.sdpa_backward(q, k, v, o, do, lse, name="bwd",
                                                 use_deterministic_algorithm=self.deterministic, **kw)
                    for t, h in ((dq, s.HQ), (dk, s.HKV), (dv, s.HKV)):
                        t.set_output(True).set_dim([s.B, h, s.T, s.HD]).set_stride(sq).set_data_type(BF)
                    tensors = dict(q=q, k=k, v=v, o=o, do=do, lse=lse, dq=dq, dk=dk, dv=dv)
                # Keep to cuDNN's own engines: the frontend's Python (CuTe-DSL) engines are not capturable.
                g.deselect_engines(["sdpa_fwd_", "sdpa_bwd_"])
                g.validate()
                g.build_operation_graph()
                g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
                g.check_support()
                g.build_plans()
                return _Built(g, tensors, g.get_workspace_size())
            except Exception as e:  # noqa: BLE001 - try the next causal spelling, report all at the end
                errors.append(f"{'+'.join(mask)}: {type(e).__name__}: {e}")
        kind = "backward" if backward else "forward"
        raise RuntimeError(f"cuDNN SDPA {kind} is not supported for {s} on this GPU/cuDNN "
                           f"({'; '.join(errors)}): use the generated flash-attention kernel instead")

    # --- execution -----------------------------------------------------------------------------
    def _pointers(self, qkv: int, grad: bool = False) -> dict[str, int]:
        s, e = self.shape, self.shape.HD * BF16_BYTES
        names = ("dq", "dk", "dv") if grad else ("q", "k", "v")
        return dict(zip(names, (qkv, qkv + s.HQ * e, qkv + (s.HQ + s.HKV) * e)))

    def _execute(self, built, stream: int, ptrs: dict[str, int], workspace: int) -> None:
        self.cudnn.set_stream(self.handle, stream)
        built.graph.execute({built.tensors[n]: p for n, p in ptrs.items()}, workspace, handle=self.handle)

    def forward(self, stream: int, qkv: int, o: int, lse: int, workspace: int) -> None:
        """o, lse <- causal softmax(q k^T / sqrt(HD)) v, on `stream`; workspace >= workspace_bytes."""
        self._execute(self.fwd, stream, dict(self._pointers(qkv), o=o, lse=lse), workspace)

    def backward(self, stream: int, qkv: int, o: int, do: int, lse: int, dqkv: int, workspace: int) -> None:
        """dqkv <- gradient of the forward w.r.t. packed qkv, given o, its gradient do and lse; in
        `bwd_chunks` launches of B/bwd_chunks sequences each, one after the other in `workspace`."""
        s = self.shape
        bc = s.B // self.bwd_chunks
        step_qkv, step_o, step_lse = (bc * s.T * s.heads * s.HD * BF16_BYTES, bc * s.T * s.HQ * s.HD * BF16_BYTES,
                                      bc * s.HQ * s.T * 4)
        for c in range(self.bwd_chunks):
            ptrs = dict(self._pointers(qkv + c * step_qkv), o=o + c * step_o, do=do + c * step_o,
                        lse=lse + c * step_lse, **self._pointers(dqkv + c * step_qkv, grad=True))
            self._execute(self.bwd, stream, ptrs, workspace)


@dataclass(frozen=True)
class _Built:
    graph: object
    tensors: dict
    workspace: int
