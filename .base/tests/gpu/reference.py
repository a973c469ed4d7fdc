"""An independent PyTorch reference of the Qwen2 / Qwen3 / Llama decoder, for the trainer's correctness tests.

Written from the architectures' published definitions (HF modeling_qwen2/qwen3/llama), not from llmqgen's
kernels, in fp32 or fp64, on any torch device. Parameters use llmqgen's fused layout and names
(llmqgen.models.hf_names.param_shapes), so gradients compare name by name with the trainer's:

    params = init_params(spec, seed=0)                 # numpy fp32, llmqgen's init recipe
    ref = Reference(spec, params, device="cuda")
    loss, grads = ref.loss_and_grads(tokens, targets)  # grads: name -> tensor, same layout
    emu = Reference(spec, params, device="cuda", fp8=("e4m3", "e4m3"))   # llmqgen's FP8 recipe, emulated
    loss, grads = emu.loss_and_grads_micro([(tokens0, targets0), (tokens1, targets1)])
    stats = compare_grads(ours, grads)                 # ours: name -> numpy array (any float dtype)
    assert_close_grads(stats, min_mean_cos=0.99, max_mean_rel=0.012)
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from llmqgen.models.hf_names import layer_name, param_shapes
from llmqgen.models.init import INIT_STD, init_params  # noqa: F401  (re-exported for the tests)
from llmqgen.models.spec import ModelSpec, RopeScaling

IGNORE_INDEX = -100
# --- the pieces of the architecture ------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, in at least fp32."""
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight


def llama3_scale(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1's RoPE frequency scaling: wavelengths longer than original_max / low_freq_factor are
    stretched by `factor`, shorter than original_max / high_freq_factor are kept, and those between are
    interpolated linearly in original_max / wavelength."""
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    interpolated = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, interpolated, scaled)


def rope_tables(spec: ModelSpec, seq_len: int, dtype=torch.float32, device=None):
    """cos, sin [T, HD] for positions 0..T-1, each frequency repeated over both halves (rotate-half)."""
    hd = spec.head_dim
    inv_freq = 1.0 / spec.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64, device=device) / hd)
    if spec.rope_scaling is not None:
        inv_freq = llama3_scale(inv_freq, spec.rope_scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half RoPE on x [..., T, H, HD]: pairs (i, i + HD/2) rotate by position * inv_freq[i]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def causal_gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(HD)) v, causal; q [B, T, HQ, HD], k/v [B, T, HKV, HD]; query head j reads kv
    head j // (HQ / HKV). Returns [B, T, HQ * HD]."""
    b, t, hq, hd = q.shape
    group = hq // k.shape[2]
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))                      # [B, H, T, HD]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    return (probs @ v).transpose(1, 2).reshape(b, t, hq * hd)


# --- the FP8 recipe, emulated -------------------------------------------------------------------------

TORCH_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}


def fp8_qdq(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Per-tensor current scaling as llmqgen's quantizers do it (templates/_quantize.cu.j2), then back:
    the bf16 tensor the kernel reads (x rounded to bf16), scale = FMAX / amax in fp32 (amax floored at
    FMAX * FLT_MIN), saturating round-to-nearest-even into `fmt`, times the descale amax / FMAX.
    Returns fp32, the values cuBLASLt multiplies."""
    xb = x.detach().to(torch.bfloat16).float()
    amax = xb.abs().max()
    if amax == 0:
        return xb
    fmax = torch.tensor(FP8_MAX[fmt], dtype=torch.float32, device=x.device)
    amax = torch.maximum(amax, fmax * torch.finfo(torch.float32).tiny)
    q = (xb * (fmax / amax)).clamp(-fmax, fmax).to(TORCH_FP8[fmt])
    return q.float() * (amax / fmax)


class _Fp8Linear(torch.autograd.Function):
    """y = Q(x) Q(w)^T; dx = Q(dy) Q(w); dw = Q(dy)^T Q(x): E4M3 forward operands, `grad` for dy (LLMQ's
    and llmqgen's recipe: the four block matmuls, per-tensor current scaling, fp32 accumulation)."""

    @staticmethod
    def forward(ctx, x, w, grad_fmt):
        xq, wq = fp8_qdq(x, "e4m3"), fp8_qdq(w, "e4m3")
        ctx.save_for_backward(xq, wq)
        ctx.grad_fmt = grad_fmt
        return xq @ wq.T

    @staticmethod
    def backward(ctx, dy):
        xq, wq = ctx.saved_tensors
        shape = xq.shape
        gq = fp8_qdq(dy.reshape(-1, dy.shape[-1]), ctx.grad_fmt)
        return (gq @ wq).reshape(shape), gq.T @ xq.reshape(-1, shape[-1]), None


# --- the model ------------------------------------------------------------------------------------------

def _attr(name: str) -> str:
    """nn.Module attribute names cannot hold dots."""
    return "p_" + name.replace(".", "_")


class Reference(torch.nn.Module):
    """The decoder with llmqgen's fused parameters (names and layouts as param_shapes(spec))."""

    def __init__(self, spec: ModelSpec, params: dict, dtype: torch.dtype = torch.float32, device=None,
                 fp8: tuple[str, str] | None = None, sdpa: bool = False):
        """fp8: (matmul, gradient) formats, e.g. ("e4m3", "e4m3"), to emulate the FP8 recipe in the four
        block matmuls (fp8_qdq at the points where llmqgen quantizes); None: plain `dtype` matmuls.
        sdpa: attention through torch's scaled_dot_product_attention (fast, for long training runs)
        instead of the explicit softmax written out here."""
        super().__init__()
        self.spec = spec
        self.fp8, self.sdpa = fp8, sdpa
        self.shapes = param_shapes(spec)
        missing = sorted(set(self.shapes) - set(params))
        extra = sorted(set(params) - set(self.shapes))
        if missing or extra:
            raise ValueError(f"Reference({spec.name}): parameter names do not match param_shapes(spec): "
                             f"missing {missing[:8]}, unexpected {extra[:8]}; build the dict with "
                             f"init_params(spec, seed) or llmqgen's checkpoint import")
        for name, shape in self.shapes.items():
            value = params[name]
            # ml_dtypes bfloat16 arrays have no torch counterpart: go through fp32.
            t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value, np.float32))
            if tuple(t.shape) != shape:
                raise ValueError(f"Reference({spec.name}): {name} has shape {tuple(t.shape)}, the fused "
                                 f"layout needs {shape} (see llmqgen.models.hf_names)")
            self.register_parameter(_attr(name), torch.nn.Parameter(t.detach().to(device=device, dtype=dtype)
                                                                    .clone()))

    def param(self, name: str) -> torch.nn.Parameter:
        return getattr(self, _attr(name))

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x @ w^T, through the FP8 emulation when the reference was made with fp8=."""
        return x @ w.T if self.fp8 is None else _Fp8Linear.apply(x, w, self.fp8[1])

    def block(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        s, p = self.spec, (lambda key: self.param(layer_name(i, key)))
        b, t, _ = x.shape
        h = rms_norm(x, p("ln1"), s.rms_norm_eps)
        qkv = self.linear(h, p("qkv"))
        if s.qkv_bias:
            qkv = qkv + p("qkv_bias")
        q, k, v = qkv.split([s.q_dim, s.kv_dim, s.kv_dim], dim=-1)
        q = q.reshape(b, t, s.num_heads, s.head_dim)
        k = k.reshape(b, t, s.num_kv_heads, s.head_dim)
        v = v.reshape(b, t, s.num_kv_heads, s.head_dim)
        if s.qk_norm:
            q = rms_norm(q, p("q_norm"), s.rms_norm_eps)
            k = rms_norm(k, p("k_norm"), s.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.sdpa:
            att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, enable_gqa=True).transpose(1, 2).reshape(b, t, -1)
        else:
            att = causal_gqa_attention(q, k, v)
        x = x + self.linear(att, p("attn_out"))
        gate, up = self.linear(rms_norm(x, p("ln2"), s.rms_norm_eps), p("gate_up")).split(s.intermediate_size, dim=-1)
        return x + self.linear(F.silu(gate) * up, p("down"))

    def forward(self, tokens) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V]."""
        emb = self.param("embedding")
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=emb.device)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
        cos, sin = rope_tables(self.spec, tokens.shape[1], emb.dtype, emb.device)
        x = emb[tokens]
        for i in range(self.spec.num_layers):
            x = self.block(i, x, cos, sin)
        x = rms_norm(x, self.param("final_norm"), self.spec.rms_norm_eps)
        head = emb if self.spec.tie_embeddings else self.param("lm_head")
        return x @ head.T

    def loss(self, tokens, targets) -> torch.Tensor:
        """Mean cross-entropy over the targets that are not IGNORE_INDEX (-100)."""
        logits = self(tokens)
        targets = torch.as_tensor(targets, dtype=torch.long, device=logits.device)
        if targets.shape != logits.shape[:2]:
            raise ValueError(f"targets {tuple(targets.shape)} must match tokens {tuple(logits.shape[:2])}")
        if not (targets != IGNORE_INDEX).any():
            raise ValueError(f"every target is {IGNORE_INDEX}: the mean loss is undefined; keep at least one")
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="mean")

    def loss_and_grads_micro(self, micro_batches) -> tuple[float, dict[str, torch.Tensor]]:
        """Gradient accumulation as the trainer does it: one forward + backward per (tokens, targets)
        micro-batch (per-tensor FP8 scales are then per micro-batch), each loss summed and divided by the
        step's count of targets that are not IGNORE_INDEX; the gradients add up. Returns (loss, grads)."""
        count = sum(int((torch.as_tensor(t) != IGNORE_INDEX).sum()) for _, t in micro_batches)
        self.zero_grad(set_to_none=True)
        total = 0.0
        for tokens, targets in micro_batches:
            logits = self(tokens)
            targets = torch.as_tensor(targets, dtype=torch.long, device=logits.device)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum") / count
            loss.backward()
            total += loss.item()
        grads = {n: (torch.zeros_like(self.param(n)) if self.param(n).grad is None
                     else self.param(n).grad.detach().clone()) for n in self.shapes}
        self.zero_grad(set_to_none=True)
        return total, grads

    def loss_and_grads(self, tokens, targets) -> tuple[float, dict[str, torch.Tensor]]:
        """One forward + backward: (loss, name -> gradient in the parameter's layout). Tied: the embedding's
        gradient holds both the lookup's and the LM head's contribution."""
        self.zero_grad(set_to_none=True)
        loss = self.loss(tokens, targets)
        loss.backward()
        grads = {}
        for name in self.shapes:
            g = self.param(name).grad
            grads[name] = torch.zeros_like(self.param(name)) if g is None else g.detach().clone()
        self.zero_grad(set_to_none=True)
        return loss.item(), grads


# --- comparing gradients ------------------------------------------------------------------------------

def compare_grads(ours: dict, ref: dict) -> dict:
    """Per tensor, in fp64 (b = reference): the cosine similarity (direction), the relative norm error
    | |a| - |b| | / |b| (magnitude; the criterion's "relative norm error", as LLMQ's checks pair them),
    and, for information, the relative error of the difference |a - b| / |b| (FP8's quantisation noise
    shows here: e4m3 keeps 3 mantissa bits, so a few percent even when nothing is wrong).
    Returns {"tensors": {name: {"cos", "rel", "diff"}}, "mean_cos", "mean_rel", "mean_diff"}."""
    missing, extra = sorted(set(ref) - set(ours)), sorted(set(ours) - set(ref))
    if missing or extra:
        raise KeyError(f"gradient names differ: missing from ours {missing[:8]}, not in the reference "
                       f"{extra[:8]}")
    tensors = {}
    for name, b_t in ref.items():
        a = np.asarray(ours[name], np.float64).ravel()
        b = b_t.detach().to("cpu", torch.float64).numpy().ravel()
        if a.size != b.size:
            raise ValueError(f"{name}: ours has {a.size} elements, the reference {b.size} "
                             f"(shape {tuple(b_t.shape)}): same fused layout expected")
        na, nb, nd = np.linalg.norm(a), np.linalg.norm(b), np.linalg.norm(a - b)
        if nb == 0.0:   # a gradient that is exactly zero: both zero is a match, anything else is not
            cos, rel, diff = (1.0, 0.0, 0.0) if na == 0.0 else (0.0, math.inf, math.inf)
        else:
            cos = float(a @ b / (na * nb)) if na > 0.0 else 0.0
            rel, diff = float(abs(na - nb) / nb), float(nd / nb)
        tensors[name] = {"cos": cos, "rel": rel, "diff": diff}
    mean = lambda key: float(np.mean([v[key] for v in tensors.values()]))  # noqa: E731
    return {"tensors": tensors, "mean_cos": mean("cos"), "mean_rel": mean("rel"), "mean_diff": mean("diff")}


def assert_close_grads(stats: dict, min_mean_cos: float, max_mean_rel: float) -> None:
    """Fail when the mean cosine is below min_mean_cos or the mean relative norm error above max_mean_rel,
    listing the 5 worst tensors (by relative norm error)."""
    ok_cos = stats["mean_cos"] >= min_mean_cos
    ok_rel = stats["mean_rel"] <= max_mean_rel
    if ok_cos and ok_rel:
        return
    worst = sorted(stats["tensors"].items(), key=lambda kv: -kv[1]["rel"])[:5]
    lines = [f"  {name:<24} cos {v['cos']:.6f}  rel {v['rel']:.4%}  diff {v['diff']:.4%}" for name, v in worst]
    raise AssertionError(
        f"gradients differ from the reference: mean cos {stats['mean_cos']:.6f} (need >= {min_mean_cos}), "
        f"mean relative norm error {stats['mean_rel']:.4%} (need <= {max_mean_rel:.4%}); worst tensors:\n"
        + "\n".join(lines))
