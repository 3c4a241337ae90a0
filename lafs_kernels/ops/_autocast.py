"""A context that switches autocast off around an op that must compute in its inputs' dtype."""

from __future__ import annotations

import contextlib

import torch


def autocast_off(tensor: torch.Tensor):
    """A context without autocast on ``tensor``'s device (a no-op on devices autocast does not know, e.g. meta).

    Used where autocast would run an op's matmuls or convolutions in bfloat16 / float16 and hand the rest of the op
    half tensors: the margin loss (logits of scale s = 64 carry ~0.25 of rounding there, and its float32 scatters
    and C++ chunk kernels refuse half inputs), the blur and the colour chain's reference.
    """
    if tensor.device.type in ("cpu", "cuda"):
        return torch.autocast(tensor.device.type, enabled=False)
    return contextlib.nullcontext()
