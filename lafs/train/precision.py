"""Mixed precision: which autocast dtype ``train.amp`` means on a device, and the autocast context."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch


def autocast_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """bfloat16/float16 on GPU as configured; None (float32) on CPU or when off."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def autocast(dtype: Optional[torch.dtype], device: torch.device):
    """``torch.autocast`` to ``dtype``, or a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
