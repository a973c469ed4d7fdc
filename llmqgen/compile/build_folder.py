"""Loading a build folder: the runtime's only input (codegen/folder.py says what each file holds).

`open_build(plan, arch)` tries to load build/<uri>/; when it is missing or incomplete it takes the folder's
file lock, looks again (another process may have built it meanwhile), builds it and loads it. With
LLMQGEN_NO_COMPILE=1 (machines that must not render or compile, e.g. a cluster's compute nodes) a missing
build is an error naming the `llmqgen build` command that makes it. `load` checks a folder: the manifest's
format, every file it lists present and unchanged, and the plan inside equal to the plan asked for.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from pydantic import ValidationError

from ..codegen.folder import CUBIN, MANIFEST, RUNTIME_FILES, SCHEMA
from ..codegen.kernel import Kernel, kernel_from_json
from ..codegen.uri import plan_uri
from ..plan.schema import MemRow, Plan
from .cache import BuildResult, build
from .nvrtc import check_target, nvrtc_version

NO_COMPILE = "LLMQGEN_NO_COMPILE"
LOCK = ".lock"


class BuildFolderError(ValueError):
    """A build folder the runtime cannot use; the message (one line) says why and what to do."""


@dataclass(frozen=True)
class BuildFolder:
    path: Path
    plan: Plan
    arch: str                       # the target the CUBIN was compiled for
    rows: dict[str, MemRow]         # the packed memory table by row name, device rows at their arena offsets
    shard_elems: dict[str, int]     # elements of one GPU's shard of each parameter (memory.shard_elems)
    kernels: dict[str, Kernel]      # by name, in kernels.json order
    schedule: dict                  # schedule.json
    cubin: bytes | None             # None when loaded with compiled=False

    def by_role(self, role: str) -> list[Kernel]:
        """The kernels the runtime launches for `role` (Kernel.role), in table order; [] if none."""
        return [k for k in self.kernels.values() if k.role == role]

    def kernel(self, role: str) -> Kernel:
        """The one kernel of `role`."""
        found = self.by_role(role)
        if len(found) != 1:
            raise BuildFolderError(f"{self.path}: kernels.json has {len(found)} kernels of role {role!r}, the "
                                   f"runtime needs one: rebuild it with this llmqgen (`llmqgen build`)")
        return found[0]


def folder_of(plan: Plan, arch: str, out_root: str | Path = "build") -> Path:
    return Path(out_root) / plan_uri(plan, arch, nvrtc_version())


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BuildFolderError(f"cannot read {what} {path}: {e}") from None


def load(path: str | Path, plan: Plan | None = None, compiled: bool = True) -> BuildFolder:
    """The folder at `path`, checked; `plan`: the plan it must hold (None: any); `compiled`: the CUBIN
    must be there (False: a rendered folder is enough, e.g. to inspect or test the binding)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise BuildFolderError(f"{path} is not a complete build ({MANIFEST} is missing)")
    manifest = _read_json(path / MANIFEST, "the manifest")
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        got = manifest.get("schema") if isinstance(manifest, dict) else None
        raise BuildFolderError(f"{path} is a build of format {got}, this llmqgen reads format {SCHEMA}: rebuild it")
    files = manifest.get("files", {})
    for name in RUNTIME_FILES + ((CUBIN,) if compiled else ()):
        if name not in files:
            raise BuildFolderError(f"{path} is incomplete: its manifest lists no {name}"
                                   + (" (rendered, not compiled)" if name == CUBIN else ""))
        if not (path / name).is_file():
            raise BuildFolderError(f"{path} is incomplete: {name} is missing")
        if hashlib.sha256((path / name).read_bytes()).hexdigest() != files[name]:
            raise BuildFolderError(f"{path}/{name} differs from the one built (changed since, or a build "
                                   f"was interrupted): rebuild it")
    try:
        inside = Plan.from_json((path / "plan.json").read_text())
    except ValidationError as e:
        raise BuildFolderError(f"{path}/plan.json is not a plan this llmqgen reads "
                               f"({e.errors()[0]['msg']}): rebuild it") from None
    if plan is not None and inside.inputs() != plan.inputs():
        raise BuildFolderError(f"{path} holds plan {inside.name} (inputs {inside.inputs_hash()[:12]}), not plan "
                               f"{plan.name} (inputs {plan.inputs_hash()[:12]}): build this plan into its own folder")
    layout = _read_json(path / "layout.json", "the memory layout")
    if layout.get("schema") != SCHEMA:
        raise BuildFolderError(f"{path}/layout.json is of format {layout.get('schema')}, this llmqgen reads "
                               f"{SCHEMA}: rebuild it")
    rows = [MemRow.model_validate(r) for r in layout["rows"]]
    return BuildFolder(
        path=path, plan=inside, arch=manifest.get("arch", ""), rows={r.name: r for r in rows},
        shard_elems=layout["shard_elems"],
        kernels={d["name"]: kernel_from_json(d) for d in _read_json(path / "kernels.json", "the kernel table")},
        schedule=_read_json(path / "schedule.json", "the schedule"),
        cubin=(path / CUBIN).read_bytes() if compiled else None)


def _lock(folder: Path) -> FileLock:
    """The folder's file lock (inside it): two processes never write one folder at once."""
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(folder / LOCK)


def build_locked(plan: Plan, arch: str | None = None, out_root: str | Path = "build") -> BuildResult:
    """`compile.cache.build` under the folder's file lock (`llmqgen build`); arch: the plan's GPU's by default."""
    arch = arch or plan.inventory.gpu.arch
    check_target(arch)          # before the lock makes the folder: none is left for a target NVRTC lacks
    with _lock(folder_of(plan, arch, out_root)):
        return build(plan, arch, out_root)


def open_build(plan: Plan, arch: str, out_root: str | Path = "build") -> BuildFolder:
    """build/<uri>/ of `plan` for `arch`: loaded, or built (under its lock) and loaded."""
    folder = folder_of(plan, arch, out_root)
    try:
        return load(folder, plan)
    except BuildFolderError as e:
        if os.environ.get(NO_COMPILE, "") not in ("", "0"):
            raise BuildFolderError(f"{e}; {NO_COMPILE} is set, so it is not built here: run `llmqgen build "
                                   f"--plan PLAN.json --arch {arch} --out {out_root}` for plan {plan.name} "
                                   f"first (with this llmqgen and NVRTC)") from None
    check_target(arch)
    with _lock(folder):
        try:
            return load(folder, plan)           # another process built it while we waited
        except BuildFolderError:
            build(plan, arch, out_root)
    return load(folder, plan)
