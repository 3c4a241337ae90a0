"""AdamW parameter groups with layer-wise learning-rate decay, and per-step schedules.

Schedules are numpy arrays indexed by the global optimizer step (as DINO does),
so resuming at step k reads exactly the value an uninterrupted run would use.
"""

from __future__ import annotations

import numpy as np
import torch

from lafs.ssl.schedules import cosine_schedule


def warmup_cosine(base: float, final: float, total_steps: int, warmup_steps: int = 0) -> np.ndarray:
    """[total_steps] values: linear warmup from 0 to ``base``, then cosine to ``final`` (lafs.ssl's schedule)."""
    return cosine_schedule(
        base, final, epochs=1, iters_per_epoch=total_steps, warmup_epochs=min(warmup_steps, total_steps) / total_steps
    )


def _no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Biases, norm gains and the learned tokens / position embeddings get no weight decay."""
    return param.ndim <= 1 or name.endswith(("cls_token", "pos_embedding", "pos_embed"))


def param_groups(
    model: torch.nn.Module,
    *,
    weight_decay: float,
    landmark_weight_decay: float,
    layer_decay: float,
    head: torch.nn.Module | None = None,
    landmark_lr_scale: float = 1.0,
) -> list[dict]:
    """AdamW groups for a PartFViT (``model.landmark_cnn``, ``model.transformer``) and its margin head.

    Each group carries ``lr_scale`` (multiplied with the scheduled lr each step)
    and ``weight_decay``. Block ``i`` of a depth-D transformer gets
    ``layer_decay ** (D + 1 - (i + 1))``; the embedding and the landmark CNN
    get ``layer_decay ** (D + 1)``, the landmark CNN times ``landmark_lr_scale``;
    the final norm and the margin head 1. The landmark CNN's groups are marked
    ``landmark: True`` (:func:`set_lr` can hold them back during a warm-up).
    """
    transformer = model.transformer
    top = transformer.num_layer_groups - 1
    groups: dict[tuple, dict] = {}

    def add(param, lr_scale, decay, landmark=False):
        key = (lr_scale, decay, landmark)
        group = groups.setdefault(
            key, {"params": [], "lr_scale": lr_scale, "weight_decay": decay, "landmark": landmark}
        )
        group["params"].append(param)

    for name, param in model.landmark_cnn.named_parameters():
        if param.requires_grad:
            add(
                param,
                layer_decay**top * landmark_lr_scale,
                0.0 if _no_weight_decay(name, param) else landmark_weight_decay,
                landmark=True,
            )
    for name, param in transformer.named_parameters():
        if param.requires_grad:
            scale = layer_decay ** (top - transformer.layer_id(name))
            add(param, scale, 0.0 if _no_weight_decay(name, param) else weight_decay)
    if head is not None:
        for param in head.parameters():
            if param.requires_grad:
                add(param, 1.0, weight_decay)
    return list(groups.values())


def landmark_warmup(total_steps: int, frozen_steps: int, ramp_steps: int) -> np.ndarray:
    """[total_steps] factors of the landmark CNN's lr: 0 for ``frozen_steps`` (the transformer learns from the
    initial layout first), then a linear ramp to 1 over ``ramp_steps``; all 1 without a warm-up."""
    if frozen_steps <= 0:
        return np.ones(total_steps)
    steps = np.arange(total_steps, dtype=np.float64)
    return np.clip((steps - frozen_steps + 1) / max(ramp_steps, 1), 0.0, 1.0) * (steps >= frozen_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float, landmark_factor: float = 1.0) -> None:
    """Scheduled lr times each group's layer-decay ``lr_scale`` (and ``landmark_factor`` for the landmark CNN)."""
    for group in optimizer.param_groups:
        factor = landmark_factor if group.get("landmark", False) else 1.0
        group["lr"] = lr * group.get("lr_scale", 1.0) * factor


@torch.no_grad()
def clip_grad_norm_global(replicated: list, sharded: list, max_norm: float, dist) -> torch.Tensor:
    """Clip every gradient by one norm, the same on every process; returns that norm (before clipping).

    ``replicated``: parameters every process holds whole (the DDP model: their gradients are
    already averaged, so each counts once); ``sharded``: this process's part of parameters split
    across processes (Partial FC class centres: their squared norms are summed over processes).
    The norm is that of all gradients of the model as one process holds it, so N processes clip
    as one process with the whole head does, and the replicas stay identical.  The factor is
    ``max_norm / (norm + 1e-6)`` when below 1 (``torch.nn.utils.clip_grad_norm_``'s rule);
    ``max_norm`` 0 only measures.  ``dist``: :class:`lafs.train.distributed.Distributed`.
    """
    from .distributed import all_reduce_sum

    def squared(params):
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=dist.device)
        return torch.stack(torch._foreach_norm(grads)).float().square().sum()

    total = (squared(replicated) + all_reduce_sum(squared(sharded), dist)).sqrt()
    if max_norm > 0:
        grads = [p.grad for p in (*replicated, *sharded) if p.grad is not None]
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef)
    return total
