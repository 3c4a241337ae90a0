"""DINO's colour augmentation on gathered patch tokens instead of whole crops (the fused view path).

Every step of the chain but two is a function of one pixel, so it gives on a token exactly
what it gives on that pixel of the whole crop: brightness, saturation, hue, grayscale and
solarisation run here on the tokens only (for a LAFS local view 36 * 64 of 112 * 112
pixels).  The two that are not:

- contrast blends with the mean gray of the whole view.  The view is represented by a
  coarse ``G x G`` grid of samples of it (``lafs.ssl.geometry.mean_sample_layout``), which
  go through every jitter step before the contrast exactly as the tokens do; their mean
  stands for the crop's (the tests bound the difference);
- Gaussian blur needs neighbours: ``MultiViewBuilder`` blurs the source image of a blurred
  view instead (its sigma mapped into source pixels by the view's scale) and gathers from
  that, so here blur is skipped.

The random draws are :func:`lafs.ssl.augment.draw_colour_parameters`, the same as the crop
path's; ``lafs_kernels.ops.dino_colour.dino_colour_tokens`` applies them: its reference lays the
tokens out as an ``[N, 3, T, 1]`` image of their pixels for the crop path's functions, its kernels
(C++ on CPUs, Triton on GPUs) take each pixel through the whole chain in one pass.
"""

from __future__ import annotations

from typing import Optional

import torch

from lafs_kernels.ops.dino_colour import dino_colour_tokens

from .augment import ColourParameters


def colour_tokens(
    tokens: torch.Tensor,
    params: ColourParameters,
    view_samples: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
    pixel_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Colour-augmented copy of ``tokens [N, K, P*P*3]`` in [-1, 1] (pixel-major, channel last).

    ``params``: the N views' draws (blur is left out: see the module docstring).
    ``view_samples [N, M, F]`` in [-1, 1]: samples of each whole view for the contrast's mean
    (None: the mean over the tokens themselves).  ``backend``: of ``dino_colour_tokens`` ("torch":
    the reference; None: the device's kernel where it can run).  ``pixel_weights [N, K, P*P]`` (or any shape
    of N * K * P * P entries): each output pixel times its weight, in the same pass (None: no weights).
    Returns ``[N, K, P*P*3]`` in [-1, 1].
    """
    n, k, features = tokens.shape
    if features % 3:
        raise ValueError(f"colour_tokens needs RGB tokens [N, K, P*P*3], got {tuple(tokens.shape)}")
    if params.jitter.shape != (n,):
        raise ValueError(f"colour parameters are for {params.jitter.shape[0]} views, the tokens for {n}")
    samples = None if view_samples is None else view_samples.reshape(n, -1, 3)
    out = dino_colour_tokens(
        tokens.reshape(n, -1, 3),
        samples,
        params.factors,
        params.order,
        params.jitter,
        params.gray,
        params.solarize,
        backend=backend,
        pixel_weights=None if pixel_weights is None else pixel_weights.reshape(n, -1),
    )
    return out.view(n, k, features)
