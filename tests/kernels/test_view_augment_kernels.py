"""The view-augmentation kernels of LAFS pretraining: the Gaussian blur (one sigma per image) and DINO's
per-pixel colour chain on token pixels, each backend against a float64 statement of the same maths."""

import itertools

import numpy as np
import pytest
import torch

from lafs.ssl.augment import draw_colour_parameters
from lafs_kernels import _extension
from lafs_kernels.ops import dino_colour, gaussian_blur

from helpers.skips import TRITON_MISSING, TRITON_SKIP_REASON
from tolerances import assert_close


def _skip_unless_available(name: str) -> str:
    if name == "cpu" and _extension.missing_reason("cpu"):
        pytest.skip(f"C++ kernels not built: {_extension.missing_reason('cpu')}")
    if name == "triton" and TRITON_MISSING:
        pytest.skip(TRITON_SKIP_REASON)
    return name


@pytest.fixture(params=["torch", "cpu"])
def backend(request):
    """The blur's backends."""
    return _skip_unless_available(request.param)


COLOUR_BACKENDS = ("torch", "cpu", "triton")


@pytest.fixture(params=COLOUR_BACKENDS)
def colour_backend(request):
    """The colour chain's backends (Triton through the interpreter on CPU tensors)."""
    return _skip_unless_available(request.param)


# --------------------------------------------------------------------------- Gaussian blur


def blur_float64(images: np.ndarray, sigma_x: np.ndarray, sigma_y: np.ndarray, radius: int) -> np.ndarray:
    """Separable Gaussian blur written out: reflect padding, taps exp(-t^2 / 2 sigma^2) normalised."""
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    out = np.empty_like(images, dtype=np.float64)
    for n in range(images.shape[0]):
        kx = np.exp(-0.5 * (taps / sigma_x[n]) ** 2)
        ky = np.exp(-0.5 * (taps / sigma_y[n]) ** 2)
        kx, ky = kx / kx.sum(), ky / ky.sum()
        padded = np.pad(images[n].astype(np.float64), ((0, 0), (radius, radius), (radius, radius)), mode="reflect")
        along_w = sum(kx[i] * padded[:, :, i : i + images.shape[3]] for i in range(2 * radius + 1))
        out[n] = sum(ky[i] * along_w[:, i : i + images.shape[2], :] for i in range(2 * radius + 1))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("radius", [0, 1, 3, 6])
def test_blur_against_the_written_out_blur(backend, dtype, radius, rng):
    images = torch.rand(5, 3, 13, 17, generator=rng, dtype=torch.float64).to(dtype) * 2 - 1
    sigma_x = 0.1 + 1.9 * torch.rand(5, generator=rng, dtype=torch.float64)
    sigma_y = 0.1 + 1.9 * torch.rand(5, generator=rng, dtype=torch.float64)
    got = gaussian_blur.gaussian_blur(images, sigma_x, sigma_y, radius, backend=backend)
    expected = blur_float64(images.double().numpy(), sigma_x.numpy(), sigma_y.numpy(), radius)
    assert got.dtype == dtype and got.shape == images.shape
    assert_close(got, torch.from_numpy(expected), dtype=dtype)


def test_blur_with_one_sigma_blurs_both_axes_alike(backend, rng):
    images = torch.rand(3, 2, 9, 9, generator=rng)
    sigma = 0.5 + torch.rand(3, generator=rng, dtype=torch.float64)
    assert torch.equal(
        gaussian_blur.gaussian_blur(images, sigma, None, 4, backend=backend),
        gaussian_blur.gaussian_blur(images, sigma, sigma, 4, backend=backend),
    )


def test_blur_kernel_equals_the_reference_on_view_sized_images(rng):
    """The backend the fused view path picks on the CPU against the one the original path uses."""
    _skip_unless_available("cpu")
    images = torch.rand(8, 3, 112, 112, generator=rng) * 2 - 1
    sigma = 0.1 + 1.9 * torch.rand(8, generator=rng, dtype=torch.float64)
    assert gaussian_blur.BACKENDS.select(gaussian_blur.Call(images.device, images.dtype), env=False) == "cpu"
    assert_close(
        gaussian_blur.gaussian_blur(images, sigma, 0.7 * sigma, 6),
        gaussian_blur.gaussian_blur(images, sigma, 0.7 * sigma, 6, backend="torch"),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_blur_taps_of_narrow_sigmas_are_zero_not_subnormal(dtype):
    """A narrow sigma's outer taps underflow: they must be exact zeros (subnormals multiply several times slower on
    x86), symmetric, and the rest must keep the normalised Gaussian to the dtype's resolution."""
    sigma = torch.linspace(0.05, 2.0, 400, dtype=torch.float64)
    taps = gaussian_blur.gaussian_kernels(sigma, 6, dtype)
    tiny = torch.finfo(dtype).tiny
    assert taps.dtype == dtype
    assert not bool(((taps > 0) & (taps < tiny)).any())
    assert torch.equal(taps, taps.flip(1))
    assert bool((taps[:, :1] == 0).any()) and bool((taps[:, 6] > 0).all())  # some outer taps are zero
    t = torch.arange(-6, 7, dtype=torch.float64)
    exact = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    exact = exact / exact.sum(dim=1, keepdim=True)
    assert (taps.double() - exact).abs().max() <= 2 * torch.finfo(dtype).eps


def test_blur_kernel_skips_zero_taps_at_the_ends(rng):
    """Zero outer taps change nothing: a kernel padded with zeros blurs exactly as the unpadded one, zeros on one
    side only as the conv2d reference with the same taps, and an all-zero kernel gives zeros."""
    _skip_unless_available("cpu")
    blur = torch.ops.lafs_kernels._gaussian_blur
    pad = torch.nn.functional.pad
    images = torch.rand(3, 2, 11, 9, generator=rng) * 2 - 1
    taps_x = torch.rand(3, 3, generator=rng) + 0.1
    taps_y = torch.rand(3, 3, generator=rng) + 0.1
    assert torch.equal(blur(images, pad(taps_x, (3, 3)), pad(taps_y, (3, 3))), blur(images, taps_x, taps_y))
    off_centre_x, off_centre_y = pad(taps_x, (4, 2)), pad(taps_y, (2, 4))  # taps at offsets -0..2 and -2..0
    assert_close(
        blur(images, off_centre_x, off_centre_y),
        gaussian_blur._blur_torch(images, off_centre_x, off_centre_y, 4),
        dtype=torch.float32,
    )
    assert torch.equal(blur(images, torch.zeros(3, 3), taps_y), torch.zeros_like(images))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blur_of_chosen_sources(backend, dtype, rng):
    """Output n blurs image source_index[n] (repeats and any order): against the written-out blur of those images,
    and bitwise against blurring the selected copies, which is what the view builder did before."""
    images = torch.rand(4, 3, 13, 17, generator=rng, dtype=torch.float64).to(dtype) * 2 - 1
    source = torch.tensor([3, 0, 3, 1, 2, 2, 0, 1])
    sigma_x = 0.1 + 1.9 * torch.rand(8, generator=rng, dtype=torch.float64)
    sigma_y = 0.1 + 1.9 * torch.rand(8, generator=rng, dtype=torch.float64)
    got = gaussian_blur.gaussian_blur(images, sigma_x, sigma_y, 4, backend=backend, source_index=source)
    expected = blur_float64(images[source].double().numpy(), sigma_x.numpy(), sigma_y.numpy(), 4)
    assert got.shape == (8, 3, 13, 17) and got.dtype == dtype
    assert_close(got, torch.from_numpy(expected), dtype=dtype)
    assert torch.equal(got, gaussian_blur.gaussian_blur(images[source], sigma_x, sigma_y, 4, backend=backend))


def test_blur_rejects_bad_sources(backend):
    images = torch.rand(2, 3, 6, 8)
    sigma = torch.ones(3, dtype=torch.float64)
    source = torch.tensor([0, 1, 1])
    with pytest.raises(ValueError, match=r"source_index must lie in \[0, 2\), got range \[0, 2\]"):
        gaussian_blur.gaussian_blur(images, sigma, radius=2, backend=backend, source_index=torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="source_index must be int64"):
        gaussian_blur.gaussian_blur(images, sigma, radius=2, backend=backend, source_index=source.int())
    with pytest.raises(ValueError, match=r"sigma must be \[N\] = \[3\]"):
        gaussian_blur.gaussian_blur(images, sigma[:2], radius=2, backend=backend, source_index=source)


def test_cpu_blur_kernel_itself_rejects_sources_outside_the_batch():
    """The raw op checks too, for callers that skip the Python wrapper."""
    _skip_unless_available("cpu")
    taps = torch.full((2, 3), 1 / 3)
    with pytest.raises(RuntimeError, match=r"source_index\[1\] = 5 is outside \[0, 2\)"):
        torch.ops.lafs_kernels._gaussian_blur(torch.rand(2, 3, 6, 8), taps, taps, torch.tensor([0, 5]))


def test_blur_rejects_what_it_cannot_blur(backend):
    images = torch.rand(2, 3, 5, 8)
    sigma = torch.ones(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="radius must be in"):
        gaussian_blur.gaussian_blur(images, sigma, radius=5, backend=backend)
    with pytest.raises(ValueError, match=r"sigma_y must be \[N\]"):
        gaussian_blur.gaussian_blur(images, sigma, torch.ones(3, dtype=torch.float64), radius=2, backend=backend)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        gaussian_blur.gaussian_blur(images, torch.tensor([1.0, 0.0]), radius=2, backend=backend)
    with pytest.raises(ValueError, match=r"images \[N, C, H, W\]"):
        gaussian_blur.gaussian_blur(images[0], sigma, radius=2, backend=backend)


def test_blur_of_bfloat16_falls_back_to_the_reference():
    images = torch.rand(2, 3, 8, 8).bfloat16()
    call = gaussian_blur.Call(images.device, images.dtype)
    assert gaussian_blur.BACKENDS.select(call, env=False) == "torch"


# --------------------------------------------------------------------------- colour chain


def colour_params(n: int, generator: torch.Generator, jitter_p: float = 0.8):
    return draw_colour_parameters(
        n,
        torch.full((n,), 0.5, dtype=torch.float64),
        torch.full((n,), 0.5, dtype=torch.float64),
        generator,
        jitter_p=jitter_p,
        grayscale_p=0.3,
    )


def working_dtype(backend: str) -> torch.dtype:
    """float64 where the backend takes it (the tightest check), else float32 (Triton)."""
    return torch.float32 if backend == "triton" else torch.float64


def run_colour(pixels, mean_pixels, params, backend, pixel_weights=None):
    draws = (params.factors, params.order, params.jitter, params.gray, params.solarize)
    return dino_colour.dino_colour_tokens(pixels, mean_pixels, *draws, backend=backend, pixel_weights=pixel_weights)


@pytest.mark.parametrize(
    ("colour_backend", "dtype"),
    # Triton computes in float32 and takes no float64 input
    [(b, d) for b in COLOUR_BACKENDS for d in (torch.float32, torch.float64) if (b, d) != ("triton", torch.float64)],
    indirect=["colour_backend"],
)
@pytest.mark.parametrize("with_mean_pixels", [True, False])
def test_colour_chain_against_the_float64_reference(colour_backend, dtype, with_mean_pixels, rng):
    n = 48
    params = colour_params(n, rng)
    pixels = torch.rand(n, 300, 3, generator=rng, dtype=torch.float64) * 2 - 1
    mean_pixels = torch.rand(n, 64, 3, generator=rng, dtype=torch.float64) * 2 - 1 if with_mean_pixels else None
    expected = run_colour(pixels, mean_pixels, params, "torch")
    got = run_colour(pixels.to(dtype), None if mean_pixels is None else mean_pixels.to(dtype), params, colour_backend)
    assert got.dtype == dtype and got.shape == pixels.shape
    assert_close(got, expected, dtype=dtype)


def test_colour_chain_in_every_op_order(colour_backend, rng):
    """Each of the 24 orders of brightness, contrast, saturation and hue, with the contrast's mean taken
    after the ops before it: against the reference in float64.  With these factors most orders give other
    pixels than the identity order (contrast and saturation commute, and so do brightness and hue up to
    clamping), so a kernel that ignored the order would fail."""
    orders = torch.tensor(list(itertools.permutations(range(4))), dtype=torch.int64)
    n = orders.shape[0]
    params = colour_params(n, rng, jitter_p=1.0)._replace(
        order=orders,
        factors=torch.tensor([[1.3, 0.7, 1.2, 0.08]], dtype=torch.float64).expand(n, 4),
        gray=torch.zeros(n, dtype=torch.bool),
        solarize=torch.zeros(n, dtype=torch.bool),
    )
    pixels = torch.rand(n, 200, 3, generator=rng, dtype=torch.float64) * 2 - 1
    mean_pixels = torch.rand(n, 50, 3, generator=rng, dtype=torch.float64) * 2 - 1
    expected = run_colour(pixels, mean_pixels, params, "torch")
    dtype = working_dtype(colour_backend)
    assert_close(run_colour(pixels.to(dtype), mean_pixels.to(dtype), params, colour_backend), expected)
    in_identity_order = run_colour(pixels, mean_pixels, params._replace(order=orders[:1].expand(n, 4)), "torch")
    differs = (expected - in_identity_order).abs().amax(dim=(1, 2)) > 1e-2
    assert int(differs.sum()) >= 16, f"only {int(differs.sum())} of 24 orders change the pixels"


def test_colour_chain_without_any_change_is_the_identity(colour_backend, rng):
    n = 6
    params = colour_params(n, rng)
    off = torch.zeros(n, dtype=torch.bool)
    params = params._replace(jitter=off, gray=off, solarize=off)
    pixels = torch.rand(n, 40, 3, generator=rng, dtype=torch.float64) * 2 - 1
    dtype = working_dtype(colour_backend)
    assert_close(run_colour(pixels.to(dtype), None, params, colour_backend), pixels)


def test_colour_chain_multiplies_by_pixel_weights(colour_backend, rng):
    """Each output pixel times its weight, after the whole chain: against the reference's result multiplied
    afterwards (what the view builder did before the weights moved into the kernels); zero weights give zeros."""
    n, count = 12, 150
    params = colour_params(n, rng)
    pixels = torch.rand(n, count, 3, generator=rng, dtype=torch.float64) * 2 - 1
    mean_pixels = torch.rand(n, 64, 3, generator=rng, dtype=torch.float64) * 2 - 1
    weights = torch.rand(n, count, generator=rng, dtype=torch.float64)
    weights[:, :20] = 0.0
    weights[:, 20:60] = 1.0
    expected = run_colour(pixels, mean_pixels, params, "torch") * weights[..., None]
    dtype = working_dtype(colour_backend)
    got = run_colour(pixels.to(dtype), mean_pixels.to(dtype), params, colour_backend, weights.to(dtype))
    assert_close(got, expected, dtype=dtype)
    assert bool((got[:, :20] == 0).all())
    unweighted = run_colour(pixels.to(dtype), mean_pixels.to(dtype), params, colour_backend)
    assert torch.equal(got[:, 20:60], unweighted[:, 20:60])  # a weight of one changes nothing


def test_colour_chain_rejects_pixel_weights_of_another_shape(colour_backend, rng):
    params = colour_params(4, rng)
    pixels = torch.rand(4, 10, 3, generator=rng)
    with pytest.raises(ValueError, match=r"pixel_weights must be float \[N, T\] = \[4, 10\]"):
        run_colour(pixels, None, params, colour_backend, pixel_weights=torch.ones(4, 9))


def test_colour_chain_rejects_bad_arguments(colour_backend, rng):
    n = 4
    params = colour_params(n, rng)
    pixels = torch.rand(n, 10, 3, generator=rng)
    with pytest.raises(ValueError, match=r"pixels \[N, T, 3\]"):
        run_colour(pixels[..., :2], None, params, colour_backend)
    with pytest.raises(ValueError, match="mean_pixels must be"):
        run_colour(pixels, torch.rand(n - 1, 5, 3), params, colour_backend)
    with pytest.raises(ValueError, match="factors and order"):
        run_colour(pixels, None, params._replace(order=params.order[:, :3]), colour_backend)
    with pytest.raises(ValueError, match="gray must be bool"):
        run_colour(pixels, None, params._replace(gray=params.gray.float()), colour_backend)


def test_triton_colour_chain_in_bfloat16(rng):
    """bfloat16 storage, float32 arithmetic: against the float64 reference on the same (rounded) inputs, within
    bfloat16's rounding of the result."""
    _skip_unless_available("triton")
    n = 32
    params = colour_params(n, rng)
    pixels = (torch.rand(n, 200, 3, generator=rng) * 2 - 1).bfloat16()
    mean_pixels = (torch.rand(n, 64, 3, generator=rng) * 2 - 1).bfloat16()
    got = run_colour(pixels, mean_pixels, params, "triton")
    assert got.dtype == torch.bfloat16
    assert_close(got, run_colour(pixels.double(), mean_pixels.double(), params, "torch"))


def test_colour_chain_rejects_op_ids_outside_the_chain(colour_backend, rng):
    n = 3
    params = colour_params(n, rng, jitter_p=1.0)
    bad = params.order.clone()
    bad[1, 2] = 4
    with pytest.raises(ValueError, match="op ids 0..3 .*, got 4 for view 1"):
        run_colour(torch.rand(n, 10, 3), None, params._replace(order=bad), colour_backend)


def test_cpu_kernel_itself_rejects_op_ids_outside_the_chain(rng):
    """The raw op checks too, for callers that skip the Python wrapper."""
    _skip_unless_available("cpu")
    n = 3
    params = colour_params(n, rng, jitter_p=1.0)
    bad = params.order.clone()
    bad[1, 2] = 4
    flags = (params.jitter, params.gray, params.solarize)
    with pytest.raises(RuntimeError, match="op ids 0..3, got 4 for view 1"):
        torch.ops.lafs_kernels._dino_colour(torch.rand(n, 10, 3), None, params.factors.float(), bad, *flags)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_colour_chain_on_cuda_picks_triton_and_matches_the_reference(dtype, rng):
    """On CUDA tensors the builder's default (Triton, one launch) against the float64 reference on the CPU."""
    n = 64
    params = colour_params(n, rng)
    pixels = (torch.rand(n, 2304, 3, generator=rng) * 2 - 1).to(dtype)
    mean_pixels = (torch.rand(n, 256, 3, generator=rng) * 2 - 1).to(dtype)
    assert dino_colour.BACKENDS.select(dino_colour.Call(torch.device("cuda"), dtype), env=False) == "triton"
    got = run_colour(pixels.cuda(), mean_pixels.cuda(), params, None)
    assert got.device.type == "cuda" and got.dtype == dtype
    assert_close(got.cpu(), run_colour(pixels.double(), mean_pixels.double(), params, "torch"))


# --------------------------------------------------------------------------- under autocast


def test_blur_and_colour_chain_keep_their_dtype_under_autocast(rng):
    """The reference paths (the blur's on CUDA tensors) under autocast: conv2d and the luma matmul would run and
    return bfloat16; the ops keep the images' dtype and give the same pixels as without autocast."""
    images = torch.rand(3, 3, 20, 20, generator=rng)
    sigma = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    params = colour_params(4, rng)
    pixels = torch.rand(4, 64, 3, generator=rng) * 2 - 1
    blurred = gaussian_blur.gaussian_blur(images, sigma, backend="torch")
    coloured = run_colour(pixels, None, params, "torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        blurred_autocast = gaussian_blur.gaussian_blur(images, sigma, backend="torch")
        coloured_autocast = run_colour(pixels, None, params, "torch")
    assert blurred_autocast.dtype == coloured_autocast.dtype == torch.float32
    assert torch.equal(blurred_autocast, blurred)
    assert torch.equal(coloured_autocast, coloured)
