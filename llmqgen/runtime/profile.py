"""`llmqgen bench --profile`: one training step's GPU time per kernel family and per schedule phase.

The step runs eagerly (no CUDA graphs) with every bound operation of every program between two CUDA
events on its rank's compute stream (`Profiler.wrap`), and every collective or await item between two
events on each rank's compute stream (`Profiler.bracket`: the time that stream waits for it). Events come
from a pool made before the step; their times are read once the step has synchronised, never per op.

Each operation of schedule.json gets a `Label` (`label`): its family — "gemm" and "lm_head gemm" (the
linear ops, split by layer_name), "attention", "bias_grad" (cuBLASLt reduction of the QKV bias gradient),
"copy", "copy wait" (the compute stream waiting for offload transfers), "memset", "collective", or a
generated kernel's family from its name (llmq_<family>_...:
quantize, transpose, amax, rmsnorm, swiglu, rope, crossentropy, embedding, adamw, gradnorm, cast) —
and its phase: forward, recompute, backward, optimizer as the schedule says, "LM head" for the ops of
the micro-step's `head` section, "collectives" and "copies" for those kinds wherever they sit. The
"floor share" is (GEMM + attention) / all GPU time: what is left is overhead a better program could shed.

Eager launches from Python are slower than the GPU's small kernels; an event pair would then time the
launch, not the kernel. So each run of operations is queued behind a short spin kernel ("pre-roll",
compiled once with NVRTC): the GPU waits while Python queues the run, then executes it back to back.
The table sums GPU time per operation; the gaps between operations (and the spins) are in no row, so
the sum is less than the eager step's wall time, and compares with the graphed step time only roughly.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, replace

from ..plan.traffic import kernel_bytes, kernel_family, op_bytes
from . import driver

FLOOR_FAMILIES = ("gemm", "lm_head gemm", "attention")
# A family the cost model predicts below this (launches only: delayed scaling's idle amax passes) gets no ratio.
RATIO_FLOOR_MS = 0.5
PHASES = ("forward", "recompute", "backward", "LM head", "optimizer", "collectives", "copies")
FAMILIES = ("gemm", "lm_head gemm", "attention", "bias_grad", "quantize", "transpose", "amax", "rmsnorm",
            "swiglu", "rope", "crossentropy", "embedding", "adamw", "gradnorm", "cast", "copy", "copy wait",
            "memset", "collective")
TOP = 10                    # costliest operations (by name) in the report
POOL_GROW = 1024            # events made at once when the pool runs dry
PREROLL_OPS = 128           # operations queued behind one spin
PREROLL_US_PER_OP = 60      # spin per queued operation: above Python's time to launch one (GEMMs: ~30 us)
PREROLL_MAX_US = 20_000
SPIN_SOURCE = r"""
extern "C" __global__ void llmq_profile_spin(unsigned long long ns) {   // waits ns on the GPU's clock
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        __nanosleep(1000);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < ns);
}
"""
NOTE = ("GPU time of each operation between CUDA events on its stream, one step run eagerly (no CUDA "
        "graphs); eager launches add gaps between operations that no row holds: the table sums GPU time, "
        "not wall time. Collectives: the time the compute stream waits for them.")


@dataclass(frozen=True)
class Label:
    family: str
    phase: str
    name: str           # kernel name, "<layer> <pass>" for a GEMM, the op kind otherwise
    launches: int       # kernels, library calls and copies the operation issues
    bytes: int = 0      # device memory an elementwise operation reads and writes (plan/traffic.py); 0: not counted


def label(op: dict, head: bool = False, flash: bool = False) -> Label:
    """Family and phase of one schedule operation; `head`: it belongs to the micro-step's head section;
    `flash`: attention runs as the program's own kernels (backward: two launches) rather than cuDNN."""
    kind = op["op"]
    phase = "LM head" if head else op.get("phase", "forward")
    if kind == "linear":
        lm = op.get("layer_name") == "lm_head"
        return Label("lm_head gemm" if lm else "gemm", phase, f"{op.get('layer_name')} {op.get('pass')}", 1)
    if kind == "kernel":
        return Label(kernel_family(op["kernel"]), phase, op["kernel"], 1)
    if kind == "branch_on_layer":          # the layer's variant of one kernel (ln1's norm: first layer or not)
        inner = label(op["rest"][0], head, flash)
        return Label(inner.family, phase, inner.name, inner.launches)
    if kind.startswith("attention_"):
        return Label("attention", phase, kind, 2 if flash and kind == "attention_backward" else 1)
    if kind == "gradnorm_partials":
        return Label("gradnorm", phase, "llmq_gradnorm_partial", len(op["sizes"]))
    if kind == "gradnorm_finalize":
        return Label("gradnorm", phase, "llmq_gradnorm_finalize", 1)
    if kind == "copy":      # an asynchronous one (offload streaming) only forks on the compute stream
        return Label("copy", "copies", "copy", 1)
    if kind == "copy_wait":     # the compute stream waiting for host transfers: offload's exposed time
        return Label("copy wait", "copies", "copy_wait", 0)
    if kind in ("collective", "await"):
        return Label("collective", "collectives", f"{kind} {op.get('kind', op.get('tag', ''))}".strip(),
                     int(kind == "collective"))
    return Label(kind, phase, kind, 1)     # memset, bias_grad


def schedule_labels(sched: dict, flash: bool = False, plan=None) -> dict[int, Label]:
    """The Label of every operation a training step runs (micro-step, evaluation head, optimizer step),
    by id() of the schedule's own op dicts — the objects Rank.program keeps beside its closures; with the
    `plan`, the bytes each elementwise operation moves (its achieved bandwidth in the report)."""
    ms, heads = sched["micro_step"], (sched["micro_step"]["head"], sched["eval"]["head"])
    rule = kernel_bytes(plan) if plan is not None else None
    out = {}
    for section in [*ms.values(), sched["eval"]["head"], *sched["optimizer_step"].values()]:
        for op in section:
            lab = label(op, head=any(section is h for h in heads), flash=flash)
            out[id(op)] = replace(lab, bytes=_bytes(op, rule)) if rule else lab
    return out


def _bytes(op: dict, rule) -> int:
    """op_bytes of an operation (a branch: its variant for layers past the first), 0 where no rule has it
    (the optimizer's kernels)."""
    try:
        return op_bytes(op["rest"][0] if op["op"] == "branch_on_layer" else op, rule)
    except KeyError:
        return 0


# --- the report: pure functions of labelled timings -------------------------------------------------
def _rows(groups: dict[str, list], total: float, order: tuple = ()) -> list[dict]:
    """One row per group of (ms, launches, bytes): in `order` (others after it, by name), else costliest
    first; `gb_per_s` where the group's operations have byte counts (None elsewhere)."""
    if order:
        names = [n for n in order if n in groups] + sorted(set(groups) - set(order))
    else:
        names = sorted(groups, key=lambda n: (-sum(g[0] for g in groups[n]), n))
    out = []
    for n in names:
        ms, nbytes = sum(g[0] for g in groups[n]), sum(g[2] for g in groups[n])
        counted = sum(g[0] for g in groups[n] if g[2])        # time of the operations with byte counts
        out.append({"name": n, "ms": ms, "launches": sum(g[1] for g in groups[n]), "ops": len(groups[n]),
                    "share": ms / total if total > 0 else 0.0,
                    "bytes": nbytes, "gb_per_s": nbytes / counted / 1e6 if nbytes and counted > 0 else None})
    return out


def summarize(timings: list[tuple[Label, float]], **extra) -> dict:
    """The profile of one step from (label, GPU ms) of every operation it ran: rows per family (costliest
    first), per phase (in PHASES order) and per operation name (costliest first; the table prints the first
    TOP); the floor share. `extra`
    (wall time, micro-steps, ...) is kept as given."""
    total = sum(ms for _, ms in timings)
    by: dict[str, dict[str, list]] = {"family": defaultdict(list), "phase": defaultdict(list),
                                      "name": defaultdict(list)}
    for lab, ms in timings:
        for key in by:
            by[key][getattr(lab, key)].append((ms, lab.launches, lab.bytes))
    floor = sum(ms for lab, ms in timings if lab.family in FLOOR_FAMILIES)
    return {"gpu_ms": total, "ops": len(timings), "launches": sum(lab.launches for lab, _ in timings),
            "floor_ms": floor, "floor_share": floor / total if total > 0 else 0.0,
            "floor_families": list(FLOOR_FAMILIES),
            "families": _rows(by["family"], total), "phases": _rows(by["phase"], total, PHASES),
            "operations": _rows(by["name"], total), "note": NOTE, **extra}


def format_profile(report: dict, step_ms: float | None = None) -> str:
    """The tables `llmqgen bench --profile` prints; step_ms: the graphed steps' median, for scale."""
    def table(title, rows):
        out = [f"  {title:<26} {'GPU ms':>10} {'share':>7} {'launches':>9} {'GB/s':>7}"]
        out += [f"  {r['name']:<26} {r['ms']:>10.3f} {100 * r['share']:>6.1f}% {r['launches']:>9,}"
                + (f" {r['gb_per_s']:>7,.0f}" if r.get("gb_per_s") else "") for r in rows]
        return out

    ranks = report.get("ranks", 1)
    head = (f"profile of one step ({report.get('micro_steps', '?')} micro-step(s)"
            + (f", rank 0 of {ranks}" if ranks > 1 else "") + ", eager): "
            f"{report['ops']:,} operations, {report['launches']:,} launches, {report['gpu_ms']:.2f} ms of GPU time")
    lines = [head, *table("family", report["families"]),
             f"  {'total':<26} {report['gpu_ms']:>10.3f} {100.0 if report['gpu_ms'] > 0 else 0:>6.1f}% "
             f"{report['launches']:>9,}", "", *table("phase", report["phases"]), "",
             *table("costliest operations", report["operations"][:TOP]), "",
             f"floor share (GEMM + attention): {100 * report['floor_share']:.1f}% of GPU time "
             f"({report['floor_ms']:.2f} of {report['gpu_ms']:.2f} ms)"]
    pred = report.get("predicted_ms")
    if pred:        # the cost model's time per family (bench adds it), beside this step's
        lines += ["", f"  {'family vs the cost model':<26} {'GPU ms':>10} {'predicted':>10} {'ratio':>6}"]
        lines += [f"  {r['name']:<26} {r['ms']:>10.3f} {pred[r['name']]:>10.3f} " + (
                  f"{r['ms'] / pred[r['name']]:>5.2f}x" if pred[r["name"]] >= RATIO_FLOOR_MS else f"{'-':>6}")
                  for r in report["families"] if r["name"] in pred]
    scale = []
    if report.get("wall_ms") is not None:
        scale.append(f"the eager step took {report['wall_ms']:.1f} ms of wall time")
    if step_ms is not None:
        scale.append(f"a graphed step {step_ms:.1f} ms (median)")
    if scale:
        lines.append("; ".join(scale))
    if report.get("preroll") is False and report.get("preroll_reason"):
        lines.append(f"pre-roll off ({report['preroll_reason']}): small kernels' times include launch latency")
    lines.append(f"note: {report['note']}")
    return "\n".join(lines)


# --- timing a step --------------------------------------------------------------------------------
class Profiler:
    """While active (a `with` block around a step), the trainer runs its programs eagerly through `wrap`
    and its collective/await items through `bracket`; on exit the times are read back (`timings`, per
    rank: (Label, ms) of every operation in order) and `report()` summarises rank 0."""

    def __init__(self, trainer, micro_steps: int = 1, preroll: bool = True):
        self.tr, self.ranks, self.micro_steps = trainer, trainer.ranks, micro_steps
        self.flash = getattr(self.ranks[0], "attn", None) is None
        self.labels = schedule_labels(trainer.sched, flash=self.flash, plan=trainer.plan)
        self.records: list[list[tuple[Label, int, int]]] = [[] for _ in self.ranks]
        self.pools: list[list[int]] = [[] for _ in self.ranks]
        self.timings: list[list[tuple[Label, float]]] = []
        self.preroll, self.preroll_reason = preroll, ""
        self.spins: list[tuple[int, int]] = []          # (module, function) per rank
        self.wall_ms: float | None = None

    # --- hooks the trainer calls ---------------------------------------------------------------------
    def wrap(self, rk, item: tuple) -> list:
        """A run of operations ("ops", closures, op dicts) as closures that time each operation."""
        i = self.ranks.index(rk)
        fns, ops = item[1], item[2]
        out = []
        for j, (f, op) in enumerate(zip(fns, ops)):
            if self.spins and j % PREROLL_OPS == 0:
                out.append(self._spin(i, min(PREROLL_OPS, len(fns) - j)))
            lab = self.labels.get(id(op)) or label(op, flash=self.flash)
            out.append(self._timed(i, f, lab))
        return out

    def bracket(self, item: tuple):
        """Events around a collective or await item on every rank's compute stream; call the result after."""
        lab = self.labels.get(id(item[1])) or label(item[1])
        pairs = []
        for i, rk in enumerate(self.ranks):
            rk.dev.make_current()
            e0, e1 = self._event(i), self._event(i)
            driver.event_record(e0, rk.stream)
            self.records[i].append((lab, e0, e1))
            pairs.append((rk, e1))

        def end():
            for rk, e1 in pairs:
                rk.dev.make_current()
                driver.event_record(e1, rk.stream)
        return end

    def _timed(self, i: int, f, lab: Label):
        e0, e1, s = self._event(i), self._event(i), self.ranks[i].stream
        self.records[i].append((lab, e0, e1))

        def run():
            driver.event_record(e0, s)
            f()
            driver.event_record(e1, s)
        return run

    def _spin(self, i: int, n_ops: int):
        func, s = self.spins[i][1], self.ranks[i].stream
        ns = 1000 * min(PREROLL_MAX_US, n_ops * PREROLL_US_PER_OP)
        return lambda: driver.launch(func, (1, 1, 1), (1, 1, 1), 0, s, [ns], ["unsigned long long"])

    def _event(self, i: int) -> int:
        pool = self.pools[i]
        if not pool:
            self.ranks[i].dev.make_current()
            pool.extend(driver.event_create(timing=True) for _ in range(POOL_GROW))
        return pool.pop()

    # --- the session ----------------------------------------------------------------------------------
    def _load_spin(self) -> None:
        try:
            from ..compile.cache import compile_cached
            cubin = compile_cached(SPIN_SOURCE, self.ranks[0].dev.arch).cubin_path.read_bytes()
            for rk in self.ranks:
                rk.dev.make_current()
                module = driver.module_load(cubin)
                self.spins.append((module, driver.function(module, "llmq_profile_spin")))
        except Exception as e:  # noqa: BLE001 - timing still works without it, less exactly; the report says so
            self.preroll, self.preroll_reason = False, f"{type(e).__name__}: {e}"
            self._unload_spin()

    def _unload_spin(self) -> None:
        for rk, (module, _) in zip(self.ranks, self.spins):
            rk.dev.make_current()
            driver.module_unload(module)
        self.spins = []

    def __enter__(self) -> "Profiler":
        if self.preroll:
            self._load_spin()
        n = 2 * step_op_count(self.tr, self.micro_steps)      # a pair per operation (more are made if short)
        for i, rk in enumerate(self.ranks):
            rk.dev.make_current()
            self.pools[i].extend(driver.event_create(timing=True) for _ in range(n))
        self.graphs = [rk.use_graphs for rk in self.ranks]
        for rk in self.ranks:
            rk.use_graphs = False
        self.tr.profiler = self
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.tr.profiler = None
        for rk, g in zip(self.ranks, self.graphs):
            rk.use_graphs = g
        try:
            for rk in self.ranks:
                rk.dev.make_current()
                driver.stream_synchronize(rk.stream)
            self.wall_ms = 1e3 * (time.perf_counter() - self.t0)
            if exc_type is None:
                self.timings = [self._read(i) for i in range(len(self.ranks))]
        finally:
            self._free()

    def _read(self, i: int) -> list[tuple[Label, float]]:
        self.ranks[i].dev.make_current()
        return [(lab, driver.event_elapsed_ms(e0, e1)) for lab, e0, e1 in self.records[i]]

    def _free(self) -> None:
        for i, rk in enumerate(self.ranks):
            rk.dev.make_current()
            for e in [e for _, e0, e1 in self.records[i] for e in (e0, e1)] + self.pools[i]:
                driver.event_destroy(e)
            self.records[i], self.pools[i] = [], []
        self._unload_spin()

    def report(self) -> dict:
        """summarize() of rank 0's operations, with every rank's total GPU time beside it."""
        extra = {"ranks": len(self.ranks), "rank_gpu_ms": [sum(ms for _, ms in t) for t in self.timings],
                 "micro_steps": self.micro_steps, "wall_ms": self.wall_ms, "graphs": False,
                 "preroll": self.preroll}
        if self.preroll_reason:
            extra["preroll_reason"] = self.preroll_reason
        return summarize(self.timings[0], **extra)


def step_op_count(trainer, micro_steps: int) -> int:
    """Operations (closures and collective items) of one step on one rank: the event pool's size."""
    rk, o, L = trainer.ranks[0], trainer.sched["optimizer_step"], trainer.L
    micro = sum(len(it[1]) if it[0] == "ops" else 1 for it in rk.micro)
    opt = (len(o["gradnorm"]) + len(o["optimizer"]) + L * len(o["layer_optimizer"]) + len(o["publish"])
           + L * len(o["layer_publish"]) + len(o["gather"]))
    return micro * micro_steps + opt


def profile_step(trainer, batches, lr: float = 1e-4, preroll: bool = True) -> dict:
    """One training step (accumulate + optimizer step) of `batches`, profiled; the report of rank 0."""
    micro_steps = len(batches) // trainer.plan.num_gpus
    with Profiler(trainer, micro_steps, preroll=preroll) as prof:
        trainer.accumulate(batches)
        trainer.optimizer_step(lr=lr)
    return prof.report()


def graphed_step(trainer, batches, lr: float = 1e-4) -> dict:
    """One step as training runs it (CUDA graphs), with events between its parts on rank 0's stream:
    the GPU time of each micro-step, of the gradient norm and of the optimizer, beside the step's wall
    time. The rest of the wall time is the GPU waiting for the host (syncs, reads, launches)."""
    trainer.marks = []
    t0 = time.perf_counter()
    try:
        trainer.accumulate(batches)
        trainer.optimizer_step(lr=lr)
        trainer._sync()
        wall = 1e3 * (time.perf_counter() - t0)
        marks, parts = trainer.marks, defaultdict(list)
        trainer.ranks[0].dev.make_current()
        for (_, e0), (what, e1) in zip(marks, marks[1:]):
            if what != "start":
                parts[what].append(driver.event_elapsed_ms(e0, e1))
    finally:
        for _, e in trainer.marks:
            driver.event_destroy(e)
        trainer.marks = None
    gpu = sum(sum(v) for v in parts.values())
    return {"wall_ms": wall, "gpu_ms": gpu, "parts": {k: {"count": len(v), "ms": sum(v)} for k, v in parts.items()},
            "micro_step_ms": parts["micro-step"], "host_wait_ms": wall - gpu}


def format_graphed(g: dict) -> str:
    """One line of graphed_step's result."""
    parts = ", ".join(f"{k} {v['ms']:.1f} ms" + (f" ({v['count']})" if v["count"] > 1 else "")
                      for k, v in g["parts"].items())
    return (f"graphed step: {g['wall_ms']:.1f} ms of wall time, {g['gpu_ms']:.1f} ms between events on the GPU "
            f"({parts}); {g['host_wait_ms']:.1f} ms outside them (the GPU waiting for the host)")


def predicted_family_ms(cost) -> dict[str, float]:
    """A StepCost (plan/cost.py) as ms per step of the profile's families: the GEMMs, the LM-head GEMMs,
    attention and each elementwise family (bytes over bandwidth, launches not included)."""
    b = cost.breakdown_ms
    return {"gemm": b["matmul"], "lm_head gemm": b["lm_head"], "attention": b["attention"], **cost.elementwise_ms}
