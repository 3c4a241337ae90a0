"""Geometry of a view as an affine map of its source image (the fused view path of ``MultiViewBuilder``).

A random resized crop of box ``(x0, y0, w, h)`` (source pixels) resized to ``S x S`` plus an
optional horizontal flip is the per-view affine of ``lafs_kernels.landmark_patch_gather``'s
``view_affine`` (``[N, 4]`` = scale_x, scale_y, offset_x, offset_y): a view sample position ``x``
(pixel centres at integers, as the gather's taps) lies at ``scale_x * x + offset_x`` in the
source.  Landmarks are in the usual continuous coordinates, pixel k spanning [k, k + 1], so a
landmark ``l`` samples around position ``l - 0.5``.

- ``lafs_kernels.ops.landmark_patch_gather.crop_affine``: boxes and flips -> ``view_affine``;
- :func:`landmarks_into_views`: landmarks found once on the source image -> each view's
  coordinates (the inverse affine; ``views.landmarks=per_image``);
- :func:`view_edge_weights`: how much of each sample's bilinear support lies inside the
  view, so that tokens sampled from the source match a materialised crop's zero padding;
- :func:`mean_sample_layout`: a coarse ``G x G`` grid of samples that stands for the whole
  view in the colour jitter's contrast (the mean gray of the view).
"""

from __future__ import annotations

import torch


def landmarks_into_views(source_landmarks: torch.Tensor, view_affine: torch.Tensor) -> torch.Tensor:
    """Landmarks of the views ``[N, L, 2]`` from the source images' ``source_landmarks [B, L, 2]``
    (N a multiple of B, row n of image n % B) through the inverse of ``view_affine [N, 4]``:
    ``l_view = (l_source - 0.5 - offset) / scale + 0.5`` per axis (float32)."""
    batch = source_landmarks.shape[0]
    rows = view_affine.shape[0]
    if rows % batch:
        raise ValueError(f"view_affine has {rows} rows, not a multiple of the {batch} source images")
    source = source_landmarks.to(torch.float32).repeat(rows // batch, 1, 1)
    affine = view_affine.to(device=source.device, dtype=torch.float32)
    scale, offset = affine[:, None, :2], affine[:, None, 2:]
    return (source - 0.5 - offset) / scale + 0.5


def sample_offsets(patch_size: int, like: torch.Tensor) -> torch.Tensor:
    """``[P]``: sample i of a patch lies at ``centre + offsets[i]`` (SPEC section 1: i - P/2 - 0.5)."""
    return torch.arange(patch_size, dtype=like.dtype, device=like.device) - patch_size / 2 - 0.5


def view_edge_weights(centres: torch.Tensor, patch_size: int, size: int) -> torch.Tensor:
    """``[N, K, P, P, 1]`` (i the x offset, j the y offset, as the tokens' features): for each sample of the
    patches centred at ``centres [N, K, 2]`` (view coordinates), the total bilinear weight of its taps that
    fall inside an ``size x size`` view, ``clamp(min(x + 1, S - x), 0, 1)`` times the same in y.

    Gathering from a materialised crop pads it with zeros; sampling the source instead reads the
    pixels beyond the crop's edge.  Multiplying those samples by this weight gives back the crop's
    zero padding wherever the source is smooth across the edge (exactly for a locally linear image).
    """
    offsets = sample_offsets(patch_size, centres)
    x = centres[..., 0, None] + offsets  # [N, K, P]
    y = centres[..., 1, None] + offsets
    weight_x = torch.minimum(x + 1, size - x).clamp_(0.0, 1.0)
    weight_y = torch.minimum(y + 1, size - y).clamp_(0.0, 1.0)
    return (weight_x[..., :, None] * weight_y[..., None, :])[..., None]


def mean_sample_layout(
    view_affine: torch.Tensor, size: int, patch_size: int, grid: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """(affine ``[N, 4]``, centres ``[N, M, 2]``): gathering ``M = (G / P)^2`` patches of ``P x P`` at
    ``centres`` through ``affine`` samples each view on a ``G x G`` grid of cell centres, G = ``grid``
    rounded up to a multiple of P (view pixel ``(u + 0.5) * S / G - 0.5`` for u = 0..G-1)."""
    cells = -(-grid // patch_size)
    grid = cells * patch_size
    step = size / grid
    affine = view_affine.to(torch.float64)
    scale, offset = affine[:, :2], affine[:, 2:]
    coarse = torch.cat((scale * step, offset + scale * (0.5 * step - 0.5)), dim=1).to(torch.float32)
    # patch (a, b) covers grid samples a*P .. a*P + P - 1: its centre is a*P + P/2 + 0.5
    starts = torch.arange(cells, dtype=torch.float32, device=view_affine.device) * patch_size + patch_size / 2 + 0.5
    centres = torch.stack(torch.meshgrid(starts, starts, indexing="xy"), dim=-1).reshape(1, -1, 2)
    return coarse, centres.expand(view_affine.shape[0], -1, -1)
