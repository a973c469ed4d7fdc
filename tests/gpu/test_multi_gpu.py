"""Several GPUs in one process, as ranks sharing the lent GPU (devices=[0, 0]): ZeRO-0/1/2/3 with peer and
host-staged copy-engine collectives against the one-GPU run of the same tokens (2, 3 and 4 ranks), and
checkpoints moved between GPU counts. Ranks on one GPU run every code path of several GPUs except the
peer link itself."""
import tempfile

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

pytest.importorskip("nvmath", reason="the runtime's GEMMs need nvmath-python: pip install 'llmqgen[gpu]'")
pytest.importorskip("cudnn", reason="the runtime's attention needs nvidia-cudnn-frontend")

from harness import small_plan  # noqa: E402
from reference import init_params  # noqa: E402
from test_trainer import batches  # noqa: E402

import llmqgen.plan.memory as memory  # noqa: E402
from llmqgen.plan.schema import Offload, Recompute, Sharding  # noqa: E402
from llmqgen.runtime.trainer import Trainer  # noqa: E402

STEPS = 4


def _plans(fp8, zero, peer, gpus=2, offload=None, **extra):
    """The one-GPU plan and the several-GPU plan of the same tokens per step; `offload` only on the latter."""
    one = small_plan("qwen2", fp8, grad_accum=gpus, **extra)
    many = small_plan("qwen2", fp8, gpus=gpus, grad_accum=1, **extra).model_copy(
        update={"sharding": Sharding.from_zero(zero), "peer_copies": peer, "name": f"tiny-{gpus}gpu-z{zero}",
                **({"offload": offload} if offload else {})})
    return one, many


def _run(plan, data, devices=None, steps=STEPS, params=None):
    tr = Trainer(plan, out_root=tempfile.mkdtemp(), devices=devices)
    try:
        tr.load_params(params or init_params(plan.model, seed=1))
        losses, norms = [], []
        for _ in range(steps):
            tr.accumulate(data)
            losses.append(tr.loss())
            norms.append(tr.optimizer_step(lr=3e-3))
        return losses, norms, tr.params(), tr.state_tensors()
    finally:
        tr.close()


CASES = [  # fp8, zero, peer, extra
    (True, 1, True, {}), (True, 1, False, {}), (True, 2, True, {}), (True, 2, False, {}),
    (False, 0, True, {}), (False, 1, False, {}), (False, 2, True, {}),
    (False, 1, True, {"master": "fp32"}), (True, 1, True, {"master": "fp32"}),
    (True, 3, True, {}), (True, 3, False, {}), (False, 3, True, {}),
    (True, 3, True, {"recompute": Recompute(block=True)}), (True, 3, True, {"lm_head": "fp8"}),
    (True, 1, False, {"gpus": 3}), (True, 3, False, {"gpus": 3}), (False, 2, True, {"gpus": 4}),
    (True, 3, True, {"offload": Offload(quantized_weights=True)}),     # e4m3 shards in pinned host memory
    (True, 3, False, {"offload": Offload(quantized_weights=True)}),
    # the choices of a 4x4090 plan (issue 11 e): every state in pinned host memory, the optimizer streamed
    (True, 3, False, {"offload": Offload(master=True, adam_m=True, adam_v=True, residual=True,
                                         quantized_weights=True, gradients=True)}),
    (True, 2, False, {"offload": Offload(master=True, adam_m=True, adam_v=True, gradients=True)}),
]


@pytest.mark.parametrize("fp8,zero,peer,extra", CASES, ids=lambda v: str(v))
def test_ranks_match_one_gpu(fp8, zero, peer, extra, monkeypatch):
    monkeypatch.setattr(memory, "COMM_PIECE", 64 << 10)     # several pieces per tensor: the pipelined path
    extra = dict(extra)
    gpus = extra.pop("gpus", 2)
    one, two = _plans(fp8, zero, peer, gpus=gpus, **extra)
    data = batches(one, gpus, seed=5, motif=fp8)
    l1, n1, p1, _ = _run(one, data)
    l2, n2, p2, _ = _run(two, data, devices=[0] * gpus)
    print(f"\n  fp8={fp8} zero={zero} peer={peer} {extra} gpus={gpus}: losses 1 GPU {[f'{x:.4f}' for x in l1]}, "
          f"{gpus} ranks {[f'{x:.4f}' for x in l2]}; norms {n1[0]:.4f} vs {n2[0]:.4f}")
    assert abs(l1[0] - l2[0]) / l1[0] < 1e-5                     # same weights: only the sum order differs
    assert abs(n1[0] - n2[0]) / n1[0] < 1e-2                     # the reduced gradients' norm
    tol = 2e-2 if fp8 else 1e-2
    assert max(abs(a - b) / a for a, b in zip(l1, l2)) < tol
    assert l2[-1] < l2[0] - 0.3                                  # and it learns
    for k in p1:     # relative, except for tensors still near their zero init (biases): a few lr steps
        d = np.abs(p1[k] - p2[k]).mean()
        assert d < 5e-2 * np.abs(p1[k]).mean() + 1e-3, (k, d, np.abs(p1[k]).mean())


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
def test_checkpoint_moves_between_gpu_counts(fp8):
    """State of 2 ranks (ZeRO-1) loads on 1 GPU and back; the next loss is the same either way."""
    one, two = _plans(fp8, 1, False)
    data = batches(one, 2, seed=7, motif=fp8)
    _, _, _, state2 = _run(two, data, devices=[0, 0], steps=2)
    nxt = {}
    for plan, devices in ((one, None), (two, [0, 0])):
        tr = Trainer(plan, out_root=tempfile.mkdtemp(), devices=devices)
        try:
            tr.load_state_tensors(state2, step=2)
            again = tr.state_tensors()
            assert all(np.array_equal(again[k], state2[k]) for k in state2), "state must round-trip exactly"
            tr.accumulate(data)
            nxt[len(tr.ranks)] = tr.loss()
        finally:
            tr.close()
    print(f"\n  next loss after loading the 2-rank state: 1 GPU {nxt[1]:.6f}, 2 ranks {nxt[2]:.6f}")
    assert abs(nxt[1] - nxt[2]) / nxt[1] < 1e-5
