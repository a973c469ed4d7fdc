"""Learning-rate schedules: linear warmup, then cosine, linear, warmup-stable-decay (WSD) or constant.

`step` is the 0-based index of the optimizer step about to run. Warmup rises linearly from
peak/warmup_steps (step 0) to peak (step warmup_steps-1), so no step trains at LR 0. The decay
phases run on a continuous position p in [0, 1] and reach final_fraction * peak exactly at
`total_steps`; later steps keep that value (a run extended past its schedule does not restart it).
WSD holds the peak after warmup and decays linearly over the last cooldown_fraction of all steps
(never starting inside the warmup).
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ScheduleKind = Literal["cosine", "linear", "wsd", "constant"]


class LRSchedule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    peak: float = Field(gt=0)
    warmup_steps: int = Field(ge=0)
    total_steps: int = Field(ge=1)
    kind: ScheduleKind = "cosine"
    final_fraction: float = Field(default=0.1, ge=0, le=1)     # LR at total_steps, as a share of peak
    cooldown_fraction: float = Field(default=0.2, ge=0, le=1)  # WSD: share of total_steps spent decaying

    @model_validator(mode="after")
    def _warmup_fits(self):
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} exceeds total_steps {self.total_steps}: "
                             f"shorten the warmup or train for more steps")
        return self

    @property
    def final(self) -> float:
        return self.final_fraction * self.peak

    @property
    def decay_start(self) -> float:
        """The step at which the LR starts to fall below the peak (total_steps for `constant`)."""
        if self.kind == "constant":
            return float(self.total_steps)
        if self.kind == "wsd":
            return max(float(self.warmup_steps), self.total_steps * (1.0 - self.cooldown_fraction))
        return float(self.warmup_steps)

    def lr(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.peak
        start = self.decay_start
        span = self.total_steps - start
        if span <= 0:   # no steps left to decay over (warmup == total, or WSD without cooldown)
            p = 1.0 if step >= start else 0.0
        else:
            p = min(1.0, max(0.0, (step - start) / span))
        if self.kind == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * p))
        else:  # linear, and WSD's cooldown
            shape = 1.0 - p
        return self.final + (self.peak - self.final) * shape
