"""Offload at a real model's width: Qwen2.5-7B's shapes (hidden 3584, FFN 18944, 28/4 heads of 128, vocab
152064) with 2 layers, micro-batch 4 x 1024, 2 micro-steps a step. Every offload choice of the 7B plans
for a 16/24 GB card, alone and as those plans combine them, gives the plain plan's losses and gradient
norms bit for bit, and the norms are finite. At this size transfers take milliseconds, so the copies
really run beside the computation (the tiny models of test_offload.py finish them at once), and the
whole-model tensors' offloaded gradients are written by the LM head's GEMM and the embedding backward
in mapped host memory."""
import tempfile

import numpy as np
import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

pytest.importorskip("nvmath", reason="the runtime's GEMMs need nvmath-python: pip install 'llmqgen[gpu]'")
pytest.importorskip("cudnn", reason="the runtime's attention needs nvidia-cudnn-frontend")

from harness import small_plan  # noqa: E402
from test_trainer import batches  # noqa: E402

from llmqgen.plan.schema import Offload, Recompute  # noqa: E402
from llmqgen.runtime.bench import BenchParams  # noqa: E402
from llmqgen.runtime.trainer import Trainer  # noqa: E402

STEPS = 3
SHAPE = dict(C=3584, F=18944, HQ=28, HKV=4, HD=128, V=152064, L=2, B=4, T=1024, tie_embeddings=False,
             grad_accum=2)
ALL = dict(master=True, adam_m=True, adam_v=True, quantized_weights=True, gradients=True)
CASES = {   # name: (recompute, offload)
    "gradients": (Recompute(), Offload(gradients=True)),
    "quantized_weights": (Recompute(), Offload(quantized_weights=True)),
    "optimizer states": (Recompute(), Offload(master=True, adam_m=True, adam_v=True)),
    "residual": (Recompute(), Offload(residual=True)),
    "1x4090 mb16": (Recompute(swiglu=True, norm=True, ffn=True), Offload(**ALL)),
    "1x4060ti": (Recompute(swiglu=True, norm=True), Offload(residual=True, **ALL)),
}


def _run(plan):
    data = [batches(plan, 2, seed=s, motif=True) for s in range(STEPS)]
    tr = Trainer(plan, out_root=tempfile.mkdtemp())
    try:
        tr.load_params(BenchParams(plan.model))
        out = []
        for step in range(STEPS):
            tr.accumulate(data[step])
            out.append((tr.loss(), tr.optimizer_step(lr=1e-4)))
        return out
    finally:
        tr.close()


_PLAIN: dict[str, list] = {}


@pytest.mark.parametrize("name", list(CASES))
def test_offload_at_7b_width_is_bit_identical(name):
    recompute, offload = CASES[name]
    key = str(recompute)
    if key not in _PLAIN:
        _PLAIN[key] = _run(small_plan("qwen2", True, recompute=recompute, **SHAPE))
    got = _run(small_plan("qwen2", True, recompute=recompute, offload=offload, **SHAPE))
    print(f"\n  {name}: (loss, norm) {[(round(a, 5), round(b, 5)) for a, b in got]}"
          f"\n  plain: {[(round(a, 5), round(b, 5)) for a, b in _PLAIN[key]]}")
    assert all(np.isfinite(v) for pair in got for v in pair)
    assert got == _PLAIN[key]
