"""Frozen copies of a network for inference only (the view builder's landmark CNN).

``frozen_copy(module)`` is a deep copy in eval mode without gradients: training
the original elsewhere does not change it.  With ``fast=True`` it is also made
cheaper to run, with the same function up to float rounding:

- every BatchNorm2d that directly follows a Conv2d inside an ``nn.Sequential``
  is folded into that convolution (weight scaled by ``gamma / sqrt(var + eps)``,
  bias shifted), and the BatchNorm slot becomes ``nn.Identity``, so module
  names stay the same;
- 4-D weights are stored channels_last (NHWC), which the CPU (oneDNN) and
  cuDNN convolutions run faster; feed it channels_last images
  (``images.contiguous(memory_format=torch.channels_last)``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batch_norms(module: nn.Module) -> int:
    """Fold each eval-mode ``Conv2d -> BatchNorm2d`` pair of an ``nn.Sequential`` in ``module``, in place.

    Returns the number of pairs folded.  Raises if ``module`` is in training mode
    (batch statistics cannot be folded).
    """
    if any(m.training for m in module.modules()):
        raise ValueError("fold_batch_norms needs a module in eval mode (call .eval() first)")
    folded = 0
    for sequential in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        children = list(sequential.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
            if (
                isinstance(conv, nn.Conv2d)
                and isinstance(norm, nn.BatchNorm2d)
                and norm.running_mean is not None
                and norm.running_var is not None
            ):
                setattr(sequential, conv_name, fuse_conv_bn_eval(conv, norm))
                setattr(sequential, norm_name, nn.Identity().eval())
                folded += 1
    return folded


def frozen_copy(module: nn.Module, fast: bool = False) -> nn.Module:
    """A deep copy of ``module`` in eval mode with ``requires_grad=False``; ``fast``: BN folded, channels_last."""
    frozen = copy.deepcopy(module).eval()
    if fast:
        fold_batch_norms(frozen)
        frozen = frozen.to(memory_format=torch.channels_last)
    return frozen.requires_grad_(False)
