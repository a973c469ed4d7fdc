"""AdamW (decoupled weight decay) over one tensor per launch, in the plan's master/m/v dtypes.

Hyper-parameters live in a device float array (HYPER order) so that a captured CUDA graph replays
with the new learning rate, bias corrections and step number of each step; the clip scale comes from gradnorm's
output slot. bf16 states round stochastically (hash of seed, step and element index: no RNG state).
"""
from __future__ import annotations

from ...plan.optimizer_step import adamw_kernel
from ..kernel import Kernel, cdiv

TEMPLATE = "_adamw.cu.j2"

# Slots of the device hyper-parameter array, float32[9]; bias_corr1 = 1 - beta1**t, bias_corr2 = 1 - beta2**t.
# max_norm (slot 7) is read by llmq_gradnorm_finalize. step (t, a float: exact up to 2**24 steps) seeds the
# stochastic rounding; in the array rather than a launch argument, the optimizer replays as a CUDA graph.
HYPER = ("lr", "beta1", "beta2", "eps", "weight_decay", "bias_corr1", "bias_corr2", "max_norm", "step")
MAX_STEP = 1 << 24

THREADS = 256
ELEMS_PER_THREAD = 8          # one 16-byte bf16 gradient vector per thread and iteration
BLOCKS_PER_SM = 4             # 1024 threads (<= 64 registers each, via __launch_bounds__) in one wave

_CTYPE = {"bf16": "bf16", "fp32": "float"}


def dtypes(ctx: dict) -> tuple[str, str, str]:
    """(master, m, v) storage dtypes of the plan."""
    pick = lambda fp32: "fp32" if fp32 else "bf16"  # noqa: E731
    return pick(ctx["MASTER_FP32"]), pick(ctx["ADAM_M_FP32"]), pick(ctx["ADAM_V_FP32"])


def kernel_name(ctx: dict) -> str:
    return adamw_kernel(*dtypes(ctx))       # the name the schedule launches


def grid(n: int, sm_count: int) -> tuple[int, int, int]:
    """Blocks for a tensor of n elements: one vector per thread up to BLOCKS_PER_SM per SM (grid-stride)."""
    return (max(1, min(cdiv(n, THREADS * ELEMS_PER_THREAD), sm_count * BLOCKS_PER_SM)), 1, 1)


def hyper_values(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                 max_norm: float) -> list[float]:
    """The hyper array for optimizer step `step` (1-based), in HYPER order."""
    if not 1 <= step <= MAX_STEP:
        raise ValueError(f"AdamW steps count from 1 (bias corrections 1 - beta**t vanish at t=0) to {MAX_STEP} "
                         f"(a float32 slot holds the step exactly that far), got {step}")
    return [lr, beta1, beta2, eps, weight_decay, 1.0 - beta1 ** step, 1.0 - beta2 ** step, max_norm, float(step)]


def context(ctx: dict) -> dict:
    p, m, v = dtypes(ctx)
    return {
        "ADAMW_THREADS": THREADS,
        "ADAMW_BLOCKS_PER_SM": BLOCKS_PER_SM,
        "ADAMW_VARIANT": kernel_name(ctx).removeprefix("llmq_adamw_"),
        "ADAMW_MASTER_T": _CTYPE[p],
        "ADAMW_M_T": _CTYPE[m],
        "ADAMW_V_T": _CTYPE[v],
        "ADAMW_HYPER": HYPER,
    }


def kernels(ctx: dict) -> list[Kernel]:
    p, m, v = dtypes(ctx)
    ct = {"bf16": "__nv_bfloat16", "fp32": "float"}
    return [Kernel(
        name=kernel_name(ctx),
        grid=(ctx["SM_COUNT"] * BLOCKS_PER_SM, 1, 1),  # the most; per tensor: grid(n, SM_COUNT)
        block=(THREADS, 1, 1),
        args=(("param", f"{ct[p]}*"), ("grad", "__nv_bfloat16*"), ("m", f"{ct[m]}*"), ("v", f"{ct[v]}*"),
              ("hyper", "const float*"), ("clip_scale", "const float*"), ("amax", "float*"), ("n", "int64_t"),
              ("seed", "int"), ("apply_weight_decay", "int"), ("zero_grad", "int")),
        doc="AdamW: g*=clip; m,v moments; p = p*(1-lr*wd) - lr/bc1*m/(sqrt(v/bc2)+eps); amax(|p|); grad=0 if asked",
        meta={"runtime_size": True, "elems_per_block": THREADS * ELEMS_PER_THREAD, "hyper": list(HYPER),
              "dtypes": {"master": p, "m": m, "v": v}, "grid_for": "adamw.grid(n, SM_COUNT)"},
        role="adamw",
    )]
