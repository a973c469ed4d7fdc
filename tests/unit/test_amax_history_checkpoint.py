"""Delayed scaling's amax history in checkpoints, through the real Trainer over the stand-in driver
(tests/standin_driver.py: device memory is host memory, so the rows really hold what is written): the state
carries GPU 0's history, a resume writes it to every GPU and puts its max into each activation slot, a history
of another length keeps its newest entries, a checkpoint without one leaves the slots cold, and the decoded
checkpoint keeps the tensor. The GPU side (a resumed run bit-identical): tests/gpu/test_delayed_scaling.py."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import standin_driver  # noqa: E402  (before the runtime: it stubs nvmath)
from golden_build import ARCH, NVRTC  # noqa: E402
from harness import small_plan  # noqa: E402

from llmqgen.checkpoint.layout import AMAX_HISTORY_KEY, decode  # noqa: E402
from llmqgen.codegen.folder import folder_files, write_files, write_manifest  # noqa: E402
from llmqgen.codegen.render import render  # noqa: E402
from llmqgen.compile.build_folder import load  # noqa: E402
from llmqgen.layout import FP8_SLOT_BYTES, act_slot_count, fp8_slot_count  # noqa: E402
from llmqgen.runtime.trainer import Trainer  # noqa: E402


def _trainer(monkeypatch, tmp_path, gpus=1, **over):
    """A Trainer of a tiny plan over a fresh stand-in driver (earlier trainers' kernels are then gone)."""
    standin_driver.install(monkeypatch)
    plan = small_plan("qwen2", True, gpus=gpus, **over)
    folder = tmp_path / plan.name
    files = folder_files(plan, render(plan, ARCH))
    del files["program.cu"]
    write_files(folder, files)
    write_manifest(folder, ARCH, NVRTC, compiled=False)
    return Trainer(plan, build=load(folder, plan, compiled=False), devices=list(range(gpus)), attention="flash")


def _slots(rk, L):
    return rk.download(rk.ptr("stats.fp8[0]", None), np.float32, (fp8_slot_count(L), FP8_SLOT_BYTES // 4))


def test_the_history_rides_in_the_state_and_a_resume_restores_it(monkeypatch, tmp_path):
    tr = _trainer(monkeypatch, tmp_path, gpus=2, scaling="delayed", amax_history=4)
    L = tr.plan.model.num_layers
    n = act_slot_count(L)
    hist = np.random.default_rng(0).uniform(0, 3, (n, 4)).astype(np.float32)
    rk0 = tr.ranks[0]
    rk0.upload(rk0.ptr("stats.amax_history[0]", None), hist)
    state = tr.state_tensors()
    np.testing.assert_array_equal(state[AMAX_HISTORY_KEY], hist)
    assert decode(state, tr.plan)[AMAX_HISTORY_KEY] is not None

    tr2 = _trainer(monkeypatch, tmp_path, gpus=2, scaling="delayed", amax_history=4)
    tr2.load_state_tensors(state, 7)
    for rk in tr2.ranks:                      # every GPU starts from GPU 0's history
        got = rk.download(rk.ptr("stats.amax_history[0]", None), np.float32, (n, 4))
        np.testing.assert_array_equal(got, hist)
        slots = _slots(rk, L)
        np.testing.assert_array_equal(slots[:n, 1], hist.max(1))
        assert not slots[n:, 1].any() and not slots[:, 0].any()      # weights and amaxes untouched


@pytest.mark.parametrize("length", [2, 6])
def test_a_history_of_another_length_keeps_its_newest_entries(monkeypatch, tmp_path, length):
    tr = _trainer(monkeypatch, tmp_path, scaling="delayed", amax_history=4)
    n = act_slot_count(tr.plan.model.num_layers)
    state = tr.state_tensors()
    old = np.arange(n * length, dtype=np.float32).reshape(n, length) + 1
    tr.load_state_tensors({**state, AMAX_HISTORY_KEY: old}, 3)
    rk = tr.ranks[0]
    got = rk.download(rk.ptr("stats.amax_history[0]", None), np.float32, (n, 4))
    k = min(4, length)
    np.testing.assert_array_equal(got[:, :k], old[:, :k])
    assert not got[:, k:].any()
    np.testing.assert_array_equal(_slots(rk, tr.plan.model.num_layers)[:n, 1], old[:, :k].max(1))


def test_without_a_history_the_slots_stay_cold_and_current_plans_ignore_it(monkeypatch, tmp_path):
    tr = _trainer(monkeypatch, tmp_path, scaling="delayed", amax_history=4)
    L = tr.plan.model.num_layers
    state = {k: v for k, v in tr.state_tensors().items() if k != AMAX_HISTORY_KEY}
    tr.load_state_tensors(state, 1)
    assert not _slots(tr.ranks[0], L)[:, 1].any()
    with pytest.raises(ValueError, match="written for another model"):
        tr.load_state_tensors({**state, AMAX_HISTORY_KEY: np.ones((3, 4), np.float32)}, 1)
    cur = _trainer(monkeypatch, tmp_path)                 # current scaling: no history kept or read
    cur_state = cur.state_tensors()
    assert AMAX_HISTORY_KEY not in cur_state
    cur.load_state_tensors({**cur_state, AMAX_HISTORY_KEY: np.ones((act_slot_count(L), 4), np.float32)}, 1)
    assert not _slots(cur.ranks[0], L)[:, 1].any()
