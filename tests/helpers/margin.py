"""The margin-softmax cross-entropy written out densely in float64: the reference every margin test compares to."""

import math

import torch
import torch.nn.functional as F

from lafs_kernels.ops.margin_softmax import THETA_EPS

MARGINS = {
    "cosface": dict(m1=1.0, m2=0.0, m3=0.4),
    "arcface": dict(m1=1.0, m2=0.5, m3=0.0),
    "combined": dict(m1=0.9, m2=0.3, m3=0.2),
}


def reference_target(cos_t, m1, m2, m3, easy_margin=False, straight_through=False):
    """Margined target cosine [B]; exact gradient with theta held in [THETA_EPS, pi - THETA_EPS]."""
    c = cos_t.clamp(-1, 1)
    theta = torch.acos(c.detach())
    value = torch.cos(m1 * theta + m2) - m3
    if easy_margin:
        fallback, fallback_value = c <= 0, c - m3
    else:
        fallback, fallback_value = m1 * theta + m2 > math.pi, c - m3 - math.sin(math.pi - m2) * m2
    value = torch.where(fallback, fallback_value.detach(), value)
    if straight_through:
        slope = torch.ones_like(c)
    else:
        held = theta.clamp(THETA_EPS, math.pi - THETA_EPS)
        slope = torch.where(fallback, 1.0, m1 * torch.sin(m1 * held + m2) / torch.sin(held))
    return value + (c - c.detach()) * slope


def reference_logits(
    x, w, labels, *, s=64.0, m1=1.0, m2=0.0, m3=0.0, easy_margin=False, straight_through=False, dtype=torch.float64
):
    """Dense logits [B, C] in ``dtype``: ``s * cos`` with every target of a row (labels [B] or [B, T]) margined."""
    x, w = x.to(dtype), w.to(dtype)
    labels = labels[:, None] if labels.dim() == 1 else labels
    cos = F.normalize(x) @ F.normalize(w).T
    logits = s * cos
    for t in range(labels.shape[1]):
        column = labels[:, t : t + 1]
        target = reference_target(cos.gather(1, column)[:, 0], m1, m2, m3, easy_margin, straight_through)
        logits = logits.scatter(1, column, s * target[:, None])
    return logits


def reference_loss(
    x,
    w,
    labels,
    label_weights=None,
    *,
    label_smoothing=0.0,
    reduction="mean",
    dtype=torch.float64,
    **margins,
):
    """Dense soft-target cross-entropy: logits [B, C], target distribution [B, C], all in ``dtype``
    (float64: the reference; a half dtype: what plain PyTorch gets in that dtype).  ``margins``: s, m1, m2,
    m3, easy_margin, straight_through of :func:`reference_logits`."""
    logits = reference_logits(x, w, labels, dtype=dtype, **margins)
    if labels.dim() == 1:
        labels, label_weights = labels[:, None], torch.ones(labels.shape[0], 1, dtype=dtype, device=x.device)
    q = torch.zeros_like(logits).scatter_add(1, labels, label_weights.to(dtype))
    q = (1 - label_smoothing) * q + label_smoothing / w.shape[0]
    loss = -(q * torch.log_softmax(logits, 1)).sum(1)
    return {"mean": loss.mean(), "sum": loss.sum(), "none": loss}[reduction]


def make_inputs(rng, b, d, c, t=1, dtype=torch.float32):
    x = torch.randn(b, d, generator=rng, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(c, d, generator=rng, dtype=torch.float64).to(dtype).requires_grad_()
    labels = torch.randint(0, c, (b,) if t == 1 else (b, t), generator=rng)
    return x, w, labels


def loss_and_grads(fn, x, w, *args, upstream=None, **kwargs):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(x, w, *args, **kwargs)
    total = loss.sum() if upstream is None else (loss * upstream).sum()
    gx, gw = torch.autograd.grad(total, [x, w])
    return loss, gx, gw


# Logits are s = 64 times the cosines: float32 gradients carry ~64x the rounding of a cosine.
GRAD_SCALE = 8.0
