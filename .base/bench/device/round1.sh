#!/usr/bin/env bash
# Device round 1: FP8 tiny-amax guard, FP8 recipe emulation, learning against PyTorch (diagnostic variants).
set -u
export LLMQGEN_CACHE_DIR=/tmp/llmqgen-cache
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -m pytest -q -s -m gpu tests/gpu/test_fp8_tiny_amax.py 2>&1 | tail -30 > $OUT/tiny_amax.log
python -m pytest -q -s -m gpu tests/gpu/test_trainer.py -k "emulated" 2>&1 | tail -150 > $OUT/fp8_emulation.log
tail -3 $OUT/tiny_amax.log; grep -E "mean cos|passed|failed|Error" $OUT/fp8_emulation.log | tail -12
timeout 420 python bench/learning_vs_torch.py --steps 240 --layers 4 \
  --variants "bf16,e4m3,bf16:precision.master=fp32+precision.adam_m=fp32+precision.adam_v=fp32" \
  --out $OUT 2>&1 | tail -20
