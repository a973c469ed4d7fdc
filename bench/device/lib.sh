# Sourced by the device scripts: the cache they share and the GPU tests they may run first.
export LLMQGEN_CACHE_DIR=/tmp/llmqgen-cache

# run_gpu_tests "<pytest args>" (or -none): into $OUT/gpu-tests.log, the summary and failures printed.
run_gpu_tests() {
  [ "$1" = "-none" ] && return
  python -m pytest -q -m gpu -s --durations=5 -p no:cacheprovider $1 > $OUT/gpu-tests.log 2>&1
  grep -E "passed|failed|error" $OUT/gpu-tests.log | tail -2
  grep -E "^(FAILED|ERROR)" $OUT/gpu-tests.log | head -20
}
