"""Batched image augmentations of DINO / LAFS on tensors, with per-sample random parameters.

Every function takes a ``torch.Generator`` (on the CPU) and draws its random
numbers from it in a fixed order, so a seed reproduces the same augmentations on
any device; the work itself runs on the images' device with torch ops.

- ``random_resized_crops``: torchvision's ``RandomResizedCrop`` (scale range, aspect
  ratio 3/4..4/3, ten tries then a central fallback) plus a horizontal flip with
  probability 1/2, done as one bicubic ``grid_sample`` per batch.
- ``colour_augment``: DINO's photometric chain on images in [0, 1]: colour jitter
  (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in a random order per
  image) with probability 0.8, grayscale with probability 0.2, Gaussian blur
  (sigma uniform in [0.1, 2]) and solarisation (invert values >= 0.5) with
  per-image probabilities.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_LUMA = (0.299, 0.587, 0.114)
_BLUR_SIGMA = (0.1, 2.0)
_BLUR_RADIUS = math.ceil(3 * _BLUR_SIGMA[1])
_CROP_TRIES = 10
_JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}


def _uniform(n: int, low: float, high: float, generator: torch.Generator, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, *shape, generator=generator, dtype=torch.float64)


def random_crop_boxes(
    n: int, height: int, width: int, scale: tuple[float, float], generator: torch.Generator,
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


def random_resized_crops(
    images: torch.Tensor, size: int, scale: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """Random resized crop + random horizontal flip: ``[N, C, H, W] -> [N, C, size, size]``.

    Values are clamped to the input's range (bicubic interpolation overshoots).
    """
    n, _, height, width = images.shape
    boxes = random_crop_boxes(n, height, width, scale, generator)
    flip = torch.rand(n, generator=generator) < 0.5
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size  # output pixel centres in (0, 1)
    u = torch.where(flip[:, None], 1.0 - centres, centres)  # [N, size]
    x = boxes[:, 0:1] + u * boxes[:, 2:3]  # input coordinates, pixel k spanning [k, k+1]
    y = boxes[:, 1:2] + centres * boxes[:, 3:4]
    grid_x = (2.0 * x / width - 1.0)[:, None, :].expand(n, size, size)
    grid_y = (2.0 * y / height - 1.0)[:, :, None].expand(n, size, size)
    grid = torch.stack((grid_x, grid_y), dim=-1).to(device=images.device, dtype=images.dtype)
    crops = F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return crops.clamp(images.amin(), images.amax())


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W] -> [N, 1, H, W]`` luma (ITU-R 601)."""
    r, g, b = x.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = factor.view(-1, 1, 1, 1)
    return (factor * x + (1.0 - factor) * other).clamp(0.0, 1.0)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    chroma = maxc - minc
    safe_chroma = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    sat = chroma / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    rc, gc, bc = (maxc - r) / safe_chroma, (maxc - g) / safe_chroma, (maxc - b) / safe_chroma
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.remainder(hue / 6.0, 1.0)
    return torch.stack((hue, sat, maxc), dim=1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    hue, sat, val = x.unbind(dim=1)
    sector = torch.floor(hue * 6.0)
    frac = hue * 6.0 - sector
    sector = sector.long() % 6
    p = val * (1.0 - sat)
    q = val * (1.0 - sat * frac)
    t = val * (1.0 - sat * (1.0 - frac))
    candidates = torch.stack((val, q, p, p, t, val, t, val, val, q, p, p, p, p, t, val, val, q), dim=1)
    # candidates holds, for each of r, g, b, the value in sectors 0..5: [N, 18, H, W] -> [N, 3, 6, H, W]
    candidates = candidates.view(x.shape[0], 3, 6, *x.shape[2:])
    pick = sector.unsqueeze(1).unsqueeze(2).expand(-1, 3, 1, -1, -1)
    return candidates.gather(2, pick).squeeze(2)


def _adjust(x: torch.Tensor, op: str, factor: torch.Tensor) -> torch.Tensor:
    if op == "brightness":
        return (x * factor.view(-1, 1, 1, 1)).clamp(0.0, 1.0)
    if op == "contrast":
        return _blend(x, _grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)
    if op == "saturation":
        return _blend(x, _grayscale(x), factor)
    hsv = _rgb_to_hsv(x)
    hue = torch.remainder(hsv[:, 0] + factor.view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(torch.stack((hue, hsv[:, 1], hsv[:, 2]), dim=1))


def _colour_jitter(x: torch.Tensor, apply: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Jitter the images where ``apply [N]`` is set, each with its own factors and op order."""
    n = x.shape[0]
    ops = list(_JITTER)
    factors = {
        op: (_uniform(n, -s, s, generator) if op == "hue" else _uniform(n, 1 - s, 1 + s, generator)).to(x.dtype)
        for op, s in _JITTER.items()
    }
    order = torch.rand(n, len(ops), generator=generator).argsort(dim=1)  # a random permutation per image
    out = x.clone()
    for stage in range(len(ops)):
        for k, op in enumerate(ops):
            rows = torch.nonzero(apply & (order[:, stage] == k)).squeeze(1)
            if rows.numel():
                rows_dev = rows.to(x.device)
                out[rows_dev] = _adjust(out[rows_dev], op, factors[op][rows].to(x.device))
    return out


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, one sigma per image (``sigma [N]``), reflect padding."""
    n, c, h, w = x.shape
    taps = torch.arange(-_BLUR_RADIUS, _BLUR_RADIUS + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(device=x.device, dtype=x.dtype)
    kernel = kernel.repeat_interleave(c, dim=0)  # [N*C, taps]
    flat = F.pad(x.reshape(1, n * c, h, w), (_BLUR_RADIUS,) * 4, mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)
    return flat.view(n, c, h, w)


def colour_augment(
    images: torch.Tensor,
    blur_p: torch.Tensor,
    solarize_p: torch.Tensor,
    generator: torch.Generator,
    jitter_p: float = 0.8,
    grayscale_p: float = 0.2,
) -> torch.Tensor:
    """DINO's colour augmentation of ``images [N, 3, H, W]`` in [0, 1]; returns a new tensor.

    ``blur_p [N]`` and ``solarize_p [N]`` are per-image probabilities (DINO / LAFS use
    blur 1.0 for the first global view, 0.1 plus solarisation 0.2 for the second,
    blur 0.5 for local views).
    """
    n = images.shape[0]
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"colour_augment needs RGB images [N, 3, H, W], got {tuple(images.shape)}")
    if blur_p.shape != (n,) or solarize_p.shape != (n,):
        raise ValueError(
            f"colour_augment: blur_p and solarize_p must be [{n}], got {tuple(blur_p.shape)}, {tuple(solarize_p.shape)}"
        )
    do_jitter = torch.rand(n, generator=generator) < jitter_p
    do_gray = torch.rand(n, generator=generator) < grayscale_p
    do_blur = torch.rand(n, generator=generator) < blur_p.cpu()
    sigma = _uniform(n, _BLUR_SIGMA[0], _BLUR_SIGMA[1], generator)
    do_solarize = torch.rand(n, generator=generator) < solarize_p.cpu()

    out = _colour_jitter(images, do_jitter, generator)
    out = torch.where(do_gray.to(images.device).view(-1, 1, 1, 1), _grayscale(out).expand_as(out), out)
    blur_rows = torch.nonzero(do_blur).squeeze(1)
    if blur_rows.numel():
        rows_dev = blur_rows.to(images.device)
        out[rows_dev] = _gaussian_blur(out[rows_dev], sigma[blur_rows])
    return torch.where(do_solarize.to(images.device).view(-1, 1, 1, 1) & (out >= 0.5), 1.0 - out, out)
