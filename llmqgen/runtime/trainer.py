"""The Trainer: executes a plan's schedule.json on every GPU of the run, in lockstep.

Load: open the plan's build folder, build/<uri>/ (compile/build_folder.py: loaded, or built under its lock
and loaded; its plan, memory layout, kernel table, schedule and CUBIN are all the runtime reads), make one
Rank per GPU this process drives (its arenas from the folder's layout, the folder's schedule bound to its
pointers) and the collectives between them. One process
drives all GPUs of a machine (copy-engine collectives); under NCCL a process drives one GPU and
its peers are other processes (torchrun, mpirun, srun). Each step the same program runs on every
rank: runs of operations (a CUDA graph each where it repeats) are issued rank after rank, so the
GPUs work together, and a `collective` item is handed to the collectives for all ranks at once.
The optimizer step replays CUDA graphs too: learning rate, bias corrections and step number sit in
a device array (scalar:hyper) that each step rewrites. It computes the global gradient norm first and reads it back before launching any update: a step whose
norm (or loss) is not finite is skipped — gradients dropped; weights, Adam moments, FP8 weight scales and
the step counter untouched. Evaluation replays the forward sections and the loss only (schedule `eval`).
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from math import prod

import numpy as np

from ..checkpoint.layout import AMAX_HISTORY_KEY, KINDS, PREFIX, instances
from ..codegen.families import adamw as adamw_family
from ..compile.build_folder import BuildFolder, open_build
from ..layout import FP8_HISTORY_MAX_OFFSET, FP8_SLOT_BYTES, act_slot_count, fp8_slot_count
from ..plan.schema import Plan
from . import driver
from .collectives import CopyEngine, Nccl
from .dist import DistEnv
from .rank import Rank
from .standin import check_runs_on


@dataclass
class AdamW:
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    max_norm: float = 1.0


class Trainer:
    marks: list | None = None       # (what, event) on rank 0's stream while profile.graphed_step times a step

    def __init__(self, plan: Plan, *, seed: int = 0, optim: AdamW | None = None, out_root: str = "build",
                 graphs: bool = True, attention: str = "auto", devices: list[int] | None = None,
                 dist: DistEnv | None = None, build: BuildFolder | None = None):
        """Runs the build folder of `plan` for the GPU it opens (out_root/<uri>/, built here unless
        LLMQGEN_NO_COMPILE is set), or `build`, a folder already loaded for this plan.
        attention: "cudnn" (cuDNN SDPA), "flash" (the program's own flash-attention kernels) or
        "auto" (cuDNN where nvidia-cudnn-frontend is installed, else the generated kernels).
        devices: the GPU of each rank this process drives (default: 0..N-1; [0, 0] runs two ranks on
        one GPU, for tests). dist: this process's place among NCCL processes (runtime.dist.dist_env)."""
        self.plan, self.optim = plan, optim or AdamW()
        N = plan.num_gpus
        if plan.collectives == "nccl":
            if dist is None and N > 1:
                raise RuntimeError(f"plan {plan.name} uses NCCL over {N} GPUs: launch one process per GPU, e.g. "
                                   f"`torchrun --nproc-per-node {plan.inventory.count} -m llmqgen run ...`")
            if dist is not None and dist.world_size != N:
                raise RuntimeError(f"{dist.world_size} processes were launched for a plan of {N} GPUs: launch "
                                   f"{N}, or re-plan with --gpus for {dist.world_size}")
            ranks = [dist.rank] if dist else [0]
            devices = devices or [dist.local_rank if dist else 0]
        else:
            if dist is not None and dist.world_size > 1:
                raise RuntimeError(f"plan {plan.name} drives all {N} GPUs from one process (copy engines): run "
                                   f"it without torchrun/mpirun, or re-plan with --set collectives=nccl")
            ranks = list(range(N))
            devices = devices or list(range(N))
        if len(devices) != len(ranks):
            raise ValueError(f"{len(devices)} devices given for {len(ranks)} ranks of plan {plan.name}")
        if max(devices) >= driver.device_count():
            raise RuntimeError(f"plan {plan.name} needs GPUs {sorted(set(devices))}, the driver sees "
                               f"{driver.device_count()}: plan for the GPUs you have (--gpus auto)")
        first = driver.open_device(devices[0])
        check_runs_on(plan, first)      # any GPU with the plan's memory and features: compiled for it below
        if build is None:
            build = open_build(plan, first.arch, out_root)
        elif build.plan.inputs() != plan.inputs():
            raise ValueError(f"build {build.path} holds plan {build.plan.name}, not plan {plan.name}: pass the "
                             f"folder of this plan, or none (the Trainer then opens it)")
        self.build = build
        if attention == "auto":
            attention = "cudnn" if _has_cudnn() else "flash"
        if attention == "flash" and not self.build.by_role("attention_forward"):
            m = plan.model
            raise RuntimeError(f"no cuDNN attention and the program has no flash-attention kernels for this "
                               f"shape (head_dim {m.head_dim}, seq_len {plan.batch.seq_len}): install "
                               f"nvidia-cudnn-frontend, or use head_dim 64/128 and a seq_len multiple of 64")
        self.sched = self.build.schedule
        shared = len(set(devices)) < len(devices)      # ranks sharing a GPU get a context each, like separate GPUs
        self.ranks = [Rank(self.build, rank=r, device=d, attention=attention, graphs=graphs, seed=seed,
                           own_context=shared) for r, d in zip(ranks, devices)]
        self.dev = self.ranks[0].dev
        self.comm = None
        if N > 1:
            self.comm = (self._nccl(dist) if plan.collectives == "nccl"
                         else CopyEngine(self.ranks, peer=plan.peer_copies))
        self.pending: dict[str, list[int]] = {}   # done events of overlapped collectives, by tag
        self.profiler = None                       # a profile.Profiler while one profiles a step
        self.step_count = 0
        self.L = plan.model.num_layers

    def _nccl(self, dist: DistEnv) -> Nccl:
        from . import nccl
        from .dist import share_bytes
        uid = share_bytes(dist, nccl.unique_id)
        rk = self.ranks[0]
        rk.dev.make_current()
        return Nccl(self.ranks, [nccl.Comm(uid, self.plan.num_gpus, rk.rank)])

    # --- executing programs on every rank -----------------------------------------------------------
    def _execute(self, programs: list[list[tuple]], key: str | None = None) -> None:
        prof = self.profiler        # runtime/profile.py: every operation between events, no graphs
        for i, items in enumerate(zip(*programs)):
            kind = items[0][0]
            end = prof.bracket(items[0]) if prof and kind != "ops" else None
            if kind == "collective":
                _, op, layer, tag = items[0]
                done = self.comm.run(op, layer)
                if op.get("overlap"):
                    self.pending[tag] = done
                else:
                    self._wait(done)
            elif kind == "await":
                done = self.pending.pop(items[0][3], None)
                if done:
                    self._wait(done)
            else:
                for rk, item in zip(self.ranks, items):
                    rk.dev.make_current()
                    rk.run_ops(prof.wrap(rk, item) if prof else item[1], (key, i) if key else None)
            if end:
                end()

    def _wait(self, done: list[int]) -> None:
        for rk in self.ranks:
            rk.dev.make_current()
            for e in done:
                driver.stream_wait(rk.stream, e)

    def _drain(self) -> None:
        for done in self.pending.values():
            self._wait(done)
        self.pending.clear()

    def _mark(self, what: str) -> None:
        if self.marks is not None:
            rk = self.ranks[0]
            rk.dev.make_current()
            e = driver.event_create(timing=True)
            driver.event_record(e, rk.stream)
            self.marks.append((what, e))

    def _sync(self) -> None:
        for rk in self.ranks:
            driver.stream_synchronize(rk.stream)

    # --- parameters ------------------------------------------------------------------------------
    def _instances(self, what: str):
        """(llmqgen name, row, instance, element count, row dtype) of every tensor of one kind: "params"
        (the masters, or the work copy that serves as master), "grads", "adam_m" or "adam_v"."""
        return instances(self.plan, self.ranks[0].rows, what)

    def load_params(self, params: dict[str, np.ndarray]) -> None:
        """Master weights (llmqgen names, e.g. layers.3.qkv) from float arrays; then the work copies."""
        for key, row, i, shape, _ in self._instances("params"):
            if key not in params:
                raise KeyError(f"parameter {key} is missing")
            a = np.asarray(params[key], np.float32).reshape(shape)
            for rk in self.ranks:
                rk.write_tensor(row, i, a)
        self._execute([rk.load_program() for rk in self.ranks])
        self._sync()

    def _whole(self, row: str, index: int, n: int, dtype) -> np.ndarray:
        """Instance `index` of a parameter row as the whole tensor's first n values: a sharded row is
        every rank's shard end to end (through NCCL when the other ranks are other processes)."""
        rk0 = self.ranks[0]
        if not rk0.is_shard(row):
            return rk0.read_row(row, index)[:n]
        if isinstance(self.comm, Nccl):
            raw = self.comm.gather_part(rk0, rk0.ptr(f"{row}[{index}]", None), rk0.shard_bytes(row))
            return np.frombuffer(raw, dtype)[:n]
        return np.concatenate([rk.read_row(row, index) for rk in self.ranks])[:n]

    def _gather(self, what: str) -> dict[str, np.ndarray]:
        return {key: self._whole(row, i, prod(shape), dtype).astype(np.float32).reshape(shape)
                for key, row, i, shape, dtype in self._instances(what)}

    def params(self) -> dict[str, np.ndarray]:
        return self._gather("params")

    def gradients(self) -> dict[str, np.ndarray]:
        """This process's first rank's accumulated gradients: the local sum, before any reduction."""
        if any(r.sharded for name, r in self.ranks[0].rows.items() if name.startswith("grads.")):
            raise NotImplementedError("ZeRO-2 keeps only reduced gradient shards: read gradients of a ZeRO-1 plan")
        return self._gather("grads")

    # --- exact training state, independent of the GPU count ---------------------------------------------
    STATE = KINDS
    STATE_NAMES = {k: v for k, v in PREFIX.items() if k != v}   # checkpoint key prefix of each kind

    def state_tensors(self) -> dict[str, np.ndarray]:
        """Masters and Adam moments as whole tensors in their stored dtypes (checkpoint/layout.py); with
        the step they resume the run bit-exactly (work copies and FP8 weight scales are made from the
        masters, gradients are zero between steps, activations are rebuilt), at any GPU count. Delayed
        scaling adds GPU 0's amax history (exact on one GPU; see _load_amax_history)."""
        out = {f"{PREFIX[what]}.{key}": np.ascontiguousarray(self._whole(row, i, prod(shape), dtype)).reshape(shape)
               for what in KINDS for key, row, i, shape, dtype in self._instances(what)}
        if self._delayed:
            rk, n = self.ranks[0], act_slot_count(self.plan.model.num_layers)
            out[AMAX_HISTORY_KEY] = rk.download(rk.ptr("stats.amax_history[0]", None), np.float32,
                                                (n, self.plan.precision.amax_history))
        return out

    @property
    def _delayed(self) -> bool:
        return self.plan.precision.delayed

    def _load_amax_history(self, tensors: dict[str, np.ndarray]) -> None:
        """Delayed scaling: the checkpoint's amax history into every GPU's, its max into each activation
        slot, so that the next micro-step scales as the uninterrupted run's would (on several GPUs from GPU
        0's history for the first amax_history micro-steps). A history of another length keeps its newest
        entries; none (a checkpoint of a current-scaling run) leaves the slots cold: current scaling until
        the first micro-step ends."""
        h = tensors.get(AMAX_HISTORY_KEY)
        if not self._delayed or h is None:
            return
        L, H = self.plan.model.num_layers, self.plan.precision.amax_history
        n = act_slot_count(L)
        h = np.asarray(h, np.float32)
        if h.ndim != 2 or h.shape[0] != n:
            raise ValueError(f"checkpoint tensor {AMAX_HISTORY_KEY} is {list(h.shape)}, this plan has {n} "
                             f"activation slots: it was written for another model")
        hist = np.zeros((n, H), np.float32)
        hist[:, :min(H, h.shape[1])] = h[:, :H]
        floats = FP8_SLOT_BYTES // 4
        for rk in self.ranks:
            rk.upload(rk.ptr("stats.amax_history[0]", None), hist)
            ptr = rk.ptr("stats.fp8[0]", None)
            slots = rk.download(ptr, np.float32, (fp8_slot_count(L), floats))
            slots[:n, FP8_HISTORY_MAX_OFFSET // 4] = hist.max(1)
            rk.upload(ptr, slots)

    def load_state_tensors(self, tensors: dict[str, np.ndarray], step: int) -> None:
        """State tensors as `state_tensors` gives them (or as checkpoint.store.TrainingCheckpoint
        decodes them); flat uint8 byte views of the right size are read too."""
        for what in KINDS:
            for key, row, i, shape, dtype in self._instances(what):
                key = f"{PREFIX[what]}.{key}"
                if key not in tensors:
                    raise KeyError(f"checkpoint lacks {key}: it was written by another llmqgen or model")
                a = np.asarray(tensors[key])
                if a.dtype == np.uint8:
                    a = a.reshape(-1).view(dtype) if a.size == prod(shape) * dtype.itemsize else a
                if a.dtype != dtype or a.size != prod(shape):
                    raise ValueError(f"checkpoint tensor {key} is {a.dtype.name} of {a.size} elements, this "
                                     f"plan stores {dtype.name} of {prod(shape)}: resume with the checkpoint's "
                                     f"precision settings")
                for rk in self.ranks:
                    rk.write_raw(row, i, a.reshape(-1))
        self._execute([rk.load_program() for rk in self.ranks])
        self._sync()
        self._load_amax_history(tensors)
        self.step_count = step

    # --- a training step --------------------------------------------------------------------------
    def accumulate(self, batches) -> None:
        """Forward + backward of a step's micro-batches (all GPUs': rank r takes the r-th equal share);
        gradients summed over them (loss-scaled by the step's valid-token count)."""
        self._replay(batches, lambda rk: rk.micro, "micro", "of this step is masked (-100): nothing to learn from")

    def _replay(self, batches, program, key: str, all_masked: str) -> None:
        """Each rank's share of `batches` through `program(rank)` (a micro-step's graphs), the loss
        summed into scalar:loss with grad_scale = 1 / the valid targets of all batches."""
        N = self.plan.num_gpus
        if len(batches) % N:
            raise ValueError(f"{len(batches)} micro-batches cannot be shared by {N} GPUs: give a multiple of {N}")
        valid = sum(int((np.asarray(b.targets) != -100).sum()) for b in batches)
        if valid == 0:
            raise ValueError(f"every target {all_masked}")
        per = len(batches) // N
        for rk in self.ranks:
            rk.dev.make_current()
            rk.set_scalar("loss", [0.0])
            rk.set_scalar("grad_scale", [1.0 / valid])
        self._mark("start")
        for m in range(per):
            for rk in self.ranks:
                rk.dev.make_current()
                rk.feed(batches[rk.rank * per + m])
            self._execute([program(rk) for rk in self.ranks], key=key)
            self._drain()       # the next micro-step reuses the double buffers from its first block on
            self._mark("micro-step")
        if isinstance(self.comm, Nccl):     # each process holds its tokens' share of the loss: sum them
            self.comm.sum_floats([rk.ptr("scalar:loss", None) for rk in self.ranks], 1)
        self._sync()

    def zero_gradients(self) -> None:
        for rk in self.ranks:
            rk.dev.make_current()
            driver.stream_synchronize(rk.stream)
            for name, row in rk.rows.items():
                if not name.startswith(("grads.", "stage.grads.")):
                    continue
                if row.place == "device":
                    driver.memset_d8(rk.mem.ptr(name), 0, row.total, rk.stream)
                else:                       # offloaded gradients: pinned host memory, the GPU is idle here
                    ctypes.memset(rk.host.ptr(name), 0, row.total)
        self._sync()

    def loss(self) -> float:
        """The step's mean loss over all GPUs' tokens (each rank holds its tokens' share of the sum;
        under NCCL, accumulate has summed the shares of every process already)."""
        return sum(float(rk.download(rk.ptr("scalar:loss", None), np.float32, (1,))[0]) for rk in self.ranks)

    def any_rank(self, flag: bool) -> bool:
        """True on every process when `flag` is true on any (e.g. a Ctrl-C that reached only some)."""
        if not isinstance(self.comm, Nccl):
            return flag
        rk = self.ranks[0]
        rk.set_scalar("flag", [float(flag)])
        p = rk.ptr("scalar:flag", None)
        self.comm.sum_floats([p], 1)
        return float(rk.download(p, np.float32, (1,))[0]) > 0

    def optimizer_step(self, lr: float, apply: bool = True) -> float:
        """AdamW over all parameters with global-norm clipping; returns the gradient norm.

        The norm is computed and read back before any update is launched. When it is not finite (or
        `apply` is false, e.g. the loss was not finite) the step is skipped: the gradients are dropped
        and weights, Adam moments, FP8 weight scales and the step counter stay as they were; the caller
        sees the non-finite norm (or passed apply=False) and does not advance its LR position either."""
        o, t = self.optim, self.step_count + 1
        hyper = adamw_family.hyper_values(lr, o.beta1, o.beta2, o.eps, o.weight_decay, t, o.max_norm)
        for rk in self.ranks:
            rk.dev.make_current()
            rk.set_scalar("hyper", hyper)
        self._mark("start")
        self._execute([rk.norm_program for rk in self.ranks], key="norm")
        self._mark("gradient norm")
        rk = self.ranks[0]
        norm = float(rk.download(rk.ptr("scalar:norm", None), np.float32, (4,))[0])
        if self.any_rank(not (apply and math.isfinite(norm))):
            self.zero_gradients()
            return norm if apply else float("nan")
        self.step_count = t
        self._mark("start")
        self._execute([rk.optimizer_program for rk in self.ranks], key="optimizer")
        self._mark("optimizer")
        return norm

    def eval_loss(self, batches) -> float:
        """Mean loss of micro-batches (all GPUs': rank r takes the r-th equal share) from the forward
        alone: the schedule's forward sections and the loss, no backward; gradients are not touched."""
        self._replay(batches, lambda rk: rk.eval_program(), "eval",
                     "of these eval batches is masked (-100): nothing to evaluate")
        return self.loss()

    def close(self) -> None:
        if self.comm is not None:
            self.comm.close()
        for rk in self.ranks:
            rk.dev.make_current()
            rk.close()


def _has_cudnn() -> bool:
    try:
        import cudnn  # noqa: F401
        return True
    except ImportError:
        return False
