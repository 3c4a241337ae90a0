"""The margin maths every backend of the margin-softmax loss shares, and the per-call preparation.

Shapes: embeddings ``x [B, D]``, class centres ``W [C, D]``, labels ``[B, T]`` int64 (labels
outside ``[0, C)`` are "not among these classes", as on another rank's shard).

``cos[b, c] = <x_b / |x_b|, W_c / |W_c|>`` (norms clamped below by ``EPS``).  A labelled class
gets ``cos(m1*theta + m2) - m3`` with ``theta = acos(cos)`` (see :func:`margin_values` for the
fallbacks), every other class keeps ``cos``; all logits are scaled by ``s``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

EPS = 1e-12
"""Lower clamp of the norms of embeddings and centres (as ``F.normalize``)."""

THETA_EPS = 1e-3
"""The margin's derivative ``m1*sin(m1*theta + m2)/sin(theta)`` is evaluated with theta
clamped to [THETA_EPS, pi - THETA_EPS]: it is singular at cos = +-1, and float32
cosines there resolve theta only to about 3e-4 anyway."""


class Margin(NamedTuple):
    """Target logit ``s * (cos(m1*theta + m2) - m3)``.

    ``easy_margin``: no margin where ``cos <= 0``.  ``straight_through``: the margin carries no
    gradient (d value / d cos = 1, as insightface applies it).  ``fallback``: where
    ``m1*theta + m2 > pi`` the value is ``cos - m3 - sin(pi - m2)*m2`` (the usual ArcFace); insightface's
    ``CombinedMarginLoss`` has no fallback (``fallback=False``).
    """

    s: float
    m1: float
    m2: float
    m3: float
    easy_margin: bool = False
    straight_through: bool = False
    fallback: bool = True


LSE_DTYPE = torch.float64
"""dtype of the chunk engines' log-sum-exp: the row's max plus the log of its shifted sum, kept in float64 so that
lse - target (a loss near 0) and exp(target - lse) (a probability near 1) keep their low bits."""


class RowStats(NamedTuple):
    """Per-row statistics over the classes of W (one shard of them when distributed).

    lse [B] (LSE_DTYPE from the chunk engines, the accumulation dtype from the dense ``torch`` path),
    target_logit [B, T] (0 where the label is not among these classes), logit_sum [B] (sum of all
    logits), best_cos [B] and argmax [B] (plain cosine); all but lse in the accumulation dtype.
    """

    lse: torch.Tensor
    target_logit: torch.Tensor
    logit_sum: torch.Tensor
    best_cos: torch.Tensor
    argmax: torch.Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def margin_values(cos: torch.Tensor, margin: Margin) -> tuple[torch.Tensor, torch.Tensor]:
    """Margined target cosine and its derivative d value / d cos, elementwise.

    cos [...] -> (value [...], derivative [...]).  ``straight_through`` gives
    derivative 1 (the margin is applied without gradient, as insightface does).
    """
    c = cos.clamp(-1.0, 1.0)
    if margin.m1 == 1.0 and margin.m2 == 0.0:
        return c - margin.m3, torch.ones_like(c)
    theta = torch.acos(c)
    angle = margin.m1 * theta + margin.m2
    value = torch.cos(angle) - margin.m3
    theta_d = theta.clamp(THETA_EPS, math.pi - THETA_EPS)
    derivative = margin.m1 * torch.sin(margin.m1 * theta_d + margin.m2) / torch.sin(theta_d)
    if margin.easy_margin:
        fallback, fallback_value = c <= 0, c - margin.m3
    elif margin.fallback:
        fallback = angle > math.pi
        fallback_value = c - margin.m3 - math.sin(math.pi - margin.m2) * margin.m2
    else:
        fallback, fallback_value = torch.zeros_like(c, dtype=torch.bool), c
    value = torch.where(fallback, fallback_value, value)
    derivative = torch.where(fallback, torch.ones_like(derivative), derivative)
    if margin.straight_through:
        derivative = torch.ones_like(derivative)
    return value, derivative


def inverse_norms(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [N, D] -> (1 / max(|row|, EPS) [N], |row| > EPS [N])."""
    norm = torch.linalg.vector_norm(rows, dim=1)
    return norm.clamp_min(EPS).reciprocal(), norm > EPS


def first_occurrence(labels: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: present and not a repeat of an earlier target of the same row."""
    repeat = torch.zeros_like(present)
    for t in range(1, labels.shape[1]):
        repeat[:, t] = (labels[:, :t] == labels[:, t : t + 1]).any(1)
    return present & ~repeat


class Prepared(NamedTuple):
    """What every chunk needs, computed once per call (all O(B*D + B*T))."""

    x: torch.Tensor  # [B, D] the embeddings as given
    xn: torch.Tensor  # [B, D] normalised embeddings, accumulation dtype
    xn_scaled: torch.Tensor  # [B, D] s * xn: the chunk GEMM then gives s * cos directly
    inv_x: torch.Tensor  # [B]
    x_nonzero: torch.Tensor  # [B] bool
    labels: torch.Tensor  # [B, T] local class ids; outside [0, C) means "not here"
    present: torch.Tensor  # [B, T] bool: label among these classes
    first: torch.Tensor  # [B, T] bool: present and not a repeat of an earlier target of the row
    target_logit: torch.Tensor  # [B, T] s * margined value
    target_derivative: torch.Tensor  # [B, T] d margined value / d cos


def target_cosines(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """cos [B, T] float64 of each embedding x [B, D] with its labelled centres weight[labels] (labels clamped
    into [0, C); 0 when W has no rows), differentiable.  float64 because near theta = 0 the margin
    cos(m1*theta + m2) multiplies a cosine's rounding by ~m1*sin(m1*theta + m2)/sin(theta), and s = 64 on top;
    B*T dot products, never a copy of W."""
    num_classes = weight.shape[0]
    if num_classes == 0:
        return x.new_zeros(labels.shape, dtype=torch.float64)
    centres = weight[labels.clamp(0, num_classes - 1)].double()  # [B, T, D]
    x64 = x.double()
    xn = x64 * torch.linalg.vector_norm(x64, dim=1).clamp_min(EPS).reciprocal()[:, None]
    inv_w = torch.linalg.vector_norm(centres, dim=-1).clamp_min(EPS).reciprocal()
    return (centres * xn[:, None, :]).sum(-1) * inv_w


def prepare(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, margin: Margin) -> Prepared:
    """The normalised embeddings and the margined target logits, from the ``B*T`` labelled centres."""
    acc = accumulation_dtype(x.dtype)
    xa = x.to(acc)
    inv_x, x_nonzero = inverse_norms(xa)
    xn = xa * inv_x[:, None]
    present = (labels >= 0) & (labels < weight.shape[0])
    value, derivative = margin_values(target_cosines(x, weight, labels), margin)
    value, derivative = value.to(acc), derivative.to(acc)
    return Prepared(
        x=x,
        xn=xn,
        xn_scaled=xn * margin.s,
        inv_x=inv_x,
        x_nonzero=x_nonzero,
        labels=labels.contiguous(),
        present=present,
        first=first_occurrence(labels, present),
        target_logit=torch.where(present, margin.s * value, 0.0),
        target_derivative=derivative,
    )


def check_label_range(
    labels: torch.Tensor, num_classes, name: str = "margin_softmax_cross_entropy", what: str = "the rows of weight"
) -> None:
    """Raise ValueError unless every label lies in [0, num_classes) (one host sync)."""
    if labels.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(labels)).tolist()  # one sync for both
    num_classes = int(num_classes)
    if low < 0 or high >= num_classes:
        raise ValueError(f"{name}: labels must lie in [0, {num_classes}) ({what}); got min {low}, max {high}")


@torch.library.custom_op("lafs_kernels::checked_labels", mutates_args=())
def _checked_labels_op(labels: torch.Tensor, num_classes: int, name: str, what: str) -> torch.Tensor:
    """A copy of labels after :func:`check_label_range`: the check as an op, which torch.compile keeps in
    its graph (the copy's use keeps the op from being dropped) where the check's host sync cannot be traced."""
    check_label_range(labels, num_classes, name, what)
    return labels.clone()


@_checked_labels_op.register_fake
def _checked_labels_fake(labels, num_classes, name, what):
    return torch.empty_like(labels)


def checked_labels(
    labels: torch.Tensor, num_classes, name: str = "margin_softmax_cross_entropy", what: str = "the rows of weight"
) -> torch.Tensor:
    """labels, after raising ValueError unless every one lies in [0, num_classes) (one host sync); inside
    torch.compile the check runs as an op of the compiled graph."""
    if torch.compiler.is_compiling():
        return _checked_labels_op(labels, int(num_classes), name, what)
    check_label_range(labels, num_classes, name, what)
    return labels
