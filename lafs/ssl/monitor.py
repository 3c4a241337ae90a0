"""A label-free check of pretraining: do two views of one image land next to each other?

DINO users watch a k-NN accuracy; without labels the nearest thing is view retrieval:
for each image, is its second global view the nearest (by cosine) of all second views
to its first?  A backbone that learns nothing augmentation-invariant stays near its
starting value; one that learns instance features climbs toward 1 even when those
features say nothing about identity (which the held-out verification tells).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lafs.eval.embed import evaluation_mode

from .views import MultiViewBuilder, ViewGroup


@torch.no_grad()
def probe_views(builder: MultiViewBuilder, images: torch.Tensor, seed: int) -> ViewGroup:
    """The global view group (``[2*N, K, P*P*3]`` tokens, view-major) of ``images [N, 3, H, W]``, drawn from
    a generator seeded with ``seed`` (the builder's own generator is not touched, so training draws
    the same views with or without the probe); restores the builder's mode."""
    if builder.global_views < 2:
        raise ValueError(f"view retrieval needs two global views per image, the builder makes {builder.global_views}")
    was_training = builder.training
    builder.train()
    try:
        group = builder(images, generator=torch.Generator().manual_seed(seed))[0]
    finally:
        builder.train(was_training)
    rows = images.shape[0]
    return ViewGroup(group.tokens[: 2 * rows], group.index[: 2 * rows])


@torch.no_grad()
def view_retrieval_accuracy(backbone: nn.Module, group: ViewGroup, batch_size: int = 256) -> float:
    """Fraction of images whose view 2 is the nearest view 2 to their view 1 (chance ``1 / N``).

    ``group``: tokens ``[2*N, K, F]`` and index ``[2*N, K]``, rows ``0..N-1`` view 1 and ``N..2N-1``
    view 2 of the same images (``probe_views``).  ``backbone(tokens, index) -> [rows, dim]`` runs
    in eval mode; its mode is restored.
    """
    rows = group.tokens.shape[0]
    if rows < 4 or rows % 2:
        raise ValueError(f"view retrieval needs two views of at least two images, got {rows} rows")
    with evaluation_mode(backbone):
        features = torch.cat(
            [
                backbone(tokens, index)
                for tokens, index in zip(group.tokens.split(batch_size), group.index.split(batch_size))
            ]
        )
    first, second = F.normalize(features.float(), dim=1).chunk(2)
    nearest = (first @ second.T).argmax(dim=1)
    return (nearest == torch.arange(len(first), device=nearest.device)).float().mean().item()
