#!/usr/bin/env bash
# A/B speed on one GPU in one session: `llmqgen bench` of the same plans from two source trees, alternating
# (base, new, base, new...) so that clocks and temperature treat both alike. Each tree plans for itself
# (`llmqgen plan <args>`), so each bench runs the plan its own code makes. The new tree's runs carry --profile.
# Usage (device): source .whl/prelude.sh && bash bench/device/compare.sh BASE_DIR NEW_DIR "<plan args>" ...
# Environment: WARMUP (default 1), STEPS (default 3); NEW_ARGS: plan arguments the new side adds (an A/B of a
# plan option in one tree: BASE_DIR = NEW_DIR). Results: $OUT/compare.log, $OUT/compare-results.tgz.
set -u
base=$(cd "$1" && pwd); new=$(cd "$2" && pwd); shift 2
export LLMQGEN_CACHE_DIR=/tmp/llmqgen-cache
mkdir -p $OUT/results/base $OUT/results/new
i=0
for args in "$@"; do
  i=$((i + 1))
  for side in base new; do
    dir=${!side}
    extra=$([ $side = new ] && echo --profile)
    more=$([ $side = new ] && echo "${NEW_ARGS:-}")
    (cd $dir && export PYTHONPATH=/tmp/site:$dir LLMQGEN_PLANS_DIR=/tmp/plans-$side &&
     python -m llmqgen plan $args $more --name ab$i > /dev/null &&
     python -m llmqgen bench --plan /tmp/plans-$side/ab$i.json --warmup ${WARMUP:-1} --steps ${STEPS:-3} $extra \
       --out $OUT/results/$side > $OUT/bench-$side-$i.log 2>&1)
    echo "[$side] $args $more: $(grep -E '^median' $OUT/bench-$side-$i.log | cut -c1-90)" | tee -a $OUT/compare.log
    grep -E "^(floor|graphed)|^  (swiglu|quantize|rmsnorm|transpose|gemm|attention|amax) " $OUT/bench-$side-$i.log >> $OUT/compare.log
  done
done
(cd $OUT && tar czf compare-results.tgz results bench-*.log && rm -rf results bench-*.log)
