"""Partial FC: the margin-softmax classifier with its class centres sharded across ranks.

A drop-in for insightface arcface_torch's ``PartialFC_V2``: the same constructor
(``margin``, ``embedding_size``, ``num_classes``, ``sample_rate``, ``fp16``), the same
``weight [num_local, D]`` shard per rank (its state dict is a ``softmax_fc_gpu_{rank}.pt`` file)
and ``forward(local_embeddings [b, D], local_labels [b]) -> loss``, with the fused op underneath,
so no rank holds its ``[B, C/world]`` logits.  It also takes two-label (mixup) and soft targets
in one call.  :func:`lafs_kernels.reshard.reshard_centres` moves the shards to another world size.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .._dispatch import select_for_tensor
from ..ops.margin_maths import checked_labels
from ..ops.margin_sharded import (
    GatherFromRanks,
    SumGradAcrossRanks,
    all_gather_no_grad,
    class_range,
    combine_shard_stats,
)
from ..ops.margin_softmax import BACKENDS, MARGIN_GRADS, Margin, default_chunk, local_row_stats, torch_stats

INSIGHTFACE_PROBABILITY_FLOOR = 1e-30
"""PartialFC_V2's loss is ``-log(max(p_target, 1e-30))`` per sample (the floor leaves the gradient alone)."""


def _is_insightface_margin(margin) -> bool:
    return all(hasattr(margin, name) for name in ("s", "m1", "m2", "m3"))


def insightface_margin(margin_loss, margin_grad: str = "straight_through") -> tuple[Margin, float]:
    """(Margin, inter-class filtering threshold) computing what arcface_torch's ``CombinedMarginLoss``
    computes: with ``m1 == 1 and m3 == 0`` the target angle gets ``+ m2`` with no fallback beyond pi,
    and the margin carries no gradient (``margin_grad="straight_through"``); otherwise with ``m3 > 0``
    the target gets ``- m3`` (m1 and m2 are ignored there, as in their code); any other margin
    raises there, and here."""
    s, m1, m2, m3 = (float(getattr(margin_loss, name)) for name in ("s", "m1", "m2", "m3"))
    threshold = float(getattr(margin_loss, "interclass_filtering_threshold", 0.0) or 0.0)
    straight_through = margin_grad == "straight_through"
    if m1 == 1.0 and m3 == 0.0:
        return Margin(s, 1.0, m2, 0.0, False, straight_through, fallback=False), threshold
    if m3 > 0:
        return Margin(s, 1.0, 0.0, m3, False, straight_through), threshold
    raise ValueError(
        f"PartialFC: insightface's CombinedMarginLoss computes only m1 == 1 with m3 == 0 (ArcFace) or m3 > 0 "
        f"(CosFace); got m1={m1}, m2={m2}, m3={m3}. Pass a (m1, m2, m3) tuple for the general combined margin."
    )


class PartialFC(nn.Module):
    """Model-parallel margin-softmax loss (Partial FC, An et al. 2022).

    Rank r of ``process_group`` (default: the initialised default group, else a single
    process) holds ``weight [num_local, embedding_size]``, the centres of classes
    ``[class_start, class_start + num_local)`` (``num_classes // world`` each, the first
    ``num_classes % world`` ranks one more).  ``forward`` gathers the embeddings ``[world*b, D]``,
    labels and label weights of all ranks, computes each rank's softmax statistics with the fused
    op and combines them; the loss (mean over the global batch) is the same on every rank.

    ``margin`` is either
      * a ``(m1, m2, m3)`` tuple (scale ``s``): target logit ``s * (cos(m1*theta + m2) - m3)`` with
        ``lafs_kernels.margin_softmax_cross_entropy``'s meaning (ArcFace fallback beyond pi, exact
        margin gradient unless ``margin_grad="straight_through"``), loss ``-log p_target``; or
      * insightface arcface_torch's ``CombinedMarginLoss`` object: trains as ``PartialFC_V2`` does,
        its formulas as they are (see :func:`insightface_margin`), its ``interclass_filtering_threshold``
        (non-target cosines above it become 0 without gradient; computed on the shard's dense logits,
        as PartialFC_V2 does), its straight-through gradient (``margin_grad`` overrides) and its loss
        ``-log(max(p_target, 1e-30))`` per sample.

    Gradients: the embeddings' gradient on each rank is ``world_size`` times the gradient of the
    global mean loss with respect to that rank's embeddings (as PartialFC_V2's all-gather backward
    makes it), so that after DDP averages the backbone's gradients over the ranks the backbone
    receives the gradient of the global mean loss, as one process with the whole batch would.  A
    backbone whose gradients are not averaged over ranks must divide by ``world_size``.  The
    centres' gradient is that of the global mean loss.

    ``sample_rate < 1`` (in training mode only): each rank keeps the positive classes of the global
    batch in its shard plus random negatives, ``num_sample = int(sample_rate * num_local)`` rows in
    all, or every positive when there are more (PartialFC_V2's count and draw: one
    ``torch.rand(num_local)`` from the default CPU generator, positives forced to the top; one host
    sync per step).  The rows used are kept in ``sampled_index``.

    ``fp16=True`` computes on float16 copies of the embeddings and centres, as PartialFC_V2 does under
    autocast; the fused op accumulates in float32 either way.
    """

    def __init__(
        self,
        margin,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        fp16: bool = False,
        *,
        s: float = 64.0,
        process_group=None,
        margin_grad: Optional[str] = None,
        chunk_size: Optional[int] = None,
        check_labels: bool = True,
    ):
        """``check_labels``: check the global label range on the host (one device sync per call, as
        ``margin_softmax_cross_entropy(check_labels=True)``); ``False`` skips it."""
        super().__init__()
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f"PartialFC: chunk_size must be positive; got {chunk_size}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"PartialFC: sample_rate must be in (0, 1]; got {sample_rate}")
        if margin_grad is not None and margin_grad not in MARGIN_GRADS:
            raise ValueError(f"PartialFC: margin_grad must be one of {MARGIN_GRADS}; got {margin_grad!r}")
        if process_group is None and dist.is_available() and dist.is_initialized():
            process_group = dist.group.WORLD
        self.process_group = process_group
        rank, world = (dist.get_rank(process_group), dist.get_world_size(process_group)) if process_group else (0, 1)
        self.rank, self.world_size = rank, world
        if isinstance(margin, (tuple, list)):
            if len(margin) != 3:
                raise ValueError(f"PartialFC: margin must be (m1, m2, m3); got {margin!r}")
            margin_grad = margin_grad or "exact"
            m1, m2, m3 = map(float, margin)
            self.margin = Margin(float(s), m1, m2, m3, False, margin_grad == "straight_through")
            self.filter_threshold, self.probability_floor = 0.0, 0.0
        elif _is_insightface_margin(margin):
            margin_grad = margin_grad or "straight_through"
            self.margin, self.filter_threshold = insightface_margin(margin, margin_grad)
            self.probability_floor = INSIGHTFACE_PROBABILITY_FLOOR
        else:
            raise TypeError(
                "PartialFC: margin must be (m1, m2, m3) or a CombinedMarginLoss-like object; "
                f"got {type(margin).__name__}"
            )
        self.margin_grad = margin_grad
        self.s, self.m1, self.m2, self.m3 = self.margin.s, self.margin.m1, self.margin.m2, self.margin.m3
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.class_start, self.num_local = class_range(num_classes, world, rank)
        self.sample_rate, self.fp16 = sample_rate, fp16
        self.num_sample = int(sample_rate * self.num_local)
        self.chunk_size = chunk_size
        self.check_labels = check_labels
        self.weight = nn.Parameter(torch.normal(0, 0.01, (self.num_local, embedding_size)))
        self.sampled_index = None

    def _sample(self, local_labels: torch.Tensor):
        """Local centre rows to use [k] (sorted) and the labels [B, T] as positions among them (-1: elsewhere)."""
        positive = (local_labels >= 0) & (local_labels < self.num_local)
        hit = torch.zeros(self.num_local + 1, dtype=torch.bool, device=local_labels.device)
        hit[torch.where(positive, local_labels, self.num_local)] = True  # the spare last slot takes the others
        hit = hit[: self.num_local]
        if int(hit.sum()) > self.num_sample:
            index = hit.nonzero()[:, 0]  # every positive class, sorted; PartialFC_V2 draws nothing here
        else:
            score = torch.rand(self.num_local).to(local_labels.device)  # PartialFC_V2's draw, on the CPU generator
            score[hit] = 2.0
            index = score.topk(self.num_sample).indices.sort().values
        position = torch.searchsorted(index, local_labels.clamp(0, self.num_local - 1))
        return index, torch.where(positive, position, -1)

    def forward(
        self,
        local_embeddings: torch.Tensor,
        local_labels: torch.Tensor,
        label_weights: Optional[torch.Tensor] = None,
        return_argmax: bool = False,
    ):
        """local_embeddings [b, D]; local_labels [b] (or [b, 1]) class ids in [0, num_classes), or [b, T]
        with label_weights [b, T] (mixup: two labels and [lam, 1 - lam]; every rank the same b and T)
        -> the loss, a scalar, mean over the global batch of ``sum_t w_t * (-log p_t)``.  The margin
        applies to every labelled class inside one softmax, as ``margin_softmax_cross_entropy`` does; unlike
        there, label_weights are constants here (no gradient reaches them).

        ``return_argmax``: also return ``[b]`` int64, the class of each local embedding's largest plain
        cosine over every rank's centres (training accuracy; one more all-gather of ``[B]``).  With
        sampling it is the best of the classes this step used (all positives among them)."""
        labels, weights = self._targets(local_embeddings, local_labels, label_weights)
        embeddings = local_embeddings
        if self.process_group is not None:
            embeddings = GatherFromRanks.apply(local_embeddings, self.process_group, float(self.world_size))
            embeddings = embeddings.flatten(0, 1)
            labels = all_gather_no_grad(labels, self.process_group).flatten(0, 1)
            weights = all_gather_no_grad(weights, self.process_group).flatten(0, 1)
        if self.check_labels:  # on the gathered labels: every rank raises, none is left waiting in a collective
            labels = checked_labels(labels, self.num_classes, "PartialFC", "num_classes")
        local_labels = labels - self.class_start
        weight = self.weight
        self.sampled_index = None
        if self.sample_rate < 1.0 and self.training:
            self.sampled_index, local_labels = self._sample(local_labels)
            weight = weight[self.sampled_index]
        if self.fp16:
            embeddings, weight = embeddings.half(), weight.half()
        else:
            embeddings = embeddings.to(weight.dtype)
        if self.process_group is not None:
            embeddings = SumGradAcrossRanks.apply(embeddings, self.process_group)
        if self.filter_threshold > 0:
            stats = torch_stats(embeddings, weight, local_labels, self.margin, self.filter_threshold)
        else:
            backend = select_for_tensor(BACKENDS.op, embeddings, requires_grad=True)
            chunk = default_chunk(embeddings.device) if self.chunk_size is None else self.chunk_size
            stats = local_row_stats(
                embeddings,
                weight,
                local_labels,
                self.margin,
                chunk_size=chunk,
                backend=backend,
                check_labels=False,
                need_logit_sum=False,
            )
        if return_argmax and self.sampled_index is not None and self.sampled_index.numel():
            stats = stats._replace(argmax=self.sampled_index[stats.argmax])  # a row of the shard, not of the sample
        if self.process_group is not None:
            stats = combine_shard_stats(stats, self.class_start, self.process_group, need_argmax=return_argmax)
        nll = stats.lse[:, None] - stats.target_logit  # [B, T] -log p_t
        if self.probability_floor > 0:
            cap = -math.log(self.probability_floor)
            nll = nll + (nll.clamp(max=cap) - nll).detach()
        loss = (weights.to(nll.dtype) * nll).sum(1).mean().to(stats.target_logit.dtype)
        if not return_argmax:
            return loss
        rows = local_embeddings.shape[0]
        rank = self.rank if self.process_group is not None else 0
        return loss, stats.argmax[rank * rows : (rank + 1) * rows]

    def _targets(self, embeddings, labels, label_weights):
        """labels [B, T] int64 and weights [B, T] from the forward's arguments, checked."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"PartialFC: local_embeddings must be [b, {self.embedding_size}]; got {tuple(embeddings.shape)}"
            )
        if labels.dim() == 2 and labels.shape[1] == 1 and label_weights is None:
            labels = labels[:, 0]  # PartialFC_V2 accepts [b, 1]
        if labels.dim() not in (1, 2) or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"PartialFC: {embeddings.shape[0]} embeddings need labels [b] or [b, T]; got {tuple(labels.shape)}"
            )
        if labels.dim() == 1:
            if label_weights is not None:
                raise ValueError("PartialFC: label_weights go with labels [b, T]; labels here are [b]")
            return labels.long()[:, None], torch.ones(labels.shape[0], 1, device=labels.device)
        if label_weights is None or label_weights.shape != labels.shape:
            got = None if label_weights is None else tuple(label_weights.shape)
            raise ValueError(f"PartialFC: labels {tuple(labels.shape)} need label_weights of that shape; got {got}")
        return labels.long(), label_weights.detach().float()

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, num_local={self.num_local}, "
            f"class_start={self.class_start}, sample_rate={self.sample_rate}, s={self.s}, "
            f"margin=({self.m1}, {self.m2}, {self.m3}), margin_grad={self.margin_grad!r}, "
            f"filter_threshold={self.filter_threshold}, world_size={self.world_size}"
        )
