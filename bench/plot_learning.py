"""Draw a learning check's FP8 and BF16 loss curves: python bench/plot_learning.py RESULT.json [--out X.png]
(needs matplotlib: pip install -e '.[plot]')."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("result", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: the plot needs matplotlib: pip install -e '.[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    r = json.loads(args.result.read_text())
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot(r["loss_bf16"], label="BF16", lw=1.2)
    ax.plot(r["loss_fp8"], label="FP8 (E4M3, per-tensor current scaling)", lw=1.2)
    ax.axvspan(len(r["loss_fp8"]) - 100, len(r["loss_fp8"]), color="0.9", label="last 100 steps")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{r['model']} on {r['gpu']}: {r['tokens_per_step']:,} tokens/step; "
                 f"last-100 mean gap {100 * r['last100_mean_rel_gap']:.2f}%")
    ax.legend()
    ax.grid(alpha=0.3)
    out = args.out or args.result.with_suffix(".png")
    fig.savefig(out, bbox_inches="tight")
    print(out)


if __name__ == "__main__":
    main()
