"""One throughput report (llmqgen.metrics.Throughput) for the planner, `bench` and `run` (issue 12 item 3,
issue 10 item 5): the same numbers from all three for a 2-GPU plan, tokens/s in total and per GPU, SOL and
MFU per GPU; under a launcher (torchrun, mpirun, srun) only rank 0 prints and writes logs."""
import io
import json
import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_trainer import TINY, FakeTrainer, tiny_plan  # noqa: E402

from llmqgen.cli import terminal_logging  # noqa: E402
from llmqgen.hardware.inventory import parse_inventory  # noqa: E402
from llmqgen.metrics import (format_throughput, mfu, plan_throughput, sol_seconds_per_token,  # noqa: E402
                             training_flops_per_token)
from llmqgen.plan.schema import Plan  # noqa: E402
from llmqgen.plan.show import predicted_block, render_plan  # noqa: E402
from llmqgen.plan.solver import solve  # noqa: E402
from llmqgen.runtime import bench as bench_mod  # noqa: E402
from llmqgen.runtime.benchfile import bench_record, bench_summary  # noqa: E402
from llmqgen.runtime.devmem import MemoryReport  # noqa: E402
from llmqgen.runtime.dist import is_rank_zero  # noqa: E402
from llmqgen.runtime.log import read_log  # noqa: E402

PLANS = Path(__file__).resolve().parents[2] / "plans"
DEVICE = {"name": "NVIDIA H200", "driver": "580.95.05"}
LAUNCHED = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def two_gpu_plan() -> Plan:
    """ZeRO-0: the CPU stand-in's memory holds whole tensors (one rank), as unsharded rows are."""
    return solve(TINY, parse_inventory("2xH200", "256G"), seq_len=64, tokens_per_step=1024,
                 pins={"sharding.optimizer": False})


class Clock:
    """Stands in for perf_counter in a timed loop that reads it twice per step: 0, then step_s, so each
    measured step takes exactly step_s."""

    def __init__(self, step_s: float):
        self.step_s, self.calls = step_s, 0

    def __call__(self) -> float:
        self.calls += 1
        return 0.0 if self.calls % 2 else self.step_s


@pytest.fixture
def no_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)


# --- the report -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen2.5-0.5b-fp8-2xh200", "qwen2.5-7b-fp8-2xh200-zero3",
                                  "qwen2.5-32b-fp8-4x4090", "qwen2.5-0.5b-fp8-1xh200"])
def test_per_gpu_values_are_the_total_over_the_gpus(name):
    plan = Plan.from_json((PLANS / f"{name}.json").read_text())
    n, m, T, gpu = plan.num_gpus, plan.model, plan.batch.seq_len, plan.inventory.gpu
    r = plan_throughput(plan, 1.25)
    assert r.num_gpus == n and r.tokens_per_s == plan.tokens_per_step / 1.25
    assert r.tokens_per_s_per_gpu == pytest.approx(r.tokens_per_s / n, rel=1e-12)
    # SOL, MFU of the whole machine counted as if it were one GPU, over the GPU count
    whole_sol = 100 * sol_seconds_per_token(m, T, gpu, plan.precision.matmul) * plan.tokens_per_step / 1.25
    whole_mfu = 100 * mfu(m, T, gpu, r.tokens_per_s)
    assert r.sol_pct == pytest.approx(whole_sol / n, rel=1e-12)
    assert r.mfu_pct == pytest.approx(whole_mfu / n, rel=1e-12)
    assert r.flops_per_token == training_flops_per_token(m, T)
    # the planner's cost model (plan/cost.py) got the same numbers from its predicted step time
    e = plan.estimate
    p = plan_throughput(plan, e.step_ms / 1e3)
    assert (p.tokens_per_s, p.sol_pct, p.mfu_pct) == pytest.approx((e.tokens_per_s, e.sol_pct, e.mfu_pct), rel=1e-9)
    assert 1e3 * p.sol_s == pytest.approx(e.sol_ms, rel=1e-9)


def test_the_line_says_per_gpu_on_several_gpus_only():
    assert format_throughput(162_300.4, 1, 41.2, 38.4) == "162,300 tok/s | SOL 41% | MFU 38%"
    assert format_throughput(341_623.0, 2, 36.2, 34.4) == \
        "341,623 tok/s (170,812 per GPU) | SOL 36% | MFU 34% per GPU"
    with pytest.raises(ValueError, match="step time"):
        plan_throughput(two_gpu_plan(), 0.0)


# --- the same numbers from show, bench and run for a 2-GPU plan -----------------------------------------

def test_show_bench_and_run_report_the_same_numbers(run, data, tmp_path, monkeypatch, capsys, caplog, no_launcher):
    plan = two_gpu_plan()
    assert plan.num_gpus == 2
    step_s = plan.estimate.step_ms / 1e3
    r = plan_throughput(plan, step_s)
    line = r.line()
    assert "per GPU" in line

    # the planner's Predicted block
    shown = predicted_block(plan)
    assert f"  throughput {line}" in shown
    assert f"  throughput {line}" in render_plan(plan).splitlines()

    # bench: its record and summary for a measured median equal to the prediction ...
    mem = MemoryReport(1 << 30, "process", 2 << 30)
    rec = bench_record(plan, [1e3 * step_s] * 3, 0, DEVICE, {}, mem)
    assert rec["tokens_per_s"] == r.tokens_per_s and rec["tokens_per_s_per_gpu"] == r.tokens_per_s_per_gpu
    assert rec["sol_pct"] == rec["sol_pct_per_gpu"] == r.sol_pct and rec["mfu_pct"] == rec["mfu_pct_per_gpu"] == r.mfu_pct
    assert line.replace(" | ", ", ") in bench_summary(rec)
    # ... and run_bench itself, timed by a fake clock, through the CPU stand-in Trainer
    monkeypatch.setattr(bench_mod, "Trainer", FakeTrainer)
    monkeypatch.setattr(bench_mod, "_clock", Clock(step_s))
    monkeypatch.setattr(bench_mod, "_driver_version", lambda: "test")
    caplog.set_level(logging.INFO, logger="llmqgen")
    path = bench_mod.run_bench(plan, steps=2, warmup=1, out_root=tmp_path / "bench")
    said = [r.getMessage() for r in caplog.records if r.name == bench_mod.__name__]
    written = json.loads(path.read_text())
    assert said[-1] == bench_summary(written, path) and line.replace(" | ", ", ") in said[-1]
    assert written["tokens_per_s_per_gpu"] == pytest.approx(written["tokens_per_s"] / 2, rel=1e-12)

    # run: the header's prediction and every step line, the log's fields
    clock = Clock(step_s)
    monkeypatch.setattr(run, "_clock", clock)
    caplog.clear()
    run.train(plan, run.RunConfig(data=data, out=tmp_path / "r", steps=2, warmup=1))
    echoed = [r.getMessage() for r in caplog.records if r.name == run.__name__]
    assert echoed[0].startswith(f"run {plan.name}: 2 steps of 1,024 tokens on 2 x ")
    assert echoed[1].endswith(line)
    steps = [s for s in capsys.readouterr().err.splitlines() if s.startswith("step ")]
    assert len(steps) == 2 and all(f" | {line} | " in s for s in steps)
    for logged in read_log(tmp_path / "r" / "log.jsonl"):
        assert logged["num_gpus"] == 2
        assert (logged["tokens_per_s"], logged["tokens_per_s_per_gpu"], logged["sol_pct"], logged["mfu_pct"]) \
            == pytest.approx((r.tokens_per_s, r.tokens_per_s / 2, r.sol_pct, r.mfu_pct), rel=1e-12)


# --- launchers: only rank 0 prints ---------------------------------------------------------------------

def test_rank_zero_from_the_launchers_variables():
    assert is_rank_zero({})
    assert is_rank_zero({**LAUNCHED, "RANK": "0", "LOCAL_RANK": "0"})
    assert not is_rank_zero(LAUNCHED)
    assert not is_rank_zero({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "3",
                             "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "MASTER_ADDR": "h"})
    assert is_rank_zero({"RANK": "x", "WORLD_SIZE": "2"})      # unparsable: printed, the run reports it


def test_a_nonzero_rank_prints_and_logs_nothing(run, data, tmp_path, monkeypatch, capsys):
    """Rank 1 writes no file and, through the command line's handler (terminal_logging), prints nothing."""
    for k, v in LAUNCHED.items():
        monkeypatch.setenv(k, v)
    with terminal_logging():
        run.train(tiny_plan(), run.RunConfig(data=data, out=tmp_path / "r", steps=2, warmup=1))
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert not (tmp_path / "r" / "log.jsonl").exists() and not (tmp_path / "r" / "model").exists()

    # the command line: no header, no step line, no result file from rank 1
    from click.testing import CliRunner

    from llmqgen.cli import main
    plan_file = tmp_path / "p.json"
    plan_file.write_text(tiny_plan().to_json())
    res = CliRunner().invoke(main, ["run", "--plan", str(plan_file), "--data", str(data),
                                    "--out", str(tmp_path / "r2"), "--steps", "2", "--warmup", "1"])
    assert res.exit_code == 0, res.output
    assert res.output == "" and not (tmp_path / "r2" / "log.jsonl").exists()

    monkeypatch.setattr(bench_mod, "Trainer", FakeTrainer)
    monkeypatch.setattr(bench_mod, "_driver_version", lambda: "test")
    with terminal_logging():
        assert bench_mod.run_bench(tiny_plan(), steps=1, warmup=0, out_root=tmp_path / "bench") is None
    out = capsys.readouterr()
    assert out.out == "" and out.err == "" and not (tmp_path / "bench").exists()


def test_rank_zero_prints_the_header_and_steps_once(run, data, tmp_path, monkeypatch, capsys):
    for k, v in {**LAUNCHED, "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with terminal_logging():
        run.train(tiny_plan(), run.RunConfig(data=data, out=tmp_path / "r", steps=2, warmup=1))
    assert sum(e.startswith("run ") for e in capsys.readouterr().out.splitlines()) == 1
    assert [s.split(" | ")[0] for s in stream.getvalue().splitlines()] == ["step 1/2", "step 2/2"]
    assert len(read_log(tmp_path / "r" / "log.jsonl")) == 2
