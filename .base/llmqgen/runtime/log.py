"""The training log: one JSON line per optimizer step in `log.jsonl`, one readable line on the terminal.

Throughput (tokens/s in total and per GPU, SOL and MFU per GPU) is llmqgen.metrics.Throughput, the
report `plan` and `bench` print too. Under a launcher only rank 0 logs (runtime/run.py passes no file
and a null stream to the others).

`StepRecord.step` is the 0-based index of the step just finished (the index `LRSchedule.lr` got);
the terminal shows steps completed, `step+1/total`. The file is opened for appending, so a resumed
run continues the same log, and every line is flushed, so a crash loses at most the step in flight.
A step skipped for a non-finite loss or gradient norm is logged with `skipped: true` (the next record
has the same step index). Events that are not steps (a resume that changed the run's settings, a stop)
are lines with an "event" key; `read_log` leaves them out unless asked.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..metrics import Throughput, format_throughput

GiB = 1 << 30
ETA_WINDOW = 20      # steps averaged for the ETA: recent enough to follow a changed pace
BAR_WIDTH = 20


@dataclass(frozen=True)
class StepRecord:
    step: int
    loss: float
    grad_norm: float
    lr: float
    step_ms: float
    tokens_per_s: float             # total, all GPUs
    sol_pct: float                  # per GPU (llmqgen.metrics.Throughput)
    mfu_pct: float                  # per GPU
    gpu_mem_bytes: int
    eval_loss: float | None = None
    skipped: bool = False           # loss or gradient norm not finite: no update was made
    num_gpus: int = 1
    tokens_per_s_per_gpu: float | None = None   # tokens_per_s / num_gpus (None in logs before it existed)


def step_rates(report: Throughput) -> dict:
    """The StepRecord fields of a step's throughput report (llmqgen.metrics.plan_throughput)."""
    return {"tokens_per_s": report.tokens_per_s, "sol_pct": report.sol_pct, "mfu_pct": report.mfu_pct,
            "num_gpus": report.num_gpus, "tokens_per_s_per_gpu": report.tokens_per_s_per_gpu}


def format_step(rec: StepRecord, total_steps: int) -> str:
    parts = [f"step {rec.step + 1}/{total_steps}", f"loss {rec.loss:.4f}"]
    if rec.eval_loss is not None:
        parts.append(f"eval {rec.eval_loss:.4f}")
    parts += [f"norm {rec.grad_norm:.2f}", f"lr {rec.lr:.1e}"]
    if rec.skipped:
        parts.append("SKIPPED (not finite: no update)")
    parts += [f"{rec.step_ms:.0f} ms",
              format_throughput(rec.tokens_per_s, rec.num_gpus, rec.sol_pct, rec.mfu_pct),
              f"{rec.gpu_mem_bytes / GiB:.1f} GiB"]
    return " | ".join(parts)


def format_duration(seconds: float) -> str:
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_suffix(done: int, total_steps: int, recent_step_ms: list[float]) -> str:
    frac = min(1.0, done / total_steps)
    filled = int(frac * BAR_WIDTH)
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    eta_s = max(0, total_steps - done) * sum(recent_step_ms) / len(recent_step_ms) / 1e3
    return f"[{bar}] {100 * frac:.0f}% ETA {format_duration(eta_s)}"


class StepLogger:
    """Writes each step to `path` (None: terminal only) and to `stream`; a TTY also gets a progress bar."""

    def __init__(self, path: Path | None, total_steps: int, stream: TextIO = sys.stderr):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = total_steps
        self.stream = stream
        self._tty = bool(getattr(stream, "isatty", lambda: False)())
        self._recent: deque[float] = deque(maxlen=ETA_WINDOW)
        self._file: TextIO | None = None
        self._closed = False
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            _drop_torn_tail(path)
            self._file = path.open("a", encoding="utf-8")

    def log(self, rec: StepRecord) -> None:
        if self._closed:
            raise RuntimeError("StepLogger.log after close(): create a new logger for a new run")
        if self._file is not None:
            self._file.write(json.dumps(dataclasses.asdict(rec)) + "\n")
            self._file.flush()
        self._recent.append(rec.step_ms)
        line = format_step(rec, self.total_steps)
        if self._tty:
            line += "  " + progress_suffix(rec.step + 1, self.total_steps, list(self._recent))
        print(line, file=self.stream, flush=True)

    def event(self, kind: str, **fields) -> None:
        """A line that is not a step (e.g. "config_change" with the changes): written to the file only;
        the caller prints what the user should read."""
        if self._file is not None:
            self._file.write(json.dumps({"event": kind, **fields}) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._closed = True

    def __enter__(self) -> StepLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line left unfinished by a crash, so that appending a resumed run keeps lines whole."""
    if not path.exists():
        return
    with path.open("r+b") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def read_log(path: Path, events: bool = False) -> list[dict]:
    """The step records of a log.jsonl (with `events`, the event lines too). A torn last line (the
    process died mid-write) is skipped; a bad line anywhere else means the file is not a log and raises."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON line ({e}); is this a llmqgen log.jsonl?") from e
    return records if events else [r for r in records if "event" not in r]
