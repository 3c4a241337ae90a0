"""Margin-softmax cross-entropy (CosFace, ArcFace, combined) without the ``[B, C]`` logits.

Shapes: embeddings ``x [B, D]``, class centres ``W [C, D]``, labels ``[B]`` or
``[B, T]`` int64 (``T`` targets per sample, e.g. mixup), label_weights ``[B, T]``.

``cos[b, c] = <x_b / |x_b|, W_c / |W_c|>`` (norms clamped below by ``EPS``, as
``F.normalize``).  For a labelled class ``theta = acos(cos)`` and the logit is
``cos(m1*theta + m2) - m3`` (ArcFace fallback ``cos - m3 - sin(pi - m2)*m2`` when
``m1*theta + m2 > pi``; with ``easy_margin`` the fallback is ``cos - m3`` whenever
``cos <= 0``); every other class keeps ``cos``; all logits are scaled by ``s``.
The loss of sample ``b`` is the cross-entropy with the soft target
``(1 - eps) * sum_t w_bt * onehot(y_bt) + eps / C``.

This file reads top to bottom: the reference, the custom ops (per-row statistics over the
classes of W: log-sum-exp, target logits, logit sum, argmax), the public function, which
assembles the loss from those statistics in plain PyTorch (so reductions, soft targets and
label weights are ordinary autograd).  The chunk engines are in ``margin_chunks.py``, the
margin maths in ``margin_maths.py``, class-sharded W (``process_group``) in ``margin_sharded.py``.

Backends (``lafs_kernels._dispatch``): ``torch`` (the reference: materialises the logits),
``chunked`` (blockwise in PyTorch ops, any device), ``cpu`` (blockwise, the elementwise work of
each chunk in the C++ kernels of csrc/cpu/margin_softmax.cpp; needs the compiled extension),
``triton`` (fused GEMM + softmax kernels; GPU, or CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _dispatch
from .._dispatch import Backend, OpBackends
from . import margin_chunks, margin_sharded
from ._autocast import autocast_off
from .margin_maths import (  # noqa: F401  (EPS, THETA_EPS, Margin, RowStats: part of this module's interface)
    EPS,
    LSE_DTYPE,
    THETA_EPS,
    Margin,
    RowStats,
    accumulation_dtype,
    check_label_range,
    checked_labels,
    first_occurrence,
    margin_values,
    target_cosines,
)

DEFAULT_CHUNK = {"cpu": 16384, "cuda": 8192}
"""Classes per chunk.  CPU (B=256, D=512, C=1e5, 2 busy cores, C++ chunk kernels): 16384 ran
5-15% faster than 8192 (fewer GEMM calls and parallel regions) and 32768 slower; the
[B, chunk] float32 block is 16 MB (the unfused loss adds ~800 MB).  GPU: B/64 x 8192/128
tiles per launch fill the device; the [B, chunk] gradient buffer and the [chunk, D] float32
temporaries stay a few tens of MB."""

REDUCTIONS = ("mean", "sum", "none")
MARGIN_GRADS = ("exact", "straight_through")


def _requires_cpp_margin_kernels(call) -> list[str]:
    reason = margin_chunks.cpp_kernels_missing_reason()
    return [reason] if reason else []


BACKENDS = _dispatch.register(
    OpBackends(
        op="margin_softmax_cross_entropy",
        backends=[
            Backend("torch", devices=frozenset({"cpu", "cuda"})),
            Backend("chunked", devices=frozenset({"cpu", "cuda"})),
            Backend("cpu", devices=frozenset({"cpu"}), checks=(_requires_cpp_margin_kernels,)),
            Backend(
                "triton",
                devices=frozenset({"cpu", "cuda"}),
                dtypes=(torch.float32, torch.float16, torch.bfloat16),
                checks=(_dispatch.requires_triton,),
            ),
        ],
        preference={"cpu": ["cpu", "chunked", "torch"], "cuda": ["triton", "chunked", "torch"]},
    )
)


# ----------------------------------------------------------------------------- reference


def torch_stats(x, weight, labels, margin: Margin, filter_threshold: float = 0.0) -> RowStats:
    """The plain formula: materialises the [B, C] logits; gradients by autograd.

    ``filter_threshold`` t > 0 (insightface's inter-class filtering): every logit of a class that is
    not a target of its row and whose cosine exceeds t becomes 0, without gradient.
    """
    with autocast_off(x):
        return _torch_stats(x, weight, labels, margin, filter_threshold)


def _torch_stats(x, weight, labels, margin: Margin, filter_threshold: float) -> RowStats:
    acc = accumulation_dtype(x.dtype)
    num_classes = weight.shape[0]
    if num_classes == 0:
        return _no_class_stats(x, weight, labels)
    cos = F.linear(F.normalize(x.to(acc), eps=EPS), F.normalize(weight.to(acc), eps=EPS))  # [B, C]
    present = (labels >= 0) & (labels < num_classes)
    index = labels.clamp(0, num_classes - 1)
    cos_t = target_cosines(x, weight, labels)  # float64, as the chunk engines' (gradients through them)
    value, derivative = margin_values(cos_t.detach(), margin)
    # value with the chosen derivative: value + (cos_t - cos_t.detach()) * derivative
    margined = (value + (cos_t - cos_t.detach()) * derivative).to(acc)
    first = first_occurrence(labels, present)  # a class named twice is margined once
    one_hot = torch.zeros_like(cos, dtype=torch.int64).scatter_add_(1, index, first.long()) > 0
    margined_dense = torch.zeros_like(cos).scatter_add(1, index, torch.where(first, margined, 0))
    plain = cos
    if filter_threshold > 0:
        plain = torch.where(cos.detach() > filter_threshold, 0.0, cos)
    logits = margin.s * torch.where(one_hot, margined_dense, plain)
    best_cos, argmax = cos.detach().max(1)
    # The log-sum-exp through the max-shifted sum, the shift held constant: its gradient exp(z - shift) / sum
    # keeps a probability near 1 to float32 precision, where torch.logsumexp's exp(z - lse) carries the
    # rounding of lse (~s ulps, all of 1 - p in a well-trained row).
    shift = logits.detach().amax(1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, 0.0)
    return RowStats(
        lse=shift[:, 0] + (logits - shift).exp().sum(1).log(),
        target_logit=torch.where(present, margin.s * margined, 0.0),
        logit_sum=logits.sum(1),
        best_cos=best_cos,
        argmax=argmax,
    )


def _no_class_stats(x, weight, labels) -> RowStats:
    """RowStats of a shard without classes (weight [0, D]), as the chunk engines give them: lse and best_cos
    -inf, no targets.  They stay in the autograd graph of x and weight (zero gradients), so a rank holding
    no classes still runs the sharded backward's collectives with the others."""
    acc = accumulation_dtype(x.dtype)
    zero = x[:, :0].to(acc).sum(1) + weight.to(acc).sum()  # [B] zeros, connected to x and weight
    return RowStats(
        lse=zero - math.inf,
        target_logit=zero[:, None].expand(labels.shape).clone(),
        logit_sum=zero,
        best_cos=zero.detach() - math.inf,
        argmax=torch.zeros(x.shape[0], dtype=torch.int64, device=x.device),
    )


def default_chunk(device: torch.device) -> int:
    """Classes per chunk on ``device`` when the caller gives none (DEFAULT_CHUNK)."""
    return DEFAULT_CHUNK.get(device.type, DEFAULT_CHUNK["cpu"])


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("lafs_kernels::margin_softmax_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    s: float,
    m1: float,
    m2: float,
    m3: float,
    easy_margin: bool,
    straight_through: bool,
    fallback: bool,
    check_labels: bool,
    need_logit_sum: bool,
    chunk_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, D], weight [C, D], labels [B, T] -> lse [B] (LSE_DTYPE), target_logit [B, T], logit_sum [B]
    (zeros unless ``need_logit_sum``), best_cos [B], argmax [B] (see RowStats), and the centres'
    norms [C] for the backward (empty for engines that do not keep them).  Labels outside
    [0, C) have no target here, unless ``check_labels`` makes them an error."""
    if check_labels:
        check_label_range(labels, weight.shape[0])
    margin = Margin(s, m1, m2, m3, easy_margin, straight_through, fallback)
    with autocast_off(x):
        stats, norms = margin_chunks.forward_stats(x, weight, labels, margin, chunk_size, backend, need_logit_sum)
    return (*stats, norms)


@_forward_op.register_fake
def _forward_fake(x, weight, labels, *args):
    backend = args[-1]
    acc = accumulation_dtype(x.dtype)
    rows = x.shape[0]
    vec = x.new_empty(rows, dtype=acc)
    norms = x.new_empty(weight.shape[0] if margin_chunks.ENGINES[backend].keeps_norms else 0, dtype=acc)
    argmax = x.new_empty(rows, dtype=torch.int64)
    lse = x.new_empty(rows, dtype=LSE_DTYPE)
    return (lse, x.new_empty(labels.shape, dtype=acc), vec, vec.clone(), argmax, norms)


@torch.library.custom_op("lafs_kernels::margin_softmax_backward", mutates_args=())
def _backward_op(
    grad_lse: torch.Tensor,
    grad_target: Optional[torch.Tensor],
    grad_logit_sum: Optional[torch.Tensor],
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    norms: torch.Tensor,
    s: float,
    m1: float,
    m2: float,
    m3: float,
    easy_margin: bool,
    straight_through: bool,
    fallback: bool,
    chunk_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of x [B, D] and weight [C, D], recomputed chunk by chunk; norms [C] from the forward."""
    margin = Margin(s, m1, m2, m3, easy_margin, straight_through, fallback)
    grads = (grad_lse, grad_target, grad_logit_sum)
    with autocast_off(x):  # a backward run inside autocast
        return margin_chunks.backward_grads(grads, x, weight, labels, lse, norms, margin, chunk_size, backend)


@_backward_op.register_fake
def _backward_fake(grad_lse, grad_target, grad_logit_sum, x, weight, *args):
    return torch.empty_like(x), torch.empty_like(weight)


_PARAMS = (*Margin._fields, "check_labels", "need_logit_sum", "chunk_size", "backend")


def _setup_context(ctx, inputs, output):
    x, weight, labels = inputs[:3]
    ctx.params = dict(zip(_PARAMS, inputs[3:]))
    ctx.set_materialize_grads(False)  # unused outputs (logit_sum without smoothing) cost no pass over W
    ctx.save_for_backward(x, weight, labels, output[0], output[5])


def _backward(ctx, grad_lse, grad_target, grad_logit_sum, _grad_best, _grad_argmax, _grad_norms):
    x, weight, labels, lse, norms = ctx.saved_tensors
    p = ctx.params
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
    grad_x, grad_weight = _backward_op(
        grad_lse,
        grad_target,
        grad_logit_sum,
        x,
        weight,
        labels,
        lse,
        norms,
        *(p[name] for name in Margin._fields),
        p["chunk_size"],
        p["backend"],
    )
    return (grad_x, grad_weight) + (None,) * (1 + len(_PARAMS))


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def local_row_stats(
    x, weight, labels, margin: Margin, *, chunk_size: int, backend: str, check_labels: bool, need_logit_sum: bool = True
) -> RowStats:
    """RowStats of x [B, D] against the classes of weight [C, D]; labels [B, T].  Without
    ``need_logit_sum`` (no label smoothing) the logit sums may be left at zero."""
    if backend == "torch":
        if check_labels:
            labels = checked_labels(labels, weight.shape[0])
        return torch_stats(x, weight, labels, margin)
    return RowStats(*_forward_op(x, weight, labels, *margin, check_labels, need_logit_sum, chunk_size, backend)[:5])


# ----------------------------------------------------------------------------- public function


def soft_target_loss(stats: RowStats, label_weights, label_smoothing: float, num_classes, reduction: str):
    """Cross-entropy against (1 - eps) * sum_t w_t onehot(y_t) + eps / C from per-row statistics.

    label_weights [B, T]; num_classes int or 0-d tensor -> loss (scalar, or [B] for "none").
    """
    weights = label_weights.to(stats.lse.dtype)
    # In lse's dtype (float64 from the chunk engines: a loss near 0 keeps its digits), returned in the others'.
    loss = weights.sum(1) * stats.lse - (weights * stats.target_logit).sum(1)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss + label_smoothing * (stats.lse - stats.logit_sum / num_classes)
    loss = loss.to(stats.target_logit.dtype)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _validate(embeddings, weight, labels, label_weights, label_smoothing, reduction, margin_grad):
    name = "margin_softmax_cross_entropy"
    if embeddings.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"{name}: embeddings must be [B, D] and weight [C, D]; got {tuple(embeddings.shape)}, {tuple(weight.shape)}"
        )
    if embeddings.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{name}: embedding size {embeddings.shape[1]} != weight's {weight.shape[1]} (weight is [C, D])"
        )
    if not embeddings.is_floating_point() or embeddings.dtype != weight.dtype:
        raise TypeError(
            f"{name}: embeddings and weight need the same floating dtype; got {embeddings.dtype}, {weight.dtype}"
        )
    if embeddings.device != weight.device or labels.device != embeddings.device:
        raise ValueError(
            f"{name}: embeddings, weight and labels must be on one device; "
            f"got {embeddings.device}, {weight.device}, {labels.device}"
        )
    if labels.dtype != torch.int64:
        raise TypeError(f"{name}: labels must be int64; got {labels.dtype}")
    if labels.dim() not in (1, 2) or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"{name}: labels must be [B] or [B, T] with B={embeddings.shape[0]}; got {tuple(labels.shape)}"
        )
    if labels.dim() == 2 and (label_weights is None or label_weights.shape != labels.shape):
        got = None if label_weights is None else tuple(label_weights.shape)
        raise ValueError(f"{name}: labels [B, T] need label_weights of the same shape {tuple(labels.shape)}; got {got}")
    if labels.dim() == 1 and label_weights is not None:
        raise ValueError(f"{name}: label_weights go with labels [B, T]; labels here are [B]")
    if label_weights is not None and (not label_weights.is_floating_point() or label_weights.device != labels.device):
        raise TypeError(
            f"{name}: label_weights must be a floating tensor on the labels' device {labels.device}; "
            f"got {label_weights.dtype} on {label_weights.device}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if margin_grad not in MARGIN_GRADS:
        raise ValueError(f"{name}: margin_grad must be one of {MARGIN_GRADS}; got {margin_grad!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{name}: label_smoothing must be in [0, 1); got {label_smoothing}")


def margin_softmax_cross_entropy(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    s: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
    label_weights: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    margin_grad: str = "exact",
    return_argmax: bool = False,
    chunk_size: Optional[int] = None,
    process_group=None,
    backend: Optional[str] = None,
    easy_margin: bool = False,
    check_labels: bool = True,
):
    """CosFace / ArcFace / combined-margin softmax cross-entropy, never forming the [B, C] logits.

    Args:
        embeddings: ``[B, D]`` float32 / float16 / bfloat16 / float64 (need not be normalised).
        weight: ``[C, D]`` class centres, same dtype (need not be normalised).  With
            ``process_group`` this rank's shard ``[C_r, D]``; shards are contiguous in rank order.
        labels: ``[B]`` int64 class ids in ``[0, C)``, or ``[B, T]`` with ``label_weights``.
        s, m1, m2, m3: target logit ``s * (cos(m1*theta + m2) - m3)``, other logits ``s * cos``.
            The defaults add no margin (a plain softmax of ``s * cos``): give the one you want.
            CosFace: ``m3=0.4``; ArcFace: ``m2=0.5`` (fallback ``cos - sin(pi-m2)*m2``
            when ``m1*theta + m2 > pi``); combined: all three.
        label_weights: ``[B, T]`` weights of the T targets (mixup: ``[lam, 1-lam]``).
        label_smoothing: eps of the target ``(1-eps)*y + eps/C``.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (``[B]``).
        margin_grad: ``"exact"`` (derivative of the margin, theta clamped to
            ``[THETA_EPS, pi-THETA_EPS]``) or ``"straight_through"`` (insightface: margin without gradient).
        return_argmax: also return ``[B]`` int64, the class of the largest plain cosine
            (training accuracy), found in the same pass over W.
        chunk_size: classes per block (default ``DEFAULT_CHUNK`` of the device).
        process_group: a ``torch.distributed`` group whose ranks hold shards of W; embeddings
            and labels must be the whole batch on every rank.  The loss is the same on every
            rank and the gradient of ``embeddings`` is the full one (summed over shards).
        backend: ``"torch"`` | ``"chunked"`` | ``"cpu"`` | ``"triton"``; default: best for the device
            (``LAFS_KERNELS_BACKEND`` overrides).
        easy_margin: use the margin only where ``cos > 0`` (ArcFace's option).
        check_labels: check the label range on the host (one device sync) and raise ValueError;
            ``False`` skips it (labels out of range then simply have no target).  Inside
            ``torch.compile`` the check runs in the compiled graph.

    Returns:
        loss (float32 for half inputs, else the input dtype): scalar, or ``[B]`` with
        ``reduction="none"``; ``(loss, argmax [B])`` with ``return_argmax``.

    Memory: O(B*chunk + B*D + B*T*D + C) beyond W and its gradient.
    """
    _validate(embeddings, weight, labels, label_weights, label_smoothing, reduction, margin_grad)
    if labels.dim() == 1:
        labels = labels[:, None]
        label_weights = torch.ones(labels.shape, dtype=accumulation_dtype(embeddings.dtype), device=labels.device)
    margin = Margin(float(s), float(m1), float(m2), float(m3), bool(easy_margin), margin_grad == "straight_through")
    requires_grad = embeddings.requires_grad or weight.requires_grad
    name = _dispatch.select_for_tensor(BACKENDS.op, embeddings, backend, requires_grad=requires_grad)
    chunk = default_chunk(embeddings.device) if chunk_size is None else int(chunk_size)
    if chunk <= 0:
        raise ValueError(f"margin_softmax_cross_entropy: chunk_size must be positive; got {chunk_size}")
    if process_group is None:
        if weight.shape[0] == 0:
            raise ValueError("margin_softmax_cross_entropy: weight has no rows (no classes); it must be [C >= 1, D]")
        stats = local_row_stats(
            embeddings,
            weight,
            labels,
            margin,
            chunk_size=chunk,
            backend=name,
            check_labels=check_labels,
            need_logit_sum=bool(label_smoothing),
        )
        num_classes = weight.shape[0]
    else:
        class_start, num_classes = margin_sharded.shard_offset(weight.shape[0], process_group, labels.device)
        if check_labels:
            labels = checked_labels(labels, num_classes)
        local = local_row_stats(
            margin_sharded.SumGradAcrossRanks.apply(embeddings, process_group),
            weight,
            labels - class_start,
            margin,
            chunk_size=chunk,
            backend=name,
            check_labels=False,
            need_logit_sum=bool(label_smoothing),
        )
        stats = margin_sharded.combine_shard_stats(local, class_start, process_group, need_argmax=return_argmax)
    loss = soft_target_loss(stats, label_weights, label_smoothing, num_classes, reduction)
    return (loss, stats.argmax) if return_argmax else loss
