"""GEMM algorithms chosen by timing on the GPU (runtime/gemm_search.py): every GEMM of the micro-step is timed
once, kept in the build folder and the machine's cache, so that another run of the build, and another build
of the same arithmetic, repeat the first bit for bit; fast accumulation's losses stay those of precise
accumulation within FP8 tolerance."""
import json
import tempfile

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
pytest.importorskip("nvmath", reason="the runtime's GEMMs need nvmath-python: pip install 'llmqgen[gpu]'")
pytest.importorskip("cudnn", reason="the runtime's attention needs nvidia-cudnn-frontend")

from harness import small_plan  # noqa: E402
from reference import init_params  # noqa: E402
from test_trainer import batches  # noqa: E402

from llmqgen.runtime import gemm_search  # noqa: E402
from llmqgen.runtime.trainer import Trainer  # noqa: E402


def _losses(plan, out_root, steps=3):
    tr = Trainer(plan, out_root=out_root)
    global GEMMS
    GEMMS = [g.label for k, g in tr.ranks[0].gemms.items() if k[0] != "bias"]
    try:
        tr.load_params(init_params(plan.model, seed=3))
        data = batches(plan, plan.batch.grad_accum, seed=5, motif=True)
        out = []
        for _ in range(steps):
            tr.accumulate(data)
            out.append(tr.loss())
            tr.optimizer_step(lr=3e-3)
        return out, tr.build.path, {k: v.copy() for k, v in tr.params().items()}
    finally:
        tr.close()


def test_chosen_algorithms_are_kept_and_reused_bit_for_bit(monkeypatch):
    plan = small_plan("qwen2", True, grad_accum=2, fast_accum=True, lm_head="fp8")
    root = tempfile.mkdtemp()
    monkeypatch.setattr(gemm_search, "_chosen", {})
    first, folder, p1 = _losses(plan, root)
    saved = json.loads((folder / gemm_search.CHOICES).read_text())
    assert {k.split(" | ")[-1] for k in saved} == set(GEMMS), saved             # every GEMM of the micro-step
    shapes = {(op["M"], op["N"], op["K"]) for op in plan_forward_linears(folder)}
    assert len([k for k in saved if "fast-accum" in k]) == len(shapes), (saved, shapes)   # the forward ones
    monkeypatch.setattr(gemm_search, "_chosen", {})                   # a new process: read from the folder
    again, _, p2 = _losses(plan, root)
    assert again == first
    assert all(np.array_equal(p1[k], p2[k]) for k in p1)
    assert json.loads((folder / gemm_search.CHOICES).read_text()) == saved
    precise, _, _ = _losses(small_plan("qwen2", True, grad_accum=2, lm_head="fp8"), tempfile.mkdtemp())
    print(f"\n  losses fast {[f'{x:.4f}' for x in first]} precise {[f'{x:.4f}' for x in precise]}")
    assert np.allclose(first, precise, rtol=1e-2)


def plan_forward_linears(folder):
    sched = json.loads((folder / "schedule.json").read_text())
    from llmqgen.plan.schedule import iter_ops
    return [op for op in iter_ops(sched) if op["op"] == "linear" and op["pass"] == "forward"]


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
def test_another_build_of_the_same_arithmetic_takes_the_machine_s_choices(monkeypatch, fp8):
    """A recompute variant, built in a fresh process state, times nothing and repeats the first bit for bit."""
    from llmqgen.plan.schema import Recompute
    monkeypatch.setattr(gemm_search, "_chosen", {})
    first, _, p1 = _losses(small_plan("qwen2", fp8, grad_accum=2), tempfile.mkdtemp())

    def no_timing(*a):
        raise AssertionError("a GEMM the machine's cache holds was timed again")
    monkeypatch.setattr(gemm_search, "_chosen", {})
    monkeypatch.setattr(gemm_search, "fastest", no_timing)
    other = small_plan("qwen2", fp8, grad_accum=2, recompute=Recompute(block=True))
    again, folder, p2 = _losses(other, tempfile.mkdtemp())
    assert again == first and all(np.array_equal(p1[k], p2[k]) for k in p1)
    assert len(gemm_search.saved(folder)) == len(set(GEMMS))     # (an FP8 dgrad may share a forward's label)
