"""A plan made for a smaller card run on a larger one (issue 11 item 3): the GPU that stands in is said
once, the run stays in the plan's arena, the plan is re-costed on the running GPU (same choices) for the
prediction a measurement there is compared with, and a GPU that cannot run the plan is refused in one
line. No GPU: the running GPU is a description like driver.Device's."""
import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_trainer import TINY, FakeTrainer  # noqa: E402

from llmqgen.codegen.render import render  # noqa: E402
from llmqgen.hardware.catalog import GPUS  # noqa: E402
from llmqgen.hardware.inventory import parse_inventory  # noqa: E402
from llmqgen.metrics import plan_throughput  # noqa: E402
from llmqgen.plan.cost import on_gpu, step_cost  # noqa: E402
from llmqgen.plan.schema import Plan  # noqa: E402
from llmqgen.plan.solver import solve  # noqa: E402
from llmqgen.runtime import bench as bench_mod  # noqa: E402
from llmqgen.runtime.benchfile import bench_record, bench_summary  # noqa: E402
from llmqgen.runtime.devmem import MemoryReport, planned_device_bytes  # noqa: E402
from llmqgen.runtime.log import read_log  # noqa: E402
from llmqgen.runtime.standin import RunningOn, check_runs_on, short_name  # noqa: E402

PLANS = Path(__file__).resolve().parents[2] / "plans"
GiB = 1 << 30


def device(name="NVIDIA H200", total=150_109_880_320, cc=(9, 0), smem=227 * 1024, ordinal=0):
    """A GPU as driver.open_device describes it (the H200's numbers as the driver reports them)."""
    return SimpleNamespace(ordinal=ordinal, name=name, total_memory=total, compute_capability=cc,
                           max_smem_optin=smem, sm_count=132, arch=f"sm_{cc[0]}{cc[1]}")


H200 = device()
TI = device("NVIDIA GeForce RTX 4060 Ti", 16_376 * 2**20, (8, 9), 99 * 1024)    # a little under the catalog's


@pytest.fixture(scope="module")
def ti_plan() -> Plan:
    """The checked-in plan for one 4060 Ti (7B, block recompute, master/Adam/gradients offloaded)."""
    return Plan.from_json((PLANS / "qwen2.5-7b-fp8-1x4060ti-block.json").read_text())


def tiny_ti_plan() -> Plan:
    return solve(TINY, parse_inventory("1x4060ti", "64G"), seq_len=64, tokens_per_step=512)


# --- detection and the line ---------------------------------------------------------------------------

def test_a_4060ti_plan_on_an_h200_is_a_stand_in_and_says_so(ti_plan):
    on = RunningOn.of(ti_plan, H200)
    assert on.stand_in and on.spec.name == "h200" and on.spec.memory_bytes == H200.total_memory
    head, predicted = on.lines()
    total = planned_device_bytes(ti_plan)
    assert head == ("stand-in: running plan for 1x NVIDIA GeForce RTX 4060 Ti (16 GiB) on NVIDIA H200 (140 GiB): "
                    f"the arena is the plan's ({total / GiB:.2f} GiB with the CUDA context); speeds are the "
                    "H200's (faster GPU, PCIe 5.0 x16 host link), not the 4060 Ti's")
    p = on.predicted
    assert predicted == (f"predicted on the H200: {p.step_ms:.0f} ms/step | "
                         + plan_throughput(on.speed_plan, p.step_ms / 1e3).line())
    assert total == ti_plan.estimate.device_bytes          # `llmqgen plan`'s "total per GPU"


def test_the_plans_own_card_is_no_stand_in(ti_plan):
    on = RunningOn.of(ti_plan, TI)          # the driver's total is a little under the catalog's
    assert not on.stand_in and on.lines() == [] and on.speed_plan is ti_plan
    assert on.fields()["stand_in"] is None
    assert on.predicted.tokens_per_s == pytest.approx(ti_plan.estimate.tokens_per_s, rel=1e-9)
    home = RunningOn.home(ti_plan)
    assert not home.stand_in and home.predicted.step_ms == on.predicted.step_ms


def test_more_memory_of_the_same_model_is_a_stand_in_too():
    plan = solve(TINY, parse_inventory("1xh200", "64G"), seq_len=64, tokens_per_step=512)
    half = plan.model_copy(update={"inventory": plan.inventory.model_copy(
        update={"gpu": plan.inventory.gpu.model_copy(update={"memory_bytes": 70 * GiB})})})
    on = RunningOn.of(half, H200)           # e.g. a plan for a MIG slice, run on the whole GPU
    (line,) = on.lines()
    assert on.stand_in and "(70 GiB) on NVIDIA H200 (140 GiB)" in line
    assert line.endswith("the same GPU model with more memory: speeds are the plan's")
    assert on.predicted.step_ms == pytest.approx(step_cost(half).step_ms, rel=1e-12)


def test_a_gpu_not_in_the_catalog_stands_in_without_a_prediction(ti_plan):
    on = RunningOn.of(ti_plan, device("NVIDIA H100 NVL", 100 * GiB))
    assert on.stand_in and on.spec is None and on.predicted is None and on.speed_plan is ti_plan
    (line,) = on.lines()
    assert line.endswith("speeds are the H100 NVL's, not the 4060 Ti's (NVIDIA H100 NVL is not in the GPU "
                         "catalog: no prediction for it, SOL and MFU against the 4060 Ti's rates)")
    assert on.fields()["predicted_tokens_per_s_here"] is None


def test_short_names():
    assert short_name("NVIDIA GeForce RTX 4060 Ti") == "4060 Ti"
    assert short_name("NVIDIA H200") == "H200"
    assert short_name("NVIDIA RTX 6000 Ada Generation") == "6000 Ada Generation"


# --- what refuses ------------------------------------------------------------------------------------

def test_runs_where_the_memory_and_features_are(ti_plan):
    check_runs_on(ti_plan, H200)            # sm_90 for a plan made for sm_89: compiled for the H200
    check_runs_on(ti_plan, TI)


@pytest.mark.parametrize("dev,match", [
    (device("NVIDIA GeForce RTX 4060 Ti", 8 * GiB, (8, 9), 99 * 1024, ordinal=1),
     r"may use 15\.52 GiB per GPU \(made for NVIDIA GeForce RTX 4060 Ti\); GPU 1 \(NVIDIA GeForce RTX 4060 Ti\) "
     r"has 8\.00 GiB: plan for this GPU \(--gpus auto\)"),
    (device("NVIDIA A100-SXM4-80GB", 80 * GiB, (8, 0), 163 * 1024),
     r"uses FP8 matmuls; GPU 0 \(NVIDIA A100-SXM4-80GB, compute capability 8\.0\) has no FP8 tensor cores"),
])
def test_a_gpu_that_cannot_run_the_plan_is_refused_in_one_line(ti_plan, dev, match):
    with pytest.raises(ValueError, match=match) as e:
        check_runs_on(ti_plan, dev)
    assert "\n" not in str(e.value)


def test_kernels_sized_for_more_shared_memory_are_refused():
    plan = Plan.from_json((PLANS / "qwen2.5-0.5b-fp8-1xh200.json").read_text())
    with pytest.raises(ValueError, match=r"227 KiB of shared memory per block .* allows 99 KiB"):
        check_runs_on(plan, device("NVIDIA GeForce RTX 4090", 200 * GiB, (8, 9), 99 * 1024))


def test_the_program_for_the_running_gpu_keeps_the_plans_scratch(ti_plan):
    """Grids (and the scratch they size) follow the plan's GPU on any compile target, so the kernels
    fit the memory table's rows when the program is compiled for the GPU that stands in."""
    from llmqgen.layout import align
    from llmqgen.plan.memory import memory_table
    row = next(r for r in memory_table(ti_plan) if r.name == "work.norm_partials")
    for arch in ("sm_89", "sm_90"):
        kernels = render(ti_plan, arch).kernels
        assert align(max(k.meta.get("dw_scratch_bytes", 0) for k in kernels)) == row.bytes


# --- the prediction for the GPU it runs on ----------------------------------------------------------

def test_recosting_on_the_h200_keeps_the_choices_and_predicts_faster(ti_plan):
    here = on_gpu(ti_plan, GPUS["h200"])
    assert here.inventory.gpu == GPUS["h200"] and here.estimate is None
    for keep in ("model", "precision", "batch", "recompute", "offload", "sharding", "lm_head_chunks",
                 "attn_bwd_chunks", "collectives", "name"):
        assert getattr(here, keep) == getattr(ti_plan, keep), keep
    assert (here.inventory.count, here.inventory.host_mem_bytes) == (1, ti_plan.inventory.host_mem_bytes)
    on_ti, on_h200 = step_cost(ti_plan), step_cost(here)
    assert on_ti.step_ms == pytest.approx(ti_plan.estimate.step_ms, rel=1e-9)
    assert on_h200.tokens_per_s > 5 * on_ti.tokens_per_s
    assert RunningOn.of(ti_plan, H200).predicted.step_ms == on_h200.step_ms


# --- bench and run ---------------------------------------------------------------------------------

def test_the_bench_record_of_a_stand_in(ti_plan):
    on = RunningOn.of(ti_plan, H200)
    p = on.predicted
    mem = MemoryReport(13 * GiB, "process", planned_device_bytes(ti_plan))
    r = bench_record(ti_plan, [2 * p.step_ms] * 3, 1, {"name": H200.name, "driver": "580"}, {}, mem, on)
    assert r["stand_in"]["plan_gpu"] == "NVIDIA GeForce RTX 4060 Ti" and r["stand_in"]["gpu"] == "NVIDIA H200"
    assert r["stand_in"]["planned_mem_bytes"] == r["planned_mem_bytes"] == ti_plan.estimate.device_bytes
    assert r["predicted_tokens_per_s_here"] == p.tokens_per_s and r["predicted_step_ms_here"] == p.step_ms
    assert r["tokens_per_s_vs_predicted_here"] == pytest.approx(0.5)
    assert r["predicted"]["tokens_per_s"] == ti_plan.estimate.tokens_per_s     # the plan's own, for the 4060 Ti
    # SOL and MFU against the H200's rates, not the 4060 Ti's
    rep = plan_throughput(on_gpu(ti_plan, on.spec), 2 * p.step_ms / 1e3)
    assert (r["sol_pct"], r["mfu_pct"]) == pytest.approx((rep.sol_pct, rep.mfu_pct), rel=1e-12)
    assert r["peak_mem_ratio"] == pytest.approx(13 * GiB / ti_plan.estimate.device_bytes)
    line = bench_summary(r)
    assert f", 50% of the {p.tokens_per_s:,.0f} tok/s predicted on the H200; device memory: peak 13.00 GiB " \
           "(NVML, this process)" in line
    assert json.loads(json.dumps(r)) == r


def test_the_bench_record_on_the_plans_own_gpu_compares_with_its_prediction():
    plan = Plan.from_json((PLANS / "qwen2.5-0.5b-fp8-1xh200.json").read_text())
    mem = MemoryReport(None, None, planned_device_bytes(plan), why="pynvml is missing: pip install nvidia-ml-py")
    r = bench_record(plan, [plan.estimate.step_ms] * 2, 0, {"name": "NVIDIA H200", "driver": "580"}, {}, mem)
    assert r["stand_in"] is None and r["tokens_per_s_vs_predicted_here"] == pytest.approx(1.0)
    assert r["peak_mem_bytes"] is None and r["peak_mem_ratio"] is None
    assert bench_summary(r).endswith(", 100% of the {:,.0f} tok/s predicted; device memory: not measured (pynvml "
                                     "is missing: pip install nvidia-ml-py); the plan's {:.2f} GiB (arena + CUDA "
                                     "context)".format(r["predicted_tokens_per_s_here"], r["planned_mem_bytes"] / GiB))


def _said(caplog, module):
    return [r.getMessage() for r in caplog.records if r.name == f"llmqgen.runtime.{module}"]


def test_bench_of_a_plan_for_a_smaller_card(run, tmp_path, monkeypatch, caplog):
    plan = tiny_ti_plan()
    monkeypatch.setattr(bench_mod, "Trainer", FakeTrainer)
    monkeypatch.setattr(bench_mod, "_driver_version", lambda: "test")
    caplog.set_level(logging.INFO)
    path = bench_mod.run_bench(plan, steps=2, warmup=1, out_root=tmp_path)
    said = _said(caplog, "bench")
    r = json.loads(path.read_text())
    assert said[0].startswith("stand-in: running plan for 1x NVIDIA GeForce RTX 4060 Ti (16 GiB) on NVIDIA H200")
    assert said[1].startswith("predicted on the H200: ")
    assert r["stand_in"]["gpu"] == "NVIDIA H200" and r["device"]["total_memory"] == H200.total_memory
    assert (r["peak_mem_bytes"], r["peak_mem_method"]) == (5 << 30, "process")     # fake_trainer.FakeNvml
    assert r["planned_mem_bytes"] == planned_device_bytes(plan)
    assert "predicted on the H200; device memory: peak 5.00 GiB (NVML, this process)" in said[-1]


def test_run_of_a_plan_for_a_smaller_card(run, data, tmp_path, caplog):
    plan = tiny_ti_plan()
    caplog.set_level(logging.INFO)
    run.train(plan, run.RunConfig(data=data, out=tmp_path / "r", steps=2, warmup=1))
    echoed = _said(caplog, "run")
    stand = [i for i, e in enumerate(echoed) if e.startswith("stand-in: ")]
    assert len(stand) == 1 and echoed[stand[0] + 1].startswith("predicted on the H200: ")
    planned = planned_device_bytes(plan)
    line = (f"device memory: peak 5.00 GiB (NVML, this process), {100 * (5 << 30) / planned:.1f}% of the plan's "
            f"{planned / GiB:.2f} GiB (arena + CUDA context)")
    assert echoed.count(line) == 1
    (event,) = [e for e in read_log(tmp_path / "r" / "log.jsonl", events=True) if e.get("event") == "device_memory"]
    assert event["peak_mem_bytes"] == 5 << 30 and event["planned_mem_bytes"] == planned
    assert event["peak_mem_method"] == "process" and event["step"] == 2
    # the step lines' SOL and MFU are against the H200's rates
    logged = read_log(tmp_path / "r" / "log.jsonl")[0]
    rep = plan_throughput(on_gpu(plan, RunningOn.of(plan, H200).spec), logged["step_ms"] / 1e3)
    assert logged["mfu_pct"] == pytest.approx(rep.mfu_pct, rel=1e-9)


def test_bench_on_a_gpu_too_small_fails_in_one_line(run, tmp_path, monkeypatch):
    """The Trainer checks the GPU it opened before it builds anything (here: a 4060 Ti 8 GB)."""
    from click.testing import CliRunner

    from llmqgen.cli import main

    class SmallGpuTrainer(FakeTrainer):
        def __init__(self, plan, **kw):
            check_runs_on(plan, device("NVIDIA GeForce RTX 4060 Ti", 8 * GiB, (8, 9), 99 * 1024))

    monkeypatch.setattr(bench_mod, "Trainer", SmallGpuTrainer)
    plan_file = tmp_path / "p.json"
    plan_file.write_text(tiny_ti_plan().to_json())
    res = CliRunner().invoke(main, ["bench", "--plan", str(plan_file), "--out", str(tmp_path / "b")])
    assert res.exit_code == 2
    (err,) = [line for line in res.output.splitlines() if line.startswith("error: ")]
    assert err.endswith("has 8.00 GiB: plan for this GPU (--gpus auto)")
