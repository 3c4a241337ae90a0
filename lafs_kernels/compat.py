"""Functions with the signatures of the original LAFS / Part fViT and insightface
code, computed by the fused kernels, so code written for those repositories runs
unchanged."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .ops.landmark_patch_gather import landmark_patch_gather


def _patch_size_of(patch_shape) -> int:
    """P from an int or a (P, P) tuple / list / numpy array / tensor (the original passes an array)."""
    if isinstance(patch_shape, (int, float)):
        values = [patch_shape]
    else:
        values = list(torch.as_tensor(patch_shape).flatten().tolist())
    if (
        not values
        or len(values) > 2
        or any(v != values[0] for v in values)
        or values[0] != int(values[0])
        or values[0] < 1
    ):
        raise ValueError(f"patch_shape must be a positive int P or a square (P, P), got {patch_shape!r}")
    return int(values[0])


def extract_patches_pytorch_gridsample(imgs: Tensor, landmarks: Tensor, patch_shape, num_landm: int = 49) -> Tensor:
    """The original LAFS patch extraction: the mosaic of patches around landmarks.

    Args:
      imgs: [B, C, S, S] square images.
      landmarks: [B, >= num_landm, 2] pixel coordinates (x, y); the first
        ``num_landm`` are used.
      patch_shape: P, or (P, P) as the original's array.
      num_landm: number of patches, a perfect square r*r.
    Returns:
      [B, C, r*P, r*P]: patch l = h*r + w fills block (h, w); inside a block the
      row index is the x offset and the column the y offset, as in the original.
    """
    P = _patch_size_of(patch_shape)
    rows = math.isqrt(num_landm) if isinstance(num_landm, int) and num_landm >= 1 else 0
    if rows * rows != num_landm:
        raise ValueError(
            f"num_landm must be a positive perfect square (the mosaic is r x r patches), got {num_landm!r}"
        )
    if imgs.dim() != 4 or imgs.shape[-1] != imgs.shape[-2]:
        raise ValueError(
            f"imgs must be square [B, C, S, S] (the original normalises both axes by the height), "
            f"got {tuple(imgs.shape)}"
        )
    if landmarks.dim() != 3 or landmarks.shape[1] < num_landm:
        raise ValueError(f"landmarks must be [B, >= {num_landm}, 2], got {tuple(landmarks.shape)}")
    B, C = imgs.shape[:2]
    tokens = landmark_patch_gather(imgs, landmarks[:, :num_landm], P)  # [B, r*r, P*P*C]
    mosaic = tokens.reshape(B, rows, rows, P, P, C).permute(0, 5, 1, 3, 2, 4)
    return mosaic.reshape(B, C, rows * P, rows * P)
