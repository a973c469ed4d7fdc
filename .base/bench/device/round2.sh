#!/usr/bin/env bash
# Device round 2: learning against PyTorch at the full Qwen2.5-0.5B depth, seq 1024 (issue 14 item 15).
set -u
export LLMQGEN_CACHE_DIR=/tmp/llmqgen-cache
timeout 560 python bench/learning_vs_torch.py --steps 120 --layers 0 --seq-len 1024 --tokens-per-step 65536 \
  --variants "bf16,e4m3" --out $OUT 2>&1 | grep -v tokenizing | grep -v "^ \+File\|^ \+\^" | tail -30
