#!/usr/bin/env bash
# Everything a GPU lease is for, in one command that fits one device call (at most 10 minutes):
#   1. benchmarks/gpu_check.sh (build for sm_90, GPU tests, pretraining at Part fViT-B, GPU benchmarks), each
#      step fitted to a deadline CHECK_SECONDS after the start (later steps skipped and named when time runs out);
#   2. benchmarks/gpu_pretrain_demo.sh with the time left (the default run, then long LAFS pretraining).
# Results are packed into at most four files in OUT_DIR, since a device call returns only a few:
#   check_summary.txt, RESULTS.md (benchmark table), pretrain_demo.md, session.tgz (every log, benchmark
#   JSON, run summary, log.jsonl and picture; no checkpoints).
#
# usage: benchmarks/gpu_session.sh OUT_DIR [TOTAL_SECONDS [CHECK_SECONDS]]   (defaults 570 and 400)
#   A plumbing check without a GPU: LAFS_GPU_CHECK_CPU=1 (gpu_check's dry run) LAFS_DEMO_QUICK=1 (tiny demo).
set -uo pipefail

[ $# -ge 1 ] || { echo "usage: $0 OUT_DIR [TOTAL_SECONDS [CHECK_SECONDS]]" >&2; exit 2; }
OUT=$1
TOTAL=${2:-570}
CHECK=${3:-400}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
START=$(date +%s)

pack() {
  cp "$WORK/check/summary.txt" "$OUT/check_summary.txt" 2>/dev/null
  cp "$WORK/check/RESULTS.md" "$OUT/RESULTS.md" 2>/dev/null
  cp "$WORK/demo/pretrain_demo.md" "$OUT/pretrain_demo.md" 2>/dev/null
  tar czf "$OUT/session.tgz" -C "$WORK" --exclude='*.pt' .
  ls -l "$OUT"
}
trap pack EXIT

# gpu_check fits its steps to the deadline (LAFS_GPU_CHECK_DEADLINE); the outer timeout, a minute later, is a
# safety net that kills the whole process group (each inner `timeout` starts a group of its own, which a plain
# outer timeout would leave running).
export LAFS_GPU_CHECK_DEADLINE=$(( START + CHECK ))
setsid bash "$ROOT/benchmarks/gpu_check.sh" "$WORK/check" &
CHECK_PID=$!
( sleep $(( CHECK + 60 )); kill -TERM -- -"$CHECK_PID" 2>/dev/null; sleep 5; kill -KILL -- -"$CHECK_PID" 2>/dev/null ) &
GUARD_PID=$!
wait "$CHECK_PID"
status=$?
kill "$GUARD_PID" 2>/dev/null
pkill -TERM -g "$CHECK_PID" 2>/dev/null  # anything of the check's group still running
echo "gpu_session: gpu_check exit $status after $(( $(date +%s) - START ))s"
if ! tail -n 1 "$WORK/check/summary.txt" 2>/dev/null | grep -qE "^(PASS|DRY RUN|FAIL)"; then
  echo "gpu_check cut off after $(( $(date +%s) - START ))s (exit $status): the steps above are all it finished" \
    | tee -a "$WORK/check/summary.txt"
fi
DEMO_BUDGET=$(( TOTAL - ($(date +%s) - START) - 20 ))
if [ "$DEMO_BUDGET" -lt 60 ]; then
  echo "gpu_session: only ${DEMO_BUDGET}s left: no pretraining demo"
else
  DEMO_ARGS=(--budget "$DEMO_BUDGET")
  [ "${LAFS_DEMO_QUICK:-0}" = 1 ] && DEMO_ARGS+=(--quick)
  bash "$ROOT/benchmarks/gpu_pretrain_demo.sh" "$WORK/demo" "${DEMO_ARGS[@]}"
  echo "gpu_session: gpu_pretrain_demo exit $? after $(( $(date +%s) - START ))s"
fi
[ -f "$WORK/demo/pretrain_demo.md" ] && cat "$WORK/demo/pretrain_demo.md"
