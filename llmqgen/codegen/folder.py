"""The files of a build folder, build/<uri>/, as a render writes them: everything the runtime loads.

    program.cu     the rendered program (for people and NVRTC; the runtime loads the CUBIN)
    plan.json      the plan it was rendered from
    layout.json    the packed memory table: every row (bytes, count, place, dtype, shape, sharded, arena
                   offset) and each parameter's shard size (elements), as the runtime allocates them
    kernels.json   the launch rows of the program's kernels
    schedule.json  the operations of init, a micro-step, evaluation and the optimizer step
    program.cubin  the compiled program (compile/cache.py adds it)
    meta.json      the compile's record: NVRTC options, seconds, the ptxas report (compile/cache.py adds it)
    build.json     the manifest, written last (compile/cache.py, after the CUBIN): format version, arch,
                   NVRTC version and the sha256 of each file the runtime loads; a folder without it, or
                   whose files differ from it, is incomplete
    gemm_algos.json  each GEMM's cuBLASLt algorithm, chosen by timing at the first run (runtime/gemm_search.py)

compile/build_folder.py reads the folder back and checks it; the runtime computes none of it again.
"""
from __future__ import annotations

import hashlib
import json
from math import prod
from pathlib import Path

from ..plan.lifetimes import packed_table
from ..plan.memory import param_tensors, shard_elems
from ..plan.schema import Plan
from . import uri
from .render import Rendered, render, write_if_different
from ..plan.schedule import build_schedule, check_schedule

SCHEMA = 1                  # of build.json and layout.json: a loader refuses folders of another
MANIFEST = "build.json"
RUNTIME_FILES = ("plan.json", "layout.json", "kernels.json", "schedule.json")
CUBIN = "program.cubin"


def layout_json(plan: Plan) -> str:
    """The packed memory table and the parameters' shard sizes, one row a line."""
    rows = [json.dumps(r.model_dump(mode="json", exclude={"live"}), sort_keys=True) for r in packed_table(plan)]
    shards = {n: shard_elems(prod(shape), plan.num_gpus) for n, shape, _, _ in param_tensors(plan)}
    return ('{"schema": %d,\n "rows": [\n  %s\n ],\n "shard_elems": %s}\n'
            % (SCHEMA, ",\n  ".join(rows), json.dumps(shards, sort_keys=True)))


def folder_files(plan: Plan, rendered: Rendered) -> dict[str, str]:
    """Every file of the folder but the CUBIN and the manifest; the schedule checked against the kernels."""
    schedule = build_schedule(plan)
    check_schedule(schedule, rendered.kernels)
    return {"program.cu": rendered.source, "plan.json": plan.to_json(),
            "kernels.json": json.dumps([k.to_json() for k in rendered.kernels], indent=2) + "\n",
            "schedule.json": json.dumps(schedule, indent=1) + "\n", "layout.json": layout_json(plan)}


def write_files(folder: Path, files: dict[str, str | bytes]) -> None:
    """Each file written only when its content changed (equal files keep their mtime)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        write_if_different(folder / name, data)


def write_manifest(folder: Path, arch: str, nvrtc: tuple[int, int], compiled: bool) -> None:
    """build.json over the files already in `folder`: the runtime's files, and the CUBIN if `compiled`."""
    names = RUNTIME_FILES + ((CUBIN,) if compiled else ())
    manifest = {"schema": SCHEMA, "arch": arch, "nvrtc": list(nvrtc),
                "files": {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}}
    write_if_different(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def write_build(plan: Plan, arch: str, nvrtc: tuple[int, int], out_root: str | Path = "build",
                rendered: Rendered | None = None) -> Path:
    """Render into build/<uri>/ (every file but the CUBIN and the manifest); returns the folder.

    `nvrtc`: the (major, minor) version that will compile it (part of the URI); `rendered` reuses a render."""
    folder = Path(out_root) / uri.plan_uri(plan, arch, nvrtc)
    write_files(folder, folder_files(plan, rendered or render(plan, arch)))
    return folder
