"""`llmqgen run`: the training loop around the Trainer — data, LR schedule, eval, log, checkpoints, export."""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.hf import export_hf
from ..checkpoint.store import load_checkpoint, save_checkpoint
from ..data.loader import EvalLoader, TrainLoader
from ..metrics import mfu, sol_seconds_per_token
from ..models.init import init_params
from ..plan.schema import Plan
from . import driver
from .log import StepLogger, StepRecord
from .lr import LRSchedule
from .dist import dist_env
from .trainer import AdamW, Trainer


@dataclass
class RunConfig:
    data: Path
    out: Path
    steps: int
    lr: float = 3e-4
    warmup: int = 20
    schedule: str = "cosine"
    final_fraction: float = 0.1
    weight_decay: float = 0.1
    max_norm: float = 1.0
    eval_every: int = 0
    eval_batches: int = 4
    checkpoint_every: int = 0
    keep_last: int = 3
    seed: int = 0
    resume: str | None = None
    stop_after: int | None = None      # stop (and checkpoint) after this step, as an interruption would
    init_from: Path | None = None      # a local HF model directory
    devices: list[int] | None = None   # GPU of each rank (default one each; [0, 0]: a 2-GPU plan on one GPU)


def train(plan: Plan, cfg: RunConfig, echo=print) -> Path:
    """Run cfg.steps optimizer steps; returns the exported model directory. Under NCCL every process
    (torchrun, mpirun, srun) runs this; rank 0 alone logs, checkpoints and exports."""
    B, T = plan.batch.micro_batch, plan.batch.seq_len
    dist = dist_env() if plan.collectives == "nccl" else None
    main = dist is None or dist.rank == 0
    if not main:
        echo = lambda *_: None      # noqa: E731
    tr = Trainer(plan, seed=cfg.seed, optim=AdamW(weight_decay=cfg.weight_decay, max_norm=cfg.max_norm),
                 dist=dist, devices=cfg.devices)
    stop = {"now": False}
    previous = signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))   # Ctrl-C: finish the step, save
    try:
        start, cursor = 0, None
        if cfg.resume:
            which = int(cfg.resume) if cfg.resume.isdigit() else cfg.resume
            tensors, state, _ = load_checkpoint(cfg.out / "checkpoints", which, expect=plan.model)
            tr.load_state_tensors(tensors, state["step"])
            start, cursor = state["step"], state["loader"]
            echo(f"resumed from step {start}")
        elif cfg.init_from:
            from ..checkpoint.hf import import_hf
            tr.load_params(import_hf(cfg.init_from, plan.model))
        else:
            tr.load_params(init_params(plan.model, cfg.seed))
        loader = TrainLoader(cfg.data, B, T, seed=cfg.seed, cursor=cursor, model_vocab=plan.model.vocab_size)
        sched = LRSchedule(peak=cfg.lr, warmup_steps=min(cfg.warmup, cfg.steps), total_steps=cfg.steps,
                           kind=cfg.schedule, final_fraction=cfg.final_fraction)
        gpu, tokens = plan.inventory.gpu, plan.tokens_per_step
        sol_s = sol_seconds_per_token(plan.model, T, gpu, plan.precision.matmul) * tokens
        quiet = None if main else open(os.devnull, "w")     # noqa: SIM115 - closed after the loop
        with StepLogger(cfg.out / "log.jsonl" if main else None, cfg.steps, stream=quiet or sys.stderr) as log:
            step = start
            end = min(cfg.steps, cfg.stop_after or cfg.steps)
            while step < end and not tr.any_rank(stop["now"]):
                t0 = time.perf_counter()
                tr.accumulate([loader.next_batch() for _ in range(plan.batch.grad_accum * plan.num_gpus)])
                loss = tr.loss()
                lr = sched.lr(step)
                norm = tr.optimizer_step(lr)
                dt = time.perf_counter() - t0
                eval_loss = None
                if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                    eval_loss = evaluate(tr, cfg.data, B, T, cfg.eval_batches, plan.num_gpus)
                free, total = driver.mem_info()
                log.log(StepRecord(step=step, loss=loss, grad_norm=norm, lr=lr, step_ms=1e3 * dt,
                                   tokens_per_s=tokens / dt, sol_pct=100 * sol_s / dt,
                                   mfu_pct=100 * mfu(plan.model, T, gpu, tokens / dt), gpu_mem_bytes=total - free,
                                   eval_loss=eval_loss))
                step += 1
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    _checkpoint(tr, plan, cfg, step, loader, main)
        if quiet:
            quiet.close()
        if stop["now"]:
            echo(f"stopped at step {step}: saving")
        _checkpoint(tr, plan, cfg, step, loader, main)
        out = cfg.out / "model"
        params = tr.params()            # every process takes part in gathering the shards
        if main:
            export_hf(params, plan.model, out)
        echo(f"model exported to {out} (Hugging Face safetensors + config.json)")
        return out
    finally:
        signal.signal(signal.SIGINT, previous)
        tr.close()


def evaluate(tr: Trainer, data: Path, B: int, T: int, batches: int, gpus: int = 1) -> float:
    """Mean loss over the eval split's first batches, `gpus` at a time (a last partial group is left
    out); forward + backward on scratch (gradients discarded)."""
    losses = []
    group: list = []
    for batch in EvalLoader(data, B, T, max_batches=max(batches, gpus)):
        group.append(batch)
        if len(group) == gpus:
            tr.accumulate(group)
            losses.append(tr.loss())
            group = []
    tr.zero_gradients()
    return sum(losses) / max(1, len(losses))


def _checkpoint(tr: Trainer, plan: Plan, cfg: RunConfig, step: int, loader: TrainLoader, main: bool = True):
    tensors = tr.state_tensors()        # every process takes part in gathering the shards
    if not main:
        return None
    state = {"step": step, "loader": loader.cursor, "seed": cfg.seed, "lr_schedule": {
        "peak": cfg.lr, "warmup": cfg.warmup, "kind": cfg.schedule, "total": cfg.steps}}
    return save_checkpoint(cfg.out / "checkpoints", step, tensors, state, plan.to_json(),
                           keep_last=cfg.keep_last)
