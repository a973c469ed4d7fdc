"""Time the bf16 LM head's fused cross-entropy (templates/_crossentropy.cu.j2) in its three forms on this GPU:
a row read twice (one block per row: a plan for a GPU without clusters), and a row held in the shared memory
of the CTAs layout.ce_row_ctas picks for four, two or one resident an SM (CE_CTAS_PER_SM).

    python bench/ce_variants.py [--vocab 151936] [--rows 8192] [--reps 10] [--out result.json]

`rows` is a chunk of the LM head (0.5B on an H200: 65,536 tokens a micro-step in 8 chunks). Each form is checked
against PyTorch (fp32 softmax) on the same logits; times are CUDA-event medians of `reps` launches, each on a
fresh copy of the logits (the kernel writes the gradient over them)."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "gpu"), str(ROOT / "tests" / "compile")]
import optim_loss_build  # noqa: E402
from harness import KernelProgram, current_device, small_plan  # noqa: E402

from llmqgen import layout  # noqa: E402
from llmqgen.codegen.context import build_context  # noqa: E402
from llmqgen.codegen.families import crossentropy as ce  # noqa: E402

FORMS = {"read twice": (None, 89), "shared memory, 4 CTAs an SM": (4, 90), "shared memory, 2 CTAs an SM": (2, 90),
         "shared memory, 1 CTA an SM": (1, 90)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out")
    a = ap.parse_args()
    arch = current_device().arch
    plan = small_plan("qwen2", fp8=False, V=a.vocab, B=a.rows // 128, T=128, lm_head_chunks=1)
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(a.rows, a.vocab, device="cuda", generator=g) * 4).bfloat16()
    targets = torch.randint(0, a.vocab, (a.rows,), device="cuda", generator=g, dtype=torch.int32)
    gs = 1.0 / a.rows
    ref = torch.softmax(logits.float(), dim=1)
    ref[torch.arange(a.rows), targets.long()] -= 1.0
    ref *= gs
    losses, lse = torch.empty(a.rows, device="cuda"), torch.empty(a.rows, device="cuda")
    scale = torch.tensor([gs], device="cuda")
    rows = []
    for form, (per_sm, sm) in FORMS.items():
        if per_sm:
            layout.CE_CTAS_PER_SM = per_sm
        ctx = {**build_context(plan, plan.inventory.gpu.arch), "SM": sm}
        src, kernels = optim_loss_build.render(["crossentropy"], ctx)
        prog = KernelProgram(optim_loss_build.compile_cubin(src, arch)[0], kernels)
        work = logits.clone()
        prog.launch("llmq_crossentropy_fused", work, targets, losses, lse, scale, 0)
        err = (work.float() - ref).abs().max().item()
        times = []
        for _ in range(a.reps):
            work.copy_(logits)
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            prog.launch("llmq_crossentropy_fused", work, targets, losses, lse, scale, 0)
            t1.record()
            t1.synchronize()
            times.append(t0.elapsed_time(t1))
        ms = statistics.median(times)
        k = prog.kernels["llmq_crossentropy_fused"]
        dram = a.rows * a.vocab * 2 * (2 if ce.row_ctas(ctx) else 3)
        rows.append({"form": form, "ctas_a_row": ce.row_ctas(ctx), "grid": k.grid, "block": k.block, "smem": k.smem,
                     "ms": ms, "times_ms": times, "dram_gb_s": dram / ms / 1e6, "max_abs_err": err})
        print(f"{form:30s} CTAs a row {ce.row_ctas(ctx)}  block {k.block[0]:4d}  smem {k.smem:6d}  {ms:7.3f} ms  "
              f"{dram / ms / 1e6:6.0f} GB/s of DRAM traffic  max |err| {err:.2e}")
    if a.out:
        Path(a.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "vocab": a.vocab, "rows": a.rows,
                                           "reps": a.reps, "forms": rows}, indent=1))


if __name__ == "__main__":
    main()
