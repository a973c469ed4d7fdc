"""Builds a program of only the given kernel families for this GPU and loads it with the harness.

Until the whole-plan build (harness.build_program) compiles, this renders just the families under
test with the framework's context (build_context) and compiles them with tests/compile's local helper.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "compile"))

import optim_loss_build  # noqa: E402
from harness import KernelProgram, current_device, small_plan  # noqa: E402

from llmqgen.codegen.context import build_context  # noqa: E402


def family_program(families: list[str], **plan_overrides) -> tuple[KernelProgram, dict]:
    """(loaded program, render context) of a tiny plan's `families`, compiled for the current GPU."""
    plan = small_plan("qwen2", fp8=True, **plan_overrides)
    ctx = build_context(plan, plan.inventory.gpu.arch)
    source, kernels = optim_loss_build.render(families, ctx)
    cubin, _ = optim_loss_build.compile_cubin(source, current_device().arch)
    return KernelProgram(cubin, kernels), ctx
