"""The golden build: a tiny plan's build folder, checked in under tests/golden/, that CPU tests load as the
runtime does (tests/unit/test_runtime_binding.py) and keep up to date with the code
(tests/unit/test_build_folder.py). It holds what the runtime reads but the CUBIN (1 MB; the compile tests
compile this program's kernels): build.json, plan.json, layout.json, kernels.json, schedule.json.

The plan covers most of what the runtime binds: FP8, two GPUs with ZeRO-2 (reduce-scatters added into
gradient shards, all-gathers, the FP8 weight amaxes' max), an offloaded residual (copies on copy
streams), fp32 masters (the cast kernel), a qkv bias (its gradient GEMM) and flash attention's kernels.

Regenerate it after a change to the schedule, the memory table or the kernel table:

    PYTHONPATH=. python tests/golden_build.py
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))
from harness import small_plan  # noqa: E402

from llmqgen.codegen.folder import folder_files, write_files, write_manifest  # noqa: E402
from llmqgen.codegen.render import render  # noqa: E402
from llmqgen.plan.schema import Offload, Plan, Sharding  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny-qwen2-fp8-zero2"
ARCH = "sm_90"
NVRTC = (13, 0)     # named in the manifest only (and in a build's URI): the golden folder is not compiled
REGENERATE = "PYTHONPATH=. python tests/golden_build.py"


def golden_plan() -> Plan:
    return small_plan("qwen2", True, gpus=2, sharding=Sharding.from_zero(2), offload=Offload(residual=True),
                      master="fp32")


def write_golden(folder: Path) -> None:
    """The golden folder of the current code at `folder` (replaced)."""
    plan = golden_plan()
    files = folder_files(plan, render(plan, ARCH))
    del files["program.cu"]
    shutil.rmtree(folder, ignore_errors=True)
    write_files(folder, files)
    write_manifest(folder, ARCH, NVRTC, compiled=False)


if __name__ == "__main__":
    write_golden(GOLDEN)
    print(f"wrote {GOLDEN}")
