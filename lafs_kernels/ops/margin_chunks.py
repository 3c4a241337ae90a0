"""The chunk engines of the margin-softmax loss: one pass over W in class chunks, never the ``[B, C]`` logits.

Forward: per row a running max and sum of exponentials (online log-sum-exp), the sum of the
logits (label smoothing) and the best cosine (argmax).  Each chunk's log-sum-exp, the row max
plus the log of the shifted sum, is formed and combined in float64 (``LSE_DTYPE``): one
float32 of ~s would carry ~4e-6 of rounding, which is the whole of ``1 - p`` where a target's
probability is near 1.  The backward gets it back as a rounded lse and a per-row factor
(:func:`backward_row_terms`), so every kernel works in the accumulation dtype.  The margined
target logits come from :func:`margin_maths.prepare` (the ``B*T`` labelled centres), so no
engine needs ``acos``.
Backward: each chunk's cosines are recomputed and turned straight into the chunk's gradients.

One engine per backend (the loops over chunks, :func:`forward_stats` and :func:`backward_grads`,
are shared):

* ``chunked``: GEMMs and the elementwise work in PyTorch ops (any device);
* ``cpu``: GEMMs in PyTorch, the elementwise work of a chunk in one pass of the C++ kernels of
  ``csrc/cpu/margin_softmax.cpp`` (``torch.ops.lafs_kernels._margin_chunk_fwd/_bwd``);
* ``triton``: fused GEMM + softmax tiles (``lafs_kernels/triton/margin_softmax.py``).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from .. import _extension
from .margin_maths import EPS, LSE_DTYPE, Margin, Prepared, RowStats, prepare


def _target_columns(prep: Prepared, start: int, size: int):
    """Columns [B, T] of the targets in the chunk [start, start + size) and whether they are in it [B, T]."""
    local = prep.labels - start
    in_chunk = prep.present & (local >= 0) & (local < size)
    return local.clamp(0, size - 1), in_chunk


def _put_targets(logits, prep: Prepared, column, in_chunk, shift=None):
    """Set, in place, the logits [B, c] at the targets to the margined ones (minus ``shift`` [B, 1]), exactly.

    Two scatter-adds at the first occurrences (a class named twice is set once): the plain logit's
    negative (a - a = 0), then the target (0 + t = t); one add of the difference would leave the
    rounding of a + (t - a), up to half an ulp of the plain logit, in a target that may hold all of
    the row's probability."""
    target = prep.target_logit if shift is None else prep.target_logit - shift
    placed = in_chunk & prep.first
    logits.scatter_add_(1, column, torch.where(placed, -logits.gather(1, column), 0.0))
    logits.scatter_add_(1, column, torch.where(placed, target, 0.0))


SHIFT_REACH = 60.0
"""How far below the row's largest plain logit the forward's exp shift may lie: e^60 times a chunk's
columns stays far inside float32's range."""


def _chunk_products(prep: Prepared, w, norms=None):
    """w [c, D] -> (w in the accumulation dtype, |W_c| [c], 1 / max(|W_c|, EPS) [c], raw [B, c] = s * <xn_b, W_c>)."""
    w = w.to(prep.xn.dtype)
    if norms is None:
        norms = torch.linalg.vector_norm(w, dim=1)
    return w, norms, norms.clamp_min(EPS).reciprocal(), torch.mm(prep.xn_scaled, w.T)


def _radial_scale(inv_w, norms, margin: Margin):
    """[c]: turns sum_b g * raw into sum_b dcos cos / |W_c|^2 (0 for a zero centre)."""
    return inv_w * inv_w * (norms > EPS) / margin.s


# ----------------------------------------------------------------------------- chunked: PyTorch ops


def _torch_chunk_forward(prep: Prepared, w, start: int, margin: Margin, need_logit_sum: bool):
    _, norms, inv_w, logits = _chunk_products(prep, w)
    logits.mul_(inv_w)  # s * cos [B, c]
    best, best_column = logits.max(1)
    column, in_chunk = _target_columns(prep, start, w.shape[0])
    _put_targets(logits, prep, column, in_chunk)
    # The exponentials are shifted by the largest target of the chunk when it lies within SHIFT_REACH of
    # the plain maximum (no overflow), else by the plain maximum: the row's maximum without a pass over
    # [B, c] (best may be a target's plain logit, which the margin replaced), and exactly the target where
    # the target holds the row's probability.  In place this is three passes where torch.logsumexp takes five.
    has_target = in_chunk.any(1)
    shift = torch.maximum(
        torch.where(has_target, best - SHIFT_REACH, best), torch.where(in_chunk, prep.target_logit, -math.inf).amax(1)
    )
    logit_sum = logits.sum(1) if need_logit_sum else None
    sum_exp = logits.sub_(shift[:, None]).exp_().sum(1)
    return shift.to(LSE_DTYPE) + sum_exp.to(LSE_DTYPE).log(), logit_sum, best / margin.s, best_column, norms


def _torch_chunk_backward(prep: Prepared, w, start: int, margin: Margin, lse, grads, norms):
    grad_lse, grad_target, grad_logit_sum = grads
    w, norms, inv_w, raw = _chunk_products(prep, w, norms)  # raw = s * <xn_b, W_c>  [B, c]
    # d loss / d logit = grad_lse * softmax (+ grad_logit_sum) (+ grad_target at the targets).
    # s * cos rounded as the forward rounded it, then minus lse (addcmul's fused rounding would move the
    # exponent of a class holding the row's probability by up to half an ulp of s)
    dlogit = torch.mul(raw, inv_w).sub_(lse[:, None])
    column, in_chunk = _target_columns(prep, start, w.shape[0])
    _put_targets(dlogit, prep, column, in_chunk, shift=lse[:, None])
    dlogit.exp_().mul_(grad_lse[:, None])
    if grad_logit_sum is not None:
        dlogit.add_(grad_logit_sum[:, None])
    if grad_target is not None:
        dlogit.scatter_add_(1, column, torch.where(in_chunk, grad_target, 0.0))
    at_target = dlogit.gather(1, column)
    dlogit.scatter_add_(1, column, torch.where(in_chunk & prep.first, at_target * (prep.target_derivative - 1), 0.0))
    g = dlogit.mul_(inv_w * margin.s)  # dcos / |W_c|
    # sum_b dcos cos / |W_c|^2 = sum_b g * raw / s / |W_c|^2  (raw is not needed any more: in place)
    radial = raw.mul_(g).sum(0).mul_(_radial_scale(inv_w, norms, margin))
    return g, w, radial


# ----------------------------------------------------------------------------- cpu: C++ chunk kernels


def _cpp_chunk_forward(prep: Prepared, w, start: int, margin: Margin, need_logit_sum: bool):
    """As _torch_chunk_forward, the elementwise work in one pass of csrc/cpu/margin_softmax.cpp."""
    _, norms, inv_w, raw = _chunk_products(prep, w)
    lse, logit_sum, best, best_column = torch.ops.lafs_kernels._margin_chunk_fwd(
        raw, inv_w, prep.labels, prep.first, start, prep.target_logit
    )
    return lse, logit_sum if need_logit_sum else None, best / margin.s, best_column, norms


def _cpp_chunk_backward(prep: Prepared, w, start: int, margin: Margin, lse, grads, norms):
    """As _torch_chunk_backward; csrc/cpu/margin_softmax.cpp turns raw into g in place."""
    grad_lse, grad_target, grad_logit_sum = (None if g is None else g.contiguous() for g in grads)
    w, norms, inv_w, raw = _chunk_products(prep, w, norms)
    radial = torch.ops.lafs_kernels._margin_chunk_bwd(
        raw,
        inv_w,
        prep.labels,
        prep.first,
        start,
        prep.target_logit,
        prep.target_derivative.contiguous(),
        lse,
        grad_lse,
        grad_target,
        grad_logit_sum,
        margin.s,
    )
    return raw, w, radial.mul_(_radial_scale(inv_w, norms, margin))


@functools.lru_cache(maxsize=None)
def cpp_kernels_missing_reason():
    """None when the compiled extension has the margin chunk kernels (csrc/cpu/margin_softmax.cpp), else why not."""
    reason = _extension.missing_reason("cpu")
    if reason is None and not hasattr(torch.ops.lafs_kernels, "_margin_chunk_fwd"):
        reason = "the compiled extension lacks the margin kernels (_margin_chunk_fwd/_bwd): rebuild it"
    return reason


# ----------------------------------------------------------------------------- triton


def _chunk_labels(prep: Prepared, start: int) -> torch.Tensor:
    """[B, T] target columns relative to the chunk; -1 for labels not among these classes."""
    return torch.where(prep.present, prep.labels - start, -1)


def _triton_chunk_forward(prep: Prepared, w, start: int, margin: Margin, need_logit_sum: bool):
    from ..triton import margin_softmax as kernels

    stats = kernels.chunk_forward(prep.x, prep.inv_x, w, _chunk_labels(prep, start), prep.target_logit, margin.s)
    return (*stats, None)  # the kernels compute the centres' norms in their tiles


def _triton_chunk_backward(prep: Prepared, w, start: int, margin: Margin, lse, grads, norms):
    from ..triton import margin_softmax as kernels

    grad_lse, grad_target, grad_logit_sum = grads
    if grad_target is None:
        grad_target = torch.zeros_like(prep.target_logit)
    if grad_logit_sum is None:
        grad_logit_sum = torch.zeros_like(lse)
    g, radial = kernels.chunk_backward(
        prep.x,
        prep.inv_x,
        w,
        _chunk_labels(prep, start),
        prep.target_logit,
        prep.target_derivative,
        lse,
        grad_lse,
        grad_target,
        grad_logit_sum,
        margin.s,
    )
    return g, w, radial


# ----------------------------------------------------------------------------- the loops over chunks


class ChunkEngine(NamedTuple):
    """How one backend handles one class chunk.

    forward(prep, w [c, D], start, margin, need_logit_sum) -> (lse [B] LSE_DTYPE, logit sum [B] (or None
        when not needed), best cosine [B], its column in the chunk [B], norms [c] = |W_c| or None)
        over the chunk's classes.  ``keeps_norms``: the forward returns the norms and the
        backward gets them back (O(C) floats saved instead of a second pass over W).
    backward(prep, w [c, D], start, margin, lse [B], (grad_lse [B], grad_target [B, T] or None,
        grad_logit_sum [B] or None), norms [c] or None) -> (g [B, c] = dcos / |W_c|, w [c, D] in
        g's dtype or W's, radial [c] = sum_b dcos_bc cos_bc / |W_c|^2, 0 for a zero centre);
        lse and grad_lse come in the accumulation dtype from :func:`backward_row_terms`.
    """

    forward: object
    backward: object
    keeps_norms: bool


ENGINES = {
    "chunked": ChunkEngine(_torch_chunk_forward, _torch_chunk_backward, keeps_norms=True),
    "cpu": ChunkEngine(_cpp_chunk_forward, _cpp_chunk_backward, keeps_norms=True),
    "triton": ChunkEngine(_triton_chunk_forward, _triton_chunk_backward, keeps_norms=False),
}


def engine_chunk(backend: str, chunk: int, weight: torch.Tensor) -> int:
    """Classes per chunk for ``backend``: ``chunk``, but no more than one Triton launch takes (its grid has a
    column of programs per BLOCK_C classes, and CUDA allows 65535)."""
    if backend == "triton":
        from ..triton import margin_softmax as kernels

        return min(chunk, kernels.max_classes_per_launch(weight.device))
    return chunk


def forward_stats(x, weight, labels, margin: Margin, chunk: int, backend: str, need_logit_sum: bool):
    """RowStats of x [B, D] against weight [C, D] (labels [B, T]) and the centres' norms [C]
    (empty unless the engine keeps them)."""
    engine = ENGINES[backend]
    chunk = engine_chunk(backend, chunk, weight)
    prep = prepare(x, weight, labels, margin)
    rows = x.shape[0]
    lse = prep.xn.new_full((rows,), -math.inf, dtype=LSE_DTYPE)
    logit_sum = prep.xn.new_zeros(rows)
    best_cos = prep.xn.new_full((rows,), -math.inf)
    argmax = torch.zeros(rows, dtype=torch.int64, device=x.device)
    norms = prep.xn.new_empty(weight.shape[0] if engine.keeps_norms else 0)
    for start in range(0, weight.shape[0], chunk):
        chunk_lse, chunk_logit_sum, chunk_best, chunk_arg, chunk_norms = engine.forward(
            prep, weight[start : start + chunk], start, margin, need_logit_sum
        )
        better = chunk_best > best_cos  # strict: ties keep the lower class index, as torch.argmax
        best_cos = torch.where(better, chunk_best, best_cos)
        argmax = torch.where(better, chunk_arg + start, argmax)
        if need_logit_sum:
            logit_sum += chunk_logit_sum
        lse = torch.logaddexp(lse, chunk_lse)
        if engine.keeps_norms:
            norms[start : start + chunk] = chunk_norms
    return RowStats(lse, prep.target_logit, logit_sum, best_cos, argmax), norms


def _mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [K, N] of half tensors, accumulated and returned in float32 as the forward's tiles
    accumulate: on CUDA the half GEMM with a float32 output (tensor cores kept), elsewhere a float32
    GEMM of the upcast inputs (a product of two half values is exact in float32, so the two agree)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def backward_row_terms(lse: torch.Tensor, grad_lse: torch.Tensor, acc: torch.dtype):
    """lse [B] and grad_lse [B] (LSE_DTYPE) -> (lse rounded to ``acc``, grad_lse * exp(rounded - lse) in ``acc``).

    The engines compute grad_lse * exp(logit - lse) as grad' * exp(logit - rounded): with the logit near
    the rounded lse (a target whose probability is near 1) the difference is exact, and the rounding
    of lse moves only the per-row factor, which is formed in float64.  Rows without classes (lse = -inf)
    keep grad_lse."""
    rounded = lse.to(acc)
    factor = torch.where(torch.isfinite(lse), torch.exp(rounded.to(lse.dtype) - lse), 1.0)
    return rounded, (grad_lse.to(lse.dtype) * factor).to(acc)


def backward_grads(grads, x, weight, labels, lse, norms, margin: Margin, chunk: int, backend: str):
    """Gradients of x [B, D] and weight [C, D], recomputed chunk by chunk; grads = (grad_lse [B],
    grad_target [B, T] or None, grad_logit_sum [B] or None); lse [B] (LSE_DTYPE) and norms [C] from the
    forward."""
    engine = ENGINES[backend]
    chunk = engine_chunk(backend, chunk, weight)
    prep = prepare(x, weight, labels, margin)
    acc = prep.xn.dtype
    lse, grad_lse = backward_row_terms(lse, grads[0], acc)
    grads = (grad_lse, *grads[1:])
    grad_xn = torch.zeros_like(prep.xn)
    grad_weight = torch.empty_like(weight)
    for start in range(0, weight.shape[0], chunk):
        chunk_norms = norms[start : start + chunk] if engine.keeps_norms else None
        g, w, radial = engine.backward(prep, weight[start : start + chunk], start, margin, lse, grads, chunk_norms)
        # Through W_c / |W_c| without a normalised copy of W:
        # grad_W_c = sum_b g_bc xn_b - W_c * radial_c   (g = dcos / |W_c|)
        out = grad_weight[start : start + chunk]
        if g.dtype == acc == weight.dtype:
            torch.mm(g.T, prep.xn, out=out)
            out.addcmul_(w, radial[:, None], value=-1.0)
            grad_xn.addmm_(g, w)
        else:  # half g and W (triton): half operands, float32 products, one rounding at the end
            centre_grad = _mm_float32(g.T, prep.xn.to(g.dtype)).to(acc)
            out.copy_(centre_grad.addcmul_(w.to(acc), radial[:, None], value=-1.0))
            grad_xn += _mm_float32(g, w.to(g.dtype)).to(acc)
    radial_x = (grad_xn * prep.xn).sum(1) * prep.x_nonzero
    grad_x = (grad_xn - prep.xn * radial_x[:, None]) * prep.inv_x[:, None]
    return grad_x.to(x.dtype), grad_weight
