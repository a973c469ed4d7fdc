"""The one-GPU trainer: executes a plan's schedule.json with the compiled program, cuBLASLt and cuDNN.

Load: build (or reuse) the program, allocate the two arenas from the memory table, bind every
operation of the schedule to pointers once. A micro-step (forward + backward of one micro-batch)
is captured as one CUDA graph and replayed; the optimizer step runs eagerly, because its step
counter and stochastic-rounding seeds change every step. Values the graph reads (loss scale, LR
and the other hyper-parameters) live in device memory (stats.scalars) and are written per step.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from math import prod
from typing import Callable

import ml_dtypes
import numpy as np

from ..codegen.context import check_arch
from ..codegen.families import adamw as adamw_family
from ..codegen.families import gradnorm as gradnorm_family
from ..codegen.kernel import kernel_from_json
from ..codegen.schedule import SCALARS, build_schedule, fp8_slot_index
from ..compile.cache import build
from ..plan.memory import memory_table, param_tensors
from ..plan.schema import Plan
from . import driver
from .arena import Arena
from .attention import Attention, AttnShape
from .blas import Blas, Gemm, linear_dgrad, linear_forward, linear_wgrad

NP_DTYPES = {"bf16": ml_dtypes.bfloat16, "fp32": np.float32, "e4m3": ml_dtypes.float8_e4m3fn,
             "e5m2": ml_dtypes.float8_e5m2, "int32": np.int32, "uint8": np.uint8}


@dataclass
class AdamW:
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    max_norm: float = 1.0


class Trainer:
    def __init__(self, plan: Plan, *, seed: int = 0, optim: AdamW | None = None, out_root: str = "build",
                 graphs: bool = True, attention: str = "auto"):
        """attention: "cudnn" (cuDNN SDPA), "flash" (the program's own flash-attention kernels) or
        "auto" (cuDNN where nvidia-cudnn-frontend is installed, else the generated kernels)."""
        unsupported = plan.offload.names() + (["sharding"] if plan.sharding.zero else [])
        if plan.num_gpus != 1 or unsupported:
            raise NotImplementedError(
                f"plan {plan.name} uses {', '.join(unsupported) or f'{plan.num_gpus} GPUs'}: this runtime runs "
                f"one GPU with everything resident; plan for a larger GPU or pin --set offload.<x>=false")
        self.plan, self.seed, self.optim = plan, seed, optim or AdamW()
        self.dev = driver.open_device(0)
        check_arch(self.dev.arch, plan.inventory.gpu)
        self.build = build(plan, self.dev.arch, out_root=out_root)
        self.kernels = {d["name"]: kernel_from_json(d)
                        for d in json.loads((self.build.path / "kernels.json").read_text())}
        self.module = driver.module_load(self.build.cubin_path.read_bytes())
        self.funcs: dict[str, int] = {}
        self.rows = {r.name: r for r in memory_table(plan)}     # the table of this llmqgen, from the inputs
        self.mem = Arena(self.rows.values(), "device")
        self.stream = driver.stream_create()
        driver.memset_d8(self.mem.base, 0, self.mem.nbytes, self.stream)   # gradients start at zero
        self.blas = Blas(self.mem.ptr("ws.cublas"), self.rows["ws.cublas"].bytes)
        m, b = plan.model, plan.batch
        if attention == "auto":
            attention = "cudnn" if _has_cudnn() else "flash"
        self.attn = None
        if attention == "cudnn":
            self.attn = Attention(AttnShape(b.micro_batch, b.seq_len, m.num_heads, m.num_kv_heads, m.head_dim))
        elif "llmq_attention_forward" not in self.kernels:
            raise RuntimeError(f"no cuDNN attention and the program has no flash-attention kernels for this "
                               f"shape (head_dim {m.head_dim}, seq_len {b.seq_len}): install "
                               f"nvidia-cudnn-frontend, or use head_dim 64/128 and a seq_len multiple of 64")
        if self.attn and self.attn.workspace_bytes > self.rows["ws.attention"].bytes:
            raise RuntimeError(f"cuDNN SDPA needs {self.attn.workspace_bytes} bytes of workspace, the plan "
                               f"reserved {self.rows['ws.attention'].bytes}: re-plan with a larger attn_bwd_chunks")
        self.gemms: dict[tuple, Gemm] = {}
        self.sched = build_schedule(plan)
        self.L = m.num_layers
        if "work.ones" in self.rows:
            ones = np.ones(b.micro_batch * b.seq_len, ml_dtypes.bfloat16)
            self._upload(self.mem.ptr("work.ones"), ones)
        self.micro = self._bind_micro_step()
        self.graph = None
        self.use_graphs = graphs
        self.step_count = 0

    # --- references -> pointers -------------------------------------------------------------------
    def ptr(self, ref: str, layer: int | None) -> int:
        if ref.startswith("fp8:"):
            body, _, part = ref[4:].partition("/")
            name, idx = _split_index(body, layer)
            base = self.mem.ptr("stats.fp8") + 32 * fp8_slot_index(name, idx or 0, self.L)
            return base + (16 if part == "descale" else 0)
        if ref.startswith("scalar:"):
            return self.mem.ptr("stats.scalars") + 4 * SCALARS[ref[7:]]
        body, _, off = ref.partition("+")
        name, idx = _split_index(body, layer)
        row = self.rows[name]
        return self.mem.ptr(name, idx if (idx is not None and row.count > 1) else 0) + int(off or 0)

    def _value(self, v, layer, extra):
        if isinstance(v, str) and (v.startswith(("fp8:", "scalar:")) or "." in v):
            return self.ptr(v, layer)
        if isinstance(v, str):
            return extra[v.split(":")[0]](v, layer)
        return v

    # --- binding operations to closures -------------------------------------------------------------
    def _func(self, name: str) -> int:
        if name not in self.funcs:
            f = driver.function(self.module, name)
            if self.kernels[name].smem > 48 * 1024:
                driver.set_max_dynamic_smem(f, self.kernels[name].smem)
            self.funcs[name] = f
        return self.funcs[name]

    def _bind(self, op: dict, layer: int | None, extra=None) -> Callable[[], None]:
        kind, s = op["op"], self.stream
        if kind == "branch_on_layer":
            ops = [self._bind(o, layer, extra) for o in (op["first"] if layer == 0 else op["rest"])]
            return lambda: [f() for f in ops] and None
        if kind == "kernel":
            k = self.kernels[op["kernel"]]
            func = self._func(k.name)
            values = [self._value(op["args"][a], layer, extra) for a, _ in k.args]
            grid = op.get("grid", k.grid)
            types = [t for _, t in k.args]
            return lambda: driver.launch(func, grid, k.block, k.smem, s, values, types)
        if kind == "linear":
            return self._bind_linear(op, layer)
        if kind.startswith("attention_") and self.attn is None:
            return self._bind_flash_attention(op, layer)
        if kind == "attention_forward":
            p = {k: self.ptr(op[k], layer) for k in ("qkv", "out", "lse")}
            ws = self.mem.ptr("ws.attention")
            return lambda: self.attn.forward(s, p["qkv"], p["out"], p["lse"], ws)
        if kind == "attention_backward":
            p = {k: self.ptr(op[k], layer) for k in ("qkv", "out", "dout", "lse", "dqkv")}
            ws = self.mem.ptr("ws.attention")
            return lambda: self.attn.backward(s, p["qkv"], p["out"], p["dout"], p["lse"], p["dqkv"], ws)
        if kind == "memset":
            dst, n = self.ptr(op["dst"], layer), op["bytes"]
            return lambda: driver.memset_d8(dst, 0, n, s)
        if kind == "bias_grad":     # db[1, cols] += ones[1, rows] . dy[rows, cols]
            g = self._gemm(("bias", op["rows"], op["cols"]), lambda: Gemm(self.blas, 1, op["cols"], op["rows"],
                                                                         b_trans=True, accumulate=True, align=256))
            a, b_, d = self.ptr(op["ones"], layer), self.ptr(op["dy"], layer), self.ptr(op["db"], layer)
            return lambda: g.run(s, a, b_, d)
        raise ValueError(f"schedule operation {kind!r} is unknown to this runtime")

    def _bind_flash_attention(self, op: dict, layer: int | None) -> Callable[[], None]:
        """The generated kernels: forward writes out and lse; backward = rowsum(dO*O) pre-pass + backward."""
        if op["op"] == "attention_forward":
            names = [("llmq_attention_forward", [op["qkv"], op["out"], op["lse"]])]
        else:
            names = [("llmq_attention_bwd_dot", [op["out"], op["dout"], "work.attn_delta"]),
                     ("llmq_attention_backward", [op["qkv"], op["dout"], op["lse"], "work.attn_delta", op["dqkv"]])]
        fns = [self._bind({"op": "kernel", "kernel": k, "args": {a: v for (a, _), v in
                                                                  zip(self.kernels[k].args, refs)}}, layer)
               for k, refs in names]
        return lambda: [f() for f in fns] and None

    def _gemm(self, key, make) -> Gemm:
        if key not in self.gemms:
            self.gemms[key] = make()
        return self.gemms[key]

    def _bind_linear(self, op: dict, layer: int | None) -> Callable[[], None]:
        P = lambda k: self.ptr(op[k], layer) if op.get(k) else 0      # noqa: E731
        M, N, K, s, fp8 = op["M"], op["N"], op["K"], self.stream, op["dtype"] != "bf16"
        if op["pass"] == "forward":
            g = self._gemm(("fwd", M, N, K, op["dtype"], bool(op["bias"]), op["accumulate"]),
                           lambda: linear_forward(self.blas, M, N, K, x_dtype=op["dtype"], w_dtype=op["dtype"],
                                                  bias=bool(op["bias"]), accumulate=op["accumulate"]))
            x, w, y, xs, ws, bias = P("x"), P("w"), P("y"), P("x_scale"), P("w_scale"), P("bias")
            return lambda: g.run(s, x, w, y, a_scale=xs, b_scale=ws, bias=bias)
        gd = op["grad_dtype"]
        if op["pass"] == "dgrad":
            if fp8:
                g = self._gemm(("dgrad8", M, K, N, gd), lambda: linear_forward(self.blas, M, K, N, x_dtype=gd,
                                                                               w_dtype="e4m3"))
            else:
                g = self._gemm(("dgrad", M, N, K), lambda: linear_dgrad(self.blas, M, N, K))
            dy, w, dx, dys, ws = P("dy"), P("w"), P("dx"), P("dy_scale"), P("w_scale")
            return lambda: g.run(s, dy, w, dx, a_scale=dys, b_scale=ws)
        if fp8:
            g = self._gemm(("wgrad8", N, K, M, gd), lambda: linear_forward(self.blas, N, K, M, x_dtype=gd,
                                                                           w_dtype="e4m3", accumulate=True))
        else:
            g = self._gemm(("wgrad", M, N, K), lambda: linear_wgrad(self.blas, M, N, K))
        dy, x, dw, dys, xs = P("dy"), P("x"), P("dw"), P("dy_scale"), P("x_scale")
        return lambda: g.run(s, dy, x, dw, a_scale=dys, b_scale=xs)

    def _bind_micro_step(self) -> list[Callable[[], None]]:
        ms, L = self.sched["micro_step"], self.L
        fns = [self._bind(op, None) for op in ms["prologue"]]
        for layer in range(L):
            fns += [self._bind(op, layer) for op in ms["layer_forward"]]
        fns += [self._bind(op, None) for op in ms["head"]]
        for layer in reversed(range(L)):
            fns += [self._bind(op, layer) for op in ms["layer_backward"]]
        fns += [self._bind(op, None) for op in ms["epilogue"]]
        return fns

    # --- parameters ------------------------------------------------------------------------------
    def _param_row(self, name: str) -> str:
        return f"master.{name}" if f"master.{name}" in self.rows else f"weights.{name}"

    def _upload(self, dst: int, array: np.ndarray) -> None:
        a = np.ascontiguousarray(array)
        driver.memcpy_htod(dst, a.ctypes.data, a.nbytes, self.stream)
        driver.stream_synchronize(self.stream)      # `a` may be freed once this returns

    def _download(self, src: int, dtype, shape) -> np.ndarray:
        out = np.empty(shape, dtype)
        driver.memcpy_dtoh(out.ctypes.data, src, out.nbytes, self.stream)
        driver.stream_synchronize(self.stream)
        return out

    def load_params(self, params: dict[str, np.ndarray]) -> None:
        """Master weights (llmqgen names, e.g. layers.3.qkv) from float arrays; then the e4m3 work copies."""
        for name, shape, per_layer, _ in param_tensors(self.plan):
            row = self.rows[self._param_row(name)]
            for i in range(self.L if per_layer else 1):
                key = f"layers.{i}.{name}" if per_layer else name
                if key not in params:
                    raise KeyError(f"parameter {key} is missing")
                a = np.asarray(params[key], np.float32).reshape(shape).astype(NP_DTYPES[row.dtype])
                self._upload(self.mem.ptr(row.name, i), a)
        for op in self.sched["init"]:
            self._bind(op, None)()
        for layer in range(self.L):
            for op in self.sched["layer_init"]:
                self._bind(op, layer)()
        driver.stream_synchronize(self.stream)

    def _read_rows(self, prefix: str) -> dict[str, np.ndarray]:
        out = {}
        for name, shape, per_layer, _ in param_tensors(self.plan):
            row = self.rows[prefix + name if prefix != "params." else self._param_row(name)]
            for i in range(self.L if per_layer else 1):
                key = f"layers.{i}.{name}" if per_layer else name
                a = self._download(self.mem.ptr(row.name, i), NP_DTYPES[row.dtype], (prod(shape),))
                out[key] = a.astype(np.float32).reshape(shape)
        return out

    def params(self) -> dict[str, np.ndarray]:
        return self._read_rows("params.")

    def gradients(self) -> dict[str, np.ndarray]:
        return self._read_rows("grads.")

    # --- exact training state: the raw bytes of every row a step carries over ------------------------
    STATE_PREFIXES = ("weights.", "master.", "adam_m.", "adam_v.", "stats.fp8")

    def state_tensors(self) -> dict[str, np.ndarray]:
        """Raw bytes of weights, masters, Adam moments and FP8 weight scales: restoring them resumes
        the run bit-exactly (gradients are zero between steps, activations are rebuilt)."""
        out = {}
        for name, row in self.rows.items():
            if row.place == "device" and name.startswith(self.STATE_PREFIXES):
                out[name] = self._download(self.mem.ptr(name), np.uint8, (row.total,))
        return out

    def load_state_tensors(self, tensors: dict[str, np.ndarray], step: int) -> None:
        for name, row in self.rows.items():
            if row.place == "device" and name.startswith(self.STATE_PREFIXES):
                a = np.asarray(tensors[name], np.uint8)
                if a.size != row.total:
                    raise ValueError(f"checkpoint row {name} has {a.size} bytes, this plan's has {row.total}: "
                                     f"resume with the plan the checkpoint was written with")
                self._upload(self.mem.ptr(name), a)
        for op in self.sched["init"]:
            self._bind(op, None)()
        self.step_count = step

    # --- a training step --------------------------------------------------------------------------
    def _set_scalar(self, name: str, values) -> None:
        self._upload(self.ptr(f"scalar:{name}", None), np.asarray(values, np.float32))

    def _feed(self, batch) -> None:
        BT = self.plan.batch.micro_batch * self.plan.batch.seq_len
        seg = np.zeros(BT + 2, np.int32)
        seg[:BT + 1] = batch.segment_starts[:BT + 1]
        seg[BT + 1] = batch.num_unique
        for row, a in (("tokens.inputs", batch.inputs), ("tokens.targets", batch.targets),
                       ("tokens.sorted_pos", batch.sorted_positions), ("tokens.segments", seg)):
            self._upload(self.mem.ptr(row), np.asarray(a, np.int32).reshape(-1))

    def _run_micro(self) -> None:
        if not self.use_graphs:
            for f in self.micro:
                f()
            return
        if self.graph is None:
            for f in self.micro:            # warm-up run: libraries allocate and pick kernels outside capture
                f()
            driver.capture_begin(self.stream)
            for f in self.micro:
                f()
            self.graph = driver.capture_end(self.stream)
            return                           # the warm-up already did this micro-step's work
        driver.graph_launch(self.graph, self.stream)

    def accumulate(self, batches) -> None:
        """Forward + backward of each micro-batch; gradients summed over them (loss-scaled per token)."""
        valid = sum(int((np.asarray(b.targets) != -100).sum()) for b in batches)
        if valid == 0:
            raise ValueError("every target of this step is masked (-100): nothing to learn from")
        self._set_scalar("loss", [0.0])
        self._set_scalar("grad_scale", [1.0 / valid])
        for b in batches:
            self._feed(b)
            self._run_micro()
        driver.stream_synchronize(self.stream)

    def zero_gradients(self) -> None:
        for name, row in self.rows.items():
            if name.startswith("grads."):
                driver.memset_d8(self.mem.ptr(name), 0, row.total, self.stream)
        driver.stream_synchronize(self.stream)

    def loss(self) -> float:
        return float(self._download(self.ptr("scalar:loss", None), np.float32, (1,))[0])

    def optimizer_step(self, lr: float) -> float:
        """AdamW over all parameters with global-norm clipping; returns the gradient norm."""
        self.step_count += 1
        o, t = self.optim, self.step_count
        self._set_scalar("hyper", adamw_family.hyper_values(lr, o.beta1, o.beta2, o.eps, o.weight_decay, t,
                                                            o.max_norm))
        opt = self.sched["optimizer_step"]
        extra = {"step": lambda v, layer: t, "seed": self._seed}
        for op in opt["optimizer"]:
            self._run_optimizer_op(op, None, extra)
        for layer in range(self.L):
            for op in opt["layer_optimizer"]:
                self._run_optimizer_op(op, layer, extra)
        out = self._download(self.ptr("scalar:norm", None), np.float32, (4,))
        return float(out[0])

    def _run_optimizer_op(self, op, layer, extra) -> None:
        if op["op"] == "gradnorm":
            self._gradnorm(op)
        elif op["op"] == "kernel" and op["kernel"].startswith("llmq_adamw"):
            n = prod(self.rows[op["args"]["grad"].split("[")[0]].shape)
            op = {**op, "args": {**op["args"], "n": n}, "grid": adamw_family.grid(n, self.dev.sm_count)}
            self._bind(op, layer, extra)()
        else:
            self._bind(op, layer, extra)()

    def _gradnorm(self, op) -> None:
        ptrs, sizes = [], []
        for name, per_layer in op["tensors"]:
            for i in range(self.L if per_layer else 1):
                ptrs.append(self.mem.ptr(name, i))
                sizes.append(prod(self.rows[name].shape))
        grids, offsets, total = gradnorm_family.partials_layout(sizes)
        partial = self._func("llmq_gradnorm_partial")
        k = self.kernels["llmq_gradnorm_partial"]
        parts = self.ptr(op["partials"], None)
        for p, n, g, off in zip(ptrs, sizes, grids, offsets):
            driver.launch(partial, (g, 1, 1), k.block, 0, self.stream, [p, n, parts, off], [t for _, t in k.args])
        fin = self.kernels["llmq_gradnorm_finalize"]
        driver.launch(self._func(fin.name), fin.grid, fin.block, 0, self.stream,
                      [parts, total, self.ptr(op["hyper"], None), self.ptr(op["out"], None)],
                      [t for _, t in fin.args])

    def _seed(self, tag: str, layer) -> int:
        h = hashlib.sha256(f"{self.seed}:{tag}:{layer}".encode()).digest()
        return int.from_bytes(h[:4], "little") & 0x7FFFFFFF

    def close(self) -> None:
        if self.graph is not None:
            driver.graph_destroy(self.graph)
            self.graph = None
        for g in self.gemms.values():
            g.close()
        self.blas.close()
        self.mem.free()


def _has_cudnn() -> bool:
    try:
        import cudnn  # noqa: F401
        return True
    except ImportError:
        return False


def _split_index(body: str, layer: int | None) -> tuple[str, int | None]:
    if "[" not in body:
        return body, None
    name, idx = body[:-1].split("[")
    if idx == "l":
        return name, layer
    if idx == "l-1":
        return name, layer - 1
    return name, int(idx)
