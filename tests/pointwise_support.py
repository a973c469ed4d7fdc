"""Build the pointwise kernel families (embedding, rmsnorm, rope, swiglu, quantize) alone, through the
framework's own pieces: harness.small_plan -> build_context -> the families' context()/kernels() ->
program.cu.j2 with only these partials (the real Jinja env) -> check_kernels -> compile_program.
Used by tests/compile, tests/unit and tests/gpu."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))
from harness import small_plan  # noqa: E402  (the project's tiny plan; torch is imported lazily there)

from llmqgen.codegen import render as R  # noqa: E402
from llmqgen.codegen.context import build_context  # noqa: E402

from llmqgen.codegen.families import FAMILIES as _ORDER  # noqa: E402

FAMILIES = tuple(f for f in _ORDER if f in ("embedding", "rmsnorm", "rope", "quantize", "swiglu"))  # in their order

def family(name: str):
    return importlib.import_module(f"llmqgen.codegen.families.{name}")


def plan_ctx(arch: str = "qwen2", fp8: bool = True, target: str = "sm_90", **over) -> dict:
    """build_context of harness.small_plan(arch, fp8, **over) for `target` (gpu chosen to match it)."""
    gpu = {"sm_89": "4090", "sm_90": "h200", "sm_120": "5090"}[target]
    return build_context(small_plan(arch, fp8, gpu=gpu, **over), target)


def render(ctx: dict, names=FAMILIES):
    """(source, kernels, source_map) of the enabled families among `names`, validated by check_kernels."""
    ctx = dict(ctx)
    mods = [family(n) for n in names]
    mods = [m for m in mods if getattr(m, "enabled", lambda c: True)(ctx)]
    for m in mods:
        if hasattr(m, "context"):
            R._merge(ctx, m.context(ctx), m.__name__)
    kernels = [k for m in mods for k in m.kernels(ctx)]
    ctx.update(COMMON_TEMPLATE=R.COMMON_TEMPLATE, FAMILY_TEMPLATES=[m.TEMPLATE for m in mods])
    source, source_map = R.render_template(R.PROGRAM_TEMPLATE, ctx)
    R.check_kernels(kernels, source, ctx["MAX_SMEM"])
    return source, kernels, source_map


def compile_ctx(ctx: dict, names=FAMILIES):
    """(CompileResult, kernels) for ctx's target."""
    from llmqgen.compile.nvrtc import compile_program
    source, kernels, source_map = render(ctx, names)
    return compile_program(source, "program.cu", ctx["ARCH"], source_map), kernels
