"""Render and NVRTC-compile the flash-attention family on its own (common helpers + _flash_attention.cu.j2),
with a ctx built here, until the codegen/compile framework is wired. Used by tests/compile and tests/gpu."""
from __future__ import annotations

import re
from pathlib import Path

import jinja2

from llmqgen.compile.nvrtc import compile_program

from llmqgen.codegen.families import flash_attention as fa
from llmqgen.codegen.uri import TEMPLATES_DIR

TEMPLATES = TEMPLATES_DIR


def make_ctx(**over) -> dict:
    """The ctx keys the family reads, for a small GQA model; `over` replaces any of them."""
    ctx = dict(HQ=4, HKV=2, HD=64, B=2, T=128, ATTN_BWD_CHUNKS=1, ARCH="sm_90", GPU_ARCH="sm_90", SM_COUNT=132,
               MAX_SMEM=227 * 1024)
    ctx.update(over)
    ctx.update(QDIM=ctx["HQ"] * ctx["HD"], KVDIM=ctx["HKV"] * ctx["HD"], BT=ctx["B"] * ctx["T"])
    ctx["QKV"] = ctx["QDIM"] + 2 * ctx["KVDIM"]
    return ctx


def render(ctx: dict) -> tuple[str, list]:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    src = env.from_string(f'{{% include "_common.cu.j2" %}}\n{{% include "{fa.TEMPLATE}" %}}\n')
    return src.render(**ctx, **fa.context(ctx)), fa.kernels(ctx)


def compile_cubin(src: str, arch: str) -> tuple[bytes, str]:
    """NVRTC through the project's compiler -> (cubin, ptxas log)."""
    r = compile_program(src, "program.cu", arch)
    return r.cubin, r.log


def spills(log: str) -> list[str]:
    """Lines of a ptxas -v log reporting non-zero spill stores or loads."""
    return [ln for ln in log.splitlines() if re.search(r"\b[1-9]\d* bytes spill (stores|loads)", ln)]
