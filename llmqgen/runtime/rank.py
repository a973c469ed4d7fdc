"""One GPU's share of a training run: its arenas, the schedule bound to its pointers, its CUDA graphs.

A Rank allocates the build folder's memory layout on its GPU (device and pinned-host arenas, every row
at its planned offset), loads the folder's CUBIN into its context and binds every operation of its
schedule.json to closures over its own pointers, once; kernels the schedule does not name (flash
attention, the gradient norm) are the kernel table's of the operation's role. Sections become
*programs*: lists of items, either ("ops", closures, ops) — a run of operations on the rank's compute
stream, captured as one CUDA graph where the program is replayed — or ("collective", op, layer), which
the Trainer hands to the collectives of all ranks at once.
Values the graphs read (loss scale, LR, ...) live in device memory (stats.scalars), written per step.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import time
from functools import cached_property
from math import prod
from typing import Callable

import ml_dtypes
import numpy as np

from ..codegen.families import adamw as adamw_family
from ..codegen.families import gradnorm as gradnorm_family
from ..layout import (FP8_AMAX_OFFSET, FP8_DESCALE_OFFSET, FP8_SLOT_BYTES, SCALARS, fp8_slot_index, num_unique_index,
                      staging_elems, token_staging)
from ..codegen.kernel import Kernel
from ..compile.build_folder import BuildFolder
from ..compile.nvrtc import usable_cache_root
from ..plan.memory import DTYPE_BYTES
from ..plan.refs import at, parse_ref, resolve_tag, split_index
from ..plan.schedule import MICRO_SECTIONS
from . import driver
from .arena import Arena
from .attention import Attention, AttnShape
from . import gemm_search
from .blas import Blas, Gemm, linear_dgrad, linear_forward, linear_wgrad

NP_DTYPES = {"bf16": ml_dtypes.bfloat16, "fp32": np.float32, "e4m3": ml_dtypes.float8_e4m3fn,
             "e5m2": ml_dtypes.float8_e5m2, "int32": np.int32, "uint8": np.uint8}
RANDOM_BLOCK = 1 << 20      # elements of the random block the GEMM timing's operands are tiled from
_RANDOM: dict[str, np.ndarray] = {}

Item = tuple
log = logging.getLogger(__name__)


class Rank:
    def __init__(self, build: BuildFolder, *, rank: int, device: int, attention: str, graphs: bool, seed: int,
                 own_context: bool = False):
        plan = build.plan
        self.build, self.plan, self.sched, self.kernels = build, plan, build.schedule, build.kernels
        self.rank, self.seed, self.world = rank, seed, plan.num_gpus
        self.dev = driver.open_device(device, own_context)
        self.module = driver.module_load(build.cubin)
        self.funcs: dict[str, int] = {}
        self.rows = build.rows              # the packed table: device rows at the offsets the planner totalled
        self.shard_of = build.shard_elems   # elements of one GPU's shard of each parameter, by parameter name
        self.mem = Arena(self.rows.values(), "device")
        self.host = Arena(self.rows.values(), "host")
        self.stream = driver.stream_create()
        self.comm_stream = driver.stream_create()     # collectives: copies in, reductions
        self.send_stream = driver.stream_create()     # host-staged collectives: copies out
        # offload streaming: one stream per copy direction, so that fetches and write-backs overlap
        self.copy_streams = {"h2d": driver.stream_create(), "d2h": driver.stream_create()}
        self.tag_events: dict[str, int] = {}          # the last copy of each tag (a resolved "w_in[3]")
        self.fork_event = driver.event_create()
        self.in_flight: dict[str, int] = {}           # copies of this run of operations not yet waited for
        ctypes.memset(self.host.base, 0, self.host.nbytes)      # offloaded gradients start at 0 (pinned host)
        self.blas = Blas(self.mem.ptr("ws.cublas"), self.rows["ws.cublas"].bytes)
        m, b = plan.model, plan.batch
        self.attn = None
        if attention == "cudnn":
            self.attn = Attention(AttnShape(b.micro_batch, b.seq_len, m.num_heads, m.num_kv_heads, m.head_dim),
                                  bwd_chunks=plan.attn_bwd_chunks)
            if self.attn.workspace_bytes > self.rows["ws.attention"].bytes:
                raise RuntimeError(f"cuDNN SDPA needs {self.attn.workspace_bytes} bytes of workspace, the plan "
                                   f"reserved {self.rows['ws.attention'].bytes}: re-plan with a larger "
                                   f"attn_bwd_chunks (a divisor of the micro-batch)")
        self.gemms: dict[tuple, Gemm] = {}
        self.gemm_where = (f"{self.dev.name} | cuBLASLt {self.blas.version} | "
                           f"{self.blas.workspace_bytes >> 20} MiB workspace")   # what the candidates depend on
        try:
            self.gemm_machine = gemm_search.machine_file(self.gemm_where, usable_cache_root())
        except ValueError:              # the cache root is a file: choices kept in the build folder only
            self.gemm_machine = None
        self.L = m.num_layers
        self.graphs: dict[tuple, int] = {}
        self.use_graphs = graphs
        self.fed = 0
        self.feed_done = [driver.event_create(), driver.event_create()]
        for e in self.feed_done:
            driver.event_record(e, self.stream)
        self.timing_gemms = True        # nothing lives in the arena yet: the GEMMs may be timed on its rows
        self.gemms_timed: list[float] = []                   # seconds each timed GEMM took
        self.micro = self.program([(ms, layers) for ms, layers in self._micro_sections()])
        self.timing_gemms = False
        if self.gemms_timed:
            log.info(f"GEMM algorithms: {len(self.gemms_timed)} of {len(self.gemms)} timed on this "
                     f"{self.dev.name} in {sum(self.gemms_timed):.1f} s (first time on this GPU model; kept in "
                     f"{self.gemm_machine or self.build.path})")
        driver.memset_d8(self.mem.base, 0, self.mem.nbytes, self.stream)   # gradients and shard pads start at 0
        if "work.ones" in self.rows:
            self.upload(self.mem.ptr("work.ones"), np.ones(b.micro_batch * b.seq_len, ml_dtypes.bfloat16))

    # --- references -> pointers -------------------------------------------------------------------
    def shard_elems(self, name: str) -> int:
        """Elements of one GPU's shard of the tensor a parameter-sized row holds (whole or sharded):
        weights.qkv, stage.grads.qkv, master.embedding, ..."""
        return self.shard_of[name.rsplit(".", 1)[1]]

    def shard_bytes(self, name: str) -> int:
        return self.shard_elems(name) * DTYPE_BYTES[self.rows[name].dtype]

    def ptr(self, ref: str, layer: int | None) -> int:
        if ref.startswith("fp8:"):
            body, _, part = ref[4:].partition("/")
            name, idx = split_index(body, layer)
            base = self.mem.ptr("stats.fp8") + FP8_SLOT_BYTES * fp8_slot_index(name, idx or 0, self.L)
            return base + (FP8_DESCALE_OFFSET if part == "descale" else FP8_AMAX_OFFSET)
        if ref.startswith("scalar:"):
            return self.mem.ptr("stats.scalars") + 4 * SCALARS[ref[7:]]
        name, idx, off, shard = parse_ref(ref, layer)
        row = self.rows[name]
        arena = self.mem if row.place == "device" else self.host     # host rows: their mapped device address
        p = arena.device_ptr(name, idx if (idx is not None and row.count > 1) else 0) + off
        return p + (self.rank * self.shard_bytes(name) if shard else 0)

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

    def launcher(self, k: Kernel, stream: int) -> Callable[..., None]:
        """A kernel of the program as a function of its grid and argument values (collectives, gradient norm)."""
        func, types = self._func(k.name), [t for _, t in k.args]
        return lambda grid, *values: driver.launch(func, grid, k.block, k.smem, stream, list(values), types)

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
            if k.role == "adamw":                       # its grid is one wave of this GPU
                grid = adamw_family.grid(op["args"]["n"], self.dev.sm_count)
            types = [t for _, t in k.args]
            return lambda: driver.launch(func, grid, k.block, k.smem, s, values, types)
        if kind == "linear":
            return self._bind_linear(op, layer)
        if kind.startswith("attention_") and self.attn is None:
            return self._bind_role_kernels(op, layer)
        if kind == "attention_forward":
            p = {k: self.ptr(op[k], layer) for k in ("qkv", "out", "lse")}
            ws = self.ptr(op["workspace"], layer)
            return lambda: self.attn.forward(s, p["qkv"], p["out"], p["lse"], ws)
        if kind == "attention_backward":
            p = {k: self.ptr(op[k], layer) for k in ("qkv", "out", "dout", "lse", "dqkv")}
            ws = self.ptr(op["workspace"], layer)
            return lambda: self.attn.backward(s, p["qkv"], p["out"], p["dout"], p["lse"], p["dqkv"], ws)
        if kind == "memset":
            dst, n = self.ptr(op["dst"], layer), op["bytes"]
            return lambda: driver.memset_d8(dst, 0, n, s)
        if kind == "copy":          # device or mapped pinned host rows, either way (offload streaming)
            dst, src, n = self.ptr(op["dst"], layer), self.ptr(op["src"], layer), op["bytes"]
            if "stream" not in op:
                return lambda: driver.memcpy(dst, src, n, s)
            return self._bind_transfer(dst, src, n, self.copy_streams[op["stream"]],
                                       self._tag(op["tag"], layer), [self._tag(t, layer) for t in op["after"]])
        if kind == "copy_wait":
            tag = self._tag(op["tag"], layer)
            return lambda: self._wait_copy(tag)
        if kind == "bias_grad":     # db[1, cols] += ones[1, rows] . dy[rows, cols]
            g = self._gemm(("bias", op["rows"], op["cols"]), lambda: Gemm(self.blas, 1, op["cols"], op["rows"],
                                                                         b_trans=True, accumulate=True, align=256))
            a, b_, d = self.ptr(op["ones"], layer), self.ptr(op["dy"], layer), self.ptr(op["db"], layer)
            return lambda: g.run(s, a, b_, d)
        if kind == "gradnorm_partials":
            return self._bind_gradnorm_partials(op)
        if kind == "gradnorm_finalize":
            k = self.build.kernel(kind)
            fin = self.launcher(k, s)
            args = (self.ptr(op["partials"], None), op["count"], self.ptr(op["hyper"], None),
                    self.ptr(op["out"], None))
            return lambda: fin(k.grid, *args)
        raise ValueError(f"schedule operation {kind!r} is unknown to this runtime")

    def _tag(self, tag: str, layer: int | None) -> str | None:
        """A copy's tag at `layer` ("w_in[l+1]" -> "w_in[4]"); None for a layer the model lacks."""
        name, idx = split_index(tag, layer)
        return None if idx is not None and not 0 <= idx < self.L else resolve_tag(tag, layer)

    def _bind_transfer(self, dst: int, src: int, n: int, stream: int, tag: str | None,
                       after: list[str | None]) -> Callable[[], None]:
        """An asynchronous copy on a copy stream: it forks from the compute stream where it is issued
        (what was computed before it is done), waits for the in-flight copies tagged `after`, and is
        recorded under its tag for `copy_wait`. Inside a captured run the forks and waits become the
        graph's edges."""
        if tag not in self.tag_events:
            self.tag_events[tag] = driver.event_create()
        event = self.tag_events[tag]

        def run():
            driver.event_record(self.fork_event, self.stream)
            driver.stream_wait(stream, self.fork_event)
            for t in after:
                if t in self.in_flight:
                    driver.stream_wait(stream, self.in_flight[t])
            driver.memcpy(dst, src, n, stream)
            driver.event_record(event, stream)
            self.in_flight[tag] = event
        return run

    def _wait_copy(self, tag: str | None) -> None:
        """The compute stream waits for the copies of `tag`; nothing when none is in flight (the data
        is still in its buffer, or the run that copied it has ended)."""
        event = self.in_flight.pop(tag, None)
        if event is not None:
            driver.stream_wait(self.stream, event)

    def _join_copies(self) -> None:
        """A run of operations ends with every copy it started: the compute stream waits for the rest
        (a captured graph must join its forks; the next run may reuse any buffer)."""
        for tag in list(self.in_flight):
            self._wait_copy(tag)

    def _bind_gradnorm_partials(self, op: dict) -> Callable[[], None]:
        ptrs = [self.ptr(ref if not per_layer else at(ref, i), None)
                for ref, per_layer in op["tensors"] for i in range(self.L if per_layer else 1)]
        grids, offsets, _ = gradnorm_family.partials_layout(op["sizes"])
        base = self.rank * op["rank_offset"]
        partial = self.launcher(self.build.kernel(op["op"]), self.stream)
        parts = self.ptr(op["partials"], None)
        calls = [((g, 1, 1), p, n, parts, base + off) for p, n, g, off in zip(ptrs, op["sizes"], grids, offsets)]
        return lambda: [partial(*c) for c in calls] and None

    def _bind_role_kernels(self, op: dict, layer: int | None) -> Callable[[], None]:
        """An operation the program's own kernels carry out (flash attention: forward; backward = rowsum(dO*O)
        pre-pass + backward): the kernel table's kernels of its role, in order, each argument the operation's
        field of that name."""
        kernels = self.build.by_role(op["op"])
        if not kernels:
            raise ValueError(f"the program has no kernels for {op['op']!r} (kernels.json role): rebuild it")
        fns = [self._bind({"op": "kernel", "kernel": k.name, "args": {a: op[a] for a, _ in k.args}}, layer)
               for k in kernels]
        return lambda: [f() for f in fns] and None

    def _gemm(self, key, make) -> Gemm:
        if key not in self.gemms:
            self.gemms[key] = make()
        return self.gemms[key]

    def _bind_linear(self, op: dict, layer: int | None) -> Callable[[], None]:
        P = lambda k: self.ptr(op[k], layer) if op.get(k) else 0      # noqa: E731
        M, N, K, s, fp8 = op["M"], op["N"], op["K"], self.stream, op["dtype"] != "bf16"
        if op["pass"] == "forward":
            x, w, y, xs, ws, bias = P("x"), P("w"), P("y"), P("x_scale"), P("w_scale"), P("bias")
            fast = fp8 and self.plan.precision.fast_accum and not op["accumulate"]
            g = self._gemm(("fwd", M, N, K, op["dtype"], bool(op["bias"]), op["accumulate"], fast),
                           lambda: linear_forward(self.blas, M, N, K, x_dtype=op["dtype"], w_dtype=op["dtype"],
                                                  bias=bool(op["bias"]), accumulate=op["accumulate"],
                                                  fast_accum=fast))
            return self._chosen(g, (x, w, y), lambda: g.run(s, x, w, y, a_scale=xs, b_scale=ws, bias=bias))
        gd = op["grad_dtype"]
        if op["pass"] == "dgrad":
            if fp8:
                g = self._gemm(("dgrad8", M, K, N, gd), lambda: linear_forward(self.blas, M, K, N, x_dtype=gd,
                                                                               w_dtype="e4m3"))
            else:
                g = self._gemm(("dgrad", M, N, K), lambda: linear_dgrad(self.blas, M, N, K))
            dy, w, dx, dys, ws = P("dy"), P("w"), P("dx"), P("dy_scale"), P("w_scale")
            return self._chosen(g, (dy, w, dx), lambda: g.run(s, dy, w, dx, a_scale=dys, b_scale=ws))
        if fp8:
            g = self._gemm(("wgrad8", N, K, M, gd), lambda: linear_forward(self.blas, N, K, M, x_dtype=gd,
                                                                           w_dtype="e4m3", accumulate=True))
        else:
            g = self._gemm(("wgrad", M, N, K), lambda: linear_wgrad(self.blas, M, N, K))
        dy, x, dw, dys, xs = P("dy"), P("x"), P("dw"), P("dy_scale"), P("x_scale")
        return self._chosen(g, (dy, x, dw), lambda: g.run(s, dy, x, dw, a_scale=dys, b_scale=xs))

    def _chosen(self, g: Gemm, operands: tuple[int, int, int], run: Callable[[], None]) -> Callable[[], None]:
        """`run`, with `g` set to its kept algorithm or, while the micro-step binds (nothing lives in the arena),
        the fastest of its candidates on random operands (runtime/gemm_search.py). Operands in host memory
        (offload) are not timed: PCIe would rank the candidates."""
        a, b, _ = operands

        def timer() -> int:
            t0 = time.perf_counter()
            self._fill_random(a, g.m * g.k, g.a_dtype)
            self._fill_random(b, g.n * g.k, g.b_dtype)
            i = gemm_search.fastest(g, run, self.stream)
            self.gemms_timed.append(time.perf_counter() - t0)
            return i
        may_time = self.timing_gemms and not any(self._in_host(p) for p in operands)
        gemm_search.choose(g, self.gemm_where, self.build.path, self.gemm_machine, timer if may_time else None)
        return run

    def _fill_random(self, ptr: int, elems: int, dtype: str) -> None:
        """`elems` values of `dtype` at device `ptr`, normal (FP8: times 16, a scaled tensor's spread): a block
        made once per dtype, uploaded, then doubled on the device."""
        if dtype not in _RANDOM:
            x = np.random.default_rng(0).standard_normal(RANDOM_BLOCK).astype(np.float32)
            _RANDOM[dtype] = (x if dtype == "bf16" else 16 * x).astype(NP_DTYPES[dtype])
        block = _RANDOM[dtype].view(np.uint8)
        nbytes = elems * _RANDOM[dtype].itemsize
        done = min(nbytes, block.nbytes)
        self.upload(ptr, block[:done])
        while done < nbytes:
            n = min(done, nbytes - done)
            driver.memcpy_dtod(ptr + done, ptr, n, self.stream)
            done += n

    # --- programs ------------------------------------------------------------------------------------
    def _micro_sections(self):
        ms, layers = self.sched["micro_step"], list(range(self.L))
        return [(ms[name], (layers[::-1] if backward else layers) if per_layer else [None])
                for name, per_layer, backward in MICRO_SECTIONS]

    def program(self, sections, extra=None) -> list[Item]:
        """Bind sections [(ops, layers)] into items; a collective ends the run of operations before it.
        An ("ops", closures, op dicts) item keeps each closure's schedule operation (runtime/profile.py)."""
        self.dev.make_current()     # binding creates events and GEMM plans: in this rank's context
        items, run, run_ops = [], [], []
        for ops, layers in sections:
            for layer in layers:
                for op in ops:
                    if layer in op.get("skip_layers", ()):   # e.g. a buffer that still holds this layer's data
                        continue
                    if op["op"] in ("collective", "await"):
                        if run:
                            items.append(("ops", run, run_ops))
                            run, run_ops = [], []
                        tag = resolve_tag(op["tag"], layer) if "tag" in op else None
                        items.append((op["op"], op, layer, tag))
                    else:
                        run.append(self._bind(op, layer, extra))
                        run_ops.append(op)
        if run:
            items.append(("ops", run, run_ops))
        return items

    def eval_program(self) -> list[Item]:
        """A micro-step's forward and loss only (the schedule's `eval` head: no backward, no gradients)."""
        if not hasattr(self, "_eval"):
            ms, L = self.sched["micro_step"], self.L
            self._eval = self.program([(ms["prologue"], [None]), (ms["layer_forward"], list(range(L))),
                                       (self.sched["eval"]["head"], [None])])
        return self._eval

    def load_program(self) -> list[Item]:
        """At load: RoPE table, weight amaxes, then the work copies from the masters (and their gather)."""
        s, o, L = self.sched, self.sched["optimizer_step"], list(range(self.L))
        return self.program([(s["init"], [None]), (s["layer_init"], L), (o["publish"], [None]),
                             (o["layer_publish"], L), (o["gather"], [None])])

    @cached_property
    def norm_program(self) -> list[Item]:
        """The gradient sums over GPUs and the global norm (scalar:norm): read before any update."""
        return self.program([(self.sched["optimizer_step"]["gradnorm"], [None])])

    @cached_property
    def optimizer_program(self) -> list[Item]:
        """The update after norm_program: AdamW, the new work copies and their gather. The same every step
        (learning rate and step number are read from scalar:hyper), so it replays as CUDA graphs."""
        o, L = self.sched["optimizer_step"], list(range(self.L))
        return self.program([(o["optimizer"], [None]), (o["layer_optimizer"], L), (o["publish"], [None]),
                             (o["layer_publish"], L), (o["gather"], [None])], {"seed": self._seed})

    def run_ops(self, fns, key: tuple | None) -> None:
        """A run of operations: eagerly, or as a CUDA graph captured on first use under `key`."""
        if key is None or not self.use_graphs:
            self._issue(fns)
            return
        graph = self.graphs.get(key)
        if graph is None:
            self._issue(fns)         # warm-up run: libraries allocate and pick kernels outside capture
            driver.capture_begin(self.stream)
            self._issue(fns)
            self.graphs[key] = driver.capture_end(self.stream)
            return                   # the warm-up already did this work
        driver.graph_launch(graph, self.stream)

    def _issue(self, fns) -> None:
        self.in_flight.clear()
        for f in fns:
            f()
        self._join_copies()

    def _seed(self, tag: str, layer) -> int:
        # each GPU rounds its own shard: a shard's random stream must not repeat another's
        shard = f":{self.rank}" if self.world > 1 and self.plan.sharding.optimizer else ""
        h = hashlib.sha256(f"{self.seed}:{tag}:{layer}{shard}".encode()).digest()
        return int.from_bytes(h[:4], "little") & 0x7FFFFFFF

    # --- host <-> device -----------------------------------------------------------------------------
    def _in_host(self, p: int) -> bool:
        return self.host.device_base <= p < self.host.device_base + self.host.nbytes

    def upload(self, dst: int, array: np.ndarray) -> None:
        self.dev.make_current()
        a = np.ascontiguousarray(array)
        if self._in_host(dst):                      # an offloaded row: written by the CPU once the GPU is idle
            driver.stream_synchronize(self.stream)
            ctypes.memmove(dst - self.host.device_base + self.host.base, a.ctypes.data, a.nbytes)
            return
        driver.memcpy_htod(dst, a.ctypes.data, a.nbytes, self.stream)
        driver.stream_synchronize(self.stream)      # `a` may be freed once this returns

    def download(self, src: int, dtype, shape) -> np.ndarray:
        self.dev.make_current()
        out = np.empty(shape, dtype)
        if self._in_host(src):                      # an offloaded row: read by the CPU once the GPU is idle
            driver.stream_synchronize(self.stream)
            ctypes.memmove(out.ctypes.data, src - self.host.device_base + self.host.base, out.nbytes)
            return out
        driver.memcpy_dtoh(out.ctypes.data, src, out.nbytes, self.stream)
        driver.stream_synchronize(self.stream)
        return out

    def set_scalar(self, name: str, values) -> None:
        self.upload(self.ptr(f"scalar:{name}", None), np.asarray(values, np.float32))

    def feed(self, batch) -> None:
        """Tokens of one micro-batch, through a pinned double buffer: no wait for the GPU unless the
        buffer's previous copy (two micro-batches ago) is still in flight."""
        BT = self.plan.batch.micro_batch * self.plan.batch.seq_len
        slot = self.fed % 2
        self.fed += 1
        driver.event_synchronize(self.feed_done[slot])
        n = staging_elems(BT)
        stage = self.host.view("stage.tokens", 0, np.int32)[slot * n:(slot + 1) * n]
        values = {"tokens.inputs": batch.inputs, "tokens.targets": batch.targets,
                  "tokens.sorted_pos": batch.sorted_positions,
                  "tokens.segments": np.append(batch.segment_starts[:num_unique_index(BT)], batch.num_unique)}
        src = stage.ctypes.data
        for row, lo, count in token_staging(BT):
            stage[lo:lo + count] = np.asarray(values[row], np.int32).reshape(-1)
            driver.memcpy_htod(self.mem.ptr(row), src + 4 * lo, 4 * count, self.stream)
        driver.event_record(self.feed_done[slot], self.stream)

    # --- parameters (this GPU's part) --------------------------------------------------------------
    def param_row(self, name: str) -> str:
        return f"master.{name}" if f"master.{name}" in self.rows else f"weights.{name}"

    def is_shard(self, name: str) -> bool:
        """A row holding this GPU's shard (shape (S,)) rather than a whole tensor."""
        return self.rows[name].sharded

    def write_tensor(self, name: str, index: int, full: np.ndarray) -> None:
        """A whole tensor (any float dtype) into row instance `index`, in the row's dtype."""
        self.write_raw(name, index, np.asarray(full, np.float32).reshape(-1).astype(NP_DTYPES[self.rows[name].dtype]))

    def write_raw(self, name: str, index: int, flat: np.ndarray) -> None:
        """A whole tensor already in the row's dtype: padded to N shards, and only this GPU's shard if
        the row holds one."""
        flat = flat.reshape(-1)
        if self.world > 1:
            S = self.shard_elems(name)
            flat = np.concatenate([flat, np.zeros(S * self.world - flat.size, flat.dtype)])
            if self.is_shard(name):
                flat = flat[self.rank * S:(self.rank + 1) * S]
        self.upload(self.ptr(f"{name}[{index}]", None), flat)

    def read_row(self, name: str, index: int) -> np.ndarray:
        """Row instance `index` as stored (its dtype): the shard or the whole padded tensor."""
        row = self.rows[name]
        n = prod(row.shape) if (row.sharded or self.world == 1) else self.shard_elems(name) * self.world
        return self.download(self.ptr(f"{name}[{index}]", None), NP_DTYPES[row.dtype], (n,))

    def close(self) -> None:
        driver.stream_synchronize(self.stream)
        for st in self.copy_streams.values():
            driver.stream_synchronize(st)
            driver.stream_destroy(st)
        for e in [*self.tag_events.values(), self.fork_event]:
            driver.event_destroy(e)
        for g in self.graphs.values():
            driver.graph_destroy(g)
        self.graphs.clear()
        for g in self.gemms.values():
            g.close()
        self.blas.close()
        if self.attn is not None:
            self.attn.close()
        self.mem.free()
        self.host.free()
        self.dev.release()
