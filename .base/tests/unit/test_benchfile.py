"""Bench result files from the checked-in plans: the measured numbers agree with the planner's
cost model when the measurement equals its prediction, and the file is stable and complete."""
import json
import statistics
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

import llmqgen
from llmqgen.plan.schema import Plan
from llmqgen.runtime import benchfile
from llmqgen.runtime.benchfile import bench_record, collect_versions, slug, write_bench
from llmqgen.runtime.devmem import MemoryReport

PLANS = sorted((Path(__file__).resolve().parents[2] / "plans").glob("*.json"))
DEVICE = {"name": "NVIDIA GeForce RTX 4090", "driver": "580.95.05", "compute_capability": [8, 9]}
VERSIONS = {"numpy": "2.0.0", "cuda-bindings": "13.0.0"}
MEM = MemoryReport(7 << 30, "process", 8 << 30)


def load(path: Path) -> Plan:
    return Plan.from_json(path.read_text())


def times_around(median_ms: float, n: int = 9, warmup: int = 3, seed: int = 0) -> list[float]:
    """Slow warm-up steps, then symmetric jitter around `median_ms` (so the median is exact)."""
    jitter = np.random.default_rng(seed).uniform(0.001, 0.05, n // 2) * median_ms
    steady = [median_ms, *(median_ms + jitter), *(median_ms - jitter)]
    return [10 * median_ms] * warmup + list(np.random.default_rng(seed + 1).permutation(steady))


def test_the_repo_has_example_plans():
    assert len(PLANS) >= 3


@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.stem)
def test_measured_equal_to_predicted_gives_the_plans_sol_mfu_and_throughput(path):
    plan = load(path)
    e = plan.estimate
    times = times_around(e.step_ms)
    r = bench_record(plan, times, warmup=3, device=DEVICE, versions=VERSIONS, memory=MEM)
    assert r["step_ms_median"] == pytest.approx(e.step_ms, rel=1e-12)
    assert r["measured_steps"] == len(times) - 3 and r["warmup_steps"] == 3
    # the cost model (plan/cost.py) computed these from its predicted step time, independently
    assert r["tokens_per_s"] == pytest.approx(e.tokens_per_s, rel=1e-9)
    assert r["sol_pct"] == pytest.approx(e.sol_pct, rel=1e-9)
    assert r["sol_pct"] == pytest.approx(100 * e.sol_ms / e.step_ms, rel=1e-9)
    assert r["mfu_pct"] == pytest.approx(e.mfu_pct, rel=1e-9)
    assert r["predicted"] == {"step_ms": e.step_ms, "tokens_per_s": e.tokens_per_s,
                              "device_bytes": e.device_bytes}
    assert Plan.model_validate(r["plan"]) == plan and r["plan_hash"] == plan.inputs_hash()


def test_half_the_time_doubles_throughput_sol_and_mfu():
    plan = load(PLANS[0])
    slow = bench_record(plan, [200.0, 200.0], 0, DEVICE, VERSIONS, MEM)
    fast = bench_record(plan, [100.0, 100.0], 0, DEVICE, VERSIONS, MEM)
    for k in ("tokens_per_s", "sol_pct", "mfu_pct"):
        assert fast[k] == pytest.approx(2 * slow[k])
    assert fast["tokens_per_s"] == pytest.approx(plan.tokens_per_step / 0.1)


def test_warmup_is_excluded_and_raw_times_kept():
    plan = load(PLANS[0])
    times = [5000.0, 900.0, 101.0, 99.0, 100.0, 300.0]
    r = bench_record(plan, times, warmup=2, device=DEVICE, versions=VERSIONS, memory=MEM)
    assert r["step_ms_median"] == statistics.median([101.0, 99.0, 100.0, 300.0]) == 100.5
    assert r["step_ms"] == times and r["peak_mem_bytes"] == 7 << 30 and r["peak_mem_ratio"] == 7 / 8
    assert r["device"] == DEVICE and r["versions"] == VERSIONS
    assert r["llmqgen_version"] == llmqgen.__version__ and r["num_gpus"] == plan.num_gpus
    assert datetime.strptime(r["timestamp_utc"], "%Y-%m-%dT%H:%M:%SZ")


def test_bad_inputs_say_what_to_do():
    plan = load(PLANS[0])
    with pytest.raises(ValueError, match="run more steps"):
        bench_record(plan, [1.0, 2.0], warmup=2, device=DEVICE, versions={}, memory=MEM)
    with pytest.raises(ValueError, match="driver"):
        bench_record(plan, [1.0], warmup=0, device={"name": "x"}, versions={}, memory=MEM)


def test_write_bench_names_the_file_and_is_stable(tmp_path):
    plan = load(PLANS[0])
    r = bench_record(plan, [120.0, 110.0, 111.0], 1, DEVICE, VERSIONS, MEM)
    path = write_bench(r, root=tmp_path / "bench" / "results")
    assert path == tmp_path / "bench" / "results" / f"nvidia-geforce-rtx-4090-{plan.name}.json"
    text = path.read_text()
    assert json.loads(text) == r
    assert text.startswith('{\n  "device": {') and text.endswith("}\n")
    keys = list(json.loads(text))
    assert keys == sorted(keys)
    shuffled = dict(reversed(list(r.items())))           # insertion order does not matter
    assert write_bench(shuffled, root=path.parent).read_text() == text
    assert [p.name for p in path.parent.iterdir()] == [path.name]   # no temp file left behind


def test_slugs_and_unsafe_plan_names(tmp_path):
    assert slug("NVIDIA H200") == "nvidia-h200"
    assert slug("NVIDIA GeForce RTX 4060 Ti (16GB)") == "nvidia-geforce-rtx-4060-ti-16gb"
    r = bench_record(load(PLANS[0]), [1.0], 0, DEVICE, VERSIONS, MEM)
    with pytest.raises(ValueError, match="rename the plan"):
        write_bench({**r, "plan_name": "../escape"}, root=tmp_path)


def test_collect_versions_reads_installed_distributions(monkeypatch):
    v = collect_versions()
    assert list(v) == list(benchfile.VERSIONED_DISTRIBUTIONS)
    assert v["numpy"] == np.__version__ and v["llmqgen"] == llmqgen.__version__
    assert all(x is None or isinstance(x, str) for x in v.values())
    monkeypatch.setattr(benchfile, "VERSIONED_DISTRIBUTIONS", ("numpy", "llmqgen-no-such-distribution"))
    assert collect_versions() == {"numpy": np.__version__, "llmqgen-no-such-distribution": None}
