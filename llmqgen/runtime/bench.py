"""`llmqgen bench`: N optimizer steps of a plan on synthetic tokens, timed, written to bench/results."""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from math import prod
from pathlib import Path

import numpy as np

from ..data.loader import TokenBatch, embedding_backward_index
from ..models.hf_names import param_shapes
from ..plan.schema import Plan
from . import gemm_search
from .benchfile import bench_record, bench_summary, collect_versions, write_bench
from .devmem import DeviceMemory, ranks_on_first_gpu
from .dist import dist_env, is_rank_zero
from .profile import format_graphed, format_profile, graphed_step, predicted_family_ms, profile_step
from .standin import RunningOn
from .trainer import Trainer


def synthetic_batches(plan: Plan, seed: int = 0) -> list[TokenBatch]:
    """One optimizer step of uniformly random tokens (speed does not depend on their values)."""
    rng = np.random.default_rng(seed)
    B, T, V = plan.batch.micro_batch, plan.batch.seq_len, plan.model.vocab_size
    out = []
    for _ in range(plan.batch.grad_accum * plan.num_gpus):
        toks = rng.integers(0, V, size=(B, T + 1), dtype=np.int32)
        inputs = np.ascontiguousarray(toks[:, :-1])
        order, seg, uniq = embedding_backward_index(inputs)
        out.append(TokenBatch(inputs, np.ascontiguousarray(toks[:, 1:]), order, seg, uniq))
    return out


class BenchParams(Mapping):
    """Weights for timing only, made when read: N(0, 0.02) values cut from one shared random pool (norms
    one), so a 14B model's weights take seconds, and host memory holds one tensor at a time (the whole
    model in float32 would sit beside the offloaded state: 56 GB more for 14B)."""

    def __init__(self, spec):
        self.shapes = param_shapes(spec)
        self.pool = np.random.default_rng(0).normal(0.0, 0.02, 1 << 24).astype(np.float32)

    def __getitem__(self, name: str) -> np.ndarray:
        shape = self.shapes[name]
        n = prod(shape)
        if name.rsplit(".", 1)[-1] in ("ln1", "ln2", "q_norm", "k_norm", "final_norm"):
            return np.ones(shape, np.float32)
        reps = -(-n // self.pool.size)
        return (np.tile(self.pool, reps)[:n] if reps > 1 else self.pool[:n]).reshape(shape)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


_clock = time.perf_counter      # step timing (tests stand a fake clock in)
logger = logging.getLogger(__name__)


def run_bench(plan: Plan, steps: int = 8, warmup: int = 2, out_root: Path = Path("bench/results"),
              devices: list[int] | None = None, profile: bool = False) -> Path | None:
    """devices: the GPU of each rank (default one per rank); several ranks on one GPU test the
    collectives' code paths and host-staged transfer rates, not multi-GPU speed (the file says so).
    profile: then one more step, eager, timed per operation (runtime/profile.py; the record's `profile`).
    Each step and the summary are logged (the command line prints rank 0's); under a launcher only rank 0
    writes the result (returns None on the others)."""
    main = is_rank_zero()
    mem = DeviceMemory()            # before the Trainer: the baseline of its fallback
    dist = dist_env() if plan.collectives == "nccl" else None   # one process per GPU under torchrun
    tr = Trainer(plan, devices=devices, dist=dist)
    try:
        running = RunningOn.of(plan, tr.dev)
        for line in running.lines():
            logger.info(line)
        mem.watch(tr.dev)
        tr.load_params(BenchParams(plan.model))
        data = synthetic_batches(plan)
        times, comm_ms, moved = [], [], []
        events = tr.comm.events if tr.comm else None
        if events is not None:
            events.start_timing()
        for step in range(warmup + steps):
            t0 = _clock()
            before = tr.comm.moved if tr.comm else 0
            tr.accumulate(data)
            norm = tr.optimizer_step(lr=1e-4)
            times.append(1e3 * (_clock() - t0))
            mem.sample()
            if events is not None:
                comm_ms.append(events.take_ms())
                moved.append(tr.comm.moved - before)
            logger.info(f"step {step + 1}/{warmup + steps}: {times[-1]:.1f} ms, loss {tr.loss():.4f}, norm {norm:.3f}"
                        + (f", collectives {comm_ms[-1]:.1f} ms ({moved[-1] / 2**20:.0f} MiB moved)" if comm_ms else "")
                        + (" (warm-up)" if step < warmup else ""))
        device = {"name": tr.dev.name, "driver": _driver_version(), "compute_capability": tr.dev.arch,
                  "sm_count": tr.dev.sm_count, "total_memory": tr.dev.total_memory,
                  "rank_devices": devices or list(range(len(tr.ranks)))}
        record = bench_record(plan, times, warmup, device, collect_versions(),
                              mem.report(plan, ranks_on_first_gpu(devices)), running,
                              profile=profile_step(tr, data) if profile else None)   # one more step, eager
        if profile:     # and one graphed, timed in parts; the cost model's times per family beside the profile's
            record["profile"]["graphed"] = graphed_step(tr, data)
            if running.predicted is not None:
                record["profile"]["predicted_ms"] = predicted_family_ms(running.predicted)
        chosen = gemm_search.saved(tr.build.path)
        if chosen:      # the GEMM algorithms this run timed or reused (runtime/gemm_search.py)
            record["gemm_algorithms"] = chosen
        if comm_ms:
            meas = slice(warmup, None)
            record["collectives"] = {
                "kind": plan.collectives, "peer_copies": bool(getattr(tr.comm, "peer", False)),
                "ms_per_step": comm_ms, "bytes_per_step": moved,
                "gb_per_s": sum(moved[meas]) / max(1e-9, sum(comm_ms[meas])) / 1e6,
                "step_share": sum(comm_ms[meas]) / sum(times[meas]),
                "note": ("several ranks share one GPU: step times are not multi-GPU speed"
                         if devices and len(set(devices)) < len(devices) else "")}
        if profile:
            logger.info(format_profile(record["profile"], record["step_ms_median"]))
            logger.info(format_graphed(record["profile"]["graphed"]))
        if not main:
            return None
        path = write_bench(record, out_root)
        logger.info(bench_summary(record, path))
        return path
    finally:
        mem.close()
        tr.close()


def _driver_version() -> str:
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # noqa: BLE001 - the record says unknown rather than failing the run
        return "unknown"
