"""Offload and one-GPU weight streaming execute exactly: 10 optimizer steps (2 micro-steps each) of a tiny
3-layer model with each choice, alone and combined, give losses and gradient norms bit-identical to the plain
plan's, in BF16 and FP8 — and the same final weights. Host rows live in mapped pinned memory; block weights,
block gradients, residuals and the optimizer's block states stream through their device double buffers by
asynchronous copies on the copy streams, beside the computation (plan/schedule.py). Also: the device arena is exactly the plan's device rows,
and the driver's free memory drops by exactly that much when it is allocated."""
import tempfile

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

pytest.importorskip("nvmath", reason="the runtime's GEMMs need nvmath-python: pip install 'llmqgen[gpu]'")
pytest.importorskip("cudnn", reason="the runtime's attention needs nvidia-cudnn-frontend")

from harness import OFFLOAD_OPTIONS, small_plan  # noqa: E402
from reference import init_params  # noqa: E402
from test_trainer import batches  # noqa: E402

from llmqgen.plan.lifetimes import packed_table  # noqa: E402
from llmqgen.plan.memory import arena_peak, memory_table  # noqa: E402
from llmqgen.plan.schema import Offload, Sharding  # noqa: E402
from llmqgen.runtime import driver  # noqa: E402
from llmqgen.runtime.arena import Arena  # noqa: E402
from llmqgen.runtime.trainer import Trainer  # noqa: E402

STEPS = 10
OPTIONS = OFFLOAD_OPTIONS


def _plan(fp8, **extra):
    return small_plan("qwen2", fp8, L=3, grad_accum=2, **extra)


def _run(plan):
    data = [batches(plan, 2, seed=s, motif=plan.fp8) for s in range(STEPS)]
    tr = Trainer(plan, out_root=tempfile.mkdtemp())
    try:
        rows = packed_table(plan)      # the device arena is the packed peak; host rows lie side by side
        rk = tr.ranks[0]
        assert rk.mem.nbytes == arena_peak(rows)
        assert rk.host.nbytes == sum(r.total for r in rows if r.place == "host" and r.lifetime != "reserve")
        tr.load_params(init_params(plan.model, seed=1))
        losses, norms = [], []
        for step in range(STEPS):
            tr.accumulate(data[step])
            losses.append(tr.loss())
            norms.append(tr.optimizer_step(lr=3e-3))
        return losses, norms, tr.state_tensors()
    finally:
        tr.close()


_PLAIN: dict[bool, tuple] = {}


def _plain(fp8):
    if fp8 not in _PLAIN:
        _PLAIN[fp8] = _run(_plan(fp8))
    return _PLAIN[fp8]


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_offload_is_bit_identical(name, fp8):
    plan = _plan(fp8, **OPTIONS[name])
    host = {r.name.split(".")[0] for r in memory_table(plan) if r.place == "host"}
    print(f"\n  {name} {'fp8' if fp8 else 'bf16'}: host rows {sorted(host)}")
    losses, norms, state = _run(plan)
    ref_losses, ref_norms, ref_state = _plain(fp8)
    print(f"  losses {[f'{x:.5f}' for x in losses]}")
    assert all(np.isfinite(losses))
    assert losses == ref_losses, (losses, ref_losses)
    assert norms == ref_norms, (norms, ref_norms)
    assert state.keys() == ref_state.keys()
    for k in state:      # masters and Adam moments, bit for bit
        assert np.array_equal(state[k].view(np.uint8), ref_state[k].view(np.uint8)), k


def test_device_arena_takes_exactly_the_planned_bytes():
    """The driver's free memory drops by the device arena, which is the plan's device rows (reserve aside),
    up to the allocation granularity (2 MiB pages; 8 MiB of slack)."""
    plan = _plan(True, offload=Offload(master=True, adam_m=True, adam_v=True, residual=True, gradients=True),
                 sharding=Sharding.from_zero(3))
    rows = memory_table(plan)
    planned = sum(r.total for r in rows if r.place == "device" and r.lifetime != "reserve")
    dev = driver.open_device(0)
    dev.synchronize()
    free0, _ = driver.mem_info()
    arena = Arena(rows, "device")
    try:
        free1, _ = driver.mem_info()
        assert arena.nbytes == planned
        assert planned <= free0 - free1 < planned + (8 << 20), (free0 - free1, planned)
    finally:
        arena.free()
    host = Arena(rows, "host")
    try:          # mapped: the GPU addresses the pinned rows at the same (unified) address
        assert host.device_base == host.base
    finally:
        host.free()
