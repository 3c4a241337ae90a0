"""Batched image augmentations of DINO / LAFS on tensors, with per-sample random parameters.

Every function takes a ``torch.Generator`` (on the CPU) and draws its random
numbers from it in a fixed order, so a seed reproduces the same augmentations on
any device; the work itself runs on the images' device with torch ops.

- ``random_resized_crops``: torchvision's ``RandomResizedCrop`` (scale range, aspect
  ratio 3/4..4/3, ten tries then a central fallback) plus a horizontal flip with
  probability 1/2, bicubic, as two batched matrix products (the grid is separable);
  ``random_crop_parameters`` draws the boxes and flips alone (the fused view path turns
  them into the gather's affine), ``resized_crops`` resamples given ones.
- ``colour_augment``: DINO's photometric chain on images in [0, 1]: colour jitter
  (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in a random order per
  image) with probability 0.8, grayscale with probability 0.2, Gaussian blur
  (sigma uniform in [0.1, 2]) and solarisation (invert values >= 0.5) with
  per-image probabilities.  On the CPU these passes are memory-bound, so each
  works in place on just the images it changes.  ``draw_colour_parameters`` draws
  everything random once (``ColourParameters``); ``jitter_and_gray_``, ``blur_`` and
  ``solarize_`` apply the steps with the reference functions of ``lafs_kernels.ops.dino_colour``
  and ``lafs_kernels.ops.gaussian_blur``, whose token kernels the fused view path
  (``lafs.ssl.token_colour``) runs on the same draws.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from lafs_kernels.ops.dino_colour import JITTER_OPS
from lafs_kernels.ops.dino_colour import change_rows_ as _change_rows_
from lafs_kernels.ops.dino_colour import colour_jitter_ as _colour_jitter_
from lafs_kernels.ops.dino_colour import grayscale as _grayscale
from lafs_kernels.ops.dino_colour import solarize_ as _solarize_images_
from lafs_kernels.ops.gaussian_blur import gaussian_blur

_BLUR_SIGMA = (0.1, 2.0)
_BLUR_RADIUS = math.ceil(3 * _BLUR_SIGMA[1])
_CROP_TRIES = 10
_JITTER = dict(zip(JITTER_OPS, (0.4, 0.4, 0.2, 0.1)))  # strengths: brightness, contrast, saturation, hue


def _uniform(n: int, low: float, high: float, generator: torch.Generator, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, *shape, generator=generator, dtype=torch.float64)


def random_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    generator: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Crop boxes ``[n, 4]`` float64 ``(x0, y0, w, h)`` in pixels, as torchvision's RandomResizedCrop draws them."""
    area = height * width
    target_area = area * _uniform(n, scale[0], scale[1], generator, _CROP_TRIES)
    aspect = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator, _CROP_TRIES))
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # first try that fits
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    x0 = torch.floor(torch.rand(n, generator=generator, dtype=torch.float64) * (width - w + 1))
    y0 = torch.floor(torch.rand(n, generator=generator, dtype=torch.float64) * (height - h + 1))

    # No try fits: the largest central crop whose aspect ratio lies within `ratio`.
    in_ratio = width / height
    fw, fh = float(width), float(height)
    if in_ratio < ratio[0]:
        fh = float(round(fw / ratio[0]))
    elif in_ratio > ratio[1]:
        fw = float(round(fh * ratio[1]))
    none_fit = ~fits.any(dim=1)
    w = torch.where(none_fit, fw, w)
    h = torch.where(none_fit, fh, h)
    x0 = torch.where(none_fit, float((width - fw) // 2), x0)
    y0 = torch.where(none_fit, float((height - fh) // 2), y0)
    return torch.stack((x0, y0, w, h), dim=1)


_CUBIC_A = -0.75  # the cubic convolution parameter of PyTorch's bicubic grid_sample / interpolate


def _cubic_weights(t: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` weights of the taps at -1, 0, 1, 2 around a position ``t`` in [0, 1) past a pixel centre."""
    a = _CUBIC_A

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return torch.stack((far(t + 1), near(t), near(1 - t), far(2 - t)), dim=-1)


def _bicubic_matrix(positions: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, K, size]`` float64: row k interpolates a signal of ``size`` samples at ``positions [N, K]``
    (pixel centres at integers), taps past either end clamped to the edge (border padding)."""
    base = torch.floor(positions)
    taps = (base.long()[..., None] + torch.arange(-1, 3, device=positions.device)).clamp_(0, size - 1)  # [N, K, 4]
    matrix = positions.new_zeros(*positions.shape, size)
    return matrix.scatter_add_(2, taps, _cubic_weights(positions - base))


def random_crop_parameters(
    n: int, height: int, width: int, scale: tuple[float, float], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(boxes ``[n, 4]`` float64 ``(x0, y0, w, h)``, flips ``[n]`` bool): the random draws of
    :func:`random_resized_crops`, in its order (boxes, then the flips)."""
    boxes = random_crop_boxes(n, height, width, scale, generator)
    return boxes, torch.rand(n, generator=generator) < 0.5


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, C, H, W] -> [N, C, size, size]``: box n of image n resized to ``size``, mirrored where ``flips[n]``.

    Bicubic (as ``grid_sample(mode="bicubic", padding_mode="border")``), done as two
    matrix products per image, rows then columns, since the sampling grid is separable.
    Values are clamped to the input's range (bicubic interpolation overshoots).
    """
    n, c, height, width = images.shape
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size  # output pixel centres in (0, 1)
    u = torch.where(flips.cpu()[:, None], 1.0 - centres, centres)  # [N, size]
    boxes = boxes.cpu().to(torch.float64)
    x = boxes[:, 0:1] + u * boxes[:, 2:3]  # input coordinates, pixel k spanning [k, k+1]
    y = boxes[:, 1:2] + centres * boxes[:, 3:4]
    columns = _bicubic_matrix((x - 0.5).to(images.device), width).to(images.dtype)  # [N, size, W]
    rows = _bicubic_matrix((y - 0.5).to(images.device), height).to(images.dtype)  # [N, size, H]
    resized = torch.matmul(images.reshape(n, c * height, width), columns.transpose(1, 2))  # [N, C*H, size]
    crops = torch.matmul(rows.unsqueeze(1), resized.view(n, c, height, size))  # [N, C, size, size]
    return crops.clamp_(images.amin(), images.amax())


def random_resized_crops(
    images: torch.Tensor, size: int, scale: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """Random resized crop + random horizontal flip: ``[N, C, H, W] -> [N, C, size, size]``
    (:func:`random_crop_parameters`, then :func:`resized_crops`)."""
    n, _, height, width = images.shape
    boxes, flips = random_crop_parameters(n, height, width, scale, generator)
    return resized_crops(images, boxes, flips, size)


class ColourParameters(NamedTuple):
    """The random draws of DINO's colour augmentation for N images (CPU tensors).

    jitter, gray, blur, solarize: [N] bool, whether each step changes image n;
    sigma: [N] float64 blur sigma in pixels; factors: [N, 4] float64 brightness, contrast,
    saturation factors and hue shift (turns); order: [N, 4] int64 the jitter ops' order.
    """

    jitter: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor


def draw_colour_parameters(
    n: int,
    blur_p: torch.Tensor,
    solarize_p: torch.Tensor,
    generator: torch.Generator,
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
) -> ColourParameters:
    """Draw :class:`ColourParameters` from ``generator`` in a fixed order: which images are jittered,
    grayed, blurred, the sigmas, which are solarised, the four jitter factors (each [N]), the op order.

    ``blur_p [N]`` and ``solarize_p [N]`` are per-image probabilities (DINO / LAFS use
    blur 1.0 for the first global view, 0.1 plus solarisation 0.2 for the second,
    blur 0.5 for local views).
    """
    if blur_p.shape != (n,) or solarize_p.shape != (n,):
        raise ValueError(
            f"colour_augment: blur_p and solarize_p must be [{n}], got {tuple(blur_p.shape)}, {tuple(solarize_p.shape)}"
        )
    jitter = torch.rand(n, generator=generator) < jitter_p
    gray = torch.rand(n, generator=generator) < grayscale_p
    blur = torch.rand(n, generator=generator) < blur_p.cpu()
    sigma = _uniform(n, _BLUR_SIGMA[0], _BLUR_SIGMA[1], generator)
    solarize = torch.rand(n, generator=generator) < solarize_p.cpu()
    factors = torch.stack(
        [
            _uniform(n, -s, s, generator) if op == "hue" else _uniform(n, 1 - s, 1 + s, generator)
            for op, s in _JITTER.items()
        ],
        dim=1,
    )
    order = torch.rand(n, len(_JITTER), generator=generator).argsort(dim=1)  # a random permutation per image
    return ColourParameters(jitter, gray, blur, sigma, solarize, factors, order)


def jitter_and_gray_(
    x: torch.Tensor, params: ColourParameters, mean_start: int = 0, dense: bool = False
) -> torch.Tensor:
    """In place on ``x [N, 3, H, W]`` in [0, 1]: the colour jitter, then grayscale (``mean_start``, ``dense``:
    see ``_blend_`` and ``_colour_jitter_``)."""
    _colour_jitter_(x, params.jitter, params.factors, params.order, mean_start, dense)
    return _change_rows_(x, params.gray, lambda images, rows: _grayscale(images).expand_as(images))


def _gaussian_blur(
    x: torch.Tensor, sigma: torch.Tensor, sigma_y: Optional[torch.Tensor] = None, radius: int = _BLUR_RADIUS
) -> torch.Tensor:
    """The reference blur (``lafs_kernels.ops.gaussian_blur``'s torch backend: depthwise conv2d, as
    torchvision's): the original path's, one sigma per image (``sigma_y`` along H if it differs)."""
    return gaussian_blur(x, sigma, sigma_y, radius, backend="torch")


def blur_(x: torch.Tensor, params: ColourParameters) -> torch.Tensor:
    """In place: Gaussian blur of the images ``params.blur`` selects, each with its sigma."""
    return _change_rows_(x, params.blur, lambda images, rows: _gaussian_blur(images, params.sigma[rows]))


def solarize_(x: torch.Tensor, params: ColourParameters) -> torch.Tensor:
    """In place: solarisation (values >= 0.5 inverted) of the images ``params.solarize`` selects."""
    return _solarize_images_(x, params.solarize)


def apply_colour_(x: torch.Tensor, params: ColourParameters) -> torch.Tensor:
    """In place on ``x [N, 3, H, W]`` in [0, 1]: jitter, grayscale, blur, solarisation, each only on the
    images it changes."""
    return solarize_(blur_(jitter_and_gray_(x, params), params), params)


def colour_augment(
    images: torch.Tensor,
    blur_p: torch.Tensor,
    solarize_p: torch.Tensor,
    generator: torch.Generator,
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
) -> torch.Tensor:
    """DINO's colour augmentation of ``images [N, 3, H, W]`` in [0, 1]; returns a new tensor
    (:func:`draw_colour_parameters`, then :func:`apply_colour_` on a copy)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"colour_augment needs RGB images [N, 3, H, W], got {tuple(images.shape)}")
    params = draw_colour_parameters(images.shape[0], blur_p, solarize_p, generator, jitter_p, grayscale_p)
    return apply_colour_(images.clone(), params)
