"""Content-addressed CUBIN cache and `build`: plan -> build/<uri>/ with a compiled program.cubin.

`build` writes the folder (codegen/folder.py: program, plan, layout, kernels, schedule), compiles through
the cache, puts the CUBIN beside the source and writes the manifest last.

An entry is <cache>/cubin/<key[:2]>/<key>/{program.cubin, meta.json}, key = sha256 of the source,
the NVRTC options, the arch and the NVRTC version. meta.json is written last (after the CUBIN), so
an entry with meta.json is complete. Compile + write run under a file lock per key: two processes
building the same program compile it once, the second one finds the entry.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from filelock import FileLock

from ..codegen.folder import CUBIN, write_build, write_manifest
from ..codegen.render import render, write_if_different
from ..plan.schema import Plan
from .nvrtc import CompileError, compile_options, compile_program, nvrtc_version, usable_cache_root
from .ptxas import spilling

PROGRAM_NAME = "program.cu"


@dataclass(frozen=True)
class CacheEntry:
    cubin_path: Path
    meta: dict
    hit: bool


@dataclass(frozen=True)
class BuildResult:
    path: Path              # build/<uri>
    cubin_path: Path        # build/<uri>/program.cubin
    cubin_bytes: int
    compile_seconds: float  # of the compile that made the CUBIN (earlier, on a cache hit)
    cache_hit: bool
    spills: list[str]       # kernels that spill registers


def cache_key(source: str, options: Sequence[str], arch: str, version: tuple[int, int]) -> str:
    h = hashlib.sha256()
    for part in (source, "\0".join(options), arch, f"{version[0]}.{version[1]}"):
        h.update(part.encode() + b"\0\1")
    return h.hexdigest()


def compile_cached(source: str, arch: str, source_map=None, root: Path | None = None) -> CacheEntry:
    """The CUBIN of `source` for `arch`, compiled at most once per cache."""
    root = Path(root or usable_cache_root())
    key = cache_key(source, compile_options(arch), arch, nvrtc_version())
    entry = root / "cubin" / key[:2] / key
    cubin, meta_path = entry / "program.cubin", entry / "meta.json"
    if meta_path.is_file():
        return CacheEntry(cubin, json.loads(meta_path.read_text()), hit=True)
    entry.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        if meta_path.is_file():  # another process compiled it while we waited
            return CacheEntry(cubin, json.loads(meta_path.read_text()), hit=True)
        result = compile_program(source, PROGRAM_NAME, arch, source_map)
        meta = {"key": key, "arch": arch, "nvrtc_version": list(result.nvrtc_version),
                "options": result.options, "compile_seconds": round(result.seconds, 3),
                "cubin_bytes": len(result.cubin), "cubin_sha256": hashlib.sha256(result.cubin).hexdigest(),
                "ptxas": result.ptxas, "log": result.log}
        write_if_different(cubin, result.cubin)
        write_if_different(meta_path, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return CacheEntry(cubin, meta, hit=False)


def build(plan: Plan, arch: str | None = None, out_root: str | Path = "build") -> BuildResult:
    """Render the plan into build/<uri>/, compile through the cache, put the CUBIN beside the source and
    write the manifest (build.json) last. Not locked: compile/build_folder.py's `build_locked` is."""
    arch = arch or plan.inventory.gpu.arch
    rendered = render(plan, arch)
    nvrtc = nvrtc_version()
    out = write_build(plan, arch, nvrtc, out_root, rendered=rendered)
    try:
        entry = compile_cached(rendered.source, arch, rendered.source_map)
    except CompileError as e:
        raise CompileError(f"{e}\n  rendered program: {out / PROGRAM_NAME}", e.log, e.errors) from None
    cubin = entry.cubin_path.read_bytes()
    write_if_different(out / CUBIN, cubin)
    write_if_different(out / "meta.json", json.dumps(entry.meta, indent=2, sort_keys=True) + "\n")
    write_manifest(out, arch, nvrtc, compiled=True)
    return BuildResult(path=out, cubin_path=out / CUBIN, cubin_bytes=len(cubin),
                       compile_seconds=entry.meta["compile_seconds"], cache_hit=entry.hit,
                       spills=spilling(entry.meta["ptxas"]))
