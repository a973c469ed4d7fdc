"""FLOPs, speed-of-light and MFU: the one definition every report uses.

- Training FLOPs per token (for MFU): 6 x (non-embedding parameters + the LM-head matrix) plus causal
  attention 6*L*C*T: QK^T and PV cost 2*T*C each per token and layer, halved by the causal mask, and
  backward doubles forward (C is the query width, the hidden size except in Qwen3).
- SOL (LLMQ's definition): the block matmuls at the matmul dtype's dense rate, plus the LM head
  6*V*C and attention 6*L*C*T at the BF16 rate. SOL% = that time / the measured time.
- MFU is BF16-equivalent: training FLOPs per second over the GPU's dense BF16 rate.
"""
from __future__ import annotations

from .hardware.spec import GpuSpec
from .models.spec import ModelSpec


def attention_flops_per_token(model: ModelSpec, seq_len: int) -> float:
    return 6.0 * model.num_layers * model.q_dim * seq_len


def training_flops_per_token(model: ModelSpec, seq_len: int) -> float:
    dense = model.num_layers * (model.block_matrix_params() + model.block_vector_params())
    dense += model.hidden_size + model.vocab_size * model.hidden_size   # final norm, LM head (tied or not)
    return 6.0 * dense + attention_flops_per_token(model, seq_len)


def sol_seconds_per_token(model: ModelSpec, seq_len: int, gpu: GpuSpec, matmul: str) -> float:
    block = 6.0 * model.num_layers * model.block_matrix_params()
    rate = gpu.fp8_tflops if matmul == "e4m3" else gpu.bf16_tflops
    rest = 6.0 * model.vocab_size * model.hidden_size + attention_flops_per_token(model, seq_len)
    return block / (rate * 1e12) + rest / (gpu.bf16_tflops * 1e12)


def mfu(model: ModelSpec, seq_len: int, gpu: GpuSpec, tokens_per_s_per_gpu: float) -> float:
    return training_flops_per_token(model, seq_len) * tokens_per_s_per_gpu / (gpu.bf16_tflops * 1e12)
