#!/usr/bin/env bash
# The whole GPU suite on the lent H200, with the default corpus as the resume/export tests' data.
# Usage (device): source .whl/prelude.sh && bash bench/device/gpu-suite.sh [pytest args]
set -u
export LLMQGEN_CACHE_DIR=/tmp/llmqgen-cache
export LLMQGEN_TEST_DATA=$(python -c "from llmqgen.data.corpus import default_corpus; print(default_corpus(progress=False))")
python -m pytest -q -m gpu tests/gpu -s --durations=10 -p no:cacheprovider "$@" > $OUT/gpu-tests.log 2>&1
grep -E "passed|failed|error" $OUT/gpu-tests.log | tail -3
grep -E "^(FAILED|ERROR)" $OUT/gpu-tests.log | head -20
