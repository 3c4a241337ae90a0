"""What every Triton launcher of lafs_kernels needs."""

from __future__ import annotations

import contextlib

import torch


def on_device_of(tensor: torch.Tensor):
    """Launch on the tensor's GPU, not the current one (a process may hold tensors on cuda:1 while cuda:0 is
    current); a no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
