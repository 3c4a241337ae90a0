"""margin_softmax_cross_entropy (CosFace, s=64, m=0.4) against the unfused formula, in one run.

Baselines (``lafs_kernels.baselines.margin``): the unfused formula users run
today (normalize, linear, one-hot margin, scale, cross-entropy: several
``[B, C]`` matrices), and ``torch.compile`` of it; each test times ours and
them interleaved, round by round (``_harness.compare``). Shapes of issue 4: on CPU
B=256, D=512, C=100,000 float32; on GPU B=512, D=512, C=205,990 (WebFace4M)
and 1,000,000, bfloat16. ``fwd+bwd`` returns the gradients of the embeddings
and the class centres; its added memory is what the loss needs beyond
embeddings, weight and weight gradient.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

import lafs_kernels
from lafs_kernels.baselines import margin as baseline

import _harness
from _harness import COMPILE, DEVICE, DTYPES, pick

pytestmark = pytest.mark.benchmark(timer=_harness.synchronized_timer)

OP = "margin_softmax_cross_entropy"
S, M3 = 64.0, 0.4

# (B, D, C, dtype)
SHAPES = pick(
    cpu=[(256, 512, 100_000, "float32")],
    gpu=[(512, 512, 205_990, "bfloat16"), (512, 512, 1_000_000, "bfloat16")],
    smoke=[(4, 8, 37, "float32")],
)
# cpu: the C++ chunk kernels
OURS = pick(cpu=["fused-cpu"], gpu=["fused-triton", "fused-chunked"], smoke=["fused-chunked"])
BASELINES = ["unfused"] + (["unfused-compiled"] if COMPILE and not _harness.SMOKE else [])
MODES = ["fwd", "fwd+bwd"]


@functools.lru_cache(maxsize=None)
def _compiled_unfused():
    return torch.compile(baseline.unfused_margin_loss, dynamic=False)


def _loss_fn(impl: str):
    """(embeddings [B,D], weight [C,D], labels [B]) -> mean CosFace loss for one implementation."""
    if impl.startswith("fused-"):
        backend = impl.split("-", 1)[1]
        return lambda x, w, y: lafs_kernels.margin_softmax_cross_entropy(x, w, y, s=S, m3=M3, backend=backend)
    if impl == "unfused":
        return lambda x, w, y: baseline.unfused_margin_loss(x, w, y, s=S, m3=M3)
    if impl == "unfused-compiled":
        compiled = _compiled_unfused()
        return lambda x, w, y: compiled(x, w, y, s=S, m3=M3)
    raise ValueError(f"unknown implementation {impl!r}")


def make_inputs(B: int, D: int, C: int, dtype: str, device: str, seed: int = 0):
    gen = torch.Generator(device).manual_seed(seed)  # drawn on the device: W has up to 512M entries
    x = torch.randn(B, D, generator=gen, device=device).to(DTYPES[dtype])
    w = torch.randn(C, D, generator=gen, device=device).mul_(0.01).to(DTYPES[dtype])
    y = torch.randint(0, C, (B,), generator=gen, device=device)
    return x, w, y


def build_case(impl: str, mode: str, B: int, D: int, C: int, dtype: str, device: str = DEVICE):
    x, w, y = make_inputs(B, D, C, dtype, device)
    x.requires_grad_(True)
    w.requires_grad_(True)
    fn = _loss_fn(impl)
    if mode == "fwd":
        return lambda: fn(x, w, y)
    return lambda: _harness.grads_of(fn(x, w, y), (x, w))


def work(mode: str, B: int, D: int, C: int, dtype: str) -> dict:
    """Matrix-multiply operations and the bytes of W read (and its gradient written) at least."""
    item = torch.empty((), dtype=DTYPES[dtype]).element_size()
    if mode == "fwd":
        return {"flops": 2 * B * C * D, "bytes": C * D * item}
    return {"flops": 6 * B * C * D, "bytes": 3 * C * D * item}


def _check_matches_baseline(impl: str, B: int, D: int, C: int, dtype: str) -> None:
    """A wrong loss must not produce a speed-up: compare with the unfused formula."""
    x, w, y = make_inputs(B, D, C, dtype, DEVICE, seed=1)
    with torch.no_grad():
        ours = _loss_fn(impl)(x, w, y).float()
        expected = baseline.unfused_margin_loss(x.float(), w.float(), y, s=S, m3=M3)
    # the loss sums C terms of size s: relative error grows with log C; the tests check accuracy
    _harness.assert_close(ours, expected, dtype=DTYPES[dtype], scale=10.0, msg=f"{impl} != unfused formula")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,D,C,dtype", SHAPES)
def test_margin(benchmark, B, D, C, dtype, mode):
    """Ours and the baselines, interleaved round by round."""
    if mode == "fwd":
        for impl in OURS:
            _check_matches_baseline(impl, B, D, C, dtype)
    impls = [
        _harness.Impl.rebuildable(
            impl, impl in OURS, os.path.abspath(__file__), build_case, impl=impl, mode=mode, B=B, D=D, C=C, dtype=dtype
        )
        for impl in OURS + BASELINES
    ]
    _harness.compare(
        benchmark,
        op=OP,
        title="Margin softmax cross-entropy, CosFace",
        mode=mode,
        dtype=dtype,
        shape={"B": B, "D": D, "C": C},
        impls=impls,
        work=work(mode, B, D, C, dtype),
    )
