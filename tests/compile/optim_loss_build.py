"""Local render + NVRTC compile of single kernel families, for tests, until codegen/render.py and
compile/nvrtc.py land (then the tests should switch to those and this file goes away).

Renders `_common.cu.j2` + the given family partials with a context dict built here; compiles to
CUBIN with NVRTC's bundled headers (NVRTC >= 13.3) or, failing that, $CUDA_HOME/include.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import jinja2

import llmqgen
from llmqgen.compile.nvrtc import compile_program
from llmqgen.codegen.uri import TEMPLATES_DIR

TEMPLATES = TEMPLATES_DIR

_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def tiny_ctx(**overrides) -> dict:
    """The base context of a tiny model (the keys the framework's build_context provides)."""
    ctx = dict(C=256, F=512, L=2, HQ=4, HKV=2, HD=64, V=1024, EPS=1e-6, ROPE_THETA=1e6, ROPE_SCALING=None,
               QK_NORM=False, QKV_BIAS=True, TIED=True, B=2, T=128, FP8=True, FP8_HEAD=False, GRAD_DTYPE="e4m3",
               MASTER_FP32=False, ADAM_M_FP32=False, ADAM_V_FP32=False, LM_HEAD_CHUNKS=2, ATTN_BWD_CHUNKS=1,
               ARCH="sm_90", GPU_ARCH="sm_90", SM_COUNT=132, MAX_SMEM=227 * 1024,
               RECOMPUTE=dict(swiglu=False, norm=False, ffn=False, qkv=False, attention=False, block=False))
    ctx.update(overrides)
    ctx.update(QDIM=ctx["HQ"] * ctx["HD"], KVDIM=ctx["HKV"] * ctx["HD"], BT=ctx["B"] * ctx["T"])
    ctx["QKV"] = ctx["QDIM"] + 2 * ctx["KVDIM"]
    return ctx


def family(name: str):
    return importlib.import_module(f"llmqgen.codegen.families.{name}")


def render(names: list[str], ctx: dict) -> tuple[str, list]:
    """program source and Kernel rows of the given families."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    full, kernels, parts = dict(ctx), [], ['{% include "_common.cu.j2" %}']
    for n in names:
        mod = family(n)
        if hasattr(mod, "context"):
            full.update(mod.context(ctx))
        kernels += mod.kernels(ctx)
        parts.append(f'{{% include "{mod.TEMPLATE}" %}}')
    return env.from_string("\n".join(parts)).render(**full), kernels


def compile_cubin(source: str, arch: str) -> tuple[bytes, str]:
    """CUBIN and the compile log (ptxas -v), through the project's compiler."""
    r = compile_program(source, "program.cu", arch)
    return r.cubin, r.log


def spills(log: str) -> list[tuple[int, int]]:
    """(spill stores, spill loads) bytes for every function in a ptxas -v log."""
    return [(int(a), int(b)) for a, b in _SPILL_RE.findall(log)]


_GLOBAL_RE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)')


def signatures(source: str) -> dict[str, tuple[tuple[str, str], ...]]:
    """{kernel: ((arg name, C type), ...)} of the extern "C" kernels in `source`, types normalised
    like Kernel.args (bf16 spelled __nv_bfloat16, no __restrict__)."""
    out = {}
    for name, params in _GLOBAL_RE.findall(source):
        args = []
        for p in params.split(","):
            p = " ".join(p.replace("__restrict__", "").split())
            ctype, _, arg = p.rpartition(" ")
            if arg.startswith("*"):
                ctype, arg = ctype + "*", arg[1:]
            ctype = re.sub(r"\bbf16\b", "__nv_bfloat16", ctype.replace(" *", "*"))
            args.append((arg, ctype))
        out[name] = tuple(args)
    return out


def check_family(names: list[str], ctx: dict, archs=("sm_89", "sm_90", "sm_120")) -> list:
    """Render, check every Kernel row against its CUDA signature, compile for each arch without spills."""
    source, kernels = render(names, ctx)
    sigs = signatures(source)
    for k in kernels:
        assert k.name in sigs, f"{k.name} has a Kernel row but no extern \"C\" kernel in the source"
        assert sigs[k.name] == k.args, f"{k.name}: source {sigs[k.name]} != row {k.args}"
        assert k.name.startswith("llmq_") and k.block[0] % 32 == 0 and min(k.grid) >= 1
    assert set(sigs) == {k.name for k in kernels}, "every kernel in the source needs a Kernel row"
    for arch in archs:
        _, log = compile_cubin(source, arch)
        found = spills(log)
        assert len(found) == len(kernels), log
        assert all(s == (0, 0) for s in found), f"register spills for {arch}:\n{log}"
    return kernels
