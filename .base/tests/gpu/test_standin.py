"""A plan made for one RTX 4060 Ti, benchmarked on this GPU (an H200 stands in for the 4060 Ti; a 4060 Ti
runs its own plan): the process's device memory as NVML counts it stays within 2% of the plan's total per
GPU (packed arena + CUDA-context reserve; NVML counts the context too), plus a little for the driver's
allocation granularity.

`llmqgen bench` runs in a process of its own: NVML counts a process's whole use of the GPU, and this one
holds torch's cached memory and the contexts of earlier tests. Qwen2.5-0.5B rather than a tiny model: the
plan's total (about 13 GiB) is then mostly arena, as in the benchmarks this checks; a tiny plan's total is
mostly the 640 MiB context reserve, which estimates the context and libraries rather than counting them
(2% of it is 13 MiB)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

pytest.importorskip("nvmath", reason="the runtime's GEMMs need nvmath-python: pip install 'llmqgen[gpu]'")
pytest.importorskip("cudnn", reason="the runtime's attention needs nvidia-cudnn-frontend")

from llmqgen.hardware.host import detected_gpus  # noqa: E402
from llmqgen.hardware.inventory import parse_inventory  # noqa: E402
from llmqgen.models.catalog import resolve_model  # noqa: E402
from llmqgen.plan.lifetimes import packed_table  # noqa: E402
from llmqgen.plan.memory import arena_peak  # noqa: E402
from llmqgen.plan.solver import solve, usable_device  # noqa: E402

MiB = 1 << 20
SLACK = 8 * MiB          # the driver's allocation granularity (2 MiB pages) and small library buffers
REPO = Path(__file__).resolve().parents[2]


def test_a_plan_for_a_4060ti_holds_its_memory_here(tmp_path):
    plan = solve(resolve_model("qwen2.5-0.5b"), parse_inventory("1x4060ti", "64G"), tokens_per_step=16384)
    if detected_gpus()[0].memory_bytes < usable_device(plan.inventory):
        pytest.skip("this GPU has less memory than a 4060 Ti 16 GB")
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(plan.to_json())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "llmqgen", "bench", "--plan", str(plan_file), "--steps", "2",
                          "--warmup", "0", "--out", str(tmp_path / "results")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    print(res.stdout, res.stderr)
    assert res.returncode == 0
    (path,) = (tmp_path / "results").glob("*.json")
    r = json.loads(path.read_text())
    assert r["peak_mem_bytes"] is not None, r["peak_mem_not_measured"]
    peak, planned = r["peak_mem_bytes"], r["planned_mem_bytes"]
    arena = arena_peak(packed_table(plan))
    print(f"NVML ({r['peak_mem_method']}): {peak / MiB:.0f} MiB; plan {planned / MiB:.0f} MiB "
          f"({100 * peak / planned:.2f}%); outside the arena {(peak - arena) / MiB:.0f} MiB "
          f"(reserved {(planned - arena) / MiB:.0f} MiB)")
    assert abs(peak - planned) <= 0.02 * planned + SLACK
    stand_in = "4060 Ti" not in r["device"]["name"]
    assert (r["stand_in"] is not None) == stand_in
    assert ("stand-in: running plan for 1x NVIDIA GeForce RTX 4060 Ti" in res.stdout) == stand_in
    assert r["predicted_tokens_per_s_here"] is not None and r["tokens_per_s_vs_predicted_here"] > 0
