"""DINO's per-pixel colour chain (LAFS pretraining's views): colour jitter in a random order per image,
grayscale and solarisation, on whole images (the reference) and on the pixels of patch tokens.

Reference (``torch``), on images ``x [N, 3, H, W]`` in [0, 1], each step in place and only on the
images it changes: :func:`colour_jitter_` (brightness, contrast and saturation blends, hue rotation, in
each image's own order), :func:`grayscale`, solarisation.  :func:`dino_colour_tokens` runs the chain on
token pixels ``[N, T, 3]`` in [-1, 1]; its ``cpu`` backend is the C++ kernel
``csrc/cpu/dino_colour.cpp`` (float32 / float64 on CPU tensors), its ``triton`` backend (preferred on
CUDA; float32 / bfloat16 / float16, computing in float32) ``lafs_kernels/triton/dino_colour.py``: each
takes every pixel through the whole chain in one pass, one launch per call.  The contrast blends with
the mean gray of ``mean_pixels`` (samples standing for the whole view) after the ops before it, or of
the pixels themselves.  ``LAFS_KERNELS_BACKEND`` does not apply here; ``backend=`` does.

Per-image parameters (``factors [N, 4]``: brightness, contrast, saturation factors and the hue shift in
turns; ``order [N, 4]`` a permutation of the op ids 0..3 in ``JITTER_OPS``' order; ``jitter``, ``gray``,
``solarize [N]`` bool) are drawn by ``lafs.ssl.augment.draw_colour_parameters``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._dispatch import Call, reference_and_kernels, register
from ._autocast import autocast_off

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
_LUMA = (0.299, 0.587, 0.114)

BACKENDS = register(reference_and_kernels("dino_colour_tokens", triton=True))


def grayscale(x: Tensor) -> Tensor:
    """``[N, 3, H, W] -> [N, 1, H, W]`` luma (ITU-R 601)."""
    luma = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3)
    return torch.matmul(luma, x.reshape(x.shape[0], 3, -1)).view(x.shape[0], 1, *x.shape[2:])


def blend_(
    x: Tensor,
    factor: Tensor,
    gray_weight: Tensor,
    mean_weight: Tensor,
    mean_start: int = 0,
) -> Tensor:
    """In place: ``x <- clamp(f * x + (1 - f) * (a * gray + b * mean(gray)), 0, 1)``, one f, a, b [N] per image.

    Brightness is a = b = 0, contrast a = 0, b = 1, saturation a = 1, b = 0 (as torchvision).
    ``mean(gray)`` is over the pixels from flat position ``mean_start`` on (0: the whole image; the
    token path puts the samples that stand for its view after its tokens).
    """
    gray = grayscale(x)
    mean = gray.flatten(1)[:, mean_start:].mean(dim=1).view(-1, 1, 1, 1)
    other = gray.mul_(gray_weight.view(-1, 1, 1, 1)).add_(mean * mean_weight.view(-1, 1, 1, 1))
    factor = factor.view(-1, 1, 1, 1)
    return x.mul_(factor).add_(other.mul_(1.0 - factor)).clamp_(0.0, 1.0)


_HUE_CHANNEL_OFFSETS = (5.0, 3.0, 1.0)  # n of r, g, b in the HSV -> RGB formula


def shift_hue_(x: Tensor, shift: Tensor) -> Tensor:
    """In place: rotate the HSV hue of ``x [N, 3, H, W]`` in [0, 1] by ``shift [N]`` turns.

    Saturation and value stay; hue, value V and chroma C = V - min give each channel
    back directly: ``V - C * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 * hue) mod 6``
    and n = 5, 3, 1 for r, g, b (the standard HSV -> RGB formula), so no HSV image is
    built.
    """
    r, g, b = x.unbind(dim=1)
    value = x.amax(dim=1, keepdim=True)
    chroma = value - x.amin(dim=1, keepdim=True)
    flat_value, flat_chroma = value.squeeze(1), chroma.squeeze(1)
    # 6 * hue (before the mod), as colorsys: the sector of the largest channel plus the offset within it
    sixths = torch.where(
        flat_value == r, g - b, torch.where(flat_value == g, b - r + 2.0 * flat_chroma, r - g + 4.0 * flat_chroma)
    )
    sixths.div_(flat_chroma.clamp_min(torch.finfo(x.dtype).tiny))  # a gray pixel: 0 / tiny = 0
    sixths.add_(6.0 * shift.view(-1, 1, 1))
    offsets = torch.tensor(_HUE_CHANNEL_OFFSETS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(sixths.unsqueeze(1) + offsets, 6.0)  # [N, 3, H, W]
    k = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0).mul_(chroma)
    return torch.sub(value, k, out=x)


def change_rows_(x: Tensor, chosen: Tensor, change) -> Tensor:
    """In place: ``x[rows] <- change(x[rows], rows)`` for the rows where ``chosen [N]`` (bool, CPU) is set."""
    rows = torch.nonzero(chosen).squeeze(1)
    if rows.numel():
        rows_dev = rows.to(x.device)
        x[rows_dev] = change(x[rows_dev], rows)
    return x


def colour_jitter_(
    x: Tensor,
    apply: Tensor,
    factors: Tensor,
    order: Tensor,
    mean_start: int = 0,
    dense: bool = False,
) -> Tensor:
    """In place: jitter the images where ``apply [N]`` is set, each with its own factors and op order.

    ``factors [N, 4]`` (brightness, contrast, saturation, hue) and ``order [N, 4]`` (a permutation of
    0..3 per image) come from ``lafs.ssl.augment.draw_colour_parameters``.  Per stage of the random order, the
    images whose op there is brightness, contrast or saturation take one ``blend_`` together, those
    whose op is hue one hue shift.  ``mean_start``: see ``blend_``.  ``dense``: the blend runs on every
    image, with factor 1 (exactly the identity on [0, 1]) where an image takes no blend at that stage,
    instead of copying the images that do out and back (cheaper for small images such as tokens).
    """
    hue = JITTER_OPS.index("hue")
    blend_factors = factors[:, :hue].to(x.dtype)  # [N, 3]: brightness, contrast, saturation
    hue_shift = factors[:, hue].to(x.dtype)
    gray_weight = torch.tensor([0.0, 0.0, 1.0], dtype=x.dtype)
    mean_weight = torch.tensor([0.0, 1.0, 0.0], dtype=x.dtype)
    for stage in order.unbind(dim=1):
        blend = apply & (stage != hue)
        if dense and blend.any():
            op = stage.clamp(max=hue - 1)
            factor = torch.where(blend, blend_factors.gather(1, op[:, None]).squeeze(1), 1.0)
            blend_(
                x,
                factor.to(x.device),
                torch.where(blend, gray_weight[op], 0.0).to(x.device),
                torch.where(blend, mean_weight[op], 0.0).to(x.device),
                mean_start,
            )
        elif not dense:
            change_rows_(
                x,
                blend,
                lambda images, rows, stage=stage: blend_(
                    images,
                    blend_factors[rows, stage[rows]].to(x.device),
                    gray_weight[stage[rows]].to(x.device),
                    mean_weight[stage[rows]].to(x.device),
                    mean_start,
                ),
            )
        change_rows_(x, apply & (stage == hue), lambda images, rows: shift_hue_(images, hue_shift[rows].to(x.device)))
    return x


def solarize_(x: Tensor, chosen: Tensor) -> Tensor:
    """In place: values >= 0.5 inverted in the images ``chosen [N]`` (bool, CPU) selects."""
    return change_rows_(x, chosen, lambda images, rows: torch.where(images >= 0.5, 1.0 - images, images))


def _colour_tokens_torch(pixels, mean_pixels, factors, order, jitter, gray, solarize, pixel_weights) -> Tensor:
    n, count = pixels.shape[:2]
    mean_start = 0
    if mean_pixels is not None:
        pixels, mean_start = torch.cat((pixels, mean_pixels), dim=1), count
    # [N, 3, T, 1] in [0, 1], channels first as the image functions expect
    x = pixels.transpose(1, 2).mul(0.5).add_(0.5).contiguous().unsqueeze(-1)
    colour_jitter_(x, jitter, factors, order, mean_start=mean_start, dense=True)
    change_rows_(x, gray, lambda images, rows: grayscale(images).expand_as(images))
    out = solarize_(x[:, :, :count], solarize)[..., 0].mul_(2.0).sub_(1.0).transpose(1, 2).contiguous()
    return out if pixel_weights is None else out.mul_(pixel_weights[..., None])


def dino_colour_tokens(
    pixels: Tensor,
    mean_pixels: Optional[Tensor],
    factors: Tensor,
    order: Tensor,
    jitter: Tensor,
    gray: Tensor,
    solarize: Tensor,
    backend: Optional[str] = None,
    pixel_weights: Optional[Tensor] = None,
) -> Tensor:
    """The colour chain on ``pixels [N, T, 3]`` in [-1, 1] (each view's token pixels, RGB last); returns a
    new ``[N, T, 3]`` in [-1, 1].

    ``mean_pixels [N, M, 3]``: pixels whose mean gray the contrast uses (None: ``pixels``); the other
    arguments: see the module docstring.  ``backend``: "torch", "cpu" or "triton" (None: the best that can
    run).  ``pixel_weights [N, T]``: each output pixel is multiplied by its weight after the chain (the view
    builder's zero padding beyond a view's edge; None: no multiply).
    """
    n = pixels.shape[0]
    if pixels.dim() != 3 or pixels.shape[2] != 3 or not pixels.is_floating_point():
        raise ValueError(
            f"dino_colour_tokens needs float RGB pixels [N, T, 3], got {tuple(pixels.shape)} {pixels.dtype}"
        )
    if mean_pixels is not None and (mean_pixels.dim() != 3 or mean_pixels.shape[::2] != (n, 3)):
        raise ValueError(f"dino_colour_tokens: mean_pixels must be [N={n}, M, 3], got {tuple(mean_pixels.shape)}")
    if mean_pixels is not None and mean_pixels.device != pixels.device:
        raise ValueError(f"dino_colour_tokens: mean_pixels are on {mean_pixels.device}, the pixels on {pixels.device}")
    if factors.shape != (n, 4) or order.shape != (n, 4):
        raise ValueError(
            f"dino_colour_tokens: factors and order must be [N={n}, 4], got {tuple(factors.shape)}, "
            f"{tuple(order.shape)}"
        )
    if pixel_weights is not None:
        if (
            pixel_weights.shape != pixels.shape[:2]
            or not pixel_weights.is_floating_point()
            or pixel_weights.device != pixels.device
        ):
            raise ValueError(
                f"dino_colour_tokens: pixel_weights must be float [N, T] = {list(pixels.shape[:2])} on "
                f"{pixels.device}, got {tuple(pixel_weights.shape)} {pixel_weights.dtype} on {pixel_weights.device}"
            )
        pixel_weights = pixel_weights.to(pixels.dtype).contiguous()
    for name, flag in (("jitter", jitter), ("gray", gray), ("solarize", solarize)):
        if flag.shape != (n,) or flag.dtype != torch.bool:
            raise ValueError(f"dino_colour_tokens: {name} must be bool [N={n}], got {tuple(flag.shape)} {flag.dtype}")
    jitter, gray, solarize, order = jitter.cpu(), gray.cpu(), solarize.cpu(), order.cpu()
    outside = torch.nonzero((order < 0) | (order >= len(JITTER_OPS)))
    if outside.numel():
        view, stage = outside[0].tolist()
        raise ValueError(
            f"dino_colour_tokens: order must hold the op ids 0..3 {JITTER_OPS}, got {int(order[view, stage])} "
            f"for view {view}"
        )
    name = BACKENDS.select(Call(device=pixels.device, dtype=pixels.dtype), backend, env=False)
    if name == "triton":
        from ..triton.dino_colour import dino_colour

        mean_pixels = None if mean_pixels is None else mean_pixels.to(pixels.dtype).contiguous()
        return dino_colour(pixels.contiguous(), mean_pixels, factors, order, jitter, gray, solarize, pixel_weights)
    if name == "cpu":
        if mean_pixels is not None:
            mean_pixels = mean_pixels.to(pixels.dtype).contiguous()
        return torch.ops.lafs_kernels._dino_colour(
            pixels.contiguous(),
            mean_pixels,
            factors.to(device=pixels.device, dtype=pixels.dtype).contiguous(),
            order.to(torch.int64).contiguous(),
            jitter.contiguous(),
            gray.contiguous(),
            solarize.contiguous(),
            pixel_weights,
        )
    # Under autocast the luma matmul would run in bfloat16 / float16: the chain keeps the pixels' dtype.
    with autocast_off(pixels):
        return _colour_tokens_torch(pixels, mean_pixels, factors, order, jitter, gray, solarize, pixel_weights)
