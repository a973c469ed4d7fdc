"""The device arena packed by lifetime (plan/lifetimes.py) against the same plan laid out row after row:
losses, gradient norms and parameters must be bit-identical over micro-steps and optimizer steps. With
`poison`, every packed row is filled with 0xFF (NaN in bf16/fp32) before training: an operation that
reads a packed row before the schedule wrote it would spread NaN."""
import dataclasses
import tempfile

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

pytest.importorskip("nvmath", reason="the runtime's GEMMs need nvmath-python: pip install 'llmqgen[gpu]'")
pytest.importorskip("cudnn", reason="the runtime's attention needs nvidia-cudnn-frontend")

from harness import small_plan  # noqa: E402
from reference import init_params  # noqa: E402
from test_trainer import batches  # noqa: E402

import llmqgen.runtime.trainer as trainer_module  # noqa: E402
from llmqgen.plan.lifetimes import packed_table, plan_interference  # noqa: E402
from llmqgen.plan.memory import arena_peak, memory_table  # noqa: E402
from llmqgen.plan.schema import Recompute, Sharding  # noqa: E402
from llmqgen.runtime import driver  # noqa: E402
from llmqgen.runtime.trainer import Trainer  # noqa: E402


def _run(plan, data, *, devices=None, attention="cudnn", poison=False, steps=2):
    tr = Trainer(plan, out_root=tempfile.mkdtemp(), devices=devices, attention=attention)
    try:
        for rk in tr.ranks:
            rows = list(rk.rows.values())
            assert rk.mem.nbytes == arena_peak(rows)
        tr.load_params(init_params(plan.model, seed=1))
        if poison:
            packed = plan_interference(plan, memory_table(plan))[2]
            for rk in tr.ranks:
                rk.dev.make_current()
                for r in rk.rows.values():
                    if r.place == "device" and r.name in packed:
                        driver.memset_d8(rk.mem.ptr(r.name), 0xFF, r.total, rk.stream)
                driver.stream_synchronize(rk.stream)
        losses, norms = [], []
        for _ in range(steps):
            tr.accumulate(data)
            losses.append(tr.loss())
            norms.append(tr.optimizer_step(lr=3e-3))
        return losses, norms, tr.params()
    finally:
        tr.close()


def _unpacked(monkeypatch):
    """Ranks allocate the table row after row (the layout before packing): the build folder's layout
    replaced by the unpacked table once loaded."""
    opened = trainer_module.open_build
    monkeypatch.setattr(trainer_module, "open_build", lambda plan, arch, out_root: dataclasses.replace(
        opened(plan, arch, out_root), rows={r.name: r for r in memory_table(plan)}))


CASES = [  # arch, fp8, gpus, zero, extra
    ("qwen2", True, 1, 0, {}), ("qwen2", False, 1, 0, {}), ("llama", True, 1, 0, {"lm_head_chunks": 2}),
    ("qwen3", True, 1, 0, {}), ("qwen2", True, 1, 0, {"recompute": Recompute(block=True)}),
    ("qwen2", True, 1, 0, {"recompute": Recompute(ffn=True, norm=True, attention=True)}),
    ("qwen3", False, 1, 0, {"attention": "flash"}), ("qwen2", True, 1, 0, {"lm_head": "fp8", "lm_head_chunks": 2}),
    ("qwen2", True, 2, 2, {}), ("qwen2", True, 2, 3, {}), ("qwen2", False, 2, 3, {"recompute": Recompute(block=True)}),
]


@pytest.mark.parametrize("poison", [False, True], ids=["zeroed", "poisoned"])
@pytest.mark.parametrize("arch,fp8,gpus,zero,extra", CASES, ids=lambda v: str(v))
def test_packed_arena_matches_row_after_row(arch, fp8, gpus, zero, extra, poison, monkeypatch):
    extra = dict(extra)
    attention = extra.pop("attention", "cudnn")
    plan = small_plan(arch, fp8, gpus=gpus, grad_accum=2, num_layers=4, **extra)
    if gpus > 1:
        plan = plan.model_copy(update={"sharding": Sharding.from_zero(zero), "peer_copies": True})
    rows = packed_table(plan)
    assert arena_peak(rows) < arena_peak(memory_table(plan))
    data = batches(plan, 2 * gpus, seed=3, motif=fp8)
    devices = [0] * gpus
    packed = _run(plan, data, devices=devices, attention=attention, poison=poison)
    with monkeypatch.context() as m:
        _unpacked(m)
        plain = _run(plan, data, devices=devices, attention=attention)
    print(f"\n  {arch} fp8={fp8} gpus={gpus} zero={zero} {extra}: arena {arena_peak(rows) >> 20} MiB packed, "
          f"{arena_peak(memory_table(plan)) >> 20} MiB row after row; losses {packed[0]} vs {plain[0]}")
    assert packed[0] == plain[0] and packed[1] == plain[1]
    for k in plain[2]:
        assert np.array_equal(packed[2][k], plain[2][k]), k
