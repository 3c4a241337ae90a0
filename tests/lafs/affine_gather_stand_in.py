"""A stand-in for ``landmark_patch_gather(..., view_affine=...)`` until the gather's affine extension
(branch ``gather``, API in the issue-21 notes) is merged: the same sampling in plain torch, one
``grid_sample`` call, for the view builder's tests and for trying the builder before the merge.

Not part of the package; ``tests/lafs/conftest.py`` installs it only where the installed
``lafs_kernels.landmark_patch_gather`` has no ``view_affine`` argument.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

import lafs_kernels
from lafs_kernels.ops.landmark_patch_gather import select_centres


_REAL_GATHER = lafs_kernels.landmark_patch_gather


def real_gather_has_view_affine() -> bool:
    return "view_affine" in inspect.signature(lafs_kernels.landmark_patch_gather).parameters


def affine_gather(image, landmarks, patch_size=8, *, index=None, num_samples=None, replacement=True,
                  jitter_std=0.0, generator=None, deterministic=None, backend=None, view_affine=None):
    """tokens [N, K, P*P*C]: row n samples image n % B at its (selected, jittered) view landmarks mapped to the
    source by ``view_affine [N, 4]`` (scale_x, scale_y, offset_x, offset_y; None: identity), bilinear, zero padding."""
    batch, channels, height, width = image.shape
    rows = landmarks.shape[0]
    if view_affine is None and rows == batch:  # what the real gather already does
        return _REAL_GATHER(image, landmarks, patch_size, index=index, num_samples=num_samples,
                            replacement=replacement, jitter_std=jitter_std, generator=generator,
                            deterministic=deterministic, backend=backend)
    if rows % batch:
        raise ValueError(f"landmarks have {rows} rows, not a multiple of the image batch {batch}")
    dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
    centres = select_centres(landmarks, index=index, num_samples=num_samples, replacement=replacement,
                             jitter_std=float(jitter_std), generator=generator, dtype=dtype)
    finite = centres.isfinite().all(dim=-1, keepdim=True)
    centres = torch.where(finite, centres, torch.full_like(centres, -1e4))
    p = patch_size
    offsets = torch.arange(p, dtype=dtype, device=image.device) - p / 2 - 0.5
    x = centres[..., 0, None] + offsets  # [N, K, P] view positions
    y = centres[..., 1, None] + offsets
    if view_affine is not None:
        affine = view_affine.to(device=image.device, dtype=dtype)
        x = affine[:, 0, None, None] * x + affine[:, 2, None, None]
        y = affine[:, 1, None, None] * y + affine[:, 3, None, None]
    k = centres.shape[1]
    gx = ((2 * x + 1) / width - 1)[..., :, None].expand(rows, k, p, p)
    gy = ((2 * y + 1) / height - 1)[..., None, :].expand(rows, k, p, p)
    grid = torch.stack((gx, gy), dim=-1).view(rows // batch, batch, k * p, p, 2)
    grid = grid.transpose(0, 1).reshape(batch, rows // batch * k * p, p, 2)
    out = F.grid_sample(image.to(dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out.view(batch, channels, rows // batch, k, p, p).permute(2, 0, 3, 4, 5, 1)
    return out.reshape(rows, k, p * p * channels).to(image.dtype)
