"""Colour augmentation on tokens (lafs.ssl.token_colour) against the same draws on whole crops (lafs.ssl.augment)."""

import math

import pytest
import torch

from lafs.data.synthetic import SyntheticFaces
from lafs.ssl.augment import (
    _BLUR_RADIUS,
    _gaussian_blur,
    apply_colour_,
    draw_colour_parameters,
    jitter_and_gray_,
    solarize_,
)
from lafs.ssl.token_colour import colour_tokens

from tolerances import assert_close

P = 4
# "torch": the reference of lafs_kernels' dino_colour_tokens; None: what the builder picks (the C++ kernel on CPU)
COLOUR_BACKENDS = pytest.mark.parametrize("backend", ["torch", None], ids=["torch", "default"])


def crop_pixels_as_tokens(crops: torch.Tensor) -> torch.Tensor:
    """[N, 3, S, S] in [0, 1] -> tokens [N, K, P*P*3] in [-1, 1] that hold every pixel once (feature
    (i * P + j) * 3 + c, i the x offset), i.e. patches at pixel centres, no interpolation."""
    n, c, s, _ = crops.shape
    tiles = crops.mul(2).sub(1).view(n, c, s // P, P, s // P, P)  # n, c, ty, j, tx, i
    return tiles.permute(0, 2, 4, 5, 3, 1).reshape(n, (s // P) ** 2, P * P * c)


def faces(n: int) -> torch.Tensor:
    data = SyntheticFaces(n, 1, seed=11, colours="per_identity")
    return torch.stack([data[i][0] for i in range(n)]).add(1).mul(0.5)  # [n, 3, 112, 112] in [0, 1]


def params_without_blur(n, generator, **kw):
    p = torch.full((n,), 0.5, dtype=torch.float64)
    params = draw_colour_parameters(n, torch.zeros(n, dtype=torch.float64), p, generator, **kw)
    return params


@COLOUR_BACKENDS
def test_tokens_get_exactly_the_crops_colours_when_the_mean_is_the_crops(rng, backend):
    """Every step is per pixel once the contrast's mean is the crop's own: with all of the crop's pixels as the
    view samples, the tokens are the coloured crop's pixels (float rounding)."""
    n, s = 48, 16  # 48 views: some grayed (1 - 0.7^48), some solarised, with any salt
    crops = torch.rand(n, 3, s, s, generator=rng)
    params = params_without_blur(n, rng, jitter_p=0.9, grayscale_p=0.3)
    assert params.jitter.any() and params.gray.any() and params.solarize.any()
    expected = crop_pixels_as_tokens(apply_colour_(crops.clone(), params))
    tokens = crop_pixels_as_tokens(crops)
    got = colour_tokens(tokens, params, view_samples=tokens, backend=backend)
    assert_close(got, expected)


@COLOUR_BACKENDS
def test_subset_of_tokens_with_the_whole_view_as_samples(rng, backend):
    """Only some patches of the view as tokens (a local view), the whole view as the samples: still exact."""
    n, s = 12, 16
    crops = torch.rand(n, 3, s, s, generator=rng)
    params = params_without_blur(n, rng, jitter_p=1.0)
    all_tokens = crop_pixels_as_tokens(crops)
    keep = torch.randint(0, all_tokens.shape[1], (5,), generator=rng)
    expected = crop_pixels_as_tokens(apply_colour_(crops.clone(), params))[:, keep]
    assert_close(colour_tokens(all_tokens[:, keep], params, view_samples=all_tokens, backend=backend), expected)


@COLOUR_BACKENDS
def test_per_pixel_steps_need_no_samples(rng, backend):
    """Without jitter (brightness / saturation / hue / contrast) the chain is per pixel: no samples needed."""
    n, s = 16, 8
    crops = torch.rand(n, 3, s, s, generator=rng)
    params = params_without_blur(n, rng, jitter_p=0.0, grayscale_p=0.5)
    expected = crop_pixels_as_tokens(apply_colour_(crops.clone(), params))
    assert_close(colour_tokens(crop_pixels_as_tokens(crops), params, backend=backend), expected)


def test_contrast_mean_from_a_16x16_grid_of_samples():
    """The builder's approximation: the contrast's mean from 16 x 16 samples of the view instead of all of its
    pixels.  On synthetic faces (112 x 112) the tokens then differ from the whole-crop result by at most 0.02
    (in [0, 1]; reported)."""
    n = 16
    crops = faces(n)
    params = params_without_blur(n, torch.Generator().manual_seed(4), jitter_p=1.0)
    tokens = crop_pixels_as_tokens(crops)
    grid = crops[:, :, 3::7, 3::7]  # every 7th pixel: 16 x 16 cell centres
    samples = crop_pixels_as_tokens(grid)
    got = colour_tokens(tokens, params, view_samples=samples)
    expected = crop_pixels_as_tokens(apply_colour_(crops.clone(), params))
    error = (got - expected).abs().mul(0.5)  # back to [0, 1] units
    print(f"contrast mean from 16x16 samples: max |error| {error.max():.4f}, mean {error.mean():.6f}")
    assert error.max() < 0.02


def test_blurring_the_source_before_the_colour_against_blurring_the_coloured_crop():
    """The builder blurs the source, then colours (the crop path: colour, then blur).  Grayscale, brightness,
    contrast and saturation are linear per pixel and commute with the blur up to clamping; hue does not.
    On synthetic faces the mean |difference| stays below 0.01 and the 99th percentile below 0.05
    (in [0, 1]; reported)."""
    n = 16
    crops = faces(n)
    gen = torch.Generator().manual_seed(5)
    params = draw_colour_parameters(n, torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), gen)
    expected = apply_colour_(crops.clone(), params)
    blurred_first = _gaussian_blur(crops.clone(), params.sigma)
    got = solarize_(jitter_and_gray_(blurred_first, params), params)
    error = (got - expected).abs()
    q99 = error.flatten().kthvalue(math.ceil(0.99 * error.numel())).values
    print(f"blur before colour: mean |difference| {error.mean():.5f}, 99th percentile {q99:.4f}, max {error.max():.4f}")
    assert error.mean() < 0.01 and q99 < 0.05


def test_blur_with_per_axis_sigma():
    image = torch.zeros(1, 3, 25, 25, dtype=torch.float64)
    image[:, :, 12, 12] = 1.0
    out = _gaussian_blur(
        image, torch.tensor([0.8], dtype=torch.float64), torch.tensor([1.7], dtype=torch.float64), radius=_BLUR_RADIUS
    )
    taps = torch.arange(25, dtype=torch.float64) - 12
    gx = torch.exp(-(taps**2) / (2 * 0.8**2)) * (taps.abs() <= _BLUR_RADIUS)
    gy = torch.exp(-(taps**2) / (2 * 1.7**2)) * (taps.abs() <= _BLUR_RADIUS)
    assert_close(out[0], (gy[:, None] * gx[None, :] / gx.sum() / gy.sum()).expand(3, 25, 25))
    same = torch.tensor([1.3], dtype=torch.float64)
    assert torch.equal(_gaussian_blur(image, same), _gaussian_blur(image, same, same))
