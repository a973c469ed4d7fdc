"""`llmqgen bench --profile` on the GPU: one step of a tiny plan timed per operation (CUDA events through
runtime/driver.py, no PyTorch): every operation has a non-negative time, families and phases add up to the
total, the floor share lies in (0, 1); with two ranks on one GPU the collectives are timed too; run_bench
writes the profile into its result file."""
import json
import logging
import tempfile

import pytest

pytestmark = pytest.mark.gpu

pytest.importorskip("nvmath", reason="the runtime's GEMMs need nvmath-python: pip install 'llmqgen[gpu]'")

from harness import small_plan  # noqa: E402

from llmqgen.plan.schema import Sharding  # noqa: E402
from llmqgen.runtime import bench as bench_mod  # noqa: E402
from llmqgen.runtime.bench import BenchParams, synthetic_batches  # noqa: E402
from llmqgen.runtime.profile import FAMILIES, PHASES, Profiler, format_profile  # noqa: E402
from llmqgen.runtime.trainer import Trainer  # noqa: E402


def executed(tr, micro_steps: int, step: int) -> int:
    """Closures and collective/await items one step runs on a rank: one timing each."""
    rk = tr.ranks[0]
    count = lambda prog: sum(len(it[1]) if it[0] == "ops" else 1 for it in prog)   # noqa: E731
    return count(rk.micro) * micro_steps + count(rk.norm_program) + count(rk.optimizer_program)


def check(prof, rep, tr, micro_steps):
    for rank_timings in prof.timings:
        assert len(rank_timings) == executed(tr, micro_steps, tr.step_count)
        assert all(ms >= 0 for _, ms in rank_timings), [(lab, ms) for lab, ms in rank_timings if ms < 0][:5]
        assert {lab.family for lab, _ in rank_timings} <= set(FAMILIES)
    total = rep["gpu_ms"]
    assert total > 0 and total == pytest.approx(sum(ms for _, ms in prof.timings[0]))
    for key in ("families", "phases"):
        assert sum(r["ms"] for r in rep[key]) == pytest.approx(total, rel=1e-9)
        assert sum(r["share"] for r in rep[key]) == pytest.approx(1.0)
    assert {r["name"] for r in rep["phases"]} <= set(PHASES)
    assert 0 < rep["floor_share"] < 1
    assert rep["wall_ms"] > 0


@pytest.mark.parametrize("arch,fp8,attention,preroll", [("qwen2", True, "auto", True), ("qwen3", False, "auto", True),
                                                        ("qwen2", True, "flash", True), ("llama", True, "auto", False)])
def test_one_profiled_step(arch, fp8, attention, preroll):
    plan = small_plan(arch, fp8, grad_accum=2)
    tr = Trainer(plan, out_root=tempfile.mkdtemp(), attention=attention)
    try:
        tr.load_params(BenchParams(plan.model))
        data = synthetic_batches(plan)
        tr.accumulate(data)                  # a graphed step first: graphs captured, libraries warm
        tr.optimizer_step(lr=1e-4)
        with Profiler(tr, micro_steps=2, preroll=preroll) as prof:
            tr.accumulate(data)
            tr.optimizer_step(lr=1e-4)
        rep = prof.report()
        print("\n" + format_profile(rep))
        assert rep["preroll"] is preroll, rep.get("preroll_reason")
        check(prof, rep, tr, 2)
        phases = {r["name"] for r in rep["phases"]}
        assert {"forward", "backward", "LM head", "optimizer"} <= phases
        fam = {r["name"]: r for r in rep["families"]}
        assert fam["gemm"]["ms"] > 0 and fam["attention"]["ms"] > 0 and fam["lm_head gemm"]["ms"] > 0
        assert all(rk.use_graphs for rk in tr.ranks) and tr.profiler is None
        tr.accumulate(data)                  # graphs again afterwards, as before
        tr.optimizer_step(lr=1e-4)
    finally:
        tr.close()


def test_two_ranks_on_one_gpu_time_their_collectives():
    plan = small_plan("qwen2", True, gpus=2, grad_accum=1).model_copy(
        update={"sharding": Sharding.from_zero(2), "peer_copies": False, "name": "tiny-2gpu-z2-profile"})
    tr = Trainer(plan, out_root=tempfile.mkdtemp(), devices=[0, 0])
    try:
        tr.load_params(BenchParams(plan.model))
        data = synthetic_batches(plan)
        tr.accumulate(data)
        tr.optimizer_step(lr=1e-4)
        with Profiler(tr, micro_steps=1) as prof:
            tr.accumulate(data)
            tr.optimizer_step(lr=1e-4)
        rep = prof.report()
        print("\n" + format_profile(rep))
        check(prof, rep, tr, 1)
        assert rep["ranks"] == 2 and len(rep["rank_gpu_ms"]) == 2
        coll = {r["name"]: r for r in rep["phases"]}["collectives"]
        assert coll["ops"] > 0 and coll["ms"] >= 0
    finally:
        tr.close()


def test_bench_writes_the_profile(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)              # run_bench builds under ./build
    plan = small_plan("qwen2", True)
    with caplog.at_level(logging.INFO, logger=bench_mod.__name__):
        path = bench_mod.run_bench(plan, steps=1, warmup=1, out_root=tmp_path / "results", profile=True)
    said = [r.getMessage() for r in caplog.records]
    rec = json.loads(path.read_text())
    prof = rec["profile"]
    assert 0 < prof["floor_share"] < 1 and prof["gpu_ms"] > 0
    assert sum(r["ms"] for r in prof["families"]) == pytest.approx(prof["gpu_ms"])
    assert any(s.startswith("profile of one step") and "floor share (GEMM + attention)" in s for s in said)
