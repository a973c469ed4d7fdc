"""Checks of command-line numbers shared by the commands of every layer (llmqgen/cli.py, checkpoint/cli.py):
a leaf module, importing click only."""
from __future__ import annotations

import math
from typing import Callable

import click


def finite_number(above: float, *, inclusive: bool, what: str) -> Callable:
    """A click callback accepting a finite float > `above` (>= with `inclusive`); anything else, NaN and inf
    included (click's FloatRange lets those through), is a BadParameter "<value> is not <what>"."""
    def check(ctx, param, value: float) -> float:
        if not (math.isfinite(value) and (value >= above if inclusive else value > above)):
            raise click.BadParameter(f"{value} is not {what}", param=param)
        return value
    return check
