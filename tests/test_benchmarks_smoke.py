"""The benchmark suites still run (tiny shapes, no timing): they must not rot
between the runs that measure. Each benchmark checks ours against its baseline
before timing, so this also fails on a mismatch."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_op_benchmarks_run_in_smoke_mode():
    env = dict(os.environ, LAFS_BENCH_SMOKE="1")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/bench_landmark_patch_gather.py",
         "benchmarks/bench_margin_softmax.py", "benchmarks/bench_training_step.py", "benchmarks/bench_embedding.py",
         "--benchmark-disable", "-q", "-p", "no:cacheprovider"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout
