#!/usr/bin/env bash
# Issue 11 on the lent H200: offload/streaming GPU tests, then `llmqgen bench` of small-card plans
# (bench/plans/*.json) with the device memory NVML reports sampled beside it (nvidia-smi, 200 ms).
# Usage (device): source .whl/prelude.sh && bash bench/device/issue11.sh "<pytest args or -none>" plan.json ...
# Environment: WARMUP, STEPS (default 1 each), PROFILE= (no --profile), DEVICES=0,0,1,1 (the GPU of each rank).
set -u
source "$(dirname "$0")/lib.sh"
tests=$1; shift
run_gpu_tests "$tests"
for plan in "$@"; do
  name=$(basename "$plan" .json)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > $OUT/nvml-$name.csv &
  smi=$!
  python -m llmqgen bench --plan "$plan" --warmup ${WARMUP:-1} --steps ${STEPS:-1} ${PROFILE-"--profile"} \
    ${DEVICES:+--devices $DEVICES} --out $OUT > $OUT/bench-$name.log 2>&1
  kill $smi
  tail -40 $OUT/bench-$name.log
  echo "NVML peak used MiB: $(sort -n $OUT/nvml-$name.csv | tail -1) (idle $(head -1 $OUT/nvml-$name.csv))"
done
