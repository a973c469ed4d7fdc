"""cuDNN SDPA on packed qkv against torch's fp32 math attention (causal, GQA), and its CUDA-graph capture."""
import math

import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch", reason="the GPU tests use torch as allocator and reference")
pytest.importorskip("cudnn", reason="cuDNN attention needs nvidia-cudnn-frontend: pip install 'llmqgen[gpu]'")

import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from harness import current_device  # noqa: E402
from llmqgen.runtime import driver  # noqa: E402
from llmqgen.runtime.attention import Attention, AttnShape  # noqa: E402


def rel(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


class Case:
    """Packed buffers for one shape, outputs poisoned with NaN so unwritten elements fail the checks."""

    def __init__(self, s: AttnShape, attn: Attention):
        bf = dict(device="cuda", dtype=torch.bfloat16)
        self.s, self.attn = s, attn
        self.qkv = torch.randn(s.B, s.T, s.heads, s.HD, **bf)
        self.do = torch.randn(s.B, s.T, s.HQ, s.HD, **bf)
        self.o = torch.full((s.B, s.T, s.HQ, s.HD), float("nan"), **bf)
        self.lse = torch.full((s.B, s.HQ, s.T), float("nan"), device="cuda", dtype=torch.float32)
        self.dqkv = torch.full_like(self.qkv, float("nan"))
        self.ws = torch.empty(max(1, attn.workspace_bytes), device="cuda", dtype=torch.uint8)

    def forward(self, stream):
        self.attn.forward(stream, self.qkv.data_ptr(), self.o.data_ptr(), self.lse.data_ptr(),
                          self.ws.data_ptr())

    def backward(self, stream, attn=None):
        (attn or self.attn).backward(stream, self.qkv.data_ptr(), self.o.data_ptr(), self.do.data_ptr(),
                                             self.lse.data_ptr(), self.dqkv.data_ptr(), self.ws.data_ptr())

    def reference(self):
        s = self.s
        q, k, v = (t.transpose(1, 2).float().requires_grad_()
                   for t in self.qkv.split([s.HQ, s.HKV, s.HKV], dim=2))
        rep = s.HQ // s.HKV
        kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        with sdpa_kernel(SDPBackend.MATH):  # plain fp32 math: the reference
            o = F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
        o.backward(self.do.transpose(1, 2).float())
        with torch.no_grad():
            scores = (q @ kr.transpose(-1, -2)) / math.sqrt(s.HD)
            mask = torch.ones(s.T, s.T, dtype=torch.bool, device="cuda").triu_(1)
            lse = scores.masked_fill_(mask, float("-inf")).logsumexp(-1)
        dqkv = torch.cat([g.transpose(1, 2) for g in (q.grad, k.grad, v.grad)], dim=2)
        return o.detach().transpose(1, 2), lse, dqkv


@pytest.fixture(scope="module")
def dev():
    return current_device()


SHAPES = [AttnShape(B=2, T=256, HQ=4, HKV=2, HD=64),      # the harness's tiny model
          AttnShape(B=2, T=512, HQ=14, HKV=2, HD=64),     # Qwen2.5-0.5B heads
          AttnShape(B=1, T=384, HQ=28, HKV=4, HD=128)]    # Qwen2.5-7B heads


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_match_torch(dev, shape):
    check_against_torch(shape, deterministic=True)


def test_nondeterministic_backward_matches_torch(dev):
    check_against_torch(SHAPES[1], deterministic=False)


def backward_twice(c, second=None):
    """Forward and backward of case `c` on torch's stream, then the backward again (through `second`, another
    Attention, when given) into a NaN-filled dqkv; returns the first backward's dqkv."""
    stream = torch.cuda.current_stream().cuda_stream
    c.forward(stream)
    c.backward(stream)
    torch.cuda.synchronize()
    first = c.dqkv.clone()
    c.dqkv.fill_(float("nan"))
    c.backward(stream, second)
    torch.cuda.synchronize()
    return first


def check_against_torch(shape, deterministic):
    c = Case(shape, Attention(shape, deterministic=deterministic))
    first = backward_twice(c)
    o_ref, lse_ref, dqkv_ref = c.reference()
    assert rel(c.o, o_ref) < 2e-2
    assert rel(c.lse, lse_ref) < 1e-3
    for i, (a, b) in enumerate(((0, shape.HQ), (shape.HQ, shape.HQ + shape.HKV),
                                (shape.HQ + shape.HKV, shape.heads))):
        assert rel(c.dqkv[:, :, a:b], dqkv_ref[:, :, a:b]) < 3e-2, "dq dk dv"[3 * i: 3 * i + 2]
    if deterministic:
        assert torch.equal(first, c.dqkv), "backward must be deterministic (bitwise repeatable)"


def test_captured_in_a_cuda_graph(dev):
    shape = SHAPES[1]
    c = Case(shape, Attention(shape))
    stream = driver.stream_create()
    try:
        torch.cuda.synchronize()
        c.forward(stream)                 # eager on the capture stream: binds cuDNN's handle to it
        c.backward(stream)
        driver.stream_synchronize(stream)
        o0, d0 = c.o.clone(), c.dqkv.clone()
        c.o.fill_(float("nan"))
        c.dqkv.fill_(float("nan"))
        torch.cuda.synchronize()
        driver.capture_begin(stream)
        c.forward(stream)
        c.backward(stream)
        graph = driver.capture_end(stream)
        driver.graph_launch(graph, stream)
        driver.stream_synchronize(stream)
        assert torch.equal(c.o, o0) and torch.equal(c.dqkv, d0)
        driver.graph_destroy(graph)
    finally:
        driver.stream_destroy(stream)


@pytest.mark.parametrize("shape", [SHAPES[1], AttnShape(B=4, T=256, HQ=28, HKV=4, HD=128)], ids=str)
def test_backward_in_chunks_is_bit_identical(dev, shape):
    """plan.attn_bwd_chunks: the backward over B/2 sequences at a time, twice, in less workspace, gives the
    full-batch backward's gradient bit for bit (each sequence's gradient is computed alone either way)."""
    whole, halves = Attention(shape), Attention(shape, bwd_chunks=2)
    c = Case(shape, whole)
    full = backward_twice(c, halves)
    print(f"\n  {shape}: backward workspace {whole.bwd.workspace} -> {halves.bwd.workspace} bytes in 2 chunks; "
          f"max |diff| {(c.dqkv.float() - full.float()).abs().max().item():.3g}")
    assert halves.bwd.workspace <= whole.bwd.workspace
    assert torch.equal(c.dqkv, full)
    with pytest.raises(ValueError, match="must divide"):
        Attention(shape, bwd_chunks=3)


@pytest.mark.parametrize("name,heads", [("0.5B", (14, 2, 64)), ("7B", (28, 4, 128))])
def test_workspace_bytes_for_model_shapes(dev, name, heads, capsys):
    """Report cuDNN's workspace for real model shapes (the planner reserves it) and run with exactly that."""
    for B, T in ((1, 1024), (8, 1024), (16, 1024), (2, 4096)):
        shape = AttnShape(B, T, *heads)
        attn, fast = Attention(shape), Attention(shape, deterministic=False)
        with capsys.disabled():
            print(f"\nATTN_WORKSPACE {name} B={B} T={T}: fwd {attn.fwd.workspace} bwd {attn.bwd.workspace} "
                  f"(non-deterministic bwd {fast.bwd.workspace}) -> workspace_bytes {attn.workspace_bytes}")
    c = Case(shape, attn)  # the last (largest-T) shape: run it with exactly the reported workspace
    stream = torch.cuda.current_stream().cuda_stream
    c.forward(stream)
    c.backward(stream)
    torch.cuda.synchronize()
    assert torch.isfinite(c.o).all() and torch.isfinite(c.dqkv).all()
