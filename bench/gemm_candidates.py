"""Time every cuBLASLt heuristic candidate of a plan's GEMMs, with and without FP8 fast accumulation: how much an
algorithm search or fast accumulation could gain over the heuristic's first pick (runtime/gemm_search.py makes the search).

    python bench/gemm_candidates.py --plan plans/qwen2.5-0.5b-fp8-1xh200.json [--reps 5] [--out result.json]

Operands are random (torch allocates them); times are CUDA-event medians of `reps` runs after one warm-up. Each
GEMM of a micro-step is listed once with how often a step runs it, so the last line weighs the gains by that."""
from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch

from llmqgen.plan.block import head_gemms, layer_gemms
from llmqgen.plan.schema import load_plan
from llmqgen.runtime.blas import Blas, Gemm

TORCH = {"bf16": torch.bfloat16, "e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def operands(pass_: str, M: int, N: int, K: int, dtype: str, grad: str):
    """(Gemm kwargs, m, n, k, a, b, d) of one pass in blas.py's convention (the FP8 backward: TN copies)."""
    fp8 = dtype != "bf16"
    if pass_ == "forward":
        m, n, k, da, db, acc, at, bt = M, N, K, dtype, dtype, False, False, False
    elif pass_ == "dgrad":
        m, n, k, da, db, acc, at, bt = M, K, N, (grad if fp8 else "bf16"), dtype, False, False, not fp8
    else:
        m, n, k, da, db, acc, at, bt = N, K, M, (grad if fp8 else "bf16"), dtype, True, not fp8, not fp8
    a = torch.randn(k if at else m, m if at else k, device="cuda").to(TORCH[da])
    b = torch.randn(k if bt else n, n if bt else k, device="cuda").to(TORCH[db])
    d = torch.zeros(m, n, device="cuda", dtype=torch.bfloat16)
    return dict(a_dtype=da, b_dtype=db, a_trans=at, b_trans=bt, accumulate=acc), m, n, k, a, b, d


def time_gemm(g: Gemm, a, b, d, scale, reps: int) -> float:
    s = torch.cuda.current_stream().cuda_stream
    run = lambda: g.run(s, a.data_ptr(), b.data_ptr(), d.data_ptr(),  # noqa: E731
                        a_scale=scale.data_ptr() if g.fp8 else 0, b_scale=scale.data_ptr() if g.fp8 else 0)
    run()
    out = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        run()
        e1.record()
        e1.synchronize()
        out.append(e0.elapsed_time(e1))
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
    plan = load_plan(args.plan)
    ws = torch.empty(32 << 20, dtype=torch.uint8, device="cuda")
    blas = Blas(ws.data_ptr(), ws.numel())
    scale = torch.ones(4, device="cuda")
    L, ga = plan.model.num_layers, plan.batch.grad_accum
    rows, total = [], {"first": 0.0, "best": 0.0, "fast_first": 0.0, "fast_best": 0.0}
    for gemms, times in ((layer_gemms(plan), L * ga), (head_gemms(plan), ga)):
        seen = set()
        for g0 in gemms:
            key = (g0.name, g0.pass_, g0.M, g0.N, g0.K, g0.dtype)
            if key in seen:
                continue
            seen.add(key)
            count = times * sum(1 for x in gemms if (x.name, x.pass_, x.M, x.N, x.K, x.dtype) == key)
            kw, m, n, k, a, b, d = operands(g0.pass_, g0.M, g0.N, g0.K, g0.dtype, plan.precision.gradient
                                            if g0.name != "lm_head" else "e5m2")
            row = {"gemm": f"{g0.name} {g0.pass_}", "m": m, "n": n, "k": k, "dtype": g0.dtype, "runs": count}
            for fast in ((False, True) if g0.dtype != "bf16" else (False,)):
                g = Gemm(blas, m, n, k, fast_accum=fast, **kw)
                ms = []
                for i in range(g.found):
                    g.use(i)
                    try:
                        ms.append(time_gemm(g, a, b, d, scale, args.reps))
                    except RuntimeError:
                        pass
                tag = "fast_" if fast else ""
                row[f"{tag}ms"] = ms
                total[f"{tag}first"] += count * ms[0]
                total[f"{tag}best"] += count * min(ms)
                g.close()
            if g0.dtype == "bf16":
                total["fast_first"] += count * row["ms"][0]
                total["fast_best"] += count * min(row["ms"])
            rows.append(row)
            print(f"{row['gemm']:<20} {m:>7}x{n:>6}x{k:>6} x{count:<4} first {row['ms'][0]:8.3f} best "
                  f"{min(row['ms']):8.3f} ms" + (f" | fast first {row['fast_ms'][0]:8.3f} best {min(row['fast_ms']):8.3f}"
                                                 if "fast_ms" in row else ""), flush=True)
            del a, b, d
    print("step GEMM ms: " + ", ".join(f"{k} {v:.1f}" for k, v in total.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"plan": plan.name, "gpu": torch.cuda.get_device_name(), "rows": rows, "step_ms": total,
                       "numpy": np.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
