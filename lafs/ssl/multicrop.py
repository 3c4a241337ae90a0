"""Backbone + DINO head over view groups, running the backbone once per group."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn


class MultiCropModel(nn.Module):
    """``forward(groups) -> logits [sum of V*B over groups, out_dim]``, rows in group order.

    ``groups``: ``(tokens [N, K, P*P*3], index [N, K] or None)`` pairs, e.g. the
    ``ViewGroup``s of :class:`lafs.ssl.MultiViewBuilder`.  The backbone
    (``backbone(tokens, index) -> [N, dim]``) runs once per group, since views with
    the same token count batch together; the head runs once on all features.
    Keys ``backbone.*`` / ``head.*`` match DINO's ``MultiCropWrapper``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, groups: Sequence[tuple[torch.Tensor, Optional[torch.Tensor]]]) -> torch.Tensor:
        if not groups:
            raise ValueError("MultiCropModel needs at least one view group")
        features = torch.cat([self.backbone(tokens, index) for tokens, index in groups])
        return self.head(features)
