"""Landmark patch gather (SPEC section 1) on every backend that runs here.

The float64 reference is the batched ``grid_sample`` baseline with autograd (an
implementation independent of every backend, including ``torch``); the
original per-landmark loop and the compatibility function are checked against
the golden outputs of the original code.  Triton runs through the interpreter
on small shapes.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from lafs_kernels import BackendUnavailableError, landmark_patch_gather
from lafs_kernels._dispatch import call_of
from lafs_kernels.baselines.gather import gather_patches_batched, gather_patches_loop
from lafs_kernels.compat import extract_patches_pytorch_gridsample
from lafs_kernels.nn import LandmarkPatchGather
from lafs_kernels.ops import landmark_patch_gather as gather_module
from lafs_kernels.ops.landmark_patch_gather import BACKENDS, patch_gather_op
from tests.tolerances import assert_close, assert_close_low_precision

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "gather_golden.pt"


def runnable(name, device="cpu", dtype=torch.float32):
    """pytest.param for a backend, skipped with the reason when it cannot run here."""
    reasons = BACKENDS.why_not(name, call_of(torch.empty(0, device=device, dtype=dtype)))
    return pytest.param(name, marks=pytest.mark.skipif(bool(reasons), reason="; ".join(reasons)))


CPU_BACKENDS = [runnable("torch"), runnable("cpu"), runnable("triton")]
GRADCHECK_BACKENDS = [runnable("torch", dtype=torch.float64), runnable("cpu", dtype=torch.float64)]


def random_case(
    rng, *, batch=2, channels=3, size=(16, 13), landmarks=6, patch_size=8, dtype=torch.float32, margin=None
):
    """image [B, C, H, W] and landmarks [B, L, 2] spread over the image and up to a patch beyond it."""
    H, W = size
    margin = patch_size if margin is None else margin
    image = torch.randn(batch, channels, H, W, generator=rng, dtype=torch.float64).to(dtype)
    extent = torch.tensor([W + 2.0 * margin, H + 2.0 * margin], dtype=torch.float64)
    points = torch.rand(batch, landmarks, 2, generator=rng, dtype=torch.float64) * extent - margin
    return image, points.to(torch.float32 if dtype != torch.float64 else torch.float64)


def select(landmarks, index):
    return landmarks if index is None else landmarks[torch.arange(landmarks.shape[0])[:, None], index]


def reference_with_grads(image, landmarks, patch_size, grad_tokens, index=None, dtype=torch.float64):
    """tokens, d image, d landmarks of the batched grid_sample baseline computed in ``dtype``."""
    image = image.detach().to(dtype).requires_grad_()
    landmarks = landmarks.detach().to(dtype).requires_grad_()
    tokens = gather_patches_batched(image, select(landmarks, index), patch_size)
    tokens.backward(grad_tokens.to(dtype))
    return tokens.detach(), image.grad, landmarks.grad


def backend_with_grads(image, landmarks, patch_size, grad_tokens, backend, **kwargs):
    image = image.detach().clone().requires_grad_()
    landmarks = landmarks.detach().clone().requires_grad_()
    tokens = landmark_patch_gather(image, landmarks, patch_size, backend=backend, **kwargs)
    tokens.backward(grad_tokens.to(tokens.dtype))
    return tokens.detach(), image.grad, landmarks.grad


def assert_matches_reference(image, landmarks, patch_size, backend, rng, index=None, check_image=None):
    """Forward and both gradients of ``backend`` against the float64 reference."""
    B, C = image.shape[:2]
    K = landmarks.shape[1] if index is None else index.shape[1]
    grad_tokens = torch.randn(B, K, patch_size * patch_size * C, generator=rng, dtype=torch.float64)
    ref = reference_with_grads(
        check_image if check_image is not None else image, landmarks, patch_size, grad_tokens, index
    )
    got = backend_with_grads(image, landmarks, patch_size, grad_tokens, backend, index=index)
    assert got[0].shape == (B, K, patch_size * patch_size * C) and got[0].dtype == image.dtype
    assert_close(got[0], ref[0], msg="tokens")
    assert_close(got[1], ref[1], scale=4, msg="image gradient (up to 4 taps per pixel and patch)")
    # The landmark gradient sums P*P*C products over a patch (and repeats).
    assert_close(got[2], ref[2], scale=patch_size * patch_size * C, msg="landmark gradient")


# --------------------------------------------------------------------------- correctness against the reference


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("patch_size", [8, 5])
def test_matches_reference_with_repeated_indices(backend, patch_size, rng):
    image, landmarks = random_case(rng, patch_size=patch_size, landmarks=5)
    # K = 9 != L = 5, with repeats: the landmark gradient accumulates over them.
    index = torch.randint(0, 5, (2, 9), generator=rng)
    index[:, :2] = 3
    assert_matches_reference(image, landmarks, patch_size, backend, rng, index=index)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_reference_float64_odd_patch_single_image(backend, rng):
    if backend == "triton":
        pytest.skip("triton computes in float32 and takes no float64 input")
    image, landmarks = random_case(rng, batch=1, channels=2, size=(11, 14), patch_size=7, dtype=torch.float64)
    assert_matches_reference(image, landmarks, 7, backend, rng)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_integer_and_half_integer_positions(backend, rng):
    # 32 x 32: grid_sample's normalisation is exact for powers of two, so the
    # reference lands exactly on the integer sample positions as well.
    image = torch.randn(2, 3, 32, 32, generator=rng)
    whole = torch.randint(-4, 36, (2, 8, 2), generator=rng).float()
    landmarks = whole + 0.5 * torch.randint(0, 2, (2, 8, 2), generator=rng)
    for patch_size in (8, 3):  # even P samples half-integers of integer landmarks, odd P integers
        assert_matches_reference(image, landmarks, patch_size, backend, rng)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_channels_last_and_strided_images(backend, layout, rng):
    base, landmarks = random_case(rng, size=(26, 24), landmarks=4)
    if layout == "channels_last":
        image = base[:, :, :13, :12].contiguous().to(memory_format=torch.channels_last)
        assert image.is_contiguous(memory_format=torch.channels_last)
    else:
        image = base[:, :, ::2, ::2]  # a view: no dense layout at all
        assert not image.is_contiguous()
    assert_matches_reference(image, landmarks, 8, backend, rng, check_image=image.contiguous())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_images(backend, dtype, rng):
    image, landmarks = random_case(rng, size=(16, 16), landmarks=5, dtype=dtype)
    grad_tokens = torch.randn(2, 5, 8 * 8 * 3, generator=rng, dtype=torch.float64)
    ref64 = reference_with_grads(image, landmarks, 8, grad_tokens)
    same_dtype = reference_with_grads(image, landmarks, 8, grad_tokens, dtype=dtype)
    got = backend_with_grads(image, landmarks, 8, grad_tokens.to(dtype), backend)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == torch.float32
    for name, ours, theirs, exact in zip(("tokens", "image gradient", "landmark gradient"), got, same_dtype, ref64):
        assert_close_low_precision(ours, theirs, exact, msg=f"{dtype} {name}")


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
@pytest.mark.parametrize("patch_size", [4, 3])
def test_gradcheck_float64(backend, patch_size, rng):
    image, landmarks = random_case(
        rng, batch=1, channels=2, size=(5, 4), landmarks=2, patch_size=patch_size, dtype=torch.float64, margin=2
    )
    index = torch.tensor([[0, 1, 1]])
    image.requires_grad_()
    landmarks.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda im, lm: landmark_patch_gather(im, lm, patch_size, index=index, backend=backend),
        (image, landmarks),
        fast_mode=True,
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_finite_landmarks_give_zero_patches_and_finite_gradients(backend, rng):
    image, landmarks = random_case(rng, landmarks=6)
    landmarks[0, 1, 0] = float("nan")
    landmarks[0, 3, 1] = float("inf")
    landmarks[1, 2] = float("-inf")
    landmarks[1, 4] = 1e30  # finite but far outside
    bad = torch.zeros(2, 6, dtype=torch.bool)
    bad[0, 1] = bad[0, 3] = bad[1, 2] = bad[1, 4] = True
    grad_tokens = torch.randn(2, 6, 8 * 8 * 3, generator=rng, dtype=torch.float64)
    tokens, grad_image, grad_landmarks = backend_with_grads(image, landmarks, 8, grad_tokens, backend)
    assert torch.equal(tokens[bad], torch.zeros_like(tokens[bad]))
    assert torch.isfinite(grad_image).all() and torch.isfinite(grad_landmarks).all()
    assert torch.equal(grad_landmarks[bad], torch.zeros_like(grad_landmarks[bad]))
    # The finite landmarks are unaffected.
    good_landmarks = torch.where(bad[..., None], torch.zeros_like(landmarks), landmarks)
    ref = reference_with_grads(image, good_landmarks, 8, grad_tokens * (~bad)[..., None])
    assert_close(tokens[~bad], ref[0][~bad])
    assert_close(grad_image, ref[1], scale=4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_finite_pixels_reach_only_the_taps_that_read_them(backend, rng):
    """A NaN / Inf pixel in a corner: the samples whose taps inside the image read it are non-finite, as
    with grid_sample; a tap outside the image contributes zero, so it must not carry the clamped pixel."""
    image, _ = random_case(rng, batch=1, size=(16, 16))
    image[0, :, 0, 0] = float("nan")
    image[0, :, 15, 15] = float("inf")
    landmarks = torch.tensor([[[0.25, 0.25], [15.75, 15.75], [8.0, 8.0]]])  # patches over both corners' edges
    grad_tokens = torch.randn(1, 3, 8 * 8 * 3, generator=rng, dtype=torch.float64)
    tokens, _, _ = backend_with_grads(image, landmarks, 8, grad_tokens, backend)
    reference, _, _ = reference_with_grads(image, landmarks, 8, grad_tokens)
    assert torch.equal(tokens.isfinite(), reference.isfinite())
    assert 0 < (~reference.isfinite()).sum() < reference.numel()
    assert_close(tokens[reference.isfinite()], reference[reference.isfinite()])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_an_empty_batch_gives_empty_tokens_and_gradients(backend, rng):
    image, landmarks = random_case(rng, batch=0)
    tokens, grad_image, grad_landmarks = backend_with_grads(
        image, landmarks, 8, torch.zeros(0, 6, 8 * 8 * 3, dtype=torch.float64), backend
    )
    assert tokens.shape == (0, 6, 8 * 8 * 3)
    assert grad_image.shape == image.shape and grad_landmarks.shape == landmarks.shape


def test_gradients_are_computed_only_for_inputs_that_need_them(rng, monkeypatch):
    calls = []
    original = gather_module._backward

    def spy(
        backend,
        grad_tokens,
        image,
        centres,
        patch_size,
        need_image_grad,
        need_centre_grad,
        deterministic,
        view_affine=None,
    ):
        calls.append((need_image_grad, need_centre_grad))
        return original(
            backend,
            grad_tokens,
            image,
            centres,
            patch_size,
            need_image_grad,
            need_centre_grad,
            deterministic,
            view_affine,
        )

    monkeypatch.setattr(gather_module, "_backward", spy)
    image, landmarks = random_case(rng, landmarks=3)
    for image_grad, landmark_grad in ((True, False), (False, True), (True, True)):
        im = image.clone().requires_grad_(image_grad)
        lm = landmarks.clone().requires_grad_(landmark_grad)
        landmark_patch_gather(im, lm, 4).square().sum().backward()
        assert calls[-1] == (image_grad, landmark_grad)
        assert (im.grad is not None) == image_grad and (lm.grad is not None) == landmark_grad
    assert len(calls) == 3


# --------------------------------------------------------------------------- selection and jitter


@pytest.mark.parametrize("replacement", [True, False])
def test_same_generator_state_gives_same_tokens_on_every_backend(replacement, rng):
    image, landmarks = random_case(rng, size=(16, 16), landmarks=7)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    results = {}
    for param in CPU_BACKENDS:
        name = param.values[0]
        if BACKENDS.why_not(name, call_of(image)):
            continue
        generator = torch.Generator().manual_seed(seed)
        results[name] = landmark_patch_gather(
            image,
            landmarks,
            8,
            num_samples=5,
            replacement=replacement,
            jitter_std=1.5,
            generator=generator,
            backend=name,
        )
    # The same draws, made by hand: indices first, then the jitter.
    generator = torch.Generator().manual_seed(seed)
    if replacement:
        index = torch.randint(0, 7, (2, 5), generator=generator)
    else:
        index = torch.rand(2, 7, generator=generator).argsort(dim=1)[:, :5]
        assert all(len(set(row.tolist())) == 5 for row in index)
    centres = select(landmarks, index) + 1.5 * torch.randn(2, 5, 2, generator=generator)
    expected = gather_patches_batched(image.double(), centres.double(), 8)
    assert len(results) >= 2
    for name, tokens in results.items():
        assert_close(tokens, expected, msg=name)
    # An int seed means a fresh CPU generator with that seed.
    seeded = landmark_patch_gather(
        image, landmarks, 8, num_samples=5, replacement=replacement, jitter_std=1.5, generator=seed, backend="torch"
    )
    assert torch.equal(seeded, results["torch"])


def test_module_randomness_only_in_training(rng):
    image, landmarks = random_case(rng, size=(16, 16), landmarks=6)
    module = LandmarkPatchGather(patch_size=4, num_samples=3, jitter_std=0.7)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    tokens, index = module(image, landmarks, generator=torch.Generator().manual_seed(seed), return_index=True)
    expected = landmark_patch_gather(
        image, landmarks, 4, num_samples=3, jitter_std=0.7, generator=torch.Generator().manual_seed(seed)
    )
    assert index.shape == (2, 3) and torch.equal(tokens, expected)
    module.eval()
    tokens, index = module(image, landmarks, generator=torch.Generator().manual_seed(seed), return_index=True)
    assert index is None
    assert torch.equal(tokens, landmark_patch_gather(image, landmarks, 4))


# --------------------------------------------------------------------------- the original code


def golden_cases():
    return torch.load(GOLDEN)["cases"]


@pytest.mark.parametrize("backend", [runnable("torch", dtype=torch.float64), runnable("cpu", dtype=torch.float64)])
def test_compat_reproduces_the_original_mosaic(backend, monkeypatch):
    monkeypatch.setenv("LAFS_KERNELS_BACKEND", backend)
    for case in golden_cases():
        P = case["patch_size"]
        for patch_shape in (np.array([P, P]), (P, P), P):
            mosaic = extract_patches_pytorch_gridsample(
                case["image"], case["landmarks"], patch_shape, num_landm=case["num_landm"]
            )
            assert_close(mosaic, case["mosaic"], msg=f"P={P} patch_shape={patch_shape!r}")
        tokens = landmark_patch_gather(case["image"], case["landmarks"][:, : case["num_landm"]], P)
        assert_close(tokens, case["tokens"])


def test_baselines_reproduce_the_original_tokens():
    for case in golden_cases():
        landmarks = case["landmarks"][:, : case["num_landm"]]
        for baseline in (gather_patches_loop, gather_patches_batched):
            assert_close(baseline(case["image"], landmarks, case["patch_size"]), case["tokens"], msg=baseline.__name__)


def test_compat_rejects_what_the_original_cannot_mean(rng):
    image, landmarks = random_case(rng, size=(16, 16), landmarks=9)
    with pytest.raises(ValueError, match="perfect square"):
        extract_patches_pytorch_gridsample(image, landmarks, 4, num_landm=8)
    with pytest.raises(ValueError, match="patch_shape"):
        extract_patches_pytorch_gridsample(image, landmarks, (4, 5), num_landm=9)
    with pytest.raises(ValueError, match="square"):
        extract_patches_pytorch_gridsample(image[:, :, :12], landmarks, 4, num_landm=9)
    with pytest.raises(ValueError, match="landmarks"):
        extract_patches_pytorch_gridsample(image, landmarks, 4, num_landm=16)


# --------------------------------------------------------------------------- errors and dispatch


def test_bad_inputs_raise_clear_errors(rng):
    image, landmarks = random_case(rng, landmarks=4)
    cases = [
        (ValueError, "image must be a \\[B, C, H, W\\]", dict(image=image[0])),
        (TypeError, "image must be float32", dict(image=image.to(torch.int32))),
        (ValueError, "landmarks must be a \\[N, L, 2\\]", dict(landmarks=landmarks[..., :1])),
        (TypeError, "landmarks must be a floating-point", dict(landmarks=landmarks.long())),
        (ValueError, "landmarks batch 1 does not match image batch 2", dict(landmarks=landmarks[:1])),
        (
            ValueError,
            "landmarks batch 3 does not match image batch 2",
            dict(landmarks=torch.cat([landmarks, landmarks[:1]])),
        ),
        (ValueError, "landmarks are on meta", dict(landmarks=landmarks.to("meta"))),
        (ValueError, "patch_size must be an int >= 1", dict(patch_size=0)),
        (ValueError, "patch_size must be an int >= 1", dict(patch_size=2.0)),
        (IndexError, "index values must lie in \\[0, 4\\)", dict(index=torch.tensor([[0, 4], [1, 2]]))),
        (IndexError, "index values must lie in \\[0, 4\\)", dict(index=torch.tensor([[0, -1], [1, 2]]))),
        (TypeError, "index must be int64", dict(index=torch.zeros(2, 3))),
        (ValueError, "index must be a \\[N, K\\]", dict(index=torch.zeros(3, dtype=torch.long))),
        (ValueError, "either index or num_samples", dict(index=torch.zeros(2, 1, dtype=torch.long), num_samples=2)),
        (ValueError, "cannot draw 5 of 4 landmarks without replacement", dict(num_samples=5, replacement=False)),
        (ValueError, "num_samples must be an int >= 1", dict(num_samples=0)),
        (ValueError, "jitter_std must be a finite number >= 0", dict(jitter_std=-1.0)),
        (TypeError, "generator must be", dict(generator="seed", jitter_std=1.0)),
    ]
    for error, message, change in cases:
        kwargs = dict(image=image, landmarks=landmarks, patch_size=4)
        kwargs.update(change)
        with pytest.raises(error, match=message):
            landmark_patch_gather(**kwargs)


def test_forced_backend_that_cannot_run_raises(rng, monkeypatch):
    image, landmarks = random_case(rng, landmarks=2)
    with pytest.raises(BackendUnavailableError, match="'cuda'"):
        landmark_patch_gather(image, landmarks, 4, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="supports dtypes"):
        landmark_patch_gather(image.double(), landmarks, 4, backend="triton")
    with pytest.raises(BackendUnavailableError, match="no deterministic mode"):
        landmark_patch_gather(image.requires_grad_(), landmarks, 4, backend="triton", deterministic=True)
    monkeypatch.setenv("LAFS_KERNELS_BACKEND", "nonsense")
    with pytest.raises(BackendUnavailableError, match="unknown backend 'nonsense'"):
        landmark_patch_gather(image, landmarks, 4)


def test_cpu_tensors_prefer_the_cpu_kernels():
    expected = "cpu" if not BACKENDS.why_not("cpu", call_of(torch.empty(0))) else "torch"
    assert BACKENDS.select(call_of(torch.empty(0))) == expected


@pytest.mark.parametrize("backend", [runnable("torch"), runnable("cpu")])
def test_opcheck_custom_op(backend, rng):
    image, centres = random_case(rng, landmarks=3, size=(9, 8))
    torch.library.opcheck(patch_gather_op, (image.requires_grad_(), centres.requires_grad_(), 4, backend, False))


def test_torch_compile_fullgraph_traces_one_node(rng):
    image, landmarks = random_case(rng, landmarks=4)
    index = torch.tensor([[0, 3, 3], [2, 1, 0]])

    def tokens_of(im, lm):
        return landmark_patch_gather(im, lm, 4, index=index)

    torch._dynamo.reset()
    compiled = torch.compile(tokens_of, fullgraph=True, backend="aot_eager")
    grad_tokens = torch.randn(2, 3, 48, generator=rng)
    got = backend_with_grads(image, landmarks, 4, grad_tokens, None, index=index)
    im, lm = image.clone().requires_grad_(), landmarks.clone().requires_grad_()
    out = compiled(im, lm)
    out.backward(grad_tokens)
    assert_close(out, got[0])
    assert_close(im.grad, got[1])
    assert_close(lm.grad, got[2])


def test_cuda_kernels_compiled_when_the_toolchain_is_present():
    from lafs_kernels import _extension

    if not _extension.load()[0]:
        pytest.skip("the extension is not built")
    compiled = "cuda" in _extension.build_info().get("backends_compiled", [])
    for op in ("_patch_gather_fwd", "_patch_gather_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lafs_kernels::{op}", "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lafs_kernels::{op}", "CUDA") == compiled


# --------------------------------------------------------------------------- GPU (skipped without a CUDA device)


def cuda_case(rng, dtype=torch.float32, batch=4, landmarks=30, size=(40, 36)):
    image, points = random_case(rng, batch=batch, size=size, landmarks=landmarks, dtype=dtype)
    return image.cuda(), points.cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_backends_match_reference(backend, dtype, rng):
    image, landmarks = cuda_case(rng, dtype=dtype)
    index = torch.randint(0, 30, (4, 50), generator=rng).cuda()
    grad_tokens = torch.randn(4, 50, 8 * 8 * 3, generator=rng, dtype=torch.float64).cuda()
    got = backend_with_grads(image, landmarks, 8, grad_tokens, backend, index=index)
    ref64 = reference_with_grads(image.cpu(), landmarks.cpu(), 8, grad_tokens.cpu(), index.cpu())
    if dtype == torch.float32:
        assert_close(got[0], ref64[0])
        assert_close(got[1], ref64[1], scale=4)
        assert_close(got[2], ref64[2], scale=8 * 8 * 3)
    else:
        same = reference_with_grads(image.cpu(), landmarks.cpu(), 8, grad_tokens.cpu(), index.cpu(), dtype=dtype)
        for ours, theirs, exact in zip(got, same, ref64):
            assert_close_low_precision(ours, theirs, exact, msg=f"{backend} {dtype}")


@pytest.mark.gpu
def test_cuda_float64_channels_last_and_odd_patch(rng):
    image, landmarks = random_case(rng, batch=3, size=(21, 19), landmarks=9, patch_size=7, dtype=torch.float64)
    image_cl = image.cuda().to(memory_format=torch.channels_last)
    grad_tokens = torch.randn(3, 9, 7 * 7 * 3, generator=rng, dtype=torch.float64)
    ref = reference_with_grads(image, landmarks, 7, grad_tokens)
    for deterministic in (False, True):
        got = backend_with_grads(image_cl, landmarks.cuda(), 7, grad_tokens.cuda(), "cuda", deterministic=deterministic)
        assert_close(got[0], ref[0])
        assert_close(got[1], ref[1], scale=4)
        assert_close(got[2], ref[2], scale=7 * 7 * 3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_deterministic_image_gradient_is_bitwise_repeatable(dtype, rng):
    image, landmarks = cuda_case(rng, dtype=dtype, batch=8, landmarks=196, size=(112, 112))
    index = torch.randint(0, 196, (8, 400), generator=rng).cuda()  # many overlapping, repeated patches
    grad_tokens = torch.randn(8, 400, 8 * 8 * 3, generator=rng).cuda().to(dtype)

    def image_gradient(**kwargs):
        return backend_with_grads(image, landmarks, 8, grad_tokens, "cuda", index=index, **kwargs)[1]

    first = image_gradient(deterministic=True)
    for _ in range(3):
        assert torch.equal(image_gradient(deterministic=True), first)
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(image_gradient(), first)
    finally:
        torch.use_deterministic_algorithms(False)
    # The atomic path sums in another order: equal up to rounding.
    assert_close(image_gradient(deterministic=False), first)


@pytest.mark.gpu
def test_cuda_matches_cpu_kernels(rng):
    image, landmarks = random_case(rng, batch=4, size=(112, 112), landmarks=196)
    grad_tokens = torch.randn(4, 196, 8 * 8 * 3, generator=rng)
    cpu = backend_with_grads(image, landmarks, 8, grad_tokens, "cpu")
    cuda = backend_with_grads(image.cuda(), landmarks.cuda(), 8, grad_tokens.cuda(), "cuda")
    for name, a, b in zip(("tokens", "image gradient", "landmark gradient"), cuda, cpu):
        assert_close(a, b, scale=1 if name == "tokens" else 8 * 8 * 3, msg=name)


@pytest.mark.gpu
def test_cuda_non_finite_landmarks_and_generator_on_device(rng):
    image, landmarks = cuda_case(rng)
    landmarks[0, 0, 0] = float("nan")
    landmarks[1, 1] = float("inf")
    generator = torch.Generator(device="cuda").manual_seed(1234)
    tokens = {}
    for backend in ("cuda", "triton", "torch"):
        generator.manual_seed(1234)
        tokens[backend] = landmark_patch_gather(
            image, landmarks, 8, num_samples=40, jitter_std=2.0, generator=generator, backend=backend
        )
    assert_close(tokens["cuda"], tokens["torch"])
    assert_close(tokens["triton"], tokens["torch"])
    im, lm = image.clone().requires_grad_(), landmarks.clone().requires_grad_()
    landmark_patch_gather(im, lm, 8, backend="cuda").sum().backward()
    assert torch.isfinite(im.grad).all() and torch.isfinite(lm.grad).all()
    assert lm.grad[0, 0].abs().sum() == 0 and lm.grad[1, 1].abs().sum() == 0
