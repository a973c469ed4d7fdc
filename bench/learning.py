"""Learning check: a Qwen2.5-0.5B-shaped model trained on real text (the embedded corpus, Qwen2.5 BPE)
in FP8 and in BF16 for the same steps and data; both losses must fall and the FP8 curve stay within
2% of the BF16 curve over the last 100 steps. Writes bench/results/learning-<model>-<gpu>.json;
bench/plot_learning.py draws it.

    python bench/learning.py [--data DIR] [--steps 300] [--gpus auto]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from llmqgen.cli import _inventory
from llmqgen.data.corpus import default_corpus
from llmqgen.models.catalog import resolve_model
from llmqgen.plan.solver import solve
from llmqgen.runtime.log import read_log
from llmqgen.runtime.run import RunConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--model", default="0.5b")
    ap.add_argument("--gpus", default="auto")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--tokens-per-step", type=int, default=32768)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    data = args.data or default_corpus()
    curves = {}
    for dtype in ("e4m3", "bf16"):
        plan = solve(resolve_model(args.model), _inventory(args.gpus, None), tokens_per_step=args.tokens_per_step,
                     dtype=dtype, name=f"learning-{args.model}-{dtype}")
        run_dir = Path("runs") / plan.name
        log = run_dir / "log.jsonl"
        shutil.rmtree(run_dir, ignore_errors=True)     # this script's own run: a new run refuses a folder holding one
        train(plan, RunConfig(data=data, out=run_dir, steps=args.steps, lr=args.lr, warmup=30))
        curves[dtype] = [r["loss"] for r in read_log(log)]
    fp8, bf16 = curves["e4m3"], curves["bf16"]
    tail = slice(-100, None)
    gap = [abs(a - b) / b for a, b in zip(fp8[tail], bf16[tail])]
    result = {
        "model": args.model, "steps": args.steps, "tokens_per_step": args.tokens_per_step, "lr": args.lr,
        "gpu": plan.inventory.gpu.display_name, "data": str(data), "loss_fp8": fp8, "loss_bf16": bf16,
        "fp8_first_last": [fp8[0], fp8[-1]], "bf16_first_last": [bf16[0], bf16[-1]],
        "last100_mean_rel_gap": sum(gap) / len(gap), "last100_max_rel_gap": max(gap),
        "both_fall": fp8[-1] < fp8[0] and bf16[-1] < bf16[0],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"learning-{args.model}-{plan.inventory.gpu.name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"FP8 {fp8[0]:.3f} -> {fp8[-1]:.3f}, BF16 {bf16[0]:.3f} -> {bf16[-1]:.3f}; last 100 steps: "
          f"mean gap {100 * result['last100_mean_rel_gap']:.2f}%, max {100 * result['last100_max_rel_gap']:.2f}% "
          f"-> {path}")


if __name__ == "__main__":
    main()
