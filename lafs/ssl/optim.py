"""Optimisation details of DINO: weight-decay groups, per-parameter clipping, last-layer freeze."""

from __future__ import annotations

import torch
from torch import nn

DECAY_GROUP = "decay"
NO_DECAY_GROUP = "no_decay"


def param_groups_for_weight_decay(model: nn.Module) -> list[dict]:
    """Two optimizer groups: weights (decayed) and biases / norm parameters (never decayed).

    A parameter is not decayed when its name ends in ``.bias`` or it is 1-d (LayerNorm /
    BatchNorm scales and shifts).  Frozen parameters (``requires_grad=False``, e.g. the
    fixed gain of the DINO head) are left out.  Groups carry a ``"name"`` key
    (``"decay"`` / ``"no_decay"``) so the training step can apply the cosine
    weight-decay schedule to the decayed group only; the other group has ``weight_decay=0``.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or param.ndim <= 1 else decay).append(param)
    return [
        {"name": DECAY_GROUP, "params": decay},
        {"name": NO_DECAY_GROUP, "params": no_decay, "weight_decay": 0.0},
    ]


@torch.no_grad()
def clip_gradients_per_parameter(model: nn.Module, clip: float) -> torch.Tensor:
    """Scale each parameter's gradient by ``clip / (norm + 1e-6)`` when that is below 1.

    Unlike ``clip_grad_norm_`` every parameter is clipped on its own (DINO's rule).
    Returns the gradient norms before clipping, ``[n]`` float32, one per parameter
    that has a gradient, in ``model.parameters()`` order.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
    # A factor of exactly 1 leaves the gradient bitwise unchanged, so clamping to 1
    # equals "multiply only when the coefficient is below 1".
    coefs = (clip / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, [c.to(g.dtype) for c, g in zip(coefs.unbind(), grads)])
    return norms


def cancel_last_layer_gradients(head: nn.Module, epoch: int, freeze_last_layer: int) -> None:
    """Drop the gradients of every ``last_layer`` parameter of ``head`` while ``epoch < freeze_last_layer``.

    ``head`` may be the DINO head or any module containing it.  A dropped gradient is set
    to None, so the optimizer neither updates nor decays those parameters in that step.
    """
    if epoch >= freeze_last_layer:
        return
    for name, param in head.named_parameters():
        if "last_layer" in name:
            param.grad = None
