"""The landmark patch gather as users run it today, for benchmarks and the
``--original-path`` training option.

Both return tokens ``[B, L, P*P*C]`` in the order of SPEC section 1
(``f = (i*P + j)*C + c``, i the x offset) from image ``[B, C, H, W]`` and
landmarks ``[B, L, 2]``.  Grid coordinates are normalised by W for x and by H
for y; the original code divides both by H, which is the same for the square
faces LAFS uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _offset_grid(patch_size: int, like: Tensor) -> Tensor:
    """[P, P, 2]: entry (i, j) = (a_i, a_j) with a = -P/2 .. P/2 - 1, as the original's meshgrid."""
    offsets = torch.arange(patch_size, dtype=like.dtype, device=like.device) - patch_size / 2
    grid_i, grid_j = torch.meshgrid(offsets, offsets, indexing="ij")
    return torch.stack((grid_i, grid_j), dim=-1)


def _half_size(image: Tensor, like: Tensor) -> Tensor:
    H, W = image.shape[-2:]
    return torch.tensor([W * 0.5, H * 0.5], dtype=like.dtype, device=like.device)


def gather_patches_loop(image: Tensor, landmarks: Tensor, patch_size: int = 8) -> Tensor:
    """The original code: one ``grid_sample`` per landmark, [B, C, P, P] each, stacked."""
    B, C = image.shape[:2]
    L, P = landmarks.shape[1], patch_size
    offset_grid = _offset_grid(P, landmarks)
    half_size = _half_size(image, landmarks)
    patches = []
    for landmark in range(L):
        grid = (offset_grid + landmarks[:, landmark, None, None, :]) / half_size - 1  # [B, P, P, 2]
        patches.append(F.grid_sample(image, grid.to(image.dtype), align_corners=False))  # [B, C, P(i), P(j)]
    patches = torch.stack(patches, dim=1)  # [B, L, C, P, P]
    return patches.permute(0, 1, 3, 4, 2).reshape(B, L, P * P * C)


def gather_patches_batched(image: Tensor, landmarks: Tensor, patch_size: int = 8) -> Tensor:
    """One ``grid_sample`` call on a [B, L*P, P, 2] grid: output [B, C, L*P, P].

    Sizes other than the batch are plain ints: traced for ONNX (``lafs.export``) they stay constants, so the
    graph's reshapes keep the batch as their only free size and also run an empty batch."""
    B, C = image.shape[0], int(image.shape[1])
    L, P = int(landmarks.shape[1]), patch_size
    grid = (_offset_grid(P, landmarks) + landmarks[:, :, None, None, :]) / _half_size(image, landmarks) - 1
    sampled = F.grid_sample(image, grid.reshape(B, L * P, P, 2).to(image.dtype), align_corners=False)
    return sampled.reshape(B, C, L, P, P).permute(0, 2, 3, 4, 1).reshape(B, L, P * P * C)
