"""Compile a rendered program to a CUBIN for one exact target with NVRTC (cuda.bindings.nvrtc).

Never PTX: PTX from a newer NVRTC does not load on an older driver, a CUBIN for the GPU's own
arch does. Options, and why:
  -std=c++17 -default-device   templates use constexpr/if constexpr; helpers need no __device__
  no --use_fast_math           softmax/LSE, RMSNorm and AdamW keep IEEE expf/logf/rsqrtf/division so
                               that results match the PyTorch reference; a kernel that wants an
                               intrinsic (__expf) says so in its own code
  -lineinfo                    line tables for profilers (no effect on the generated code)
  -Xptxas=-v                   registers/spills/smem per kernel into the log (see ptxas.py)
  --no-cache                   (NVRTC >= 12.9) NVRTC's own cache, in the driver's compute cache,
                               returns a CUBIN without the ptxas report; compile_cached caches instead
Headers: NVRTC >= 13.3 bundles the toolkit and CCCL headers (`--use-bundled-headers=<dir>` unpacks
them once into the cache); older NVRTC needs a CUDA toolkit's include folder.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

from .ptxas import parse_ptxas

BUNDLED_HEADERS_SINCE = (13, 3)
NO_CACHE_SINCE = (12, 9)
SYSTEM_CUDA_INCLUDE = Path("/usr/local/cuda/include")
_ERROR_RE = re.compile(r"^(?P<file>[^\s()]+)\((?P<line>\d+)\): (?P<kind>catastrophic error|error)[^:]*: (?P<msg>.*)$")


class NvrtcUnavailable(RuntimeError):
    pass


class CompileError(RuntimeError):
    def __init__(self, message: str, log: str = "", errors: list[dict] | None = None):
        super().__init__(message)
        self.log = log
        self.errors = errors or []


@dataclass
class CompileResult:
    cubin: bytes
    log: str
    options: list[str]
    nvrtc_version: tuple[int, int]
    arch: str
    seconds: float
    ptxas: dict[str, dict] = field(default_factory=dict)  # kernel -> registers, spills, smem, ...


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        raise NvrtcUnavailable(f"cuda-python is not importable ({e}): pip install 'cuda-python>=12.6'") from e
    return nvrtc


def _check(ret, call: str):
    """cuda.bindings returns (status, *values): raise on a bad status, else return the values."""
    err, *values = ret if isinstance(ret, tuple) else (ret,)
    if int(err) != 0:
        raise RuntimeError(f"{call} failed: {err.name}")
    return values[0] if len(values) == 1 else values


@lru_cache(maxsize=1)
def nvrtc_version() -> tuple[int, int]:
    nvrtc = _nvrtc()
    try:
        major, minor = _check(nvrtc.nvrtcVersion(), "nvrtcVersion")
    except RuntimeError as e:  # the library itself cannot be found or loaded
        raise NvrtcUnavailable(f"NVRTC cannot be loaded ({e}): pip install 'nvidia-cuda-nvrtc>=13.3' "
                               f"(or put a CUDA toolkit's libnvrtc on the library path)") from e
    return int(major), int(minor)


def supported_archs() -> list[int]:
    return [int(a) for a in _check(_nvrtc().nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs")]


def cache_root(env: Mapping[str, str] = os.environ) -> Path:
    """Where llmqgen keeps compiled CUBINs and NVRTC's unpacked headers."""
    return Path(env.get("LLMQGEN_CACHE_DIR") or Path.home() / ".cache" / "llmqgen")


def usable_cache_root(env: Mapping[str, str] = os.environ) -> Path:
    """`cache_root`, refused in one line when it is a file (else the first write under it blames
    whatever path it was writing: the build's --out, a header folder)."""
    root = cache_root(env)
    if root.exists() and not root.is_dir():
        raise ValueError(f"the cache folder {root} is a file: set LLMQGEN_CACHE_DIR to a folder")
    return root


def toolkit_include_dirs(env: Mapping[str, str] = os.environ) -> list[str]:
    """A CUDA toolkit's include folder (+ its cccl/ when present), for NVRTC without bundled headers.

    Tried in order: $CUDA_HOME, $CUDA_PATH, cuda.pathfinder (wheels, conda, system), /usr/local/cuda."""
    candidates = [Path(env[k]) / "include" for k in ("CUDA_HOME", "CUDA_PATH") if env.get(k)]
    try:
        import cuda.pathfinder as pathfinder
        found = pathfinder.locate_nvidia_header_directory("cudart")
        if found is not None:
            candidates.append(Path(found.abs_path))
    except ImportError:
        pass
    candidates.append(SYSTEM_CUDA_INCLUDE)
    def has_cccl(d: Path) -> bool:      # the templates include CCCL's <cuda/std/...>: a bare cudart folder lacks it
        return (d / "cuda" / "std" / "cstdint").is_file()
    for inc in candidates:
        if (inc / "cuda_fp8.h").is_file() and (has_cccl(inc) or has_cccl(inc / "cccl")):
            return [str(inc)] + ([str(inc / "cccl")] if has_cccl(inc / "cccl") else [])
    tried = ", ".join(str(c) for c in candidates)
    raise NvrtcUnavailable(f"NVRTC {'.'.join(map(str, nvrtc_version()))} has no bundled CUDA headers and no "
                           f"toolkit include folder with cuda_fp8.h and CCCL's cuda/std was found (tried {tried}): pip install "
                           f"'nvidia-cuda-nvrtc>=13.3', or set CUDA_HOME to a CUDA toolkit")


def header_options(version: tuple[int, int] | None = None, env: Mapping[str, str] = os.environ) -> list[str]:
    version = version or nvrtc_version()
    if version >= BUNDLED_HEADERS_SINCE:
        headers = cache_root(env) / "nvrtc-headers" / f"{version[0]}.{version[1]}"
        return [f"--use-bundled-headers={headers}"]
    return [f"-I{d}" for d in toolkit_include_dirs(env)]


def compile_options(arch: str) -> list[str]:
    no_cache = ["--no-cache"] if nvrtc_version() >= NO_CACHE_SINCE else []
    return [f"-arch={arch}", "-std=c++17", "-default-device", "-lineinfo", "-Xptxas=-v", *no_cache,
            *header_options()]


def _log(nvrtc, prog) -> str:
    size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
    buf = b" " * size
    _check(nvrtc.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
    return buf.rstrip(b"\0").decode(errors="replace")


def explain_errors(log: str, source: str, source_map: Sequence | None) -> list[dict]:
    """Errors of an NVRTC log, each with its template origin and the rendered line."""
    lines = source.split("\n")
    errors = []
    for raw in log.splitlines():
        m = _ERROR_RE.match(raw.strip())
        if not m:
            continue
        no = int(m.group("line"))
        origin = source_map[no - 1] if source_map and 1 <= no <= len(source_map) else None
        errors.append({"line": no, "kind": m.group("kind"), "message": m.group("msg"),
                       "origin": str(origin) if origin else f"{m.group('file')}:{no}",
                       "text": lines[no - 1].strip() if 1 <= no <= len(lines) else ""})
    return errors


def _compile_error(name: str, arch: str, log: str, source: str, source_map) -> CompileError:
    errors = explain_errors(log, source, source_map)
    head = f"NVRTC {'.'.join(map(str, nvrtc_version()))} failed to compile {name} for {arch}"
    if not errors:
        return CompileError(f"{head}:\n{log.strip()}", log, errors)
    body = "\n".join(f"  {e['origin']}: {e['kind']}: {e['message']}\n"
                     f"      {name}:{e['line']} | {e['text']}" for e in errors)
    return CompileError(f"{head} ({len(errors)} error{'s' if len(errors) > 1 else ''}):\n{body}", log, errors)


def check_target(arch: str) -> None:
    """Raises CompileError when this NVRTC cannot compile for `arch` (e.g. "sm_90a")."""
    base = int(re.sub(r"\D", "", arch.split("_", 1)[-1]) or 0)
    if base not in supported_archs():
        raise CompileError(f"NVRTC {'.'.join(map(str, nvrtc_version()))} cannot target {arch} (it supports "
                           f"sm_{supported_archs()}): install a newer nvidia-cuda-nvrtc")


def compile_program(source: str, name: str, arch: str, source_map: Sequence | None = None) -> CompileResult:
    """Compile `source` (named `name` in messages) to a CUBIN for `arch` (e.g. "sm_90a")."""
    nvrtc = _nvrtc()
    check_target(arch)
    options = compile_options(arch)
    prog = _check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []), "nvrtcCreateProgram")
    try:
        t0 = time.perf_counter()
        status = nvrtc.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options])[0]
        seconds = time.perf_counter() - t0
        log = _log(nvrtc, prog)
        if int(status) != 0:
            raise _compile_error(name, arch, log, source, source_map)
        size = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        if size == 0:
            raise CompileError(f"NVRTC produced no CUBIN for {arch} (a virtual arch gives PTX only): "
                               f"target a real sm_XY")
        cubin = b" " * size
        _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
    finally:
        _check(nvrtc.nvrtcDestroyProgram(prog), "nvrtcDestroyProgram")
    return CompileResult(cubin=cubin, log=log, options=options, nvrtc_version=nvrtc_version(), arch=arch,
                         seconds=seconds, ptxas=parse_ptxas(log))
