"""landmark_patch_gather against the code users run today, in one run.

Baselines (``lafs_kernels.baselines.gather``): the original per-landmark
``grid_sample`` loop, and one batched ``grid_sample`` producing the same
tokens. Shapes of issue 3: B in {64, 256}, L=196 landmarks, K=196 or 36
tokens (subsampled with an index), P=8, 112x112 RGB, float32 and bfloat16.
``fwd`` is a training-mode forward (image and landmarks require grad);
``fwd+bwd`` adds the image and landmark gradients.

Each test times ours and both baselines interleaved, round by round
(``_harness.compare``). A copy of a large buffer is measured in the same
run: report.py states the gather's bandwidth as a share of it.
"""

from __future__ import annotations

import os

import pytest
import torch

import lafs_kernels
from lafs_kernels.baselines import gather as baseline

import _harness
from _harness import DEVICE, DTYPES, pick

pytestmark = pytest.mark.benchmark(timer=_harness.synchronized_timer)

OP = "landmark_patch_gather"
L, P, SIZE, CHANNELS = 196, 8, 112, 3

# (B, K, dtype)
SHAPES = pick(
    # B=256 on GPU only: the loop takes minutes here
    cpu=[(64, 196, "float32"), (64, 36, "float32"), (64, 196, "bfloat16")],
    gpu=[(b, k, d) for b in (64, 256) for k in (196, 36) for d in ("float32", "bfloat16")],
    smoke=[(2, 5, "float32")],
)
OURS = pick(
    cpu=["fused-cpu"],
    gpu=["fused-cuda", "fused-triton"],
    smoke=["fused-torch", "fused-cpu" if DEVICE == "cpu" else "fused-cuda"],
)
BASELINES = ["batched-grid_sample", "loop-grid_sample"]
MODES = ["fwd", "fwd+bwd"]


def _gather_fn(impl: str):
    """(image, landmarks, index or None) -> tokens [B, K, P*P*C] for one implementation."""
    if impl.startswith("fused-"):
        backend = impl.split("-", 1)[1]
        return lambda image, landmarks, index: lafs_kernels.landmark_patch_gather(
            image, landmarks, P, index=index, backend=backend
        )
    gather = {"batched-grid_sample": baseline.gather_patches_batched, "loop-grid_sample": baseline.gather_patches_loop}
    if impl not in gather:
        raise ValueError(f"unknown implementation {impl!r}")
    # the baselines take the selected landmarks (as the original code does for subsampled views)
    return lambda image, landmarks, index: gather[impl](image, _select(landmarks, index), P)


def _select(landmarks, index):
    """landmarks [B, L, 2] -> [B, K, 2] in the order of ``index`` [B, K] (None: all)."""
    if index is None:
        return landmarks
    return landmarks.gather(1, index[..., None].expand(-1, -1, 2))


def make_inputs(B: int, K: int, dtype: str, device: str, seed: int = 0):
    """image [B,3,112,112] in [-1,1], landmarks [B,L,2] float32 (some off the image), index [B,K] or None."""
    gen = torch.Generator(device).manual_seed(seed)
    image = (torch.rand(B, CHANNELS, SIZE, SIZE, generator=gen, device=device) * 2 - 1).to(DTYPES[dtype])
    landmarks = torch.rand(B, L, 2, generator=gen, device=device) * (SIZE + 8) - 4
    index = torch.randint(0, L, (B, K), generator=gen, device=device) if K != L else None
    return image, landmarks, index


def build_case(impl: str, mode: str, B: int, K: int, dtype: str, device: str = DEVICE):
    image, landmarks, index = make_inputs(B, K, dtype, device)
    fn = _gather_fn(impl)
    image.requires_grad_(True)
    landmarks.requires_grad_(True)
    if mode == "fwd":
        return lambda: fn(image, landmarks, index)
    grad_tokens = torch.randn(B, K, P * P * CHANNELS, device=device).to(image.dtype)
    return lambda: _harness.grads_of(fn(image, landmarks, index), (image, landmarks), grad_tokens)


def minimal_bytes(mode: str, B: int, K: int, dtype: str) -> int:
    """Bytes a pass must move at least, each tensor read or written once."""
    item = torch.empty((), dtype=DTYPES[dtype]).element_size()
    image = B * CHANNELS * SIZE * SIZE * item
    image_read = min(image, B * K * (P + 1) ** 2 * CHANNELS * item)  # a patch touches a (P+1)^2 window
    tokens = B * K * P * P * CHANNELS * item
    landmarks = B * L * 2 * 4
    fwd = image_read + tokens + landmarks
    # backward: read the token gradient and the image windows, write the image and landmark gradients
    return fwd if mode == "fwd" else fwd + tokens + image_read + image + landmarks


def _check_matches_baseline(impl: str, B: int, K: int, dtype: str) -> None:
    """A wrong kernel must not produce a speed-up: compare the forward with the batched baseline."""
    image, landmarks, index = make_inputs(B, K, dtype, DEVICE, seed=1)
    with torch.no_grad():
        ours = _gather_fn(impl)(image, landmarks, index)
        # in float32: the baseline rounds its grid to the image dtype, which moves bfloat16 samples by pixels
        expected = _gather_fn("batched-grid_sample")(image.float(), landmarks, index)
    # float32: positions are computed in pixels here and from a normalised grid
    # by grid_sample, so their rounding differs; the tests check accuracy.
    _harness.assert_close(
        ours,
        expected,
        dtype=DTYPES[dtype],
        scale=100.0 if dtype == "float32" else 2.0,
        msg=f"{impl} != batched grid_sample",
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,K,dtype", SHAPES)
def test_gather(benchmark, B, K, dtype, mode):
    """Ours and both baselines, interleaved round by round."""
    if mode == "fwd":
        for impl in OURS:
            _check_matches_baseline(impl, B, K, dtype)
    impls = [
        _harness.Impl.rebuildable(
            impl, impl in OURS, os.path.abspath(__file__), build_case, impl=impl, mode=mode, B=B, K=K, dtype=dtype
        )
        for impl in OURS + BASELINES
    ]
    _harness.compare(
        benchmark,
        op=OP,
        title="Landmark patch gather",
        mode=mode,
        dtype=dtype,
        shape={"B": B, "L": L, "K": K, "P": P, "HxW": f"{SIZE}x{SIZE}"},
        impls=impls,
        work={"bytes": minimal_bytes(mode, B, K, dtype)},
    )


def test_copy_bandwidth(benchmark):
    """The device's copy bandwidth (bytes read + written per second), the gather's ceiling."""
    numel = pick(cpu=32 << 20, gpu=256 << 20, smoke=1 << 16)
    src = torch.rand(numel, device=DEVICE)
    dst = torch.empty_like(src)
    case = lambda: dst.copy_(src)  # noqa: E731
    _harness.compare(
        benchmark,
        op="copy",
        title="Copy bandwidth (the ceiling of memory-bound work)",
        mode="fwd",
        dtype="float32",
        shape={"numel": numel},
        impls=[_harness.Impl("copy_", False, lambda: case)],
        work={"bytes": 2 * src.nbytes},
        role="ceiling",
        group=f"copy {DEVICE}",
    )
