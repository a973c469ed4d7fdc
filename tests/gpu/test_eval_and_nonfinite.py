"""Issue 14.13 on the GPU: evaluation runs the forward and the loss only (schedule `eval.head`) — its loss
equals the training forward's on the same batch, bit for bit, and it leaves the gradients alone; a step
whose gradient norm is not finite is skipped before any update is launched — weights, Adam moments, FP8
weight scales and the step counter stay, so the run continues exactly as if the step had not happened."""
import math
import tempfile

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
pytest.importorskip("nvmath", reason="the runtime's GEMMs need nvmath-python: pip install 'llmqgen[gpu]'")
pytest.importorskip("cudnn", reason="the runtime's attention needs nvidia-cudnn-frontend")

from harness import small_plan  # noqa: E402

from llmqgen.data.loader import TokenBatch, embedding_backward_index  # noqa: E402
from llmqgen.models.init import init_params  # noqa: E402
from llmqgen.plan.schema import Recompute  # noqa: E402
from llmqgen.runtime.trainer import Trainer  # noqa: E402


def batches(plan, n, seed=0):
    rng = np.random.default_rng(seed)
    B, T, V = plan.batch.micro_batch, plan.batch.seq_len, plan.model.vocab_size
    out = []
    for _ in range(n):
        toks = rng.integers(0, V, size=(B, T + 1), dtype=np.int32)
        inputs, targets = toks[:, :-1].copy(), toks[:, 1:].copy()
        targets[0, :5] = -100
        order, seg, uniq = embedding_backward_index(inputs)
        out.append(TokenBatch(inputs, targets, order, seg, uniq))
    return out


def trainer(plan):
    tr = Trainer(plan, out_root=tempfile.mkdtemp())
    tr.load_params(init_params(plan.model, 3))
    return tr


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(np.array_equal(np.asarray(a[k]).view(np.uint8), np.asarray(b[k]).view(np.uint8))
                                    for k in a)


CASES = [("qwen2", True, {}), ("qwen2", False, {}), ("llama", True, {"lm_head_chunks": 2}),
         ("qwen3", True, {"recompute": Recompute(block=True)}), ("qwen2", True, {"grad_accum": 2}),
         ("qwen2", True, {"lm_head": "fp8", "lm_head_chunks": 2})]


@pytest.mark.parametrize("arch,fp8,extra", CASES, ids=lambda v: str(v))
def test_eval_is_the_training_forward_and_leaves_gradients_alone(arch, fp8, extra):
    plan = small_plan(arch, fp8, **extra)
    tr = trainer(plan)
    try:
        data = batches(plan, plan.batch.grad_accum, seed=1)
        tr.accumulate(data)
        train_loss = tr.loss()
        grads = tr.gradients()
        assert any(np.any(g != 0) for g in grads.values())
        ev = tr.eval_loss(data)
        assert ev == train_loss, f"eval loss {ev!r} != training forward loss {train_loss!r}"
        assert same(tr.gradients(), grads), "eval changed the gradients: it ran a backward"
        assert tr.eval_loss(data) == ev                    # the eval graph replays the same numbers
        tr.optimizer_step(3e-3)
        after_eval = tr.state_tensors()
    finally:
        tr.close()
    ref = trainer(plan)                                      # the same step without an eval in between
    try:
        ref.accumulate(data)
        ref.optimizer_step(3e-3)
        assert same(ref.state_tensors(), after_eval)
    finally:
        ref.close()


@pytest.mark.parametrize("fp8", [True, False])
def test_nonfinite_gradient_norm_skips_the_step_before_any_update(fp8):
    plan = small_plan("qwen2", fp8)
    A, B = batches(plan, 2, seed=2)
    ref = trainer(plan)
    try:
        ref.accumulate([A])
        ref.optimizer_step(3e-3)
        ref_state = ref.state_tensors()
        ref.accumulate([B])
        ref_loss = ref.loss()
    finally:
        ref.close()
    tr = trainer(plan)
    try:
        tr.accumulate([A])
        rk = tr.ranks[0]
        g = rk.read_row("grads.final_norm", 0)
        g[0] = np.nan                                        # one poisoned gradient element
        rk.write_raw("grads.final_norm", 0, g)
        before = tr.state_tensors()
        norm = tr.optimizer_step(3e-3)
        assert not math.isfinite(norm) and tr.step_count == 0
        assert same(tr.state_tensors(), before), "a non-finite step changed weights or Adam moments"
        assert all(np.all(v == 0) for v in tr.gradients().values()), "the skipped step's gradients were kept"
        assert math.isnan(tr.optimizer_step(3e-3, apply=False))     # a non-finite loss: skipped as well
        tr.accumulate([A])                                   # the step again, clean: as if nothing happened
        norm = tr.optimizer_step(3e-3)
        assert math.isfinite(norm) and tr.step_count == 1
        assert same(tr.state_tensors(), ref_state)
        tr.accumulate([B])                                   # FP8 weight scales intact: the next loss agrees
        assert tr.loss() == ref_loss
    finally:
        tr.close()
