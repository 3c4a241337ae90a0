"""The unfused margin-softmax loss as face-recognition code runs it today.

normalize -> linear -> one-hot margin -> scale -> cross_entropy: the full
``[B, C]`` cosine matrix, a one-hot of the same size, a margined and a scaled
copy, and a cross-entropy that saves its softmax.  Kept as the baseline of the
benchmarks and for ``--original-path`` training; the fused op is
:func:`lafs_kernels.margin_softmax_cross_entropy`.
"""

import math

import torch
import torch.nn.functional as F


def unfused_margin_loss(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    s: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Combined margin softmax cross-entropy, computed the plain way.

    embeddings [B, D], weight [C, D], labels [B] int64 -> loss (scalar, or [B]
    with ``reduction="none"``).  Margins default to none, as the fused op's.  Target logit
    ``cos(m1*theta + m2) - m3`` with the ArcFace fallback ``cos - sin(pi - m2) * m2`` when ``m1*theta + m2 > pi``;
    gradients flow through ``acos`` as autograd gives them (infinite at cos = +-1).
    """
    cos = F.linear(F.normalize(embeddings), F.normalize(weight))
    return F.cross_entropy(margin_logits(cos, labels, s=s, m1=m1, m2=m2, m3=m3), labels, reduction=reduction)


def margin_logits(
    cos: torch.Tensor, labels: torch.Tensor, *, s: float, m1: float, m2: float, m3: float
) -> torch.Tensor:
    """cos [B, C], labels [B] -> scaled logits [B, C]: ``cos(m1*theta + m2) - m3`` at the labels (ArcFace
    fallback ``cos - sin(pi - m2) * m2`` where ``m1*theta + m2 > pi``), plain cosine elsewhere, times s."""
    one_hot = F.one_hot(labels, cos.shape[1]).to(torch.bool)
    if m1 == 1.0 and m2 == 0.0:
        margined = cos - m3
    else:
        theta = torch.acos(cos.clamp(-1.0, 1.0))
        angle = m1 * theta + m2
        margined = torch.where(angle > math.pi, cos - math.sin(math.pi - m2) * m2, torch.cos(angle)) - m3
    return torch.where(one_hot, margined, cos) * s
