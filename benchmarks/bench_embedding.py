"""Embeddings per second of a deployed Part fViT: onnxruntime running the exported file against PyTorch eager.

``torch-eager``: ``PartFViT`` in eval mode under ``torch.inference_mode`` (our
fused gather, C++ kernel on the CPU); ``onnxruntime``: the file
``lafs.export.export_onnx`` writes (the gather as one GridSample), run by
onnxruntime's CPU provider with as many intra-op threads as torch uses.  One
call embeds a batch of B aligned faces (no flip: FaceEmbedder's flip protocol
costs two of them).  Both run the same weights; the ONNX output is checked
against eager before timing.  Both are timed interleaved, so a loaded machine
affects both sides of each ratio alike (``_harness.compare``: every
implementation once per round).

CPU only (the onnxruntime in the pinned set has no CUDA provider).  Shapes:
B = 1 and 64 for ``part_fvit_tiny``, B = 1 for ``part_fvit_b`` (the released
architecture; a batch of 64 takes tens of seconds per call on 2 cores), with
all of torch's threads, and again with one thread: on a machine shared with
other jobs eager PyTorch loses far more with two threads than onnxruntime
(measurements in docs/EXPERIMENTS.md), so the one-thread rows are the ones a
loaded machine can still compare.
``python benchmarks/bench_embedding.py RUN.json`` prints a saved run as a table.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile

import pytest
import torch

import _harness
from _harness import DEVICE, pick

pytestmark = [
    pytest.mark.benchmark(timer=_harness.synchronized_timer),
    pytest.mark.skipif(DEVICE != "cpu", reason="embedding benchmark: CPU only (onnxruntime's CPU provider)"),
]

OP = "embedding"
# (model preset, batch, threads: None = torch's default)
CASES = pick(
    cpu=[
        (model, batch, threads)
        for threads in (None, 1)
        for model, batch in (("part_fvit_tiny", 1), ("part_fvit_tiny", 64), ("part_fvit_b", 1))
    ],
    gpu=[],
    smoke=[("part_fvit_nano", 2, 1)],
)
IMPLS = ["onnxruntime", "torch-eager"]  # ours (the exported file) first
MIN_COSINE = 0.9999


@functools.lru_cache(maxsize=None)
def _model(preset: str):
    from lafs.models import create_model

    torch.manual_seed(0)
    return create_model(preset).eval()


@functools.lru_cache(maxsize=None)
def _onnx_file(preset: str) -> str:
    from lafs.export import export_onnx

    folder = tempfile.mkdtemp(prefix="lafs_bench_onnx_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return str(export_onnx(_model(preset), os.path.join(folder, f"{preset}.onnx"), check=False).path)


def _images(batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(batch, 3, 112, 112, generator=gen) * 2 - 1


def build_case(impl: str, model: str, batch: int):
    """One call embedding ``batch`` faces with ``impl``; returns the embeddings."""
    images = _images(batch)
    if impl == "torch-eager":
        module = _model(model)

        def eager():
            with torch.inference_mode():
                return module(images)

        return eager
    if impl == "onnxruntime":
        from lafs.deploy import OnnxModel

        # No spin-waiting after a call: onnxruntime's spinning threads would take the cores from the eager call
        # timed next (measured: 1.27x in rounds where onnxruntime ran first, 1.01x where eager did).
        session = OnnxModel(_onnx_file(model), threads=torch.get_num_threads(), spin=False)
        return lambda: session(images)
    raise ValueError(f"unknown implementation {impl!r}")


@pytest.fixture
def threads(request):
    """torch's intra-op threads for the test (onnxruntime gets as many); restored afterwards."""
    default = torch.get_num_threads()
    torch.set_num_threads(request.param or default)
    yield torch.get_num_threads()
    torch.set_num_threads(default)


@pytest.mark.parametrize("model,batch,threads", CASES, indirect=["threads"])
def test_embedding(benchmark, model, batch, threads):
    cases = {impl: build_case(impl, model, batch) for impl in IMPLS}
    expected, actual = cases["torch-eager"](), cases["onnxruntime"]()  # also the warm-up calls
    cosine = torch.nn.functional.cosine_similarity(actual.double(), expected.double()).min().item()
    assert cosine >= MIN_COSINE, f"the exported file's embeddings differ from eager: cosine {cosine:.6f}"
    shape = {"model": model, "B": batch, "threads": threads}
    _harness.compare(
        benchmark,
        op=OP,
        title="Embeddings per second (exported ONNX in onnxruntime vs PyTorch eager)",
        mode="fwd",
        dtype="float32",
        shape=shape,
        impls=[
            _harness.Impl(impl, impl == "onnxruntime", functools.partial(cases.__getitem__, impl)) for impl in IMPLS
        ],
        work={"images": batch},
        warmed_up=IMPLS,
    )
    benchmark.extra_info["min_cosine_vs_eager"] = cosine
    benchmark.extra_info["load_1min"] = os.getloadavg()[0]


def summary(path: str) -> str:
    """Markdown table of a saved run: embeddings/s of each side and the interleaved ratio (eager time / onnxruntime)."""
    import json
    import statistics

    with open(path) as file:
        run = json.load(file)
    lines = [
        "| model | B | threads | torch eager (emb/s) | onnxruntime (emb/s) | onnxruntime speed-up: median of "
        "interleaved ratios (IQR, count) | load (1 min) |",
        "|---|---|---|---|---|---|---|",
    ]
    for bench in run["benchmarks"]:
        info = bench["extra_info"]
        if info.get("op") != OP:
            continue
        shape = info["shape"]
        times = {impl["name"]: impl["times_s"] for impl in info["impls"]}  # per-round times of both
        ratios = [e / o for e, o in zip(times["torch-eager"], times["onnxruntime"])]
        q25, median, q75 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        count = len(ratios)
        seconds = {name: statistics.median(t) for name, t in times.items()}
        lines.append(
            f"| {shape['model']} | {shape['B']} | {shape['threads']} | "
            f"{shape['B'] / seconds['torch-eager']:.3g} | {shape['B'] / seconds['onnxruntime']:.3g} | "
            f"{median:.2f}x ({q25:.2f}-{q75:.2f}, {count}) | {info['load_1min']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/bench_embedding.py RUN.json   (a pytest-benchmark JSON of this file)")
    print(summary(sys.argv[1]))
