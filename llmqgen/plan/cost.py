"""Predicted time of one optimizer step, per GPU, from the plan alone.

Compute: GEMM FLOPs at the dtype's dense rate times a size-dependent efficiency; attention at a
fraction of the BF16 rate; elementwise kernels as the bytes the schedule's kernels move (plan/traffic.py) over
bandwidth; a launch cost per operation on the compute stream.
Transfers: offload streams over PCIe and copy-engine collectives overlap with compute up to
OFFLOAD_OVERLAP of it; the optimizer's own streaming is exposed. Constants live in calibration.py.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from math import prod

from ..hardware.spec import GpuSpec
from ..metrics import mfu, sol_seconds_per_token, training_flops_per_token
from . import calibration as K
from .block import Gemm, head_gemms, layer_gemms, recomputed
from .memory import DTYPE_BYTES, param_tensors
from .schedule import build_schedule
from .schema import Plan
from .traffic import MicroStepTraffic, micro_step_traffic


def gemm_seconds(flops: float, tflops: float, dtype: str, consumer: bool = False) -> float:
    """One GEMM of `flops` at `tflops` dense: e(f) = max * f / (f + half), per GPU class (calibration.py)."""
    if consumer:
        eff = K.CONSUMER_GEMM_EFF_MAX[dtype] * flops / (flops + K.CONSUMER_GEMM_EFF_HALF_FLOPS)
    else:
        eff = K.GEMM_EFF_MAX[dtype] * flops / (flops + K.GEMM_EFF_HALF_FLOPS)
    return flops / (tflops * 1e12 * eff)


@dataclass
class StepCost:
    """The predicted cost of one optimizer step (all `grad_accum` micro-steps plus the optimizer)."""

    breakdown_ms: dict[str, float]  # ms per step: matmul, lm_head, attention, elementwise (incl. launches),
                                    # exposed_transfers, optimizer, collectives; they sum to step_ms
    step_ms: float                  # ms per optimizer step, per GPU (the GPUs run in lockstep)
    tokens_per_s: float             # tokens/s of the whole machine (all GPUs, all nodes)
    sol_ms: float                   # speed-of-light ms per step (metrics.sol_seconds_per_token)
    sol_pct: float                  # 100 * sol_ms / step_ms
    mfu_pct: float                  # BF16-equivalent model FLOPs utilisation per GPU, percent
    flops_per_token: float          # training FLOPs per token (6N + attention), BF16-equivalent
    # ms per step of each elementwise kernel family (plan/traffic.py's bytes over bandwidth, launches not
    # included), named as `bench --profile` groups its measured times
    elementwise_ms: dict[str, float] = field(default_factory=dict)


def gemm_runs(gemms: list[Gemm]) -> Counter:
    """How many times each (name, pass, M, N, K, dtype) runs among `gemms` (forward and recompute: pass
    "forward"; dgrad, wgrad)."""
    return Counter((g.name, g.pass_, g.M, g.N, g.K, g.dtype) for g in gemms)


_TRAFFIC: dict[tuple, MicroStepTraffic] = {}


def micro_step_traffic_of(plan: Plan) -> MicroStepTraffic:
    """plan/traffic.py's count over the plan's schedule, kept per step shape: the solver prices thousands of
    plans, and where state sits (offload, sharding: copies and collectives, which are not counted) leaves the
    count as it is, but for ZeRO-2's zeroing of each layer's gradient buffer (tests/unit/test_traffic.py)."""
    staged_grads = plan.num_gpus > 1 and plan.sharding.gradients
    key = (plan.model, plan.batch.micro_batch, plan.batch.seq_len, plan.recompute, plan.precision,
           plan.lm_head_chunks, staged_grads)
    if key not in _TRAFFIC:
        if len(_TRAFFIC) >= 4096:      # one solve needs a few hundred; a long process must not grow without end
            _TRAFFIC.clear()
        _TRAFFIC[key] = micro_step_traffic(plan, build_schedule(plan))
    return _TRAFFIC[key]


def step_cost(plan: Plan) -> StepCost:
    """Predict one optimizer step of `plan` on its inventory, from the plan alone (no GPU needed).

    Per micro-step of micro_batch x seq_len tokens per GPU: the block GEMMs the schedule runs (forward,
    dgrad, wgrad, and those backward recomputes: plan/block.py's layer_gemms) at the matmul dtype's dense
    TFLOP/s times a size-dependent efficiency, the LM head in `lm_head_chunks` GEMMs (BF16, or FP8 with
    precision.lm_head), causal attention
    (its forward twice when recomputed), elementwise kernels as the bytes the schedule's kernels move
    (plan/traffic.py) over memory bandwidth, and launches; offload over PCIe and per-layer collectives overlap with
    compute up to `calibration.OFFLOAD_OVERLAP`, the rest is exposed. Per step: `grad_accum` micro-steps,
    then the optimizer (state bytes over bandwidth, offloaded state over PCIe) and the step's collectives.

    Args:
        plan: a validated Plan; `plan.estimate` is not read (the solver calls this before it exists).
    Returns:
        StepCost: times in milliseconds per optimizer step per GPU, throughput in tokens/s of the whole
        machine, SOL and MFU in percent. Constants come from `plan/calibration.py`.
    Raises:
        Nothing for a Plan that validated: inconsistent inputs are refused by `Plan` (pydantic
        ValidationError) before they reach the cost model.
    """
    m, b, r, o, s = plan.model, plan.batch, plan.recompute, plan.offload, plan.sharding
    gpu, N = plan.inventory.gpu, plan.num_gpus
    L, C = m.num_layers, m.hidden_size
    BT, T = b.micro_batch * b.seq_len, b.seq_len
    mm = plan.precision.matmul
    bw = gpu.mem_bandwidth_gbs * 1e9 * (K.CONSUMER_MEM_EFF if gpu.consumer else K.MEM_EFF)
    elem_bw = gpu.mem_bandwidth_gbs * 1e9 * (K.CONSUMER_MEM_EFF if gpu.consumer else K.ELEMENTWISE_EFF)
    attn_eff = K.CONSUMER_ATTN_EFF if gpu.consumer else {
        k: v * (K.ATTN_EFF_HEAD_DIM_64 if m.head_dim <= 64 else 1.0) for k, v in K.ATTN_EFF.items()}

    # --- one micro-step ----------------------------------------------------------------------
    # the GEMMs the schedule runs (plan/block.py): a layer's times L, the LM head's chunks
    fast = K.FP8_FAST_ACCUM_TIME if (plan.precision.fast_accum and not gpu.consumer) else 1.0

    def seconds(gemms: list[Gemm]) -> float:
        return sum(n * gemm_seconds(2.0 * M * Nn * Kk, gpu.fp8_tflops if dt == "e4m3" else gpu.bf16_tflops, dt,
                                    gpu.consumer) * (fast if (p == "forward" and dt == "e4m3") else 1.0)
                   for (_, p, M, Nn, Kk, dt), n in gemm_runs(gemms).items())
    t_gemm, t_head = L * seconds(layer_gemms(plan)), seconds(head_gemms(plan))

    f_att = 2.0 * b.micro_batch * m.num_heads * T * T * m.head_dim   # causal forward
    t_att_f = f_att / (gpu.bf16_tflops * 1e12 * attn_eff["fwd"])
    t_att_b = 2.5 * f_att / (gpu.bf16_tflops * 1e12 * attn_eff["bwd"])
    rerun = {x.op.name for x in recomputed(r, m.qk_norm)}          # what backward recomputes (plan/block.py)
    t_att = L * (t_att_f * (2 if "attention" in rerun else 1) + t_att_b)

    # Elementwise operations: the bytes the micro-step's schedule moves outside GEMMs and attention, over
    # bandwidth (plan/traffic.py); a launch cost for every operation it runs.
    traffic = micro_step_traffic_of(plan)
    t_elem = traffic.bytes / elem_bw
    t_launch = traffic.launches * K.KERNEL_LAUNCH_US * 1e-6

    t_compute = t_gemm + t_head + t_att + t_elem + t_launch

    # Streams during a micro-step (PCIe for offload, links for collectives), overlapped with compute.
    pcie = gpu.pcie_gbs * 1e9 * K.PCIE_EFF
    tensors = param_tensors(plan)
    block_elems = sum(prod(sh) for _, sh, per_layer, _ in tensors if per_layer) * L
    all_elems = sum(prod(sh) * (L if per_layer else 1) for _, sh, per_layer, _ in tensors)
    w_bytes = sum(prod(sh) * (1 if (mm == "e4m3" and mat) else 2) for _, sh, pl, mat in tensors if pl) * L
    t_pcie = 0.0
    if o.residual:
        t_pcie += 2 * L * BT * C * 2 / pcie
    if o.quantized_weights or (s.weights and N == 1):
        t_pcie += 2 * w_bytes / pcie                      # forward and backward pass
    if o.gradients:
        t_pcie += block_elems * 2 / pcie
    link = _link_bytes_per_s(plan)
    t_coll = 0.0
    if N > 1:
        frac = (N - 1) / N
        if s.weights:
            t_coll += 2 * w_bytes * frac / link           # all-gather per layer, forward and backward
        if s.gradients:
            t_coll += all_elems * 2 * frac / link         # reduce-scatter per layer as backward runs
    exposed = max(0.0, t_pcie - K.OFFLOAD_OVERLAP * t_compute) + max(0.0, t_coll - K.OFFLOAD_OVERLAP * t_compute)
    t_micro = t_compute + exposed

    # --- once per optimizer step --------------------------------------------------------------
    shard = N if s.optimizer else 1
    p = plan.precision
    state_bytes = all_elems / shard * (2 + 2 * DTYPE_BYTES[p.master] + 2 * DTYPE_BYTES[p.adam_m]
                                       + 2 * DTYPE_BYTES[p.adam_v])
    t_opt = state_bytes / bw + all_elems / shard * (3 if mm == "e4m3" else 2) / bw   # + work copy (+ transpose)
    off_bytes = all_elems / shard * sum(DTYPE_BYTES[d] for d, f in ((p.master, o.master),
                                        (p.adam_m, o.adam_m), (p.adam_v, o.adam_v)) if f)
    t_opt += 2 * off_bytes / pcie                         # read and write back, exposed
    if o.gradients:
        t_opt += block_elems * 2 / shard / pcie
    t_opt_coll = 0.0
    if N > 1:
        frac = (N - 1) / N
        if not s.gradients:
            t_opt_coll += all_elems * 2 * frac / link      # reduce-scatter of the accumulated gradients
        if not s.optimizer:
            t_opt_coll += all_elems * 2 * frac / link      # ZeRO-0: all-gather of the summed gradients
        elif not s.weights:
            all_w = w_bytes + (all_elems - block_elems) * 2
            t_opt_coll += all_w * frac / link              # all-gather of the updated work weights

    ga = b.grad_accum
    breakdown = {
        "matmul": ga * t_gemm * 1e3, "lm_head": ga * t_head * 1e3, "attention": ga * t_att * 1e3,
        "elementwise": ga * (t_elem + t_launch) * 1e3, "exposed_transfers": ga * exposed * 1e3,
        "optimizer": t_opt * 1e3, "collectives": t_opt_coll * 1e3,
    }
    step_s = ga * t_micro + t_opt + t_opt_coll
    tokens = plan.tokens_per_step
    tps = tokens / step_s
    sol_s = sol_seconds_per_token(m, T, gpu, mm) * tokens / N
    fpt = training_flops_per_token(m, T)
    return StepCost(breakdown_ms=breakdown, step_ms=step_s * 1e3, tokens_per_s=tps,
                    sol_ms=sol_s * 1e3, sol_pct=100 * sol_s / step_s,
                    mfu_pct=100 * mfu(m, T, gpu, tps / N), flops_per_token=fpt,
                    elementwise_ms={f: ga * n / elem_bw * 1e3 for f, n in traffic.by_family})


def on_gpu(plan: Plan, gpu: GpuSpec) -> Plan:
    """The same plan (batch, recompute, offload, sharding, chunks, GPU count) on another GPU model, without
    its estimate: `step_cost(on_gpu(plan, gpu))` predicts the plan run on a GPU it was not made for (a
    stand-in, runtime/standin.py), and `metrics.plan_throughput` of it gives SOL and MFU against that GPU."""
    return plan.model_copy(update={"inventory": plan.inventory.model_copy(update={"gpu": gpu}), "estimate": None})


def _link_bytes_per_s(plan: Plan) -> float:
    """GPU-to-GPU bandwidth a collective sees: NVLink, PCIe peer-to-peer, or staged through host."""
    gpu = plan.inventory.gpu
    if plan.collectives == "nccl" and plan.inventory.nodes > 1:
        return K.NETWORK_GBS * 1e9
    staged = gpu.pcie_gbs * 1e9 / 2 * K.HOST_STAGED_EFF    # device -> pinned host -> device: crosses twice
    if plan.peer_copies or plan.collectives == "nccl":
        return (gpu.nvlink_gbs or gpu.pcie_gbs) * 1e9 if gpu.peer_access else staged
    return staged
