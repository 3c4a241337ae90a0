"""benchmarks/bench_pretrain_views.py still runs (tiny shapes, no timing), as pytest benchmarks and as a command."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def test_pretrain_views_benchmark_runs_in_smoke_mode(tmp_path):
    env = dict(os.environ, LAFS_BENCH_SMOKE="1", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "benchmarks/bench_pretrain_views.py", "--pairs", "1", "--json", str(tmp_path / "views.json")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    for line in (
        "MultiViewBuilder by part",
        "Pretraining step by part",
        "builder per_image vs original",
        "step per_view vs original",
        "ms with the per-pair loop",
        "top-level ATen ops per builder call",
    ):
        assert line in out.stdout
    (case,) = json.loads((tmp_path / "views.json").read_text())["cases"]
    # the CPU's stand-in for kernel launches: the fused views dispatch fewer ops than the per-landmark loop
    for unit in ("aten_ops_per_builder_call", "aten_ops_per_step"):
        ops = case[unit]
        assert 0 < ops["per_image"] < ops["original"] and 0 < ops["per_view"] < ops["original"], (unit, ops)
