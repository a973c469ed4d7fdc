"""Kernel families: one Python module + one partial template per family of generated kernels.

A family module defines
  TEMPLATE = "_<family>.cu.j2"                 # the partial, rendered with the plan's context
  def kernels(ctx: dict) -> list[Kernel]       # launch rows, every number computed in Python
  def context(ctx: dict) -> dict               # optional: extra template variables
  def enabled(ctx: dict) -> bool               # optional: False when the plan does not need it
The order of FAMILIES is the order of the partials in program.cu.
"""
from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES = [
    "embedding",
    "quantize",     # before rmsnorm and swiglu: their FP8 outputs use the quantize helpers
    "rmsnorm",
    "rope",
    "swiglu",
    "crossentropy",
    "adamw",
    "gradnorm",
    "shard",
    "flash_attention",
]


def load_families(names: list[str] | None = None) -> list[ModuleType]:
    """Import the family modules in order; a broken family is an error, never skipped."""
    modules = []
    for name in FAMILIES if names is None else names:
        mod = importlib.import_module(f"{__name__}.{name}")
        missing = [a for a in ("TEMPLATE", "kernels") if not hasattr(mod, a)]
        if missing:
            raise TypeError(f"kernel family {name!r} ({mod.__file__}) lacks {', '.join(missing)}: "
                            f"a family module defines TEMPLATE and kernels(ctx)")
        modules.append(mod)
    return modules
