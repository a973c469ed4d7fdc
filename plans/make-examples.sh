#!/usr/bin/env bash
# Regenerates the checked-in example plans (host RAM given explicitly so the files do not depend
# on the machine that plans them). The compile tests build every plans/*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export LLMQGEN_PLANS_DIR=plans     # the examples live in plans/ (user plans default to ./llmqgen-plans/)
llmqgen plan --model qwen2.5-0.5b --gpus 1xH200 --host-mem 256G --name qwen2.5-0.5b-fp8-1xh200 "$@" >/dev/null
llmqgen plan --model qwen2.5-0.5b --gpus 1xH200 --host-mem 256G --dtype bf16 --name qwen2.5-0.5b-bf16-1xh200 "$@" >/dev/null
llmqgen plan --model qwen2.5-0.5b --gpus 1xH200 --host-mem 256G --set precision.scaling=delayed \
  --name qwen2.5-0.5b-fp8-1xh200-delayed "$@" >/dev/null
llmqgen plan --model qwen2.5-0.5b --gpus 1xH200 --host-mem 256G --set precision.scaling=delayed \
  --set precision.lm_head=fp8 --set precision.fast_accum=true --name qwen2.5-0.5b-fp8-1xh200-fastest "$@" >/dev/null
for m in 1.5b 7b; do
  llmqgen plan --model qwen2.5-$m --gpus 1xH200 --host-mem 256G --name qwen2.5-$m-fp8-1xh200 "$@" >/dev/null
  llmqgen plan --model qwen2.5-$m --gpus 1xH200 --host-mem 256G --dtype bf16 --name qwen2.5-$m-bf16-1xh200 "$@" >/dev/null
done
llmqgen plan --model qwen2.5-7b --gpus 1x4060ti --host-mem 128G --set recompute.block=true \
  --name qwen2.5-7b-fp8-1x4060ti-block "$@" >/dev/null
llmqgen plan --model qwen2.5-32b --gpus 4x4090 --host-mem 512G --name qwen2.5-32b-fp8-4x4090 "$@" >/dev/null
llmqgen plan --model qwen3-0.6b --gpus 1x4090 --host-mem 64G --dtype bf16 --name qwen3-0.6b-bf16-1x4090 "$@" >/dev/null
llmqgen plan --model llama3.2-1b --gpus 1x4090 --host-mem 64G --name llama3.2-1b-fp8-1x4090 "$@" >/dev/null
llmqgen plan --model qwen2.5-0.5b --gpus 2xH200 --host-mem 256G --name qwen2.5-0.5b-fp8-2xh200 "$@" >/dev/null
llmqgen plan --model qwen2.5-1.5b --gpus 2x4090 --host-mem 128G --set sharding.gradients=true \
  --name qwen2.5-1.5b-fp8-2x4090-zero2 "$@" >/dev/null
llmqgen plan --model qwen2.5-7b --gpus 2xH200 --host-mem 256G --set sharding.weights=true \
  --name qwen2.5-7b-fp8-2xh200-zero3 "$@" >/dev/null
ls plans/*.json
