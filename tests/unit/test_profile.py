"""`llmqgen bench --profile` on CPU: every operation of real schedules gets a family and a phase; the
report's rows, totals and floor share from synthetic timings; the profiler inside the real Trainer._execute
and Rank.program over a fake driver whose "GPU clock" advances by a known time per operation; the bench
record's `profile` field and the CLI flag."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fake_trainer  # noqa: E402,F401  (stubs nvmath, which runtime.rank imports, as test_throughput_report does)
from harness import small_plan  # noqa: E402

from llmqgen.plan.schedule import build_schedule  # noqa: E402
from llmqgen.plan.schema import Offload, Plan, Recompute, Sharding  # noqa: E402
from llmqgen.runtime import profile  # noqa: E402
from llmqgen.runtime.benchfile import bench_record, write_bench  # noqa: E402
from llmqgen.runtime.profile import (FAMILIES, FLOOR_FAMILIES, PHASES, Label, Profiler, format_profile,  # noqa: E402
                                     kernel_family, label, schedule_labels, summarize)
from llmqgen.runtime.rank import Rank  # noqa: E402
from llmqgen.runtime import trainer as trainer_mod  # noqa: E402
from llmqgen.runtime.trainer import AdamW, Trainer  # noqa: E402

PLANS = sorted((Path(__file__).resolve().parents[2] / "plans").glob("*.json"))
VARIANTS = {
    "plain": {},
    "fp32 master": dict(master="fp32"),
    "zero2": dict(gpus=2, sharding=Sharding.from_zero(2)),
    "zero3": dict(gpus=2, sharding=Sharding.from_zero(3)),
    "offload+block": dict(offload=Offload(residual=True, gradients=True, master=True, adam_m=True, adam_v=True),
                          recompute=Recompute(block=True)),
    "lm_head chunks": dict(lm_head_chunks=2, recompute=Recompute(ffn=True, norm=True)),
}


def step_sections(sched):
    """(section name, ops) of everything a training step runs."""
    return [*sched["micro_step"].items(), *sched["optimizer_step"].items()]


CASES = [(p.stem, lambda p=p: Plan.from_json(p.read_text())) for p in PLANS] + \
    [(f"{name}-{'fp8' if fp8 else 'bf16'}", lambda kw=kw, fp8=fp8: small_plan("qwen2", fp8, **kw))
     for name, kw in VARIANTS.items() for fp8 in (True, False)]


@pytest.mark.parametrize("name,make", CASES, ids=[c[0] for c in CASES])
def test_every_operation_of_a_step_has_a_known_family_and_phase(name, make):
    sched = build_schedule(make())
    labels = schedule_labels(sched)
    for section, ops in step_sections(sched):
        for op in ops:
            lab = labels[id(op)]
            assert lab.family in FAMILIES and lab.phase in PHASES, (section, op["op"], lab)
            kind = op["op"]
            if kind in ("collective", "await"):
                assert (lab.family, lab.phase) == ("collective", "collectives")
            elif kind in ("copy", "copy_wait"):
                assert (lab.family, lab.phase) == ({"copy": "copy", "copy_wait": "copy wait"}[kind], "copies")
            elif section == "head":
                assert lab.phase == "LM head"
            else:       # the schedule's own phase: forward, recompute, backward, optimizer
                assert lab.phase == op["phase"] and op["phase"] in PHASES
            if kind == "linear":
                assert lab.family == ("lm_head gemm" if op["layer_name"] == "lm_head" else "gemm")
                assert (op["layer_name"] == "lm_head") == (section == "head")
            if kind.startswith("attention_"):
                assert lab.family == "attention"
            if section in sched["optimizer_step"] and kind not in ("copy", "copy_wait", "collective", "await"):
                assert lab.phase == "optimizer"
    for op in sched["eval"]["head"]:                    # evaluation's head: the same ops, the same labels
        assert labels[id(op)].phase == "LM head"


def test_families_of_the_kernels_and_launch_counts():
    assert kernel_family("llmq_rmsnorm_forward_ln1_first") == "rmsnorm"
    assert kernel_family("llmq_loss_reduce") == kernel_family("llmq_crossentropy_fused") == "crossentropy"
    assert kernel_family("llmq_quantize_shard_ln1") == "quantize" and kernel_family("llmq_cast_f32_bf16") == "cast"
    sched = build_schedule(small_plan("qwen2", True, master="fp32"))
    labels = schedule_labels(sched)
    fams = {lab.family for lab in labels.values()}
    assert {"gemm", "lm_head gemm", "attention", "bias_grad", "quantize", "transpose", "amax", "rmsnorm",
            "swiglu", "rope", "crossentropy", "embedding", "adamw", "gradnorm", "cast", "memset"} <= fams
    back = sched["micro_step"]["layer_backward"]
    att = next(op for op in back if op["op"] == "attention_backward")
    assert label(att).launches == 1 and label(att, flash=True).launches == 2    # rowsum pre-pass + backward
    partials = next(op for op in sched["optimizer_step"]["gradnorm"] if op["op"] == "gradnorm_partials")
    assert label(partials).launches == len(partials["sizes"]) > 1
    first = next(op for op in sched["micro_step"]["layer_forward"] if op["op"] == "branch_on_layer")
    assert label(first).family == "rmsnorm"


# --- the report from synthetic timings -----------------------------------------------------------------
def L(family, phase, name=None, launches=1):
    return Label(family, phase, name or family, launches)


SYNTH = [(L("gemm", "forward", "qkv forward"), 4.0), (L("gemm", "backward", "qkv dgrad"), 6.0),
         (L("attention", "forward", "attention_forward"), 2.0),
         (L("attention", "backward", "attention_backward", 2), 4.0),
         (L("lm_head gemm", "LM head", "lm_head forward"), 3.0), (L("crossentropy", "LM head"), 1.0),
         (Label("rmsnorm", "forward", "rmsnorm", 1, 2_000_000), 0.5), (L("rmsnorm", "recompute"), 0.5), (L("quantize", "backward"), 1.0),
         (L("adamw", "optimizer"), 2.0), (L("copy", "copies"), 1.0), (L("collective", "collectives", "await", 0), 3.0),
         (L("gradnorm", "optimizer", "llmq_gradnorm_partial", 7), 1.0)]


def test_summary_rows_add_up_and_the_floor_share_is_gemm_plus_attention():
    rep = summarize(SYNTH, micro_steps=1, wall_ms=40.0)
    total = sum(ms for _, ms in SYNTH)
    assert rep["gpu_ms"] == pytest.approx(total) and rep["ops"] == len(SYNTH)
    assert rep["launches"] == sum(lab.launches for lab, _ in SYNTH) == 19
    floor = 4 + 6 + 2 + 4 + 3
    assert rep["floor_ms"] == pytest.approx(floor) and rep["floor_share"] == pytest.approx(floor / total)
    assert set(rep["floor_families"]) == set(FLOOR_FAMILIES)
    for key in ("families", "phases"):
        rows = rep[key]
        assert sum(r["ms"] for r in rows) == pytest.approx(total)
        assert sum(r["share"] for r in rows) == pytest.approx(1.0)
        assert sum(r["launches"] for r in rows) == rep["launches"]
        assert sum(r["ops"] for r in rows) == len(SYNTH)
    fam = {r["name"]: r for r in rep["families"]}
    assert fam["gemm"]["ms"] == 10 and fam["attention"]["launches"] == 3 and fam["gradnorm"]["launches"] == 7
    assert [r["ms"] for r in rep["families"]] == sorted((r["ms"] for r in rep["families"]), reverse=True)
    assert [r["name"] for r in rep["phases"]] == list(PHASES)            # the schedule's order
    assert rep["operations"][0]["name"] == "qkv dgrad" and len(rep["operations"]) == len({lab.name for lab, _ in SYNTH})
    assert rep["wall_ms"] == 40.0 and rep["note"] == profile.NOTE
    json.dumps(rep)                                                     # the record holds it as it is


def test_empty_and_floorless_steps():
    assert summarize([])["floor_share"] == 0.0
    rep = summarize([(L("copy", "copies"), 1.0)])
    assert rep["floor_share"] == 0.0 and rep["phases"][0]["name"] == "copies"


def test_the_printed_table():
    rep = summarize(SYNTH, micro_steps=2, wall_ms=55.5, ranks=1, preroll=True)
    text = format_profile(rep, step_ms=20.0)
    lines = text.splitlines()
    assert lines[0].startswith("profile of one step (2 micro-step(s), eager): 13 operations, 19 launches, "
                               "29.00 ms of GPU time")
    assert any(line.split()[:4] == ["gemm", "10.000", "34.5%", "2"] for line in lines)
    assert any(line.split()[:5] == ["LM", "head", "4.000", "13.8%", "2"] for line in lines)
    assert any(line.split()[:4] == ["total", "29.000", "100.0%", "19"] for line in lines)
    # GB/s of the operations with byte counts: the rmsnorm forward's 2 MB in 0.5 ms (its recompute has none)
    assert any(line.split() == ["rmsnorm", "1.000", "3.4%", "2", "4"] for line in lines)
    assert not any(line.split()[:1] == ["gemm"] and len(line.split()) > 4 for line in lines)
    assert "floor share (GEMM + attention): 65.5% of GPU time (19.00 of 29.00 ms)" in text
    assert "55.5 ms of wall time" in text and "a graphed step 20.0 ms (median)" in text
    assert "the table sums GPU time, not wall time" in text
    assert "family vs the cost model" not in text
    rep["predicted_ms"] = {"gemm": 8.0, "attention": 7.5, "rmsnorm": 0.2}     # rmsnorm: below the ratio floor
    rows = {line.split()[0]: line.split()[1:] for line in format_profile(rep).split("family vs the cost model")[1]
            .splitlines()[1:4]}
    assert rows == {"gemm": ["10.000", "8.000", "1.25x"], "attention": ["6.000", "7.500", "0.80x"],
                    "rmsnorm": ["1.000", "0.200", "-"]}
    rep2 = summarize(SYNTH, micro_steps=1, ranks=2, preroll=False, preroll_reason="no NVRTC")
    text2 = format_profile(rep2)
    assert "rank 0 of 2" in text2 and "pre-roll off (no NVRTC)" in text2 and "graphed" not in text2


# --- the profiler inside the real Trainer._execute over a fake driver --------------------------------
COST = {"gemm": 5.0, "lm_head gemm": 7.0, "attention": 3.0, "collective": 2.0}   # ms; every other family 0.25


class FakeDriver:
    """Events read a global "GPU clock" that the fake operations advance."""

    def __init__(self):
        self.now, self.times, self.created, self.destroyed, self.spins = 0.0, {}, 0, set(), []

    def event_create(self, timing=False):
        assert timing
        self.created += 1
        return self.created

    def event_record(self, e, stream):
        assert e not in self.destroyed
        self.times[e] = self.now

    def event_elapsed_ms(self, a, b):
        return self.times[b] - self.times[a]

    def event_destroy(self, e):
        assert e not in self.destroyed
        self.destroyed.add(e)

    def stream_synchronize(self, s):
        pass

    def launch(self, func, grid, block, smem, stream, values, types):
        assert func == "spin" and types == ["unsigned long long"]
        self.spins.append(values[0])
        self.now += 100.0                       # a spin: time in no row

    def module_load(self, cubin):
        return "module"

    def function(self, module, name):
        assert name == "llmq_profile_spin"
        return "spin"

    def module_unload(self, module):
        pass


class FakeRank:
    program = Rank.program
    norm_program = Rank.norm_program
    optimizer_program = Rank.optimizer_program
    run_ops = Rank.run_ops
    _issue = Rank._issue
    _join_copies = Rank._join_copies
    _wait_copy = Rank._wait_copy
    _micro_sections = Rank._micro_sections

    def __init__(self, sched, r, L, clock, flash):
        self.sched, self.rank, self.L, self.clock = sched, r, L, clock
        self.stream, self.use_graphs, self.graphs = 100 + r, True, {}
        self.attn = None if flash else object()
        self.dev = SimpleNamespace(make_current=lambda: None, arch="sm_90")
        self.ran, self.in_flight = [], {}
        self.micro = self.program(self._micro_sections())

    def _seed(self, tag, layer):
        return 0

    def _bind(self, op, layer, extra=None):
        lab = label(op, head=any(op is o for o in self.sched["micro_step"]["head"]))

        def run():
            self.ran.append(op)
            self.clock.now += COST.get(lab.family, 0.25)
        return run


class FakeTrainer:
    _execute = Trainer._execute

    def __init__(self, plan, clock, flash=False):
        self.plan, self.sched, self.L = plan, build_schedule(plan), plan.model.num_layers
        self.ranks = [FakeRank(self.sched, r, self.L, clock, flash) for r in range(plan.num_gpus)]
        self.clock, self.pending, self.profiler = clock, {}, None
        self.comm = SimpleNamespace(run=self._collective)

    def _collective(self, op, layer):
        self.clock.now += COST["collective"]     # the compute streams wait this long for it
        return ["done"]

    def _wait(self, done):
        pass

    def step(self, micro_steps):
        for _ in range(micro_steps):
            self._execute([rk.micro for rk in self.ranks], key="micro")
        self._execute([rk.norm_program for rk in self.ranks])
        self._execute([rk.optimizer_program for rk in self.ranks])


def expected(tr, micro_steps):
    """(Label, ms) of every operation a step runs on rank 0, from the programs themselves."""
    rk = tr.ranks[0]
    labels = schedule_labels(tr.sched, flash=rk.attn is None, plan=getattr(tr, "plan", None))
    out = []
    for prog, times in ((rk.micro, micro_steps), (rk.norm_program, 1), (rk.optimizer_program, 1)):
        for _ in range(times):
            for item in prog:
                for op in (item[2] if item[0] == "ops" else [item[1]]):
                    lab = labels[id(op)]
                    out.append((lab, COST.get(lab.family, 0.25) if item[0] != "await" else 0.0))
    return out


@pytest.mark.parametrize("name,kw", [("1 GPU", {}), ("zero2", dict(gpus=2, sharding=Sharding.from_zero(2))),
                                     ("zero3+offload", dict(gpus=2, sharding=Sharding.from_zero(3),
                                                            offload=Offload(residual=True)))])
def test_the_profiler_times_every_operation_of_a_step(monkeypatch, name, kw):
    fake = FakeDriver()
    monkeypatch.setattr(profile, "driver", fake)
    monkeypatch.setattr(profile, "POOL_GROW", 7)         # the pool runs dry and grows mid-step
    plan = small_plan("qwen2", True, grad_accum=2, **kw)
    tr = FakeTrainer(plan, fake)
    micro = plan.batch.grad_accum            # micro-steps per rank
    want = expected(tr, micro)
    with Profiler(tr, micro, preroll=False) as prof:
        assert tr.profiler is prof and not any(rk.use_graphs for rk in tr.ranks)
        tr.step(micro)
    assert tr.profiler is None and all(rk.use_graphs for rk in tr.ranks)
    got = prof.timings[0]
    assert [lab for lab, _ in got] == [lab for lab, _ in want]
    assert [ms for _, ms in got] == pytest.approx([ms for _, ms in want])
    assert len(prof.timings) == plan.num_gpus
    rep = prof.report()
    assert rep["gpu_ms"] == pytest.approx(sum(ms for _, ms in want))
    assert sum(r["ms"] for r in rep["families"]) == pytest.approx(rep["gpu_ms"])
    assert sum(r["ms"] for r in rep["phases"]) == pytest.approx(rep["gpu_ms"])
    assert 0 < rep["floor_share"] < 1 and rep["micro_steps"] == micro and rep["ranks"] == plan.num_gpus
    phases = {r["name"] for r in rep["phases"]}
    assert {"forward", "backward", "LM head", "optimizer"} <= phases
    fams = {r["name"]: r for r in rep["families"]}          # bandwidth of what plan/traffic.py counts
    assert fams["gemm"]["gb_per_s"] is None and fams["swiglu"]["bytes"] > 0
    assert fams["swiglu"]["gb_per_s"] == pytest.approx(fams["swiglu"]["bytes"] / fams["swiglu"]["ms"] / 1e6)
    assert ("collectives" in phases) == (plan.num_gpus > 1)
    assert fake.created == len(fake.destroyed) > 0        # every event freed, pool leftovers included
    json.dumps(rep)


def test_the_preroll_queues_each_run_behind_a_spin_outside_every_row(monkeypatch):
    fake = FakeDriver()
    monkeypatch.setattr(profile, "driver", fake)
    monkeypatch.setattr(profile, "PREROLL_OPS", 16)
    import llmqgen.compile.cache as cache
    monkeypatch.setattr(cache, "compile_cached",
                        lambda src, arch: SimpleNamespace(cubin_path=SimpleNamespace(read_bytes=lambda: b"cubin")))
    tr = FakeTrainer(small_plan("qwen3", False), fake)
    with Profiler(tr, 1) as prof:
        tr.step(1)
    runs = [len(it[1]) for prog in (tr.ranks[0].micro, tr.ranks[0].norm_program, tr.ranks[0].optimizer_program)
            for it in prog if it[0] == "ops"]
    assert len(fake.spins) == sum(-(-n // 16) for n in runs)
    assert max(fake.spins) == 1000 * 16 * profile.PREROLL_US_PER_OP
    rep = prof.report()
    assert rep["preroll"] is True and "preroll_reason" not in rep
    assert rep["gpu_ms"] == pytest.approx(sum(ms for _, ms in expected(tr, 1)))    # no spin in any row
    assert rep["wall_ms"] is not None


def test_without_nvrtc_the_profile_runs_without_preroll_and_says_why(monkeypatch):
    fake = FakeDriver()
    monkeypatch.setattr(profile, "driver", fake)
    import llmqgen.compile.cache as cache

    def fail(src, arch):
        raise RuntimeError("NVRTC is not importable")
    monkeypatch.setattr(cache, "compile_cached", fail)
    tr = FakeTrainer(small_plan("llama", True), fake, flash=True)
    with Profiler(tr, 1) as prof:
        tr.step(1)
    rep = prof.report()
    assert rep["preroll"] is False and "NVRTC is not importable" in rep["preroll_reason"]
    assert not fake.spins and "pre-roll off" in format_profile(rep)
    att = {r["name"]: r for r in rep["families"]}["attention"]
    backward = sum(op["op"] == "attention_backward" for op in tr.ranks[0].micro[0][2])
    assert backward == tr.L and att["launches"] == att["ops"] + backward    # flash backward: two kernels


def test_a_failing_step_frees_its_events_and_restores_graphs(monkeypatch):
    fake = FakeDriver()
    monkeypatch.setattr(profile, "driver", fake)
    tr = FakeTrainer(small_plan("qwen2", True), fake)
    with pytest.raises(KeyError):
        with Profiler(tr, 1, preroll=False):
            tr._execute([rk.micro for rk in tr.ranks], key="micro")
            raise KeyError("boom")
    assert tr.profiler is None and all(rk.use_graphs for rk in tr.ranks)
    assert fake.created == len(fake.destroyed)


class GraphedTrainer(FakeTrainer):
    """The fake trainer stepping through the Trainer's own accumulate and optimizer_step (where the marks are)."""
    accumulate, _replay, optimizer_step = Trainer.accumulate, Trainer._replay, Trainer.optimizer_step
    _mark, _drain, any_rank, marks = Trainer._mark, Trainer._drain, Trainer.any_rank, None

    def __init__(self, plan, clock):
        super().__init__(plan, clock)
        self.optim, self.step_count = AdamW(), 0
        for rk in self.ranks:
            rk.use_graphs = False           # the fake driver captures nothing; the runs are the same
            rk.set_scalar = rk.feed = lambda *a: None
            rk.ptr = lambda *a: 0
            rk.download = lambda src, dtype, shape: np.ones(shape, dtype)

    def _sync(self):
        pass


def test_a_graphed_step_is_timed_in_parts(monkeypatch):
    fake = FakeDriver()
    monkeypatch.setattr(profile, "driver", fake)
    monkeypatch.setattr(trainer_mod, "driver", fake)
    plan = small_plan("qwen2", True, grad_accum=3)
    tr = GraphedTrainer(plan, fake)
    batches = [SimpleNamespace(targets=np.ones(4, np.int32))] * 3
    g = profile.graphed_step(tr, batches)
    ms = lambda prog: sum(ms for _, ms in expected(SimpleNamespace(ranks=[SimpleNamespace(  # noqa: E731
        micro=prog, norm_program=[], optimizer_program=[], attn=tr.ranks[0].attn)], sched=tr.sched), 1))
    assert g["parts"]["micro-step"] == {"count": 3, "ms": pytest.approx(3 * ms(tr.ranks[0].micro))}
    assert g["micro_step_ms"] == pytest.approx([ms(tr.ranks[0].micro)] * 3)
    assert g["parts"]["gradient norm"]["ms"] == pytest.approx(ms(tr.ranks[0].norm_program))
    assert g["parts"]["optimizer"]["ms"] == pytest.approx(ms(tr.ranks[0].optimizer_program))
    assert g["gpu_ms"] == pytest.approx(sum(p["ms"] for p in g["parts"].values()))
    assert g["host_wait_ms"] == pytest.approx(g["wall_ms"] - g["gpu_ms"])
    assert tr.marks is None and fake.created == len(fake.destroyed) > 0
    line = profile.format_graphed(g)
    assert "micro-step" in line and "(3)" in line and "optimizer" in line and "waiting for the host" in line


def test_rank_program_keeps_each_closures_operation():
    tr = FakeTrainer(small_plan("qwen2", True, gpus=2, sharding=Sharding.from_zero(3)), FakeDriver())
    rk = tr.ranks[0]
    items = rk.micro
    assert {it[0] for it in items} == {"ops", "collective", "await"}
    for it in items:
        if it[0] == "ops":
            fns, ops = it[1], it[2]
            assert len(fns) == len(ops) > 0
            rk.ran.clear()
            for f in fns:
                f()
            assert rk.ran == ops        # closure i runs operation i


# --- the bench record and the CLI ----------------------------------------------------------------------
DEVICE = {"name": "NVIDIA H200", "driver": "580.95.05"}


def test_the_bench_record_carries_the_profile(tmp_path):
    plan = Plan.from_json(PLANS[0].read_text())
    from llmqgen.runtime.devmem import MemoryReport
    mem = MemoryReport(7 << 30, "process", 8 << 30)
    rep = summarize(SYNTH, micro_steps=1, wall_ms=40.0)
    assert "profile" not in bench_record(plan, [10.0, 10.0], 1, DEVICE, {}, mem)
    r = bench_record(plan, [10.0, 10.0], 1, DEVICE, {}, mem, profile=rep)
    assert r["profile"] == rep
    written = json.loads(write_bench(r, tmp_path).read_text())
    assert written["profile"]["floor_share"] == pytest.approx(rep["floor_share"])
    assert [f["name"] for f in written["profile"]["families"]] == [f["name"] for f in rep["families"]]
    with pytest.raises(ValueError, match="report of runtime.profile"):
        bench_record(plan, [10.0, 10.0], 1, DEVICE, {}, mem, profile={"ms": 1})


def test_bench_profile_flag_reaches_run_bench(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import llmqgen.runtime.bench as bench_mod
    from llmqgen.cli import main
    seen = {}
    monkeypatch.setattr(bench_mod, "run_bench", lambda p, **kw: seen.update(kw))
    for args, want in (([], False), (["--profile"], True)):
        res = CliRunner().invoke(main, ["bench", "--plan", str(PLANS[0]), "--out", str(tmp_path), *args])
        assert res.exit_code == 0, res.output
        assert seen["profile"] is want


def test_run_bench_with_profile_records_the_graphed_step_and_the_predicted_families(monkeypatch, tmp_path, caplog):
    """run_bench's --profile branch through the CPU stand-in Trainer; the GPU timings themselves are canned."""
    import logging

    import llmqgen.runtime.bench as bench_mod
    from fake_trainer import FakeTrainer as CheckpointFake, tiny_plan
    plan = tiny_plan()
    graphed = {"wall_ms": 12.0, "gpu_ms": 11.0, "parts": {"micro-step": {"count": 2, "ms": 10.0},
                                                          "optimizer": {"count": 1, "ms": 1.0}},
               "micro_step_ms": [5.0, 5.0], "host_wait_ms": 1.0}
    monkeypatch.setattr(bench_mod, "Trainer", CheckpointFake)
    monkeypatch.setattr(bench_mod, "_driver_version", lambda: "test")
    monkeypatch.setattr(bench_mod, "profile_step", lambda tr, data: summarize(SYNTH, micro_steps=1, wall_ms=40.0))
    monkeypatch.setattr(bench_mod, "graphed_step", lambda tr, data: graphed)
    caplog.set_level(logging.INFO, logger="llmqgen")
    path = bench_mod.run_bench(plan, steps=1, warmup=0, out_root=tmp_path, profile=True)
    rec = json.loads(path.read_text())["profile"]
    assert rec["graphed"] == graphed
    from llmqgen.plan.cost import step_cost
    assert rec["predicted_ms"] == pytest.approx(profile.predicted_family_ms(step_cost(plan)))
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "family vs the cost model" in said and "graphed step: 12.0 ms of wall time" in said
