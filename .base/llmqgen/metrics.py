"""FLOPs, speed-of-light and MFU: the one definition every report uses.

- Training FLOPs per token (for MFU): 6 x (non-embedding parameters + the LM-head matrix) plus causal
  attention 6*L*C*T: QK^T and PV cost 2*T*C each per token and layer, halved by the causal mask, and
  backward doubles forward (C is the query width, the hidden size except in Qwen3).
- SOL (LLMQ's definition): the block matmuls at the matmul dtype's dense rate, plus the LM head
  6*V*C and attention 6*L*C*T at the BF16 rate. SOL% = that time / the measured time.
- MFU is BF16-equivalent: training FLOPs per second over the GPU's dense BF16 rate.
- Several GPUs: SOL and MFU are per GPU (each GPU's share of the tokens against one GPU's rates);
  tokens/s is reported in total and per GPU. `Throughput` (from `throughput`/`plan_throughput`) is the
  one report that `llmqgen plan`, `bench` and `run` print, with `format_throughput` its one line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .hardware.spec import GpuSpec
from .models.spec import ModelSpec

if TYPE_CHECKING:       # plan.cost imports this module: no runtime import of plan
    from .plan.schema import Plan


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


@dataclass(frozen=True)
class Throughput:
    """One step's speed as every report shows it (`plan` predicted, `bench` measured, `run` per step).

    `tokens_per_s` is the whole machine's (all GPUs, all nodes); `tokens_per_s_per_gpu` is that over
    `num_gpus`. SOL and MFU are per GPU: each GPU's share of the step's tokens (tokens_per_step /
    num_gpus) against that one GPU's rates, so they read the same on 1 GPU or 8 and stay <= 100%.
    Formulas (this module's docstring; SOL is LLMQ's definition, arXiv 2512.15306):
      sol_s    = sol_seconds_per_token(model, T, gpu, matmul) * tokens_per_step / num_gpus
      sol_pct  = 100 * sol_s / step_s
      mfu_pct  = 100 * training_flops_per_token(model, T) * tokens_per_s_per_gpu / (gpu BF16 dense rate)
    Data-parallel ranks do equal work, so the per-GPU numbers are also the machine's averages.
    """

    num_gpus: int
    tokens_per_step: int
    step_s: float                   # one optimizer step, wall clock
    tokens_per_s: float             # total, all GPUs
    tokens_per_s_per_gpu: float     # tokens_per_s / num_gpus
    sol_s: float                    # speed-of-light time of one GPU's share of the step
    sol_pct: float                  # per GPU, percent
    mfu_pct: float                  # per GPU, BF16-equivalent, percent
    flops_per_token: float          # training FLOPs per token (6N + attention)

    def line(self, sep: str = " | ") -> str:
        return format_throughput(self.tokens_per_s, self.num_gpus, self.sol_pct, self.mfu_pct, sep)


def throughput(model: ModelSpec, gpu: GpuSpec, num_gpus: int, matmul: str, seq_len: int,
               tokens_per_step: int, step_s: float) -> Throughput:
    """The report of one optimizer step of `tokens_per_step` tokens (over all `num_gpus` GPUs) taking
    `step_s` seconds. `matmul`: the plan's matmul dtype ("e4m3" or "bf16"). Raises ValueError for a
    step time or GPU count that is not positive."""
    if not step_s > 0:
        raise ValueError(f"step time must be > 0 s, got {step_s}")
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    tps = tokens_per_step / step_s
    per_gpu = tps / num_gpus
    sol_s = sol_seconds_per_token(model, seq_len, gpu, matmul) * tokens_per_step / num_gpus
    return Throughput(num_gpus=num_gpus, tokens_per_step=tokens_per_step, step_s=step_s, tokens_per_s=tps,
                      tokens_per_s_per_gpu=per_gpu, sol_s=sol_s, sol_pct=100 * sol_s / step_s,
                      mfu_pct=100 * mfu(model, seq_len, gpu, per_gpu),
                      flops_per_token=training_flops_per_token(model, seq_len))


def plan_throughput(plan: Plan, step_s: float, tokens_per_step: int | None = None) -> Throughput:
    """`throughput` with the plan's model, GPU, GPU count, matmul dtype and sequence length;
    `tokens_per_step` defaults to the plan's."""
    return throughput(plan.model, plan.inventory.gpu, plan.num_gpus, plan.precision.matmul, plan.batch.seq_len,
                      plan.tokens_per_step if tokens_per_step is None else tokens_per_step, step_s)


def format_throughput(tokens_per_s: float, num_gpus: int, sol_pct: float, mfu_pct: float,
                      sep: str = " | ") -> str:
    """`162,300 tok/s | SOL 41% | MFU 38%` on one GPU;
    `341,623 tok/s (170,812 per GPU) | SOL 36% | MFU 34% per GPU` on several."""
    if num_gpus == 1:
        return sep.join([f"{tokens_per_s:,.0f} tok/s", f"SOL {sol_pct:.0f}%", f"MFU {mfu_pct:.0f}%"])
    return sep.join([f"{tokens_per_s:,.0f} tok/s ({tokens_per_s / num_gpus:,.0f} per GPU)", f"SOL {sol_pct:.0f}%",
                     f"MFU {mfu_pct:.0f}% per GPU"])
