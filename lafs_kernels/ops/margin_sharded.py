"""Class centres sharded across the ranks of a process group (model parallel, as Partial FC).

Rank r holds the centres of classes ``[class_start, class_start + num_local)``.  Each rank
computes the per-row statistics (:class:`margin_maths.RowStats`) of the whole batch against its
own classes; the softmax max and sum are the log-sum-exp of the ranks' ``lse``, and a target's
logit comes from the rank that holds its class.  No host synchronisation: the statistics are
gathered (``[world, B, T + 2]`` numbers) and combined.
"""

from __future__ import annotations

import torch

from .margin_maths import RowStats


def world(group) -> tuple[int, int]:
    """(rank, world size) in ``group``."""
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def class_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """(class_start, num_local) of ``rank``: arcface_torch's split, the first ``num_classes % world_size``
    ranks hold one class more."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + int(rank < extra)


def all_gather_no_grad(tensor: torch.Tensor, group) -> torch.Tensor:
    """[*S] on every rank -> [world, *S] (rank order)."""
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(world(group)[1])]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


class GatherFromRanks(torch.autograd.Function):
    """[*S] -> [world, *S].  Backward keeps this rank's slice times ``grad_scale``: the loss built
    from the gathered tensor is the same on every rank, so each rank already holds the full gradient."""

    @staticmethod
    def forward(ctx, tensor, group, grad_scale=1.0):
        ctx.group, ctx.grad_scale = group, grad_scale
        return all_gather_no_grad(tensor, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad[world(ctx.group)[0]]
        return (grad if ctx.grad_scale == 1.0 else grad * ctx.grad_scale), None, None


class SumGradAcrossRanks(torch.autograd.Function):
    """Identity forward; backward sums the gradient over ranks (each rank's shard of W
    contributes its part of the gradient of the replicated embeddings)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def shard_offset(num_local: int, group, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(class_start, num_classes) as 0-d tensors from every rank's shard size (shards contiguous in rank order)."""
    rank, _ = world(group)
    sizes = all_gather_no_grad(torch.tensor(num_local, device=device), group)
    return sizes[:rank].sum(), sizes.sum()


def combine_shard_stats(stats: RowStats, class_start, group, need_argmax: bool) -> RowStats:
    """RowStats over all ranks' classes from this rank's ``stats`` (computed from embeddings passed
    through :class:`SumGradAcrossRanks`, labels relative to ``class_start``).  The argmax is global
    when ``need_argmax`` (one more gather), else this shard's."""
    # Packed in lse's dtype (float64 from the chunk engines), unpacked into each statistic's own.
    wide = stats.lse.dtype
    packed = torch.cat([stats.lse[:, None], stats.target_logit.to(wide), stats.logit_sum.to(wide)[:, None]], 1)
    gathered = GatherFromRanks.apply(packed, group)  # [world, B, T + 2]
    best_cos, argmax = stats.best_cos, stats.argmax
    if need_argmax:
        all_best = all_gather_no_grad(stats.best_cos, group)
        all_arg = all_gather_no_grad(stats.argmax + class_start, group)
        winner = all_best.argmax(0, keepdim=True)
        best_cos, argmax = all_best.gather(0, winner)[0], all_arg.gather(0, winner)[0]
    return RowStats(
        lse=torch.logsumexp(gathered[..., 0], 0),
        target_logit=gathered[..., 1:-1].sum(0).to(stats.target_logit.dtype),
        logit_sum=gathered[..., -1].sum(0).to(stats.logit_sum.dtype),
        best_cos=best_cos,
        argmax=argmax,
    )
