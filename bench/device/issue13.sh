#!/usr/bin/env bash
# Issue 13 on the lent H200: GPU tests (kernels and training against PyTorch, offload/recompute bit-identical),
# then `llmqgen bench --profile` of plans; the result JSONs come back as one tarball (the device tool returns
# at most 8 files).
# Usage (device): source .whl/prelude.sh && bash bench/device/issue13.sh "<pytest args or -none>" plan.json ...
# Environment: WARMUP (default 1), STEPS (default 3).
set -u
source "$(dirname "$0")/lib.sh"
tests=$1; shift
run_gpu_tests "$tests"
mkdir -p $OUT/results
for plan in "$@"; do
  name=$(basename "$plan" .json)
  python -m llmqgen bench --plan "$plan" --warmup ${WARMUP:-1} --steps ${STEPS:-3} --profile --out $OUT/results \
    > $OUT/bench-$name.log 2>&1
  grep -E "^(step|median|floor|graphed)|^  (gemm|lm_head gemm|attention|swiglu|quantize|rmsnorm|crossentropy|transpose|amax|rope) " $OUT/bench-$name.log
done
(cd $OUT && tar czf results.tgz results && rm -rf results)
