"""CPU stand-in for the GPU Trainer, so that CPU tests run llmqgen's real training loop (runtime/run.py:
data loader, LR schedule, log, checkpoints, resume, export) — adapted from
shared/field-cases/_harness/fake_gpu.py.

The stand-in keeps the real Trainer's state format and step logic: `state_tensors`, `load_state_tensors`,
`params` and `optimizer_step` (norm read back first, a non-finite step skipped) are the real methods of
llmqgen.runtime.trainer.Trainer, running over a fake rank whose rows come from the plan's real memory
table and whose memory is numpy arrays. Only kernels are absent: the "loss" is a fixed function of the
step and the batch, the "update" adds lr to every master weight and Adam moment, and the "norm" is 1 unless
a test poisons steps (`FakeTrainer.poison`: optimizer-step attempts whose norm is NaN).

    from fake_trainer import install, tiny_plan, tiny_data
    run = install()                     # llmqgen.runtime.run with the stand-in
    run.train(tiny_plan(), run.RunConfig(data=tiny_data(tmp / "data"), out=tmp / "run", steps=3))
"""
from __future__ import annotations

import sys
import types
from math import prod
from pathlib import Path

import numpy as np

import standin_driver  # noqa: F401,E402  (stubs nvmath, which runtime/blas.py imports)
from llmqgen.data.shards import Manifest, ShardEntry, write_manifest, write_shard  # noqa: E402
from llmqgen.hardware.inventory import parse_inventory  # noqa: E402
from llmqgen.models.spec import ModelSpec  # noqa: E402
from llmqgen.plan.memory import memory_table  # noqa: E402
from llmqgen.plan.solver import solve  # noqa: E402
from llmqgen.runtime import run as run_mod  # noqa: E402
from llmqgen.runtime.rank import NP_DTYPES, Rank  # noqa: E402
from llmqgen.runtime.trainer import AdamW, Trainer  # noqa: E402

TINY = ModelSpec(name="tiny-qwen2", architecture="qwen2", hidden_size=64, intermediate_size=128,
                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=512,
                 tie_embeddings=True, qkv_bias=True, qk_norm=False, rope_theta=1e6)


def tiny_plan(seq_len=64, tokens_per_step=512, spec=TINY):
    return solve(spec, parse_inventory("1xH200", "256G"), seq_len=seq_len, tokens_per_step=tokens_per_step)


def tiny_data(out: Path, tokens=200_000, vocab=512, seed=0, tokenizer="synthetic:0"):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = np.random.default_rng(seed).integers(0, vocab, tokens, dtype=np.uint32)
    write_shard(out / "train-00000.bin", ids, vocab, tokenizer)
    write_shard(out / "eval-00000.bin", ids[:20_000], vocab, tokenizer)
    write_manifest(out, Manifest(tokenizer, vocab, 0, [ShardEntry("train-00000.bin", tokens)],
                                 [ShardEntry("eval-00000.bin", 20_000)], {"train": 1, "eval": 1}, []))
    return out


class _Dev:
    """The GPU as the driver describes it (an H200, the GPU of tiny_plan)."""
    ordinal, name, arch, compute_capability, sm_count = 0, "NVIDIA H200", "sm_90", (9, 0), 132
    total_memory, max_smem_optin = 150_109_880_320, 227 * 1024

    def make_current(self):
        pass


class FakeRank:
    """Rows of the real memory table, memory as numpy arrays (whole tensors: one GPU)."""

    def __init__(self, plan, trainer):
        self.rows = {r.name: r for r in memory_table(plan)}
        self.world, self.rank = 1, 0
        self.mem: dict[tuple[str, int], np.ndarray] = {}
        self.scalars: dict[str, list] = {}
        self.dev, self.trainer = _Dev(), trainer

    param_row = Rank.param_row
    is_shard = Rank.is_shard

    def _arr(self, name, index):
        row = self.rows[name]
        key = (name, index)
        if key not in self.mem:
            self.mem[key] = np.zeros(prod(row.shape), NP_DTYPES[row.dtype])
        return self.mem[key]

    # programs are tags the fake Trainer's _execute interprets
    def load_program(self):
        return []

    norm_program = [("norm",)]
    optimizer_program = [("update",)]

    def ptr(self, ref, layer):
        return ref

    def set_scalar(self, name, values):
        self.scalars[name] = list(values)

    def download(self, src, dtype, shape):
        assert src == "scalar:norm", src
        return np.array([self.trainer._norm, 1.0, 0.0, 1.0], np.float32)[:prod(shape)].reshape(shape)

    def read_row(self, name, index):
        return self._arr(name, index).copy()

    def write_raw(self, name, index, a):
        self._arr(name, index)[:] = np.asarray(a).reshape(-1)

    def write_tensor(self, name, index, full):
        self.write_raw(name, index, np.asarray(full, np.float32).reshape(-1).astype(NP_DTYPES[self.rows[name].dtype]))


class FakeTrainer(Trainer):
    lrs: list = []          # (step index, lr) of every applied optimizer step of every FakeTrainer
    batches: list = []      # first input token of each micro-batch fed to a training step
    evals: list = []        # first input token of each micro-batch evaluated
    poison: set = set()     # optimizer-step attempts (0-based, counted over all FakeTrainers) with a NaN norm
    attempts = 0

    def __init__(self, plan, *, seed=0, optim=None, dist=None, devices=None, **_):
        self.plan, self.optim, self.seed = plan, optim or AdamW(), seed
        self.ranks = [FakeRank(plan, self)]
        self.dev = self.ranks[0].dev
        self.build = types.SimpleNamespace(path=Path("/nonexistent/llmqgen-fake-build"))   # no choices kept there
        self.comm, self.pending, self.step_count = None, {}, 0
        self.L = plan.model.num_layers
        self._loss, self._norm = 0.0, 1.0
        self.grads_dropped = 0

    @classmethod
    def reset(cls):
        cls.lrs, cls.batches, cls.evals, cls.poison, cls.attempts = [], [], [], set(), 0

    def _execute(self, programs, key=None):
        for item in programs[0]:
            if item[0] == "norm":
                self._norm = float("nan") if FakeTrainer.attempts in FakeTrainer.poison else 1.0
                FakeTrainer.attempts += 1
            elif item[0] == "update":
                lr, step = self.ranks[0].scalars["hyper"][0], self.ranks[0].scalars["hyper"][-1]
                FakeTrainer.lrs.append((int(step) - 1, lr))
                for what in ("params", "adam_m", "adam_v"):
                    for key_, row, i, shape, dtype in self._instances(what):
                        a = self.ranks[0]._arr(row, i)
                        a[:] = (a.astype(np.float32) + lr).astype(dtype)

    def _sync(self):
        pass

    def accumulate(self, batches):
        FakeTrainer.batches.append([int(b.inputs[0, 0]) for b in batches])
        self._loss = 10.0 / (1 + self.step_count) + sum(int(b.inputs[0, 0]) for b in batches) * 1e-6

    def eval_loss(self, batches):
        FakeTrainer.evals.append([int(b.inputs[0, 0]) for b in batches])
        return 5.0 + sum(int(b.inputs[0, 0]) for b in batches) * 1e-6

    def loss(self):
        return self._loss

    def zero_gradients(self):
        self.grads_dropped += 1

    def any_rank(self, flag):
        return flag

    def close(self):
        pass


class FakeNvml(types.ModuleType):
    """pynvml as runtime/devmem.py uses it: one GPU at PCI_BUS (the driver's spelling; NVML's is longer)
    with `baseline` bytes in use before the run; this process then uses `process_bytes` on it, which the
    process list shows unless `listed` is false (a container's PID namespace), and the GPU's used memory
    grows by as much."""

    PCI_BUS = "0000:1b:00.0"

    class NVMLError(Exception):
        pass

    def __init__(self, process_bytes=5 << 30, baseline=600 << 20, listed=True, fail_init=False):
        super().__init__("pynvml")
        self.process_bytes, self.baseline, self.listed, self.fail_init = process_bytes, baseline, listed, fail_init
        self.running, self.inits = False, 0

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("Driver Not Loaded")
        self.inits += 1

    def nvmlShutdown(self):
        self.inits -= 1

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return "gpu0"

    def nvmlDeviceGetHandleByPciBusId(self, bus):
        assert bus == self.PCI_BUS, bus
        return "gpu0"

    def nvmlDeviceGetPciInfo(self, h):
        return types.SimpleNamespace(busId=b"00000000:1B:00.0")

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(used=self.baseline + (self.process_bytes if self.running else 0))

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        import os
        mine = [types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=self.process_bytes)] if self.listed else []
        return [types.SimpleNamespace(pid=1, usedGpuMemory=123 << 20)] + mine


def fake_nvml(monkeypatch, **kw) -> FakeNvml:
    """FakeNvml(**kw) as pynvml, the fake device's PCI address from the driver; the GPU counts this
    process's memory from its first `watch` on (the Trainer has opened it by then)."""
    from llmqgen.runtime import driver
    nvml = FakeNvml(**kw)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)

    def bus(dev):
        nvml.running = True
        return nvml.PCI_BUS
    monkeypatch.setattr(driver, "pci_bus_id", bus)
    return nvml


def install():
    """llmqgen.runtime.run with FakeTrainer in place of the GPU Trainer (undo with uninstall())."""
    FakeTrainer.reset()
    run_mod.Trainer = FakeTrainer
    run_mod.driver.mem_info = lambda: (0, 0)
    return run_mod


def uninstall():
    run_mod.Trainer = Trainer

