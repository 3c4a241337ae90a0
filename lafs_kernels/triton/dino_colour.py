"""Triton kernel of DINO's colour chain on token pixels (``lafs_kernels.ops.dino_colour``) and its launcher.

One program per view: it first takes the pixels that stand for the whole view (``mean_pixels``, or the
view's own) through the jitter ops before the contrast and sums their gray, then takes every token pixel
through the whole chain (the view's four jitter ops in its order, grayscale, solarisation) in blocks of
``BLOCK`` pixels, in float32 whatever the storage dtype.  An op is chosen per view at run time: each stage
computes the blend and the hue rotation and keeps the one the view's order names (the chain is a few dozen
flops per pixel against 24 bytes moved, so the unused candidate costs nothing measurable).  One launch per
view group replaces the reference's one or more per op.  Optional per-pixel weights multiply the result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import on_device_of

BLOCK = 1024
_FLOAT32_TINY = tl.constexpr(1.1754943508222875e-38)  # float32 tiny: a gray pixel gives 0 / tiny = 0


@triton.jit
def _luma(r, g, b):
    return 0.299 * r + 0.587 * g + 0.114 * b


@triton.jit
def _clamp01(x):
    return tl.minimum(tl.maximum(x, 0.0), 1.0)


@triton.jit
def _hue_channel(sixths, offset, value, chroma):
    """value - chroma * clamp(min(k, 4 - k), 0, 1), k = (offset + sixths) mod 6."""
    a = sixths + offset
    k = a - 6.0 * tl.floor(a / 6.0)
    return value - _clamp01(tl.minimum(k, 4.0 - k)) * chroma


@triton.jit
def _jitter_stage(op, r, g, b, brightness, contrast, saturation, six_shift, mean, active):
    """Jitter op ``op`` (0 brightness, 1 contrast, 2 saturation, 3 hue) on rows r, g, b where ``active``."""
    f = tl.where(op == 0, brightness, tl.where(op == 1, contrast, saturation))
    keep = 1.0 - f
    other = tl.where(op == 2, _luma(r, g, b) * keep, tl.where(op == 1, mean * keep, 0.0))
    blend_r = _clamp01(r * f + other)
    blend_g = _clamp01(g * f + other)
    blend_b = _clamp01(b * f + other)
    value = tl.maximum(tl.maximum(r, g), b)
    chroma = value - tl.minimum(tl.minimum(r, g), b)
    sixths = tl.where(value == r, g - b, tl.where(value == g, (b - r) + 2.0 * chroma, (r - g) + 4.0 * chroma))
    sixths = sixths / tl.maximum(chroma, _FLOAT32_TINY) + six_shift
    hue = op == 3
    new_r = tl.where(hue, _hue_channel(sixths, 5.0, value, chroma), blend_r)
    new_g = tl.where(hue, _hue_channel(sixths, 3.0, value, chroma), blend_g)
    new_b = tl.where(hue, _hue_channel(sixths, 1.0, value, chroma), blend_b)
    return tl.where(active, new_r, r), tl.where(active, new_g, g), tl.where(active, new_b, b)


@triton.jit
def _load_rgb(ptr, row, count, idx, mask):
    """Rows r, g, b in [0, 1] (float32) of pixels idx of row ``row`` of a [N, count, 3] tensor in [-1, 1]."""
    base = ptr + (row * count + idx) * 3
    r = tl.load(base, mask=mask, other=0.0).to(tl.float32) * 0.5 + 0.5
    g = tl.load(base + 1, mask=mask, other=0.0).to(tl.float32) * 0.5 + 0.5
    b = tl.load(base + 2, mask=mask, other=0.0).to(tl.float32) * 0.5 + 0.5
    return r, g, b


@triton.jit
def _colour_kernel(
    pixels_ptr,
    mean_pixels_ptr,
    out_ptr,
    factors_ptr,
    order_ptr,
    flags_ptr,
    weights_ptr,
    T,
    M,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    brightness = tl.load(factors_ptr + n * 4)
    contrast = tl.load(factors_ptr + n * 4 + 1)
    saturation = tl.load(factors_ptr + n * 4 + 2)
    six_shift = 6.0 * tl.load(factors_ptr + n * 4 + 3)
    op0 = tl.load(order_ptr + n * 4)
    op1 = tl.load(order_ptr + n * 4 + 1)
    op2 = tl.load(order_ptr + n * 4 + 2)
    op3 = tl.load(order_ptr + n * 4 + 3)
    jitter = tl.load(flags_ptr + n * 3) != 0
    gray = tl.load(flags_ptr + n * 3 + 1) != 0
    solarize = tl.load(flags_ptr + n * 3 + 2) != 0
    contrast_stage = tl.where(op0 == 1, 0, tl.where(op1 == 1, 1, tl.where(op2 == 1, 2, tl.where(op3 == 1, 3, 4))))
    offsets = tl.arange(0, BLOCK)

    # The contrast's mean gray, after the ops before it.
    gray_sum = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, M, BLOCK):
        idx = start + offsets
        mask = idx < M
        r, g, b = _load_rgb(mean_pixels_ptr, n, M, idx, mask)
        r, g, b = _jitter_stage(
            op0, r, g, b, brightness, contrast, saturation, six_shift, 0.0, jitter & (0 < contrast_stage)
        )
        r, g, b = _jitter_stage(
            op1, r, g, b, brightness, contrast, saturation, six_shift, 0.0, jitter & (1 < contrast_stage)
        )
        r, g, b = _jitter_stage(
            op2, r, g, b, brightness, contrast, saturation, six_shift, 0.0, jitter & (2 < contrast_stage)
        )
        gray_sum += tl.where(mask, _luma(r, g, b), 0.0)
    mean = tl.sum(gray_sum, axis=0) / M

    for start in range(0, T, BLOCK):
        idx = start + offsets
        mask = idx < T
        r, g, b = _load_rgb(pixels_ptr, n, T, idx, mask)
        r, g, b = _jitter_stage(op0, r, g, b, brightness, contrast, saturation, six_shift, mean, jitter)
        r, g, b = _jitter_stage(op1, r, g, b, brightness, contrast, saturation, six_shift, mean, jitter)
        r, g, b = _jitter_stage(op2, r, g, b, brightness, contrast, saturation, six_shift, mean, jitter)
        r, g, b = _jitter_stage(op3, r, g, b, brightness, contrast, saturation, six_shift, mean, jitter)
        luma = _luma(r, g, b)
        r = tl.where(gray, luma, r)
        g = tl.where(gray, luma, g)
        b = tl.where(gray, luma, b)
        r = tl.where(solarize & (r >= 0.5), 1.0 - r, r)
        g = tl.where(solarize & (g >= 0.5), 1.0 - g, g)
        b = tl.where(solarize & (b >= 0.5), 1.0 - b, b)
        r, g, b = r * 2.0 - 1.0, g * 2.0 - 1.0, b * 2.0 - 1.0
        if HAS_WEIGHTS:
            weight = tl.load(weights_ptr + n * T + idx, mask=mask, other=0.0).to(tl.float32)
            r, g, b = r * weight, g * weight, b * weight
        base = out_ptr + (n * T + idx) * 3
        tl.store(base, r.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(base + 1, g.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(base + 2, b.to(out_ptr.dtype.element_ty), mask=mask)


def dino_colour(pixels, mean_pixels, factors, order, jitter, gray, solarize, pixel_weights=None) -> torch.Tensor:
    """pixels [N, T, 3] in [-1, 1] (float32 / bfloat16 / float16, contiguous) -> coloured [N, T, 3]; the other
    arguments as ``lafs_kernels.ops.dino_colour.dino_colour_tokens`` takes them (checked there; pixel_weights
    [N, T] contiguous or None)."""
    n, count = pixels.shape[:2]
    device = pixels.device
    out = torch.empty_like(pixels)
    if pixels.numel() == 0:
        return out
    mean_pixels = pixels if mean_pixels is None else mean_pixels  # the view's own pixels stand for it
    factors = factors.to(device=device, dtype=torch.float32).contiguous()
    order = order.to(device=device, dtype=torch.int32).contiguous()
    flags = torch.stack((jitter, gray, solarize), dim=1).to(device=device, dtype=torch.int8).contiguous()
    with on_device_of(pixels):
        _colour_kernel[(n,)](
            pixels,
            mean_pixels,
            out,
            factors,
            order,
            flags,
            out if pixel_weights is None else pixel_weights,  # not read without weights
            count,
            mean_pixels.shape[1],
            HAS_WEIGHTS=pixel_weights is not None,
            BLOCK=BLOCK,
        )
    return out
