"""Render and NVRTC-compile the flash-attention family on its own (common helpers + _flash_attention.cu.j2),
with a ctx built here, until the codegen/compile framework is wired. Used by tests/compile and tests/gpu."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import jinja2

from llmqgen.codegen.families import flash_attention as fa

TEMPLATES = Path(__file__).resolve().parents[1] / "llmqgen" / "templates"


def make_ctx(**over) -> dict:
    """The ctx keys the family reads, for a small GQA model; `over` replaces any of them."""
    ctx = dict(HQ=4, HKV=2, HD=64, B=2, T=128, ATTN_BWD_CHUNKS=1, ARCH="sm_90", SM_COUNT=132,
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


_STDINT_SHIM = """#pragma once
#include <cuda/std/cstdint>
using cuda::std::int8_t; using cuda::std::int16_t; using cuda::std::int32_t; using cuda::std::int64_t;
using cuda::std::uint8_t; using cuda::std::uint16_t; using cuda::std::uint32_t; using cuda::std::uint64_t;
"""


def _check(res, prog=None):
    from cuda.bindings import nvrtc
    if res[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        log = _log(prog) if prog is not None else ""
        raise RuntimeError(f"NVRTC failed: {res[0]}\n{log}")
    return res[1:]


def _log(prog) -> str:
    from cuda.bindings import nvrtc
    _, n = nvrtc.nvrtcGetProgramLogSize(prog)
    buf = b" " * n
    nvrtc.nvrtcGetProgramLog(prog, buf)
    return buf.decode(errors="replace")


def compile_cubin(src: str, arch: str) -> tuple[bytes, str]:
    """NVRTC -> (cubin, ptxas log). Headers: NVRTC's bundled ones (>= 13.3), else $CUDA_HOME/include."""
    from cuda.bindings import nvrtc
    (prog,) = _check(nvrtc.nvrtcCreateProgram(src.encode(), b"program.cu", 0, [], []))
    with tempfile.TemporaryDirectory() as hdr:
        opts = [f"-arch={arch}", "-std=c++17", "-Xptxas=-v", "-lineinfo"]
        _, major, minor = nvrtc.nvrtcVersion()
        if (major, minor) >= (13, 3):
            # The bundled headers have neither libc's <stdint.h> nor <math.h>'s INFINITY (used by _common).
            os.makedirs(f"{hdr}/shim")
            Path(f"{hdr}/shim/stdint.h").write_text(_STDINT_SHIM)
            opts += [f"--use-bundled-headers={hdr}", f"-I{hdr}/shim", "-DINFINITY=__int_as_float(0x7f800000)"]
        else:
            opts.append(f"-I{os.environ.get('CUDA_HOME', '/usr/local/cuda')}/include")
        _check(nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts]), prog)
    log = _log(prog)
    _, size = nvrtc.nvrtcGetCUBINSize(prog)
    cubin = b" " * size
    nvrtc.nvrtcGetCUBIN(prog, cubin)
    return cubin, log


def spills(log: str) -> list[str]:
    """Lines of a ptxas -v log reporting non-zero spill stores or loads."""
    return [ln for ln in log.splitlines() if re.search(r"\b[1-9]\d* bytes spill (stores|loads)", ln)]
