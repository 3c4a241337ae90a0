#!/usr/bin/env bash
# The one check of the GPU paths, for a machine with an NVIDIA H100/H200 (CUDA 13, torch and Triton
# installed, no network). In about nine and a half minutes it
#   1. finds Python (.venv/bin/python, else python3; LAFS_GPU_CHECK_PYTHON overrides) and the CUDA toolkit,
#   2. builds the extension in place for sm_90 (setup.py build_ext --inplace: nothing is installed, but the
#      _C of an editable install in this checkout is replaced; `pip install -e .` restores it),
#   3. runs the GPU-marked tests (pytest -m gpu tests; a test module that does not import there, as those needing
#      insightface, which the lent image lacks, is noted and skipped unless it holds GPU tests),
#   4. runs the LAFS pretraining step and view builder at Part fViT-B by part, with kernel launches per
#      step (python benchmarks/bench_pretrain_views.py), then the GPU benchmarks at the issues' shapes
#      (pytest benchmarks --benchmark-only); with LAFS_GPU_CHECK_DEADLINE every step fits the time left,
#   5. prints a short table last.
# Writes into OUT_DIR (10 files): build.log (with `python -m lafs_kernels.info`), tests.log, bench.log,
# bench_landmark_patch_gather.json, bench_margin_softmax.json, bench_training_step.json, pretrain_views.log,
# bench_pretrain_views.json, RESULTS.md, summary.txt.
# Exit status 0 only when every step passed; otherwise FAIL lines name the failed steps.
#
# usage: benchmarks/gpu_check.sh OUT_DIR [--dry-run]
#   --dry-run (or LAFS_GPU_CHECK_CPU=1): on a machine without a GPU, run every step up to the first GPU
#   call (environment, toolkit, CUDA build, build record, collecting the GPU tests) and stop there.
#   LAFS_GPU_CHECK_BUILD_TIMEOUT (default 240 s) bounds the build; MAX_JOBS defaults to nproc.
#   Time limits: build 240 s, tests 120 s, benchmarks 90 + 100 + 110 s, views gather 60 s, pretraining views
#   200 s (typical total: about 10 minutes).
set -uo pipefail

usage() { echo "usage: $0 OUT_DIR [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
DRY_RUN=${LAFS_GPU_CHECK_CPU:-0}
for arg in "$@"; do
  case $arg in --dry-run) DRY_RUN=1 ;; *) usage ;; esac
done
case $DRY_RUN in ""|0) DRY_RUN=0 ;; *) DRY_RUN=1 ;; esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
START=$(date +%s)
FAILED=()
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

say() { echo "gpu_check [$(( $(date +%s) - START ))s] $*" | tee -a "$SUMMARY"; }
fail() { FAILED+=("$1"); echo "FAIL: $1" | tee -a "$SUMMARY" >&2; }
finish() {
  say "total $(( $(date +%s) - START ))s; outputs in $OUT"
  if [ ${#FAILED[@]} -gt 0 ]; then
    for f in "${FAILED[@]}"; do echo "FAIL: $f" | tee -a "$SUMMARY"; done
    exit 1
  fi
  echo "$1" | tee -a "$SUMMARY"
  exit 0
}
abort() { fail "$1"; finish "unreachable"; }

# LAFS_GPU_CHECK_DEADLINE (epoch seconds; gpu_session.sh sets it): each step's time limit shrinks to the time
# left (30 s kept for the report), and a step that would get under 20 s is skipped and named, so the check
# ends by its deadline with a summary instead of being killed mid-step.
DEADLINE=${LAFS_GPU_CHECK_DEADLINE:-0}
step_limit() {  # step_limit SECONDS -> the limit to use now; 0: skip the step
  local limit=$1 left
  [ "$DEADLINE" -gt 0 ] || { echo "$limit"; return; }
  left=$(( DEADLINE - $(date +%s) - 30 ))
  if [ "$left" -lt 20 ]; then echo 0; elif [ "$left" -lt "$limit" ]; then echo "$left"; else echo "$limit"; fi
}

# ---- 1. Python and toolkit ------------------------------------------------------------------------------
. "$ROOT/benchmarks/_find_python.sh"
[ -n "$PY" ] || abort "no Python with torch found (.venv/bin/python, python3); set LAFS_GPU_CHECK_PYTHON"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
say "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"

# one interpreter start: "<has GPU 0/1> <versions>"
PROBE=$("$PY" - <<'EOF'
import torch
try:
    import triton
    triton_version = triton.__version__
except Exception as exc:
    triton_version = f"MISSING ({exc})"
has_gpu = torch.cuda.is_available()
gpu = torch.cuda.get_device_name(0) if has_gpu else "none"
print(int(has_gpu), f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}, GPU: {gpu}")
EOF
) || abort "torch failed to import"
HAS_GPU=${PROBE%% *}
VERSIONS=${PROBE#* }
say "$VERSIONS"
case $VERSIONS in *"triton MISSING"*) fail "triton is not importable: the Triton GPU paths cannot be checked" ;; esac
case $VERSIONS in *"(CUDA None)"*) abort "torch is a CPU-only build: install a CUDA build of torch" ;; esac
if [ "$HAS_GPU" != "1" ] && [ "$DRY_RUN" = "0" ]; then
  abort "no CUDA device visible to torch (torch.cuda.is_available() is False); use --dry-run to check the build only"
fi
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
  --format=csv,noheader 2>/dev/null | sed 's/^/nvidia-smi: /' | tee -a "$SUMMARY"

find_cuda_home() {
  local nvcc
  for home in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-13* /opt/cuda; do
    [ -n "$home" ] && [ -x "$home/bin/nvcc" ] && { echo "$home"; return; }
  done
  # nvcc on the PATH may be a wrapper outside the toolkit: accept it only next to include/cuda.h
  nvcc=$(command -v nvcc 2>/dev/null) && nvcc=$(readlink -f "$nvcc") \
    && [ -f "$(dirname "$(dirname "$nvcc")")/include/cuda.h" ] && { dirname "$(dirname "$nvcc")"; return; }
  # the pip wheel nvidia-cuda-nvcc
  "$PY" -c "import nvidia.cuda_nvcc, os; print(os.path.dirname(nvidia.cuda_nvcc.__file__))" 2>/dev/null
}
CUDA_HOME=$(find_cuda_home)
[ -n "$CUDA_HOME" ] && [ -x "$CUDA_HOME/bin/nvcc" ] || abort "no CUDA toolkit with nvcc found; set CUDA_HOME"
export CUDA_HOME
say "CUDA_HOME=$CUDA_HOME: $("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*')"

# ---- 2. build the extension for sm_90 -------------------------------------------------------------------
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
"$PY" -c "import ninja" >/dev/null 2>&1 || command -v ninja >/dev/null 2>&1 \
  || say "warning: ninja not found: the extension compiles one file at a time"
say "building lafs_kernels._C (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS) -> build.log"
BUILD_TIMEOUT=$(step_limit "${LAFS_GPU_CHECK_BUILD_TIMEOUT:-240}")
[ "$BUILD_TIMEOUT" -gt 0 ] || abort "no time left for the build before the deadline"
if ! timeout "$BUILD_TIMEOUT" "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -n 30 "$OUT/build.log" >&2
  abort "build of the extension failed or took over $BUILD_TIMEOUT s (see build.log)"
fi
"$PY" -m lafs_kernels.info >> "$OUT/build.log" 2>&1 || abort "python -m lafs_kernels.info failed (see build.log)"
"$PY" - <<'EOF' >> "$OUT/build.log" 2>&1 || abort "the build has no CUDA kernels or does not load (see build.log)"
from lafs_kernels import _extension
loaded, reason = _extension.load()
compiled = _extension.build_info().get("backends_compiled", [])
assert loaded, f"extension does not load: {reason}"
assert "cuda" in compiled, f"extension built without CUDA kernels: {_extension.build_info()}"
print(f"extension loads; CUDA kernels compiled for {_extension.build_info().get('cuda_arch_list')}")
EOF
say "build ok: $(tail -n 1 "$OUT/build.log")"

# Test modules that failed to import (pytest's "ERROR tests/x.py" lines, no test id): with
# --continue-on-collection-errors the other modules' GPU tests still run.  A module with GPU tests that does not
# import fails the check; one without only costs a note (the image may lack a package some CPU tests need, as
# insightface: 8 modules of tests/lafs import it, and pytest without that flag stopped before any GPU test ran).
LOST_GPU_MODULES=()
check_collection() {  # check_collection LOG
  local module
  LOST_GPU_MODULES=()
  local others=()
  for module in $(grep -oE "^ERROR tests/[^ :]+\.py( |$)" "$1" | awk '{print $2}' | sort -u); do
    if grep -qE "mark\.gpu" "$module" 2>/dev/null; then LOST_GPU_MODULES+=("$module"); else others+=("$module"); fi
  done
  if [ ${#others[@]} -gt 0 ]; then
    say "note: ${#others[@]} test modules without GPU tests do not import here (skipped): ${others[*]}"
    grep -E "^E +(ModuleNotFoundError|ImportError)" "$1" | sort | uniq -c | head -n 3 | sed 's/^/  /' | tee -a "$SUMMARY"
  fi
  if [ ${#LOST_GPU_MODULES[@]} -gt 0 ]; then
    fail "test modules with GPU tests do not import (${LOST_GPU_MODULES[*]}): see $(basename "$1")"
  fi
}

if [ "$HAS_GPU" != "1" ]; then
  # Collecting needs no GPU: a test module that does not import shows here, not in the lent session.
  "$PY" -m pytest -m gpu tests -q -p no:cacheprovider --collect-only --continue-on-collection-errors \
    > "$OUT/tests.log" 2>&1
  check_collection "$OUT/tests.log"
  say "GPU tests collected: $(grep -cE "^tests/.*::" "$OUT/tests.log" || true) (tests.log)"
  say "DRY RUN: no GPU on this machine; every step before the first GPU call passed. Stopping here."
  finish "DRY RUN PASSED (GPU tests and benchmarks not run)"
fi

# ---- 3. GPU tests ---------------------------------------------------------------------------------------
say "GPU tests: pytest -m gpu tests -> tests.log"
limit=$(step_limit 120)
if [ "$limit" -gt 0 ]; then
  timeout "$limit" "$PY" -m pytest -m gpu tests -q -rfEs -p no:cacheprovider --continue-on-collection-errors \
    > "$OUT/tests.log" 2>&1
  status=$?
  check_collection "$OUT/tests.log"
  # pytest exits 1 for collection errors too: when they were all in modules without GPU tests (noted above) and no
  # test failed or errored, the GPU tests passed.
  if [ "$status" = 1 ] && [ ${#LOST_GPU_MODULES[@]} -eq 0 ] && ! grep -qE "^(FAILED|ERROR tests/.*::)" "$OUT/tests.log"; then
    status=0
  fi
else
  echo "skipped: the deadline left no time" > "$OUT/tests.log"; status=125
fi
tail -n 3 "$OUT/tests.log" | sed 's/^/  /' | tee -a "$SUMMARY"
case $status in
  0) ;;
  5) fail "no GPU-marked tests were collected (tests.log)" ;;
  124) fail "GPU tests took over ${limit} s (tests.log)" ;;
  125) fail "GPU tests skipped: the session's deadline left no time" ;;
  *) fail "GPU tests failed (exit $status, tests.log)"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -n 20 | tee -a "$SUMMARY" ;;
esac

# ---- 4. the owed issue-21 measurements first, then the GPU benchmark suites --------------------------
: > "$OUT/bench.log"
# LAFS pretraining at Part fViT-B (issue 21): builder and step by part, ours against the original path,
# kernel launches per step (torch.profiler), the DINO head + loss at out_dim 65,536 and 100,000.
say "GPU pretraining views: benchmarks/bench_pretrain_views.py (limit 200s) -> pretrain_views.log, bench_pretrain_views.json"
limit=$(step_limit 200)
if [ "$limit" -gt 0 ]; then
  timeout "$limit" "$PY" benchmarks/bench_pretrain_views.py --case "paper layout" --pairs 6 \
    --json "$OUT/bench_pretrain_views.json" > "$OUT/pretrain_views.log" 2>&1
  status=$?
else
  echo "skipped: the deadline left no time" > "$OUT/pretrain_views.log"; status=125
fi
case $status in
  0) grep -E "^(kernel launches|builder |step |DINO head|(per_image|per_view|original) per )" "$OUT/pretrain_views.log" | sed 's/^/  /' | tee -a "$SUMMARY" ;;
  124) fail "benchmarks/bench_pretrain_views.py took over ${limit}s (pretrain_views.log)" ;;
  125) fail "benchmarks/bench_pretrain_views.py skipped: the session's deadline left no time" ;;
  *) fail "benchmarks/bench_pretrain_views.py failed (exit $status, pretrain_views.log)"; tail -n 10 "$OUT/pretrain_views.log" | tee -a "$SUMMARY" ;;
esac

# The gather through a per-view affine (issue 21): distance from crop-resize-gather and its time
# against materialising the crops (benchmarks/gather_views.py), into bench.log and the summary.
say "GPU views gather: benchmarks/gather_views.py (limit 60s) -> bench.log"
limit=$(step_limit 60)
if [ "$limit" -gt 0 ]; then
  timeout "$limit" "$PY" benchmarks/gather_views.py --device cuda --rounds 15 > "$OUT/gather_views.log" 2>&1
  status=$?
else
  : > "$OUT/gather_views.log"; status=125
fi
cat "$OUT/gather_views.log" >> "$OUT/bench.log"
grep -E "ratio|vs interpolate" "$OUT/gather_views.log" | sed 's/^/  /' | tee -a "$SUMMARY"
rm -f "$OUT/gather_views.log"
case $status in
  0) ;;
  124) fail "benchmarks/gather_views.py took over ${limit}s (bench.log)" ;;
  125) fail "benchmarks/gather_views.py skipped: the session's deadline left no time" ;;
  *) fail "benchmarks/gather_views.py failed (exit $status, bench.log)" ;;
esac

# One pytest run (and JSON) per suite, so a suite that overruns its time loses only its own numbers.
export LAFS_BENCH_BUDGET_S=${LAFS_BENCH_BUDGET_S:-0.3}
JSONS=()
for suite in landmark_patch_gather:90 margin_softmax:100 training_step:110; do
  name=${suite%%:*}; limit=${suite##*:}
  say "GPU benchmarks: benchmarks/bench_$name.py (limit ${limit}s) -> bench.log, bench_$name.json"
  limit=$(step_limit "$limit")
  if [ "$limit" -eq 0 ]; then
    fail "benchmarks/bench_$name.py skipped: the session's deadline left no time"
    continue
  fi
  timeout "$limit" "$PY" -m pytest "benchmarks/bench_$name.py" --benchmark-only -q -p no:cacheprovider \
    --benchmark-json "$OUT/bench_$name.json" --benchmark-columns=median,rounds,iterations >> "$OUT/bench.log" 2>&1
  status=$?
  case $status in
    0) ;;
    124) fail "benchmarks/bench_$name.py took over ${limit}s (bench.log): its numbers are lost" ;;
    *) fail "benchmarks/bench_$name.py failed (exit $status, bench.log): a mismatch with a baseline fails its benchmark"
       grep -E "^(FAILED|ERROR)" "$OUT/bench.log" | tail -n 10 | tee -a "$SUMMARY" ;;
  esac
  [ -s "$OUT/bench_$name.json" ] && JSONS+=("$OUT/bench_$name.json")
done

# ---- 5. report ------------------------------------------------------------------------------------------
if [ ${#JSONS[@]} -gt 0 ]; then
  "$PY" benchmarks/report.py "${JSONS[@]}" --out "$OUT/RESULTS.md" --charts none --summary \
    | tee -a "$SUMMARY" || fail "report.py failed"
else
  fail "no benchmark JSON was written"
fi
finish "PASS: build, GPU tests and benchmarks (targets above: met / MISSED)"
