"""Learning against PyTorch: llmqgen plans (BF16, FP8, ...) and a PyTorch run (fp32 weights, BF16 autocast,
fused AdamW) from one shared init, on the same batches in the same order, with the same LR schedule,
clipping, AdamW hyper-parameters and weight-decay mask. Prints the loss gap per stretch of steps and
writes bench/results/learning-vs-torch-<model>-<gpu>.json.

    python bench/learning_vs_torch.py [--model 0.5b] [--layers 4] [--steps 240] [--variants bf16,e4m3]

A variant is a dtype (bf16 | e4m3) with optional plan pins after ':' (comma-free, '+'-joined), e.g.
`bf16:precision.master=fp32+precision.adam_m=fp32+precision.adam_v=fp32`.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "gpu"))

from llmqgen.cli import _inventory, _parse_value  # noqa: E402
from llmqgen.data.corpus import default_corpus  # noqa: E402
from llmqgen.data.loader import TrainLoader  # noqa: E402
from llmqgen.models.catalog import resolve_model  # noqa: E402
from llmqgen.models.init import init_params  # noqa: E402
from llmqgen.plan.memory import param_tensors  # noqa: E402
from llmqgen.plan.solver import solve  # noqa: E402
from llmqgen.runtime.lr import LRSchedule  # noqa: E402
from llmqgen.runtime.trainer import AdamW, Trainer  # noqa: E402


def step_batches(data: Path, plan, steps: int, seed: int = 0):
    """The micro-batches of every step, drawn once: every run sees exactly these."""
    loader = TrainLoader(data, plan.batch.micro_batch, plan.batch.seq_len, seed=seed,
                         model_vocab=plan.model.vocab_size)
    return [[loader.next_batch() for _ in range(plan.batch.grad_accum)] for _ in range(steps)]


def llmqgen_curve(plan, params, batches, sched: LRSchedule, optim: AdamW) -> list[float]:
    tr = Trainer(plan, optim=optim)
    try:
        tr.load_params(params)
        losses = []
        for step, bs in enumerate(batches):
            tr.accumulate(bs)
            losses.append(tr.loss())
            tr.optimizer_step(sched.lr(step))
        return losses
    finally:
        tr.close()


def torch_curve(plan, params, batches, sched: LRSchedule, optim: AdamW, rows: int = 8) -> list[float]:
    """PyTorch: fp32 master weights, BF16 autocast, fused AdamW, global-norm clipping; the loss of a step is
    the mean over its valid targets (each micro-batch's summed loss divided by the step's count)."""
    import torch
    import torch.nn.functional as F
    from reference import IGNORE_INDEX, Reference

    model = Reference(plan.model, params, device="cuda", sdpa=True)
    decayed = {n for n, _, _, is_matrix in param_tensors(plan) if is_matrix or n in ("embedding", "lm_head")}
    base = lambda name: name.rsplit(".", 1)[-1]     # noqa: E731  "layers.3.qkv" -> "qkv"
    groups = [{"params": [model.param(n) for n in model.shapes if base(n) in decayed],
               "weight_decay": optim.weight_decay},
              {"params": [model.param(n) for n in model.shapes if base(n) not in decayed], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=sched.lr(0), betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=True)
    losses = []
    for step, bs in enumerate(batches):
        count = sum(int((b.targets != IGNORE_INDEX).sum()) for b in bs)
        total = 0.0
        pieces = [(b.inputs[i:i + rows], b.targets[i:i + rows]) for b in bs for i in range(0, len(b.inputs), rows)]
        for inputs, tgts in pieces:     # a few sequences at a time: the fp32 logits of a whole micro-batch are large
            tokens = torch.as_tensor(inputs, dtype=torch.long, device="cuda")
            targets = torch.as_tensor(tgts, dtype=torch.long, device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(tokens)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum") / count
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.max_norm)
        for g in opt.param_groups:
            g["lr"] = sched.lr(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def parse_variant(text: str) -> tuple[str, dict]:
    dtype, _, rest = text.partition(":")
    pins = {}
    for item in filter(None, rest.split("+")):
        key, _, value = item.partition("=")
        pins[key] = _parse_value(value)
    return dtype, pins


def stretches(a: list[float], b: list[float], width: int) -> list[dict]:
    """Mean losses of a and b and their relative gap over consecutive stretches of `width` steps."""
    out = []
    for s in range(0, len(a), width):
        ma, mb = float(np.mean(a[s:s + width])), float(np.mean(b[s:s + width]))
        out.append({"steps": [s, min(s + width, len(a))], "ours": ma, "torch": mb, "gap": (ma - mb) / mb})
    return out


def compare(model: str = "0.5b", layers: int | None = 4, steps: int = 240, seq_len: int = 512,
            tokens_per_step: int = 65536, lr: float = 6e-4, warmup: int = 20, variants=("bf16", "e4m3"),
            data: Path | None = None, gpus: str = "auto", seed: int = 0) -> dict:
    """Run every variant and PyTorch; returns the result dict (curves, per-stretch gaps, tail means)."""
    spec = resolve_model(model)
    if layers:
        spec = spec.model_copy(update={"num_layers": layers, "name": f"{spec.name}-{layers}l"})
    data = data or default_corpus()
    sched = LRSchedule(peak=lr, warmup_steps=warmup, total_steps=steps, kind="cosine")
    optim = AdamW()
    inventory = _inventory(gpus, None)
    params = init_params(spec, seed=seed)
    curves, plans, ref_plan = {}, {}, None
    for v in variants:
        dtype, pins = parse_variant(v)
        plan = solve(spec, inventory, seq_len=seq_len, tokens_per_step=tokens_per_step, dtype=dtype, pins=pins,
                     name=f"learn-{spec.name}-{v}".replace(":", "-").replace("=", "-").replace("+", "-"))
        ref_plan = ref_plan or plan     # any split of a step draws the same sequences (TrainLoader's slots)
        t0 = time.perf_counter()
        curves[v] = llmqgen_curve(plan, params, step_batches(data, plan, steps, seed), sched, optim)
        plans[v] = {"micro_batch": plan.batch.micro_batch, "grad_accum": plan.batch.grad_accum,
                    "recompute": plan.recompute.model_dump(), "precision": plan.precision.model_dump(),
                    "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{v}: {curves[v][0]:.4f} -> {curves[v][-1]:.4f}  ({plans[v]['seconds']} s)", flush=True)
    t0 = time.perf_counter()
    curves["torch"] = torch_curve(ref_plan, params, step_batches(data, ref_plan, steps, seed), sched, optim)
    print(f"torch: {curves['torch'][0]:.4f} -> {curves['torch'][-1]:.4f}  ({time.perf_counter() - t0:.1f} s)")
    tail = max(1, steps // 5)
    result = {"model": spec.name, "layers": spec.num_layers, "steps": steps, "seq_len": seq_len,
              "tokens_per_step": tokens_per_step, "lr": lr, "warmup": warmup, "schedule": "cosine",
              "optim": optim.__dict__, "data": str(data), "gpu": inventory.gpu.display_name,
              "python": platform.python_version(), "plans": plans, "curves": curves,
              "tail_steps": tail, "tail_mean": {k: float(np.mean(c[-tail:])) for k, c in curves.items()},
              "gaps": {v: stretches(curves[v], curves["torch"], max(1, steps // 8)) for v in variants}}
    for v in variants:
        g = result["gaps"][v]
        print(f"{v:>40}: gap to torch by stretch " + " ".join(f"{100 * s['gap']:+.2f}%" for s in g))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="0.5b")
    ap.add_argument("--layers", type=int, default=4, help="Override the layer count (0: the model's own).")
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--tokens-per-step", type=int, default=65536)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--variants", default="bf16,e4m3")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    res = compare(args.model, args.layers or None, args.steps, args.seq_len, args.tokens_per_step, args.lr,
                  args.warmup, args.variants.split(","), args.data)
    res["command"] = "python " + " ".join(sys.argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"learning-vs-torch-{res['model']}-{res['gpu'].replace(' ', '-').lower()}.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    print("->", path)


if __name__ == "__main__":
    main()
