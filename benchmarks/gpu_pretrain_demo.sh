#!/usr/bin/env bash
# The default three-stage run on a GPU, then the same run with LAFS pretraining as long as the time left
# allows (issue 6: the default run's 576 pretraining steps fit a 2-core CPU; on the CPU, 2880 steps took few-shot
# fine-tuning from LAFS from +0.060 to +0.139 over scratch (seed 0); on a GPU thousands of steps fit in minutes).
#   1. python -m lafs.train --out OUT_DIR/default          (the recipe as it is, measured on this machine)
#   2. benchmarks/pretrain_budget.py plan: the most pretraining epochs that fit in the time left, from the
#      default run's own pretraining speed
#   3. OUT_DIR/long: the default run's supervised and scratch stages are reused (same recipe, same seed:
#      neither depends on pretraining), pretraining and few-shot fine-tuning run again with the planned
#      epochs (python -m lafs.train --resume keeps finished stages)
#   4. OUT_DIR/pretrain_demo.md: both runs side by side (benchmarks/pretrain_budget.py report)
# Each run's log is OUT_DIR/<run>.log; exit status 0 when both runs finished.
#
# usage: benchmarks/gpu_pretrain_demo.sh OUT_DIR [--budget SECONDS] [--quick]
#   --budget: wall-clock seconds for the whole script (default 420); every step is bounded by what is left.
#   --quick: tiny stages (a plumbing check that runs on a CPU in a few minutes; its numbers mean nothing).
#   LAFS_DEMO_WORKERS (default 8): DataLoader workers per stage (the synthetic faces render on the CPU).
set -uo pipefail

usage() { echo "usage: $0 OUT_DIR [--budget SECONDS] [--quick]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
BUDGET=420
QUICK=0
while [ $# -gt 0 ]; do
  case $1 in
    --budget) [ $# -ge 2 ] || usage; BUDGET=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    *) usage ;;
  esac
done
case $BUDGET in ''|*[!0-9]*) echo "--budget takes whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
START=$(date +%s)
. "$ROOT/benchmarks/_find_python.sh"
[ -n "$PY" ] || { echo "gpu_pretrain_demo: no Python with torch found; set LAFS_GPU_CHECK_PYTHON" >&2; exit 1; }
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

say() { echo "gpu_pretrain_demo [$(( $(date +%s) - START ))s] $*"; }
# seconds of the budget left, at least 1 (`timeout 0` would mean no limit at all)
left() { local l=$(( BUDGET - ($(date +%s) - START) )); [ "$l" -ge 1 ] || l=1; echo "$l"; }

# The recipe sets one CPU thread (right for a shared 2-core machine); a GPU machine renders the faces in
# worker processes and lets torch use its cores.
COMMON=(train.cpu_threads=0 "data.num_workers=${LAFS_DEMO_WORKERS:-8}")
MIN_EPOCHS=24  # twice the default run's 12 pretraining epochs, or the "long" run is not longer
if [ "$QUICK" = 1 ]; then
  COMMON+=(data.num_workers=0 data.synthetic.identities=16 data.synthetic.images_per_identity=4
           val.synthetic_identities=8 val.pairs=40 supervised.optim.epochs=1 pretrain.optim.epochs=1
           pretrain.views.local_count=1 pretrain.dino.out_dim=256 pretrain.val.view_probe=8 finetune.optim.epochs=1
           supervised.data.synthetic.difficulty_warmup_epochs=0 pretrain.data.synthetic.images_per_identity=4
           train.plots=false)
  MIN_EPOCHS=1
fi

say "python: $PY; budget ${BUDGET}s; overrides: ${COMMON[*]}"
say "1. default run -> $OUT/default (log default.log)"
if ! timeout "$(left)" "$PY" -m lafs.train --out "$OUT/default" "${COMMON[@]}" > "$OUT/default.log" 2>&1; then
  tail -n 20 "$OUT/default.log" >&2
  say "FAIL: the default run failed or ran out of time (default.log)"; exit 1
fi
tail -n 8 "$OUT/default.log"

say "2. plan the long pretraining for the $(left) s left"
PLAN=$("$PY" benchmarks/pretrain_budget.py plan "$OUT/default" --seconds "$(( $(left) - 30 ))" \
       --min-epochs "$MIN_EPOCHS") || { say "no long run: too little time left"; exit 1; }
read -r EPOCHS WARMUP VAL_EVERY <<< "$PLAN"
say "long run: pretrain.optim.epochs=$EPOCHS warmup_epochs=$WARMUP val.every_steps=$VAL_EVERY"

say "3. long run -> $OUT/long (log long.log)"
rm -rf "$OUT/long" && mkdir -p "$OUT/long"
cp -r "$OUT/default/supervised" "$OUT/default/scratch" "$OUT/default/config.yaml" "$OUT/long/"
if ! timeout "$(left)" "$PY" -m lafs.train --out "$OUT/long" --resume "${COMMON[@]}" \
     "pretrain.optim.epochs=$EPOCHS" "pretrain.optim.warmup_epochs=$WARMUP" \
     "pretrain.val.every_steps=$VAL_EVERY" > "$OUT/long.log" 2>&1; then
  tail -n 20 "$OUT/long.log" >&2
  say "FAIL: the long run failed or ran out of time (long.log; its pretraining log is long/pretrain/log.jsonl)"
  "$PY" benchmarks/pretrain_budget.py report "$OUT/default" --out "$OUT/pretrain_demo.md"
  exit 1
fi
tail -n 8 "$OUT/long.log"

say "4. comparison -> $OUT/pretrain_demo.md"
"$PY" benchmarks/pretrain_budget.py report "$OUT/default" "$OUT/long" --out "$OUT/pretrain_demo.md"
say "done in $(( $(date +%s) - START ))s"
