#!/usr/bin/env bash
# Issue 12 on the two-GPU machine: one model's one-GPU plan next to its two-GPU plans of the same
# micro-batch and tokens per step (copy engines over NVLink peer copies, copies staged through pinned
# host memory, NCCL under torchrun), each benched; a summary line of the scaling at the end.
# Usage (device): source .whl/prelude.sh && bash bench/device/issue12.sh MODEL MICRO_BATCH TOKENS_PER_STEP ZERO VARIANTS
#   VARIANTS: comma list of peer,staged,nccl (e.g. peer,staged,nccl); results and logs go to $OUT.
set -u
export LLMQGEN_CACHE_DIR=/tmp/llmqgen-cache LLMQGEN_PLANS_DIR=/tmp/issue12-plans
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
model=$1 mb=$2 tokens=$3 zero=$4 variants=$5
steps=${STEPS:-3} warmup=${WARMUP:-1}
z=(--set sharding.optimizer=$([ "$zero" -ge 1 ] && echo true || echo false)
   --set sharding.gradients=$([ "$zero" -ge 2 ] && echo true || echo false)
   --set sharding.weights=$([ "$zero" -ge 3 ] && echo true || echo false))
common=(--model "$model" --host-mem 256G --micro-batch "$mb" --tokens-per-step "$tokens")
one=$model-fp8-1xh200-mb$mb
python -m llmqgen plan "${common[@]}" --gpus 1xH200 --name "$one" >/dev/null || exit 1
python -m llmqgen bench --plan $LLMQGEN_PLANS_DIR/$one.json --steps $steps --warmup $warmup --out $OUT \
  > $OUT/bench-$one.log 2>&1; grep -E "tok/s|Error|error" $OUT/bench-$one.log | tail -2
for v in ${variants//,/ }; do
  name=$model-fp8-2xh200-zero$zero-$v
  case $v in
    peer) extra=(--set peer_copies=true) ;;
    staged) extra=(--set peer_copies=false) ;;
    nccl) extra=(--set collectives=nccl) ;;
  esac
  python -m llmqgen plan "${common[@]}" --gpus 2xH200 "${z[@]}" "${extra[@]}" --name "$name" >/dev/null || continue
  if [ "$v" = nccl ]; then
    torchrun --nproc-per-node 2 -m llmqgen bench --plan $LLMQGEN_PLANS_DIR/$name.json --steps $steps \
      --warmup $warmup --out $OUT > $OUT/bench-$name.log 2>&1
  else
    python -m llmqgen bench --plan $LLMQGEN_PLANS_DIR/$name.json --devices 0,1 --steps $steps --warmup $warmup \
      --out $OUT > $OUT/bench-$name.log 2>&1
  fi
  grep -E "step [0-9]|tok/s|Error|error" $OUT/bench-$name.log | tail -4
done
python - "$OUT" "$one" <<'PY'
import glob, json, sys
out, one = sys.argv[1:]
base = json.load(open(glob.glob(f"{out}/*-{one}.json")[0]))["tokens_per_s"]
for f in sorted(glob.glob(f"{out}/*2xh200*.json")):
    r = json.load(open(f))
    print(f"{r['plan_name']}: {r['tokens_per_s']:,.0f} tok/s = {r['tokens_per_s'] / base:.3f}x the one-GPU {base:,.0f}")
PY
