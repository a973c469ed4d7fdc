#!/usr/bin/env bash
# Two ranks of a 2-GPU plan on ONE GPU (--devices 0,0): the copy-engine collectives' code paths and the
# host-staged transfer rate (device -> pinned host -> device over this GPU's PCIe link), next to the
# one-GPU plan of the same micro-batch. Not multi-GPU speed: both ranks share one GPU's compute.
# Usage: bash bench/multi-rank.sh [model] [micro-batch] [zero level] [results dir]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-qwen2.5-0.5b}; mb=${2:-16}; zero=${3:-1}; out=${4:-bench/results}
plans=$(mktemp -d)
flags=(--set sharding.optimizer=true --set sharding.gradients=$([ "$zero" -ge 2 ] && echo true || echo false)
       --set sharding.weights=$([ "$zero" -ge 3 ] && echo true || echo false))
python3 -m llmqgen plan --model "$model" --gpus 1xH200 --host-mem 128G --micro-batch "$mb" \
  --name "$model-fp8-1xh200-mb$mb" --out "$plans" >/dev/null
for peer in true false; do
  python3 -m llmqgen plan --model "$model" --gpus 2xH200 --host-mem 128G --micro-batch "$mb" "${flags[@]}" \
    --set peer_copies=$peer --name "$model-fp8-2xh200-zero$zero-peer-$peer-on-1gpu" --out "$plans" >/dev/null
done
python3 -m llmqgen bench --plan "$plans/$model-fp8-1xh200-mb$mb.json" --steps 4 --warmup 1 --out "$out"
for peer in true false; do
  python3 -m llmqgen bench --plan "$plans/$model-fp8-2xh200-zero$zero-peer-$peer-on-1gpu.json" --devices 0,0 \
    --steps 4 --warmup 1 --out "$out"
done
