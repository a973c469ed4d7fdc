"""A run folder (`runs/<plan name>` or `--out`): what `llmqgen run` writes there, and the check that a new
run does not write over an earlier one. Pure Python: the command line checks it before it needs a GPU.

run folder/
  checkpoints/   step-NNNNNN/ and `latest` (checkpoint/store.py)
  log.jsonl      a line per optimizer step and event (runtime/log.py)
  model/         the Hugging Face export at the end of the run (checkpoint/hf.py)
"""
from __future__ import annotations

from pathlib import Path

from ..checkpoint.store import step_dirs, verify

CHECKPOINTS, LOG, MODEL = "checkpoints", "log.jsonl", "model"


def check_new_run(out: Path) -> None:
    """Refuse to start a new run in `out` if it already holds one: a checkpoint (intact or not), a
    log.jsonl or a non-empty model/. Raises ValueError, one line saying how to continue that run (--resume)
    or where to start the new one (--out); nothing in `out` is read beyond names, nor written."""
    steps = [step for step, _ in step_dirs(out / CHECKPOINTS)]
    if steps:
        raise ValueError(f"{out} already holds a run (checkpoints up to step {steps[-1]}): add --resume to "
                         f"continue it, or --out <folder> for a new run")
    model = out / MODEL
    held = [f"its {LOG}"] if (out / LOG).exists() else []
    held += [f"an exported model in {MODEL}/"] if model.is_dir() and any(model.iterdir()) else []
    if held:
        raise ValueError(f"{out} already holds a run ({' and '.join(held)}, no checkpoint to resume from): "
                         f"move it away, or give --out <folder> for a new run")


def check_resume_step(out: Path, checkpoint: Path) -> None:
    """Refuse to resume `out`'s run from `checkpoint` (a step-NNNNNN folder of it) when an intact checkpoint
    of a later step exists: the resumed run would write over the later ones (and --keep-last delete the
    rest). Raises ValueError saying what to do; reads names and sizes only. (A resume of "latest" starts
    from the newest intact checkpoint: nothing later is intact.)"""
    step = int(checkpoint.name.rsplit("-", 1)[-1])
    later = [s for s, p in step_dirs(out / CHECKPOINTS) if s > step and verify(p, deep=False) is None]
    if later:
        raise ValueError(f"resuming {out} at step {step} would write over its later checkpoints (steps "
                         f"{', '.join(map(str, later))}): resume latest, or move those step folders out of "
                         f"{out / CHECKPOINTS} first (to keep them)")
