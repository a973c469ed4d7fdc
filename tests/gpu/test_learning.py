"""Learning against PyTorch (issue 14 item 15): llmqgen BF16 and FP8 plans (FP8 with current and with delayed
scaling, with an FP8 LM head, and with delayed scaling, FP8 head and fast accumulation together) and a PyTorch
run (fp32 weights, BF16 autocast, fused AdamW) from one init on the same batches, LR schedule and AdamW settings. Over enough steps for drift to show, the mean loss of the last fifth of the steps
stays within 3% of PyTorch's, and the gap does not grow from the middle of the run to its end by more than 1.5
points. The full-depth run behind the numbers in the README: bench/learning_vs_torch.py."""
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
pytest.importorskip("torch")
pytest.importorskip("nvmath", reason="the runtime's GEMMs need nvmath-python: pip install 'llmqgen[gpu]'")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from learning_vs_torch import compare  # noqa: E402


VARIANTS = ("bf16", "e4m3", "e4m3:precision.scaling=delayed", "e4m3:precision.lm_head=fp8",
            "e4m3:precision.scaling=delayed+precision.lm_head=fp8+precision.fast_accum=true")


def test_bf16_and_fp8_learn_like_pytorch():
    res = compare("0.5b", layers=4, steps=160, seq_len=512, tokens_per_step=32768, variants=VARIANTS)
    torch_tail = res["tail_mean"]["torch"]
    for v in VARIANTS:
        gaps = [s["gap"] for s in res["gaps"][v]]
        tail = (res["tail_mean"][v] - torch_tail) / torch_tail
        print(f"\n  {v}: tail mean {res['tail_mean'][v]:.4f} vs torch {torch_tail:.4f} ({100 * tail:+.2f}%); "
              f"gap by stretch " + " ".join(f"{100 * g:+.2f}%" for g in gaps))
        assert abs(tail) < 0.03, f"{v}: the last {res['tail_steps']} steps' mean loss is {100 * tail:+.2f}% off PyTorch"
        assert gaps[-1] - gaps[len(gaps) // 2] < 0.015, f"{v}: the gap to PyTorch grows: {gaps}"
