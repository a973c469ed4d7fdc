"""`llmqgen run`: the training loop around the Trainer — data, LR schedule, eval, log, checkpoints, export.

The run's configuration (steps, LR and schedule, weight decay, clipping, seed) is saved in every
checkpoint. A resume continues that run: options left out take the saved values, and an option that
would change one must be named in `change` (`--change lr`); each change is printed and written to
log.jsonl. `steps` beyond a finished run's end extends it at the schedule's final LR.
Steps whose loss or gradient norm is not finite are skipped (no update, the LR position stays); after
`max_bad_steps` of them in a row the run checkpoints and stops. SIGINT and SIGTERM finish the step,
checkpoint and export. Checkpoints are written every `checkpoint_every` steps, once `checkpoint_minutes` of
wall time have passed since the last one, and at the end; the newest `keep_last` are kept (KEEPING: saved in
each checkpoint, kept by a resume unless given).
"""
from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..checkpoint.hf import export_hf
from ..checkpoint.store import TrainingCheckpoint, read_checkpoint, save_checkpoint
from ..data.loader import EvalLoader, TrainLoader
from ..data.shards import ShardError, check_dataset
from ..metrics import plan_throughput
from ..models.init import init_params
from ..plan.schema import Plan
from . import driver
from .log import StepLogger, StepRecord, step_rates
from .lr import LRSchedule
from .rundir import CHECKPOINTS, LOG, MODEL, check_new_run, check_resume_step
from .devmem import DeviceMemory, ranks_on_first_gpu
from .dist import dist_env, is_rank_zero
from .standin import RunningOn
from .trainer import AdamW, Trainer

# The settings that make a run what it is: saved in its checkpoints, kept on resume unless changed
# explicitly. None in a RunConfig means "the default for a new run, the saved value on resume".
DEFAULTS = {"steps": 300, "lr": 3e-4, "warmup": 20, "schedule": "cosine", "final_fraction": 0.1,
            "weight_decay": 0.1, "max_norm": 1.0, "seed": 0}
CHANGEABLE = ("steps", "lr", "warmup", "schedule", "final_fraction", "weight_decay", "max_norm")
# How a run keeps its state: saved in each checkpoint and kept by a resume unless given again (a resume of a
# run that keeps every checkpoint must not delete them at its first save); any value may be given.
KEEPING = {"checkpoint_every": 0, "checkpoint_minutes": 60.0, "keep_last": 3}
_clock = time.perf_counter      # step timing (tests stand a fake clock in)
_wall = time.monotonic          # seconds between checkpoints (tests stand a fake clock in)
logger = logging.getLogger(__name__)


@dataclass
class RunConfig:
    data: Path | None                  # None: a resumed run's own dataset (a new run needs one)
    out: Path
    steps: int | None = None
    lr: float | None = None
    warmup: int | None = None
    schedule: str | None = None
    final_fraction: float | None = None
    weight_decay: float | None = None
    max_norm: float | None = None
    eval_every: int = 0
    eval_batches: int = 4
    # KEEPING (None: a new run's default, a resumed run's saved value)
    checkpoint_every: int | None = None      # steps between checkpoints (0: none but the last)
    checkpoint_minutes: float | None = None  # also checkpoint once this much wall time passed since the last (0: not)
    keep_last: int | None = None             # checkpoints kept, the newest (0: all)
    seed: int | None = None
    resume: str | None = None
    change: tuple[str, ...] = ()       # saved settings this resume may change (CHANGEABLE), each logged
    max_bad_steps: int = 3             # non-finite steps in a row (each skipped) before the run stops
    stop_after: int | None = None      # stop (and checkpoint) after this step, as an interruption would
    init_from: Path | None = None      # a local HF model directory
    devices: list[int] | None = None   # GPU of each rank (default one each; [0, 0]: a 2-GPU plan on one GPU)


class TrainingStopped(ValueError):
    """The run stopped itself (e.g. non-finite steps in a row) after saving a checkpoint."""


def _saved_settings(ck: TrainingCheckpoint) -> dict:
    """The run configuration a checkpoint was written under (older checkpoints: what they recorded)."""
    st = ck.state
    if "run" in st:
        return dict(st["run"])
    old = st.get("lr_schedule", {})
    saved = {"steps": old.get("total"), "lr": old.get("peak"), "warmup": old.get("warmup"),
             "schedule": old.get("kind"), "seed": st.get("seed")}
    return {k: v for k, v in saved.items() if v is not None}


def run_dataset(given: Path | None, ck: TrainingCheckpoint | None) -> Path:
    """The dataset a run reads: a new run's `given` one; a resumed run's own (its read position belongs to
    it), which a given --data must name, unless the saved one is not there any more (moved). Raises
    ValueError for another dataset on resume, or a resumed run's vanished dataset without --data."""
    saved = (ck.state.get("run") or {}).get("data") if ck is not None else None
    if saved is None:                   # a new run (or a checkpoint older than the saved dataset)
        if given is None:
            raise ValueError("no dataset: give --data DIR (made by `llmqgen data prepare`)")
        return given
    saved = Path(saved)
    if given is None:
        if not saved.exists():
            raise ValueError(f"{ck.path.name}'s run read {saved}, which is not there any more: give --data "
                             f"with its new place")
        return saved
    if saved.exists() and given.resolve() != saved.resolve():
        raise ValueError(f"resuming {ck.path.name} would change the dataset ({saved} -> {given}): the saved "
                         f"read position belongs to {saved}; leave --data out, or start a new run (another --out)")
    if not saved.exists():
        logger.info(f"the run's dataset {saved} is not there any more: reading {given} in its place")
    return given


def settle(cfg: RunConfig, ck: TrainingCheckpoint | None) -> tuple[dict, list[str], dict]:
    """(settings, lines to print, changes {name: [old, new]}) of this run: a new run's given values or
    defaults; a resumed run's saved values with the changes asked for. Refuses silent changes."""
    given = {k: getattr(cfg, k) for k in DEFAULTS}
    if ck is None:
        s = {k: DEFAULTS[k] if v is None else v for k, v in given.items()}
        s["schedule_steps"] = s["steps"]
        return s, [], {}
    bad = [c for c in cfg.change if c not in CHANGEABLE]
    if bad:
        raise ValueError(f"--change {','.join(bad)}: a resume can change "
                         f"{', '.join(c.replace('_', '-') for c in CHANGEABLE)}")
    saved, at = _saved_settings(ck), ck.step
    s = {k: saved.get(k, DEFAULTS[k] if given[k] is None else given[k]) for k in DEFAULTS}
    s["schedule_steps"] = saved.get("schedule_steps", s["steps"])
    lines, changes, refused = [], {}, []
    for k in DEFAULTS:
        v = given[k]
        if v is None or k not in saved or v == saved[k]:
            continue
        if k == "steps":
            if v <= at:
                raise ValueError(f"the checkpoint is at step {at}; --steps {v} leaves nothing to train: give "
                                 f"more steps than {at}")
            if "steps" in cfg.change:
                s["steps"] = s["schedule_steps"] = v
                changes["steps"] = [saved[k], v]
                lines.append(f"changing steps {saved[k]} -> {v} (--change steps): the LR schedule is laid "
                             f"over {v} steps from step {at} on")
            elif at >= saved["steps"]:
                s["steps"] = v
                changes["steps"] = [saved[k], v]
                lines.append(f"extending the finished run from {saved[k]} to {v} steps; its LR schedule ended "
                             f"at step {s['schedule_steps']} and the LR stays at its final value (to lay a "
                             f"new schedule over {v} steps: --change steps)")
            else:
                refused.append(k)
            continue
        if k in cfg.change:
            s[k] = v
            changes[k] = [saved[k], v]
            lines.append(f"changing {k.replace('_', '-')} {saved[k]} -> {v} from step {at} (--change {k})")
        else:
            refused.append(k)
    if refused:
        diff = ", ".join(f"{k.replace('_', '-')} {saved[k]} -> {given[k]}" for k in refused)
        hint = (f"add --change {','.join(refused)} to apply them from step {at}, or leave those options out"
                if all(k in CHANGEABLE for k in refused) else "the seed cannot change on resume: leave --seed out")
        raise ValueError(f"resuming {ck.path.name} would change the saved run ({diff}): {hint}")
    return s, lines, changes


def train(plan: Plan, cfg: RunConfig) -> Path:
    """Run the configured optimizer steps; returns the exported model directory. Under a launcher every
    process (torchrun, mpirun, srun) runs this; rank 0 alone prints the step lines, logs, checkpoints and
    exports (the header and messages are logged; the command line prints rank 0's). Once the GPU is open
    the header says whether it stands in for the plan's (runtime/standin.py); at the end the measured peak
    device memory is logged next to the plan's (runtime/devmem.py). A new run (no `cfg.resume`) refuses a
    folder that holds a run already (ValueError, runtime/rundir.py), before anything is written."""
    B, T = plan.batch.micro_batch, plan.batch.seq_len
    dist = dist_env() if plan.collectives == "nccl" else None
    main = dist.rank == 0 if dist is not None else is_rank_zero()
    # everything that can be checked is checked before the Trainer opens a GPU
    ck = None
    if cfg.resume:
        which = int(cfg.resume) if cfg.resume.isdigit() else cfg.resume
        ck = read_checkpoint(cfg.out / CHECKPOINTS, which, expect=plan.model)
        if which != "latest":           # latest passes over damaged newer ones, which may look intact by size
            check_resume_step(cfg.out, ck.path)
        state = ck.state_tensors()
    else:
        check_new_run(cfg.out)
    saved = ck.state.get("keeping", {}) if ck is not None else {}
    cfg = replace(cfg, data=run_dataset(cfg.data, ck),
                  **{k: saved.get(k, d) if getattr(cfg, k) is None else getattr(cfg, k) for k, d in KEEPING.items()})
    s, lines, changes = settle(cfg, ck)
    check_dataset(cfg.data, plan.model)
    if cfg.eval_every:      # an eval split too small for one evaluation: said now, not at the first one
        try:
            EvalLoader(cfg.data, B, T, num_ranks=plan.num_gpus)
        except ShardError as e:
            raise ShardError(f"--eval-every {cfg.eval_every}: {e} (or prepare the data with a larger "
                             "--eval-fraction, or leave out --eval-every)") from None
    for line in run_header(plan, s["steps"], cfg.out):
        logger.info(line)
    sched = LRSchedule(peak=s["lr"], warmup_steps=min(s["warmup"], s["schedule_steps"]),
                       total_steps=s["schedule_steps"], kind=s["schedule"], final_fraction=s["final_fraction"])
    mem = DeviceMemory()            # before the Trainer: the baseline of its fallback
    tr = Trainer(plan, seed=s["seed"], optim=AdamW(weight_decay=s["weight_decay"], max_norm=s["max_norm"]),
                 dist=dist, devices=cfg.devices)
    stop = {"now": False}
    handler = lambda *_: stop.update(now=True)      # noqa: E731 - finish the step, save, export
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        running = RunningOn.of(plan, tr.dev)
        for line in running.lines():
            logger.info(line)
        mem.watch(tr.dev)
        start, cursor = 0, None
        if ck is not None:
            tr.load_state_tensors(state, ck.step)
            start, cursor = ck.step, ck.state["loader"]
            logger.info(f"resumed from step {start} ({ck.path})")
        elif cfg.init_from:
            from ..checkpoint.hf import import_hf
            tr.load_params(import_hf(cfg.init_from, plan.model))
        else:
            tr.load_params(init_params(plan.model, s["seed"]))
        loader = TrainLoader(cfg.data, B, T, seed=s["seed"], cursor=cursor, model_vocab=plan.model.vocab_size)
        quiet = None if main else open(os.devnull, "w")     # noqa: SIM115 - closed after the loop
        bad: list[tuple[float, float]] = []                # (loss, norm) of the non-finite steps in a row
        with StepLogger(cfg.out / LOG if main else None, s["steps"], stream=quiet or sys.stderr) as log:
            for line in lines:
                logger.info(line)
            if changes:
                log.event("config_change", step=start, changes=changes)
            step, saved_at = start, _wall()
            end = min(s["steps"], cfg.stop_after or s["steps"])
            while step < end and not tr.any_rank(stop["now"]):
                t0 = _clock()
                tr.accumulate([loader.next_batch() for _ in range(plan.batch.grad_accum * plan.num_gpus)])
                loss = tr.loss()
                lr = sched.lr(step)
                norm = tr.optimizer_step(lr, apply=math.isfinite(loss))
                skipped = not (math.isfinite(loss) and math.isfinite(norm))
                dt = _clock() - t0
                eval_loss = None
                if not skipped and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                    eval_loss = evaluate(tr, cfg.data, B, T, cfg.eval_batches, plan.num_gpus)
                free, total = driver.mem_info()
                mem.sample()
                log.log(StepRecord(step=step, loss=loss, grad_norm=norm, lr=lr, step_ms=1e3 * dt,
                                   **step_rates(plan_throughput(running.speed_plan, dt)), gpu_mem_bytes=total - free,
                                   eval_loss=eval_loss, skipped=skipped))
                if skipped:
                    bad.append((loss, norm))
                    if len(bad) >= cfg.max_bad_steps:
                        break
                    continue
                bad.clear()
                step += 1
                if step == end:                 # checkpointed after the loop
                    continue
                # the time on every rank alike (a checkpoint gathers from all of them)
                late = cfg.checkpoint_minutes > 0 and tr.any_rank(_wall() - saved_at >= 60 * cfg.checkpoint_minutes)
                if late or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                    _checkpoint(tr, plan, cfg, s, step, loader, main)
                    saved_at = _wall()
            if bad and len(bad) >= cfg.max_bad_steps:
                what = ", ".join(f"loss {lo:g} norm {n:g}" for lo, n in bad)
                log.event("stopped_nonfinite", step=step, attempts=[[lo, n] for lo, n in bad])
            memory = mem.report(plan, ranks_on_first_gpu(cfg.devices))
            logger.info(memory.line())
            log.event("device_memory", step=step, **memory.fields())
        if quiet:
            quiet.close()
        if bad and len(bad) >= cfg.max_bad_steps:
            path = _checkpoint(tr, plan, cfg, s, step, loader, main)
            raise TrainingStopped(
                f"step {step + 1} was not finite {len(bad)} times in a row ({what}; each skipped, on the next "
                f"batches): stopped, with the weights from before them saved in {path}; lower --lr (resume "
                f"with --change lr), raise --warmup, or check the data")
        if stop["now"]:
            logger.info(f"stopped at step {step}: saving")
        _checkpoint(tr, plan, cfg, s, step, loader, main)
        out = cfg.out / MODEL
        params = tr.params()            # every process takes part in gathering the shards
        if main:
            export_hf(params, plan.model, out, force=True)     # the run's own model/: an earlier export of it
        logger.info(f"model exported to {out} (Hugging Face safetensors + config.json)")
        return out
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        mem.close()
        tr.close()


def run_header(plan: Plan, steps: int, out: Path) -> list[str]:
    """What `llmqgen run` prints first (rank 0 only): the plan, the GPUs, the steps, and the planner's
    prediction in the same report as the step lines (llmqgen.metrics.Throughput)."""
    inv = plan.inventory
    gpus = (f"{inv.nodes} x " if inv.nodes > 1 else "") + f"{inv.count} x {inv.gpu.display_name}"
    lines = [f"run {plan.name}: {steps} step{'s' if steps != 1 else ''} of {plan.tokens_per_step:,} tokens on {gpus} -> {out}"]
    if plan.estimate is not None:
        e = plan.estimate
        lines.append(f"predicted {e.step_ms:.0f} ms/step | "
                     + plan_throughput(plan, e.step_ms / 1e3).line())
    return lines


def evaluate(tr: Trainer, data: Path, B: int, T: int, batches: int, gpus: int = 1) -> float:
    """Mean loss over the eval split's first batches, `gpus` at a time (a last partial group is left
    out): the forward and the loss only, gradients untouched."""
    losses = []
    group: list = []
    for batch in EvalLoader(data, B, T, max_batches=max(batches, gpus)):
        group.append(batch)
        if len(group) == gpus:
            losses.append(tr.eval_loss(group))
            group = []
    return sum(losses) / max(1, len(losses))


def _checkpoint(tr: Trainer, plan: Plan, cfg: RunConfig, s: dict, step: int, loader: TrainLoader,
                main: bool = True):
    tensors = tr.state_tensors()        # every process takes part in gathering the shards
    if not main:
        return None
    state = {"step": step, "loader": loader.cursor, "seed": s["seed"],
             "run": {**s, "data": str(Path(cfg.data).resolve())}, "keeping": {k: getattr(cfg, k) for k in KEEPING}}
    return save_checkpoint(cfg.out / CHECKPOINTS, step, tensors, state, plan.to_json(),
                           keep_last=cfg.keep_last)
