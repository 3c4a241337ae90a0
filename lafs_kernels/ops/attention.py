"""Attention over short token sequences (the Part fViT blocks'), forward and backward.

Shapes:
  q        [B, H, Tq, d]  float
  k, v     [B, H, T, d]   q's dtype and device
  returns  [B, H, Tq, d]  softmax(scale * q k^T) v

Backends: ``torch`` (the formula in torch ops: matmul, scale, softmax, matmul; any device and dtype) and ``cpu``
(``csrc/cpu/attention.cpp``: CPU tensors, float32 with d <= 64 or float64 with d <= 32).  The C++ kernel runs one
task per (b, h) and keeps a block of 8 query rows' scores in L1 from the score product through the softmax to the
value product; its backward recomputes the probabilities from the forward's log-sum-exp instead of keeping the
``[B, H, Tq, T]`` probabilities.  It returns the output as a view of a ``[B, Tq, H, d]`` tensor, so a block's
transpose back to ``[B, Tq, H * d]`` costs no copy.  For sequences of 32 keys or fewer and single query rows the
torch formula is as fast or faster on the CPU; ``lafs.models.transformer.attend`` chooses between them.
``LAFS_KERNELS_BACKEND`` does not apply here; ``backend=`` does.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _extension
from .._dispatch import BackendUnavailableError, reference_and_kernels, register, select_for

BACKENDS = register(reference_and_kernels("attention"))
# The C++ kernel keeps a block's output rows in at most 4 vectors of 64 bytes.
MAX_HEAD_WIDTH = {torch.float32: 64, torch.float64: 32}


def reference_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale) v in torch ops (the released Part fViT code's einsum, scale, softmax, einsum)."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    return torch.matmul(scores.softmax(-1), v)


def _dense_last(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _heads_major(like: Tensor, b: int, t: int, h: int, d: int) -> Tensor:
    """An empty [B, H, T, d] view of a [B, T, H, d] tensor: the layout the kernel writes."""
    return like.new_empty(b, t, h, d).permute(0, 2, 1, 3)


def _save_for_backward(ctx, inputs, output):
    """Setup of both ops' autograd: their tensor inputs, out and lse saved; the trailing scale kept."""
    *tensors, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(*tensors, out, lse)
    ctx.scale = scale


@torch.library.custom_op("lafs_kernels::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(out [B, H, Tq, d], lse [B, H, Tq]: the log-sum-exp of each row of scaled scores) from the C++ kernel."""
    _extension.load()
    return torch.ops.lafs_kernels._attention_fwd(_dense_last(q), _dense_last(k), _dense_last(v), scale)


@attention_op.register_fake
def _(q, k, v, scale):
    b, h, tq, d = q.shape
    return _heads_major(q, b, tq, h, d), q.new_empty(b, h, tq)


@torch.library.custom_op("lafs_kernels::attention_backward", mutates_args=())
def attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_q like q, grad_k, grad_v like k) from the C++ kernel."""
    return torch.ops.lafs_kernels._attention_bwd(
        _dense_last(grad_out), _dense_last(q), _dense_last(k), _dense_last(v), out, lse, scale
    )


@attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, scale):
    b, h, tq, d = q.shape
    t = k.shape[2]
    return _heads_major(q, b, tq, h, d), _heads_major(q, b, t, h, d), _heads_major(q, b, t, h, d)


def _backward_formula(ctx, grad_out, grad_lse):
    return (*attention_backward_op(grad_out, *ctx.saved_tensors, ctx.scale), None)


attention_op.register_autograd(_backward_formula, setup_context=_save_for_backward)


def unpack_qkv(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v [B, H, T, d]: views of a packed ``qkv [B, T, 3, H, d]`` (by unbind: a select per view would
    zero-fill a whole qkv-sized gradient in each one's backward)."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


@torch.library.custom_op("lafs_kernels::attention_qkv", mutates_args=())
def attention_qkv_op(qkv: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """:func:`attention_op` on the q, k, v of a contiguous ``qkv [B, T, 3, H, d]``: (out [B, H, T, d], lse)."""
    _extension.load()
    return torch.ops.lafs_kernels._attention_fwd(*unpack_qkv(qkv), scale)


@attention_qkv_op.register_fake
def _(qkv, scale):
    b, t, _, h, d = qkv.shape
    return _heads_major(qkv, b, t, h, d), qkv.new_empty(b, h, t)


@torch.library.custom_op("lafs_kernels::attention_qkv_backward", mutates_args=())
def attention_qkv_backward_op(grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, scale: float) -> Tensor:
    """grad_qkv [B, T, 3, H, d], written by the C++ kernel without stacking and reshaping three gradients."""
    return torch.ops.lafs_kernels._attention_qkv_bwd(_dense_last(grad_out), qkv, out, lse, scale)


@attention_qkv_backward_op.register_fake
def _(grad_out, qkv, out, lse, scale):
    return torch.empty_like(qkv)


def _qkv_backward_formula(ctx, grad_out, grad_lse):
    return attention_qkv_backward_op(grad_out, *ctx.saved_tensors, ctx.scale), None


attention_qkv_op.register_autograd(_qkv_backward_formula, setup_context=_save_for_backward)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"attention: {name} must be [B, H, T, d], got {getattr(x, 'shape', type(x))}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attention: q [B, H, Tq, d] and k, v [B, H, T, d] disagree: {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if k.shape[2] == 0:
        raise ValueError("attention: at least one key is needed (k has T = 0)")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise TypeError(f"attention: q, k and v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")


def _prepared(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], backend: Optional[str]) -> tuple[float, str]:
    """(scale, backend name) of a checked call; ``scale`` defaults to ``d ** -0.5``."""
    _check_inputs(q, k, v)
    return (q.shape[3] ** -0.5 if scale is None else float(scale)), select_backend(q, backend)


def select_backend(q: Tensor, backend: Optional[str] = None) -> str:
    """The backend for a call on ``q [B, H, Tq, d]``: the C++ kernel where it can run, else torch's formula."""
    name = select_for("attention", str(q.device), q.dtype, False, False, backend, env=False)
    if name == "cpu" and q.shape[3] > MAX_HEAD_WIDTH[q.dtype]:
        if backend == "cpu":
            raise BackendUnavailableError(
                f"attention: backend 'cpu' takes a head width of at most {MAX_HEAD_WIDTH[q.dtype]} for {q.dtype}, "
                f"got {q.shape[3]}"
            )
        return "torch"
    return name


def attention_qkv(qkv: Tensor, scale: Optional[float] = None, backend: Optional[str] = None) -> Tensor:
    """:func:`attention` of the q, k, v packed in ``qkv [B, T, 3, H, d]`` (a block's qkv projection, viewed) ->
    [B, H, T, d].  The C++ backend writes the gradient of ``qkv`` in one piece, where three separate gradients
    would be stacked and reshaped by autograd (two copies of ``qkv``'s size)."""
    if not isinstance(qkv, Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"attention_qkv: qkv must be [B, T, 3, H, d], got {getattr(qkv, 'shape', type(qkv))}")
    q, k, v = unpack_qkv(qkv)
    scale, name = _prepared(q, k, v, scale, backend)
    if name == "torch":
        return reference_attention(q, k, v, scale)
    return attention_qkv_op(qkv.contiguous(), scale)[0]


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None, backend: Optional[str] = None) -> Tensor:
    """softmax(scale * q k^T) v for q [B, H, Tq, d], k and v [B, H, T, d] -> [B, H, Tq, d]; ``scale`` defaults to
    ``d ** -0.5``.  ``backend``: "torch" or "cpu" (None: the C++ kernel where it can run)."""
    scale, name = _prepared(q, k, v, scale, backend)
    if name == "torch":
        return reference_attention(q, k, v, scale)
    return attention_op(q, k, v, scale)[0]
