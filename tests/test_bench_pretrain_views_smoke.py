"""benchmarks/bench_pretrain_views.py still runs (tiny shapes, no timing), as pytest benchmarks and as a command."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def bench_module():
    """benchmarks/bench_pretrain_views.py, imported as the benchmarks import it (their folder on sys.path)."""
    folder = os.path.join(REPO, "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import bench_pretrain_views

    return bench_pretrain_views


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


def test_cuda_timeline_counts_kernels_copies_waits_and_busy_time():
    """The GPU timeline summary on made-up profiler events (the GPU run is where it counts; its arithmetic is
    checked here): copies and memsets are not kernels, only host-to-device copies count as copies, waits are
    summed per runtime call, and overlapping GPU intervals are counted once."""
    from types import SimpleNamespace

    import torch

    cuda_timeline = bench_module().cuda_timeline

    def event(name, start, end, device):
        kind = torch.autograd.DeviceType.CUDA if device else torch.autograd.DeviceType.CPU
        return SimpleNamespace(name=name, device_type=kind, time_range=SimpleNamespace(start=start, end=end))

    events = [
        event("aten::mm", 0, 10, False),
        event("cudaMemcpyAsync", 10, 30, False),  # waits 20 us for the stream
        event("Memcpy HtoD (Pageable -> Device)", 28, 30, True),
        event("cudaLaunchKernel", 30, 32, False),
        event("ampere_sgemm", 32, 60, True),
        event("elementwise_kernel", 50, 70, True),  # overlaps the one before: [32, 70] busy once
        event("Memset (Device)", 70, 71, True),
        event("Memcpy DtoH (Device -> Pageable)", 90, 95, True),
        event("cudaMemcpyAsync", 88, 96, False),
        event("cudaStreamSynchronize", 96, 100, False),
    ]
    got = cuda_timeline(events)
    assert got["kernels"] == 2
    assert got["copies_to_device"] == 1
    assert got["host_waits"] == {"cudaMemcpyAsync": [2, 0.028], "cudaStreamSynchronize": [1, 0.004]}
    assert abs(got["gpu_busy"] - (2 + 38 + 1 + 5) / 100) < 1e-12
    assert cuda_timeline([])["gpu_busy"] == 0.0


def test_a_failing_timeline_is_reported_not_raised(monkeypatch):
    """On a lent GPU a profiler failure must not cost the run's other timings: it comes back as an error entry."""
    bench_pretrain_views = bench_module()

    def broken(case, activities):
        raise RuntimeError("no CUPTI")

    monkeypatch.setattr(bench_pretrain_views, "DEVICE", "cuda")
    monkeypatch.setattr(bench_pretrain_views, "_profile_second_call", broken)
    assert bench_pretrain_views.timeline(lambda: None) == {"error": "RuntimeError: no CUPTI"}
