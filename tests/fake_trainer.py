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

# nvmath (cuBLASLt bindings, the [gpu] extra) is imported by runtime/blas.py at import time only.
for _mod in ("nvmath", "nvmath.bindings", "nvmath.bindings.cublas", "nvmath.bindings.cublasLt"):
    sys.modules.setdefault(_mod, types.ModuleType(_mod))
sys.modules["nvmath"].bindings = sys.modules["nvmath.bindings"]
sys.modules["nvmath.bindings"].cublas = sys.modules["nvmath.bindings.cublas"]
sys.modules["nvmath.bindings"].cublasLt = sys.modules["nvmath.bindings.cublasLt"]
for _attr in ("MatmulDescAttribute", "MatmulPreferenceAttribute"):
    if not hasattr(sys.modules["nvmath.bindings.cublasLt"], _attr):
        setattr(sys.modules["nvmath.bindings.cublasLt"], _attr, types.SimpleNamespace())

from llmqgen.data.shards import Manifest, ShardEntry, write_manifest, write_shard  # noqa: E402
from llmqgen.hardware.inventory import parse_inventory  # noqa: E402
from llmqgen.models.spec import ModelSpec  # noqa: E402
from llmqgen.plan.memory import memory_table  # noqa: E402
from llmqgen.plan.solver import solve  # noqa: E402
from llmqgen.runtime import run as run_mod  # noqa: E402
from llmqgen.runtime.rank import NP_DTYPES, Rank  # noqa: E402
from llmqgen.runtime.trainer import Trainer  # noqa: E402

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

    def norm_program(self):
        return [("norm",)]

    def optimizer_program(self, step):
        return [("update", step)]

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
        self.plan, self.optim, self.seed = plan, optim, seed
        self.ranks = [FakeRank(plan, self)]
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
                lr = self.ranks[0].scalars["hyper"][0]
                FakeTrainer.lrs.append((item[1] - 1, lr))
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


def install():
    """llmqgen.runtime.run with FakeTrainer in place of the GPU Trainer (undo with uninstall())."""
    FakeTrainer.reset()
    run_mod.Trainer = FakeTrainer
    run_mod.driver.mem_info = lambda: (0, 0)
    return run_mod


def uninstall():
    run_mod.Trainer = Trainer

