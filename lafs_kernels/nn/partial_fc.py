"""Partial FC: the margin-softmax classifier with its class centres sharded across ranks.

A drop-in for insightface arcface_torch's ``PartialFC_V2``: same constructor meaning
(``margin``, ``embedding_size``, ``num_classes``, ``sample_rate``, ``fp16``) and
``forward(local_embeddings [b, D], local_labels [b]) -> loss``, with the fused op
underneath, so no rank ever holds its ``[B, C/world]`` logits.
"""
import torch
import torch.distributed as dist
from torch import nn

from ..ops.margin_sharded import GatherFromRanks, SumGradAcrossRanks, all_gather_no_grad, combine_shard_stats
from ..ops.margin_softmax import BACKENDS, DEFAULT_CHUNK, Margin, local_row_stats, soft_target_loss
from .._dispatch import call_of


def _margin_of(margin, s: float):
    """(s, m1, m2, m3) from a (m1, m2, m3) tuple or an insightface ``CombinedMarginLoss``."""
    if isinstance(margin, (tuple, list)):
        if len(margin) != 3:
            raise ValueError(f"PartialFC: margin must be (m1, m2, m3); got {margin!r}")
        return (float(s), *map(float, margin))
    if all(hasattr(margin, name) for name in ("s", "m1", "m2", "m3")):
        if getattr(margin, "interclass_filtering_threshold", 0) > 0:
            raise ValueError("PartialFC: interclass_filtering_threshold > 0 is not supported by the fused loss")
        return float(margin.s), float(margin.m1), float(margin.m2), float(margin.m3)
    raise TypeError(f"PartialFC: margin must be (m1, m2, m3) or a CombinedMarginLoss-like object; got {type(margin).__name__}")


class PartialFC(nn.Module):
    """Model-parallel margin-softmax loss (Partial FC, An et al. 2022).

    Rank r of ``process_group`` (default: the initialised default group, else a single
    process) holds ``weight [num_local, embedding_size]``, the centres of classes
    ``[class_start, class_start + num_local)`` (the first ``num_classes % world`` ranks get
    one more).  ``forward`` gathers embeddings [world*b, D] and labels from all ranks
    (gradients flow back to each rank's own embeddings), computes each rank's softmax
    statistics with the fused op and combines them; the loss (mean over the global batch)
    is the same on every rank.

    ``sample_rate < 1`` (in training): each step uses every class that is a positive of the
    global batch plus random negatives, ``max(sample_rate * num_local, world*b)`` classes
    per rank (a fixed size, so the step needs no host synchronisation; the chosen local
    rows are kept in ``sampled_index``).  Labels are not range-checked (that would sync).

    ``fp16=True`` computes on float16 copies of the embeddings and centres, as
    ``PartialFC_V2`` does under autocast; the fused op accumulates in float32 either way.
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
        margin_grad: str = "exact",
        chunk_size=None,
    ):
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"PartialFC: sample_rate must be in (0, 1]; got {sample_rate}")
        if process_group is None and dist.is_available() and dist.is_initialized():
            process_group = dist.group.WORLD
        self.process_group = process_group
        rank, world = (dist.get_rank(process_group), dist.get_world_size(process_group)) if process_group else (0, 1)
        self.rank, self.world_size = rank, world
        self.s, self.m1, self.m2, self.m3 = _margin_of(margin, s)
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.num_local = num_classes // world + int(rank < num_classes % world)
        self.class_start = num_classes // world * rank + min(rank, num_classes % world)
        self.sample_rate, self.fp16 = sample_rate, fp16
        self.num_sample = int(sample_rate * self.num_local)
        self.margin_grad, self.chunk_size = margin_grad, chunk_size
        self.weight = nn.Parameter(torch.normal(0, 0.01, (self.num_local, embedding_size)))
        self.sampled_index = None

    def _sample(self, local_labels: torch.Tensor):
        """Local centre rows to use [k] (sorted) and the labels as positions among them (-1: elsewhere)."""
        positive = (local_labels >= 0) & (local_labels < self.num_local)
        k = min(self.num_local, max(self.num_sample, local_labels.numel()))
        score = torch.rand(self.num_local + 1, device=local_labels.device)
        # positives score 2 > any random score in [0, 1); non-positives land on the spare last slot
        score[torch.where(positive, local_labels, self.num_local)] = 2.0
        index = score[: self.num_local].topk(k).indices.sort().values
        position = torch.searchsorted(index, local_labels.clamp(0, self.num_local - 1))
        return index, torch.where(positive, position, -1)

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        labels = local_labels.reshape(-1).long()
        if local_embeddings.shape[0] != labels.shape[0]:
            raise ValueError(
                f"PartialFC: {local_embeddings.shape[0]} embeddings but {labels.shape[0]} labels"
            )
        embeddings = local_embeddings
        if self.process_group is not None:
            embeddings = GatherFromRanks.apply(local_embeddings, self.process_group, 1.0).flatten(0, 1)
            labels = all_gather_no_grad(labels, self.process_group).flatten()
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
        margin = Margin(self.s, self.m1, self.m2, self.m3, False, self.margin_grad == "straight_through")
        backend = BACKENDS.select(call_of(embeddings, requires_grad=True))
        chunk = self.chunk_size or DEFAULT_CHUNK.get(embeddings.device.type, DEFAULT_CHUNK["cpu"])
        local_labels = local_labels[:, None]
        if self.process_group is None:
            stats = local_row_stats(embeddings, weight, local_labels, margin, chunk_size=chunk, backend=backend,
                                    check_labels=False, need_logit_sum=False)
        else:
            local = local_row_stats(SumGradAcrossRanks.apply(embeddings, self.process_group), weight, local_labels,
                                    margin, chunk_size=chunk, backend=backend, check_labels=False, need_logit_sum=False)
            stats = combine_shard_stats(local, self.class_start, self.process_group, need_argmax=False)
        ones = torch.ones_like(local_labels, dtype=stats.lse.dtype)
        return soft_target_loss(stats, ones, 0.0, self.num_classes, "mean")

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, num_local={self.num_local}, "
            f"class_start={self.class_start}, sample_rate={self.sample_rate}, s={self.s}, "
            f"margin=({self.m1}, {self.m2}, {self.m3}), world_size={self.world_size}"
        )
