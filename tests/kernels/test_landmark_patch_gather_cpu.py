"""The CPU gather kernels' own paths: the P=8 float32 vector code for SSE2 and for AVX2 (chosen at run
time) must give bitwise the same tokens and gradients, and the image gradient must not depend on the
number of threads.  Accuracy against the float64 reference is checked in test_landmark_patch_gather.py
(whatever instruction set this machine picks)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lafs_kernels._dispatch import call_of
from lafs_kernels.ops.landmark_patch_gather import BACKENDS
from tests.kernels.test_landmark_patch_gather import backend_with_grads, random_case

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    bool(BACKENDS.why_not("cpu", call_of(torch.empty(0)))), reason="the CPU kernels are not built"
)

SCRIPT = """
import sys, torch
from tests.kernels.test_landmark_patch_gather import backend_with_grads, random_case
rng = torch.Generator().manual_seed(int(sys.argv[2]))
image, landmarks = random_case(rng, batch=3, size=(40, 37), landmarks=40, margin=6)
grad = torch.randn(3, 40, 192, generator=rng)
results = backend_with_grads(image, landmarks, 8, grad, "cpu")
torch.save([image, landmarks, grad, *results], sys.argv[1])
"""


def test_sse2_and_avx2_paths_agree_bitwise(tmp_path, rng):
    seed = str(int(torch.randint(0, 2**31, (1,), generator=rng)))
    outputs = {}
    for simd in ("sse2", "default"):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("LAFS_KERNELS_CPU_SIMD", None)
        if simd == "sse2":
            env["LAFS_KERNELS_CPU_SIMD"] = "sse2"
        path = tmp_path / f"{simd}.pt"
        subprocess.run([sys.executable, "-c", SCRIPT, str(path), seed], cwd=ROOT, env=env, check=True, timeout=120)
        outputs[simd] = torch.load(path)
    for a, b in zip(outputs["sse2"], outputs["default"]):
        assert torch.equal(a, b)


def test_image_gradient_does_not_depend_on_the_thread_count(rng):
    image, landmarks = random_case(rng, batch=5, size=(30, 33), landmarks=25)
    grad = torch.randn(5, 25, 192, generator=rng)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(backend_with_grads(image, landmarks, 8, grad, "cpu", deterministic=True))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_large_outputs_match_the_same_images_in_small_batches(rng):
    """Token tensors of 8 MiB and more are written with streaming stores (and images are prefetched when
    the patches cover them): the same values as the regular path, which small batches take."""
    image, landmarks = random_case(rng, batch=64, size=(112, 112), landmarks=196, margin=6)
    forward = torch.ops.lafs_kernels._patch_gather_fwd
    tokens = forward(image, landmarks, 8)
    assert tokens.numel() * tokens.element_size() >= 8 << 20
    assert torch.equal(tokens, torch.cat([forward(image[b : b + 4], landmarks[b : b + 4], 8) for b in range(0, 64, 4)]))
