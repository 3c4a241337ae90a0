"""The margin-softmax head of a recognition stage, and the original-path model for comparisons.

``MarginHead(embeddings [B, D] float32, labels [B] or [B, T], label_weights None or [B, T])
-> (loss scalar, argmax [B])``: the class centres and the fused loss of
``lafs_kernels.nn`` (CosFace / ArcFace on one process, PartialFC with the
centres sharded across processes under torchrun). ``train.original_path`` swaps
in ``lafs_kernels.baselines``: the unfused loss and the per-landmark
``grid_sample`` loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lafs_kernels import margin_softmax_cross_entropy

from .config import Config
from .distributed import Distributed


def margin_parameters(cfg: Config) -> dict:
    """(s, m1, m2, m3) of the configured loss: CosFace ``cos - m``, ArcFace ``cos(theta + m)``."""
    if cfg.loss.type == "cosface":
        return {"s": cfg.loss.s, "m1": 1.0, "m2": 0.0, "m3": cfg.loss.m}
    return {"s": cfg.loss.s, "m1": 1.0, "m2": cfg.loss.m, "m3": 0.0}


class FusedMarginHead(nn.Module):
    """Class centres ``weight [C, D]`` + the fused margin loss (soft targets for mixup, argmax for accuracy)."""

    def __init__(self, embedding_dim: int, num_classes: int, margin: dict):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim).normal_(0, 0.01))
        self.margin = margin

    def forward(self, embeddings, labels, label_weights=None):
        return margin_softmax_cross_entropy(embeddings, self.weight, labels, label_weights=label_weights,
                                            return_argmax=True, **self.margin)


class OriginalMarginHead(FusedMarginHead):
    """The unfused loss users run today (full [B, C] logits); mixup as a weighted sum of per-label losses."""

    def forward(self, embeddings, labels, label_weights=None):
        from lafs_kernels.baselines.margin import unfused_margin_loss

        with torch.no_grad():
            argmax = F.linear(F.normalize(embeddings), F.normalize(self.weight)).argmax(dim=1)
        if labels.dim() == 1:
            return unfused_margin_loss(embeddings, self.weight, labels, **self.margin), argmax
        losses = torch.stack([unfused_margin_loss(embeddings, self.weight, labels[:, t], reduction="none",
                                                  **self.margin) for t in range(labels.shape[1])], dim=1)
        return (losses * label_weights).sum(dim=1).mean(), argmax


def build_margin_head(cfg: Config, embedding_dim: int, num_classes: int, dist: Distributed) -> nn.Module:
    margin = margin_parameters(cfg)
    if cfg.train.original_path:
        return OriginalMarginHead(embedding_dim, num_classes, margin)
    return FusedMarginHead(embedding_dim, num_classes, margin)


class OriginalPathModel(nn.Module):
    """A PartFViT run through the original per-landmark ``grid_sample`` loop instead of the fused gather."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from lafs_kernels.baselines.gather import grid_sample_loop_gather

        landmarks = self.model.landmark_cnn(images)
        return self.model.transformer(grid_sample_loop_gather(images, landmarks, self.model.patch_size))
