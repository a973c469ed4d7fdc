"""Scratch sizes that only the kernel families know (their grids decide them), for the memory table.

The planner asks here instead of re-deriving a family's grid, so the table and the kernels agree."""
from __future__ import annotations

from functools import lru_cache

from ..plan.schema import Plan
from .context import build_context
from . import families as family_names
from .families import load_families


@lru_cache(maxsize=256)
def _needs(key: str, families: tuple[str, ...]) -> dict[str, int]:
    plan = Plan.model_validate_json(key)
    ctx = build_context(plan, plan.inventory.gpu.arch)
    out: dict[str, int] = {}
    for fam in load_families(list(families)):
        if hasattr(fam, "enabled") and not fam.enabled(ctx):
            continue
        extra = fam.context(ctx) if hasattr(fam, "context") else {}
        for k in fam.kernels({**ctx, **extra}):
            for field in ("dw_scratch_bytes", "scratch_bytes", "delta_bytes"):
                if field in k.meta:
                    out[field] = max(out.get(field, 0), int(k.meta[field]))
    return out


def scratch_needs(plan: Plan) -> dict[str, int]:
    """Largest scratch each kind needs: dw_scratch_bytes (deterministic norm-weight partials),
    scratch_bytes (flash attention), delta_bytes (flash attention's rowsum(dO*O))."""
    # Only what shapes the kernels matters: not the memory choices, so candidates share the result.
    key = plan.model_copy(update={"estimate": None, "offload": type(plan.offload)(),
                                  "sharding": type(plan.sharding)(), "name": "scratch"})
    return _needs(key.model_dump_json(), tuple(family_names.FAMILIES))
