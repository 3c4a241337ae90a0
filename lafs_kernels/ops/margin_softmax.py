"""Margin-softmax cross-entropy (CosFace, ArcFace, combined) without the ``[B, C]`` logits.

Shapes: embeddings ``x [B, D]``, class centres ``W [C, D]``, labels ``[B]`` or
``[B, T]`` int64 (``T`` targets per sample, e.g. mixup), label_weights ``[B, T]``.

``cos[b, c] = <x_b / |x_b|, W_c / |W_c|>`` (norms clamped below by ``EPS``, as
``F.normalize``).  For a labelled class ``theta = acos(cos)`` and the logit is
``cos(m1*theta + m2) - m3`` (ArcFace fallback ``cos - m3 - sin(pi - m2)*m2`` when
``m1*theta + m2 > pi``; with ``easy_margin`` the fallback is ``cos - m3`` whenever
``cos <= 0``); every other class keeps ``cos``; all logits are scaled by ``s``.
The loss of sample ``b`` is the cross-entropy with the soft target
``(1 - eps) * sum_t w_bt * onehot(y_bt) + eps / C``.

How it is computed.  One pass over W in class chunks keeps, per row, a running
max and sum of exponentials (online log-sum-exp), the sum of the logits (label
smoothing) and the best cosine (argmax).  The margined target logits are
computed up front from the ``B*T`` gathered centres, so no kernel needs ``acos``.
The backward pass recomputes each chunk's cosines and turns them straight into
the chunk's gradients; the loss itself is assembled from the per-row statistics
in plain PyTorch, so reductions, soft targets and label weights are ordinary
autograd.

Backends (``lafs_kernels._dispatch``): ``torch`` (the reference: materialises
the logits), ``chunked`` (blockwise, any device: GEMMs in PyTorch; the elementwise
work of a chunk in one pass of the C++ kernels of csrc/cpu/margin_softmax.cpp on
CPU when the extension is built, in PyTorch ops otherwise), ``triton`` (fused
GEMM + softmax kernels; GPU, or CPU under ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .. import _dispatch, _extension
from .._dispatch import Backend, OpBackends

EPS = 1e-12
"""Lower clamp of the norms of embeddings and centres (as ``F.normalize``)."""

THETA_EPS = 1e-3
"""The margin's derivative ``m1*sin(m1*theta + m2)/sin(theta)`` is evaluated with theta
clamped to [THETA_EPS, pi - THETA_EPS]: it is singular at cos = +-1, and float32
cosines there resolve theta only to about 3e-4 anyway."""

DEFAULT_CHUNK = {"cpu": 16384, "cuda": 8192}
"""Classes per chunk.  CPU (B=256, D=512, C=1e5, 2 busy cores, C++ chunk kernels): 16384 ran
5-15% faster than 8192 (fewer GEMM calls and parallel regions) and 32768 slower; the
[B, chunk] float32 block is 16 MB (the unfused loss adds ~800 MB).  GPU: B/64 x 8192/128
tiles per launch fill the device; the [B, chunk] gradient buffer and the [chunk, D] float32
temporaries stay a few tens of MB."""

REDUCTIONS = ("mean", "sum", "none")
MARGIN_GRADS = ("exact", "straight_through")

BACKENDS = _dispatch.register(
    OpBackends(
        op="margin_softmax_cross_entropy",
        backends=[
            Backend("torch", devices=frozenset({"cpu", "cuda"})),
            Backend("chunked", devices=frozenset({"cpu", "cuda"})),
            Backend(
                "triton",
                devices=frozenset({"cpu", "cuda"}),
                dtypes=(torch.float32, torch.float16, torch.bfloat16),
                checks=(_dispatch.requires_triton,),
            ),
        ],
        preference={"cpu": ["chunked", "torch"], "cuda": ["triton", "chunked", "torch"]},
    )
)


class Margin(NamedTuple):
    s: float
    m1: float
    m2: float
    m3: float
    easy_margin: bool
    straight_through: bool


class RowStats(NamedTuple):
    """Per-row statistics over the classes of W (one shard of them when distributed).

    lse [B], target_logit [B, T] (0 where the label is not among these classes),
    logit_sum [B] (sum of all logits), best_cos [B] and argmax [B] (plain cosine).
    """

    lse: torch.Tensor
    target_logit: torch.Tensor
    logit_sum: torch.Tensor
    best_cos: torch.Tensor
    argmax: torch.Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def margin_values(cos: torch.Tensor, margin: Margin) -> tuple[torch.Tensor, torch.Tensor]:
    """Margined target cosine and its derivative d value / d cos, elementwise.

    cos [...] -> (value [...], derivative [...]).  ``straight_through`` gives
    derivative 1 (the margin is applied without gradient, as insightface does).
    """
    c = cos.clamp(-1.0, 1.0)
    if margin.m1 == 1.0 and margin.m2 == 0.0:
        return c - margin.m3, torch.ones_like(c)
    theta = torch.acos(c)
    angle = margin.m1 * theta + margin.m2
    value = torch.cos(angle) - margin.m3
    theta_d = theta.clamp(THETA_EPS, math.pi - THETA_EPS)
    derivative = margin.m1 * torch.sin(margin.m1 * theta_d + margin.m2) / torch.sin(theta_d)
    if margin.easy_margin:
        fallback, fallback_value = c <= 0, c - margin.m3
    else:
        fallback = angle > math.pi
        fallback_value = c - margin.m3 - math.sin(math.pi - margin.m2) * margin.m2
    value = torch.where(fallback, fallback_value, value)
    derivative = torch.where(fallback, torch.ones_like(derivative), derivative)
    if margin.straight_through:
        derivative = torch.ones_like(derivative)
    return value, derivative


def _inverse_norms(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [N, D] -> (1 / max(|row|, EPS) [N], |row| > EPS [N])."""
    norm = torch.linalg.vector_norm(rows, dim=1)
    return norm.clamp_min(EPS).reciprocal(), norm > EPS


class _Prepared(NamedTuple):
    """What every chunk needs, computed once per call (all O(B*D + B*T))."""

    x: torch.Tensor  # [B, D] the embeddings as given
    xn: torch.Tensor  # [B, D] normalised embeddings, accumulation dtype
    xn_scaled: torch.Tensor  # [B, D] s * xn: the chunk GEMM then gives s * cos directly
    inv_x: torch.Tensor  # [B]
    x_nonzero: torch.Tensor  # [B] bool
    labels: torch.Tensor  # [B, T] local class ids; outside [0, C) means "not here"
    present: torch.Tensor  # [B, T] bool: label among these classes
    first: torch.Tensor  # [B, T] bool: present and not a repeat of an earlier target of the row
    target_logit: torch.Tensor  # [B, T] s * margined value
    target_derivative: torch.Tensor  # [B, T] d margined value / d cos


def _first_occurrence(labels: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: present and not a repeat of an earlier target of the same row."""
    repeat = torch.zeros_like(present)
    for t in range(1, labels.shape[1]):
        repeat[:, t] = (labels[:, :t] == labels[:, t : t + 1]).any(1)
    return present & ~repeat


def _prepare(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, margin: Margin) -> _Prepared:
    acc = accumulation_dtype(x.dtype)
    xa = x.to(acc)
    inv_x, x_nonzero = _inverse_norms(xa)
    xn = xa * inv_x[:, None]
    num_classes = weight.shape[0]
    present = (labels >= 0) & (labels < num_classes)
    index = labels.clamp(0, max(num_classes - 1, 0))
    if num_classes == 0:
        centres = xn.new_zeros(*labels.shape, x.shape[1])
    else:
        centres = weight[index].to(acc)  # [B, T, D]: B*T rows, never a copy of W
    inv_w = torch.linalg.vector_norm(centres, dim=-1).clamp_min(EPS).reciprocal()
    cos_t = (centres * xn[:, None, :]).sum(-1) * inv_w
    value, derivative = margin_values(cos_t, margin)
    return _Prepared(
        x=x,
        xn=xn,
        xn_scaled=xn * margin.s,
        inv_x=inv_x,
        x_nonzero=x_nonzero,
        labels=labels.contiguous(),
        present=present,
        first=_first_occurrence(labels, present),
        target_logit=torch.where(present, margin.s * value, 0.0),
        target_derivative=derivative,
    )


# ----------------------------------------------------------------------------- torch reference


def _torch_stats(x, weight, labels, margin: Margin) -> RowStats:
    """The plain formula: materialises the [B, C] logits; gradients by autograd."""
    acc = accumulation_dtype(x.dtype)
    cos = F.linear(F.normalize(x.to(acc), eps=EPS), F.normalize(weight.to(acc), eps=EPS))  # [B, C]
    num_classes = weight.shape[0]
    present = (labels >= 0) & (labels < num_classes)
    index = labels.clamp(0, num_classes - 1)
    cos_t = cos.gather(1, index)
    value, derivative = margin_values(cos_t.detach(), margin)
    # value with the chosen derivative: value + (cos_t - cos_t.detach()) * derivative
    margined = value + (cos_t - cos_t.detach()) * derivative
    first = _first_occurrence(labels, present)  # a class named twice is margined once
    one_hot = torch.zeros_like(cos, dtype=torch.int64).scatter_add_(1, index, first.long()) > 0
    margined_dense = torch.zeros_like(cos).scatter_add(1, index, torch.where(first, margined, 0))
    logits = margin.s * torch.where(one_hot, margined_dense, cos)
    best_cos, argmax = cos.detach().max(1)
    return RowStats(
        lse=torch.logsumexp(logits, 1),
        target_logit=torch.where(present, margin.s * margined, 0.0),
        logit_sum=logits.sum(1),
        best_cos=best_cos,
        argmax=argmax,
    )


# ----------------------------------------------------------------------------- chunked PyTorch


def _target_columns(prep: _Prepared, start: int, size: int):
    """Columns [B, T] of the targets in the chunk [start, start + size) and whether they are in it [B, T]."""
    local = prep.labels - start
    in_chunk = prep.present & (local >= 0) & (local < size)
    return local.clamp(0, size - 1), in_chunk


def _put_targets(logits, prep: _Prepared, column, in_chunk, shift=None):
    """Replace, in place, the logits [B, c] at the targets by the margined ones (minus ``shift`` [B, 1]).

    Added as a difference at the first occurrence only, so a class named twice gets it once."""
    target = prep.target_logit if shift is None else prep.target_logit - shift
    delta = target - logits.gather(1, column)
    logits.scatter_add_(1, column, torch.where(in_chunk & prep.first, delta, 0.0))


def _chunk_products(prep: _Prepared, w, norms=None):
    """w [c, D] -> (w in the accumulation dtype, |W_c| [c], 1 / max(|W_c|, EPS) [c], raw [B, c] = s * <xn_b, W_c>)."""
    w = w.to(prep.xn.dtype)
    if norms is None:
        norms = torch.linalg.vector_norm(w, dim=1)
    return w, norms, norms.clamp_min(EPS).reciprocal(), torch.mm(prep.xn_scaled, w.T)


def _radial_scale(inv_w, norms, margin: Margin):
    """[c]: turns sum_b g * raw into sum_b dcos cos / |W_c|^2 (0 for a zero centre)."""
    return inv_w * inv_w * (norms > EPS) / margin.s


def _torch_chunk_forward(prep: _Prepared, w, start: int, margin: Margin, need_logit_sum: bool):
    _, norms, inv_w, logits = _chunk_products(prep, w)
    logits.mul_(inv_w)  # s * cos [B, c]
    best, best_column = logits.max(1)
    column, in_chunk = _target_columns(prep, start, w.shape[0])
    _put_targets(logits, prep, column, in_chunk)
    # Shifted by the row max (the margin may raise a target above it), the exponentials cannot
    # overflow; in place, this is three passes over [B, c] where torch.logsumexp takes five.
    shift = torch.maximum(best, torch.where(in_chunk, prep.target_logit, -math.inf).amax(1))
    logit_sum = logits.sum(1) if need_logit_sum else None
    sum_exp = logits.sub_(shift[:, None]).exp_().sum(1)
    return shift + sum_exp.log(), logit_sum, best / margin.s, best_column, norms


LOG_SCALE_FLOOR = -1e4
"""log |grad_lse| for rows with grad_lse = 0: finite (so target differences stay finite) and
small enough that exp underflows to exactly 0 in float32 and float64."""


def _torch_chunk_backward(prep: _Prepared, w, start: int, margin: Margin, lse, grads, norms):
    grad_lse, grad_target, grad_logit_sum = grads
    w, norms, inv_w, raw = _chunk_products(prep, w, norms)  # raw = s * <xn_b, W_c>  [B, c]
    # d loss / d logit = grad_lse * softmax (+ grad_logit_sum) (+ grad_target at the targets).
    # |grad_lse| * softmax = exp(logit - lse + log |grad_lse|): the row scale rides in the exp's pass.
    shift = lse - torch.log(grad_lse.abs()).clamp_min(LOG_SCALE_FLOOR)
    dlogit = torch.addcmul(-shift[:, None], raw, inv_w)  # s * cos - shift
    column, in_chunk = _target_columns(prep, start, w.shape[0])
    _put_targets(dlogit, prep, column, in_chunk, shift=shift[:, None])
    # The sign of grad_lse (negative upstream gradients) in one multiply; no host sync to skip it.
    dlogit.exp_().mul_(torch.where(grad_lse < 0, -1.0, 1.0).to(dlogit.dtype)[:, None])
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


def _kernel_chunk_forward(prep: _Prepared, w, start: int, margin: Margin, need_logit_sum: bool):
    """As _torch_chunk_forward, the elementwise work in one pass of csrc/cpu/margin_softmax.cpp."""
    _, norms, inv_w, raw = _chunk_products(prep, w)
    lse, logit_sum, best, best_column = torch.ops.lafs_kernels._margin_chunk_fwd(
        raw, inv_w, prep.labels, prep.first, start, prep.target_logit
    )
    return lse, logit_sum if need_logit_sum else None, best / margin.s, best_column, norms


def _kernel_chunk_backward(prep: _Prepared, w, start: int, margin: Margin, lse, grads, norms):
    """As _torch_chunk_backward; csrc/cpu/margin_softmax.cpp turns raw into g in place."""
    grad_lse, grad_target, grad_logit_sum = (None if g is None else g.contiguous() for g in grads)
    w, norms, inv_w, raw = _chunk_products(prep, w, norms)
    radial = torch.ops.lafs_kernels._margin_chunk_bwd(
        raw, inv_w, prep.labels, prep.first, start, prep.target_logit, prep.target_derivative.contiguous(),
        lse, grad_lse, grad_target, grad_logit_sum, margin.s,
    )
    return raw, w, radial.mul_(_radial_scale(inv_w, norms, margin))


def _triton_chunk_forward(prep: _Prepared, w, start: int, margin: Margin, need_logit_sum: bool):
    from ..triton import margin_softmax as kernels

    stats = kernels.chunk_forward(prep.x, prep.inv_x, w, _chunk_labels(prep, start), prep.target_logit, margin.s)
    return (*stats, None)  # the kernels compute the centres' norms in their tiles


def _triton_chunk_backward(prep: _Prepared, w, start: int, margin: Margin, lse, grads, norms):
    from ..triton import margin_softmax as kernels

    grad_lse, grad_target, grad_logit_sum = grads
    if grad_target is None:
        grad_target = torch.zeros_like(prep.target_logit)
    if grad_logit_sum is None:
        grad_logit_sum = torch.zeros_like(lse)
    g, radial = kernels.chunk_backward(
        prep.x, prep.inv_x, w, _chunk_labels(prep, start), prep.target_logit, prep.target_derivative,
        lse, grad_lse, grad_target, grad_logit_sum, margin.s,
    )
    return g, w, radial


def _chunk_labels(prep: _Prepared, start: int) -> torch.Tensor:
    """[B, T] target columns relative to the chunk; -1 for labels not among these classes."""
    return torch.where(prep.present, prep.labels - start, -1)


class _ChunkEngine(NamedTuple):
    """How one backend handles one class chunk; the loops over chunks are shared.

    forward(prep, w [c, D], start, margin, need_logit_sum) -> (lse [B], logit sum [B] (or None
        when not needed), best cosine [B], its column in the chunk [B], norms [c] = |W_c| or None)
        over the chunk's classes.  ``keeps_norms``: the forward returns the norms and the
        backward gets them back (O(C) floats saved instead of a second pass over W).
    backward(prep, w [c, D], start, margin, lse [B], (grad_lse [B], grad_target [B, T] or None,
        grad_logit_sum [B] or None), norms [c] or None) -> (g [B, c] = dcos / |W_c|, w [c, D] in
        g's dtype, radial [c] = sum_b dcos_bc cos_bc / |W_c|^2, 0 for a zero centre).
    """

    forward: object
    backward: object
    keeps_norms: bool


ENGINES = {
    "chunked": _ChunkEngine(_torch_chunk_forward, _torch_chunk_backward, keeps_norms=True),
    "triton": _ChunkEngine(_triton_chunk_forward, _triton_chunk_backward, keeps_norms=False),
}
# keeps the norms as ENGINES["chunked"] does: the op's fake outputs depend on the backend name only
CPU_KERNEL_ENGINE = _ChunkEngine(_kernel_chunk_forward, _kernel_chunk_backward, keeps_norms=True)


@functools.lru_cache(maxsize=None)
def cpu_kernels_available() -> bool:
    """Whether the compiled extension has the margin chunk kernels (csrc/cpu/margin_softmax.cpp)."""
    return _extension.missing_reason("cpu") is None and hasattr(torch.ops.lafs_kernels, "_margin_chunk_fwd")


def _engine(backend: str, device: torch.device) -> _ChunkEngine:
    """The chunked backend's elementwise work runs in the C++ kernels on CPU when they are built:
    one pass over each [B, chunk] block instead of five or six PyTorch ops."""
    if backend == "chunked" and device.type == "cpu" and cpu_kernels_available():
        return CPU_KERNEL_ENGINE
    return ENGINES[backend]


def _forward_stats(
    x, weight, labels, margin: Margin, chunk: int, engine: _ChunkEngine, need_logit_sum: bool
) -> tuple[RowStats, torch.Tensor]:
    """RowStats and the centres' norms [C] (empty unless the engine keeps them)."""
    prep = _prepare(x, weight, labels, margin)
    rows = x.shape[0]
    lse = prep.xn.new_full((rows,), -math.inf)
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


def _backward_grads(grads, x, weight, labels, lse, norms, margin: Margin, chunk: int, engine: _ChunkEngine):
    prep = _prepare(x, weight, labels, margin)
    acc = prep.xn.dtype
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
        else:
            centre_grad = (g.T @ prep.xn.to(g.dtype)).to(acc)
            out.copy_(centre_grad.addcmul_(w.to(acc), radial[:, None], value=-1.0))
            grad_xn += (g @ w.to(g.dtype)).to(acc)
    radial_x = (grad_xn * prep.xn).sum(1) * prep.x_nonzero
    grad_x = (grad_xn - prep.xn * radial_x[:, None]) * prep.inv_x[:, None]
    return grad_x.to(x.dtype), grad_weight


# ----------------------------------------------------------------------------- custom ops


def check_label_range(labels: torch.Tensor, num_classes) -> None:
    """Raise ValueError unless every label lies in [0, num_classes) (one host sync)."""
    if labels.numel() == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    num_classes = int(num_classes)
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"margin_softmax_cross_entropy: labels must lie in [0, {num_classes}) (the rows of weight); "
            f"got min {low}, max {high}"
        )


@torch.library.custom_op("lafs_kernels::margin_softmax_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    s: float,
    m1: float,
    m2: float,
    m3: float,
    easy_margin: bool,
    straight_through: bool,
    check_labels: bool,
    need_logit_sum: bool,
    chunk_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, D], weight [C, D], labels [B, T] -> lse [B], target_logit [B, T], logit_sum [B]
    (zeros unless ``need_logit_sum``), best_cos [B], argmax [B] (see RowStats), and the centres'
    norms [C] for the backward (empty for engines that do not keep them).  Labels outside
    [0, C) have no target here, unless ``check_labels`` makes them an error."""
    if check_labels:
        check_label_range(labels, weight.shape[0])
    margin = Margin(s, m1, m2, m3, easy_margin, straight_through)
    stats, norms = _forward_stats(x, weight, labels, margin, chunk_size, _engine(backend, x.device), need_logit_sum)
    return (*stats, norms)


@_forward_op.register_fake
def _forward_fake(
    x, weight, labels, s, m1, m2, m3, easy_margin, straight_through, check_labels, need_logit_sum, chunk_size, backend
):
    acc = accumulation_dtype(x.dtype)
    rows = x.shape[0]
    vec = x.new_empty(rows, dtype=acc)
    norms = x.new_empty(weight.shape[0] if _engine(backend, x.device).keeps_norms else 0, dtype=acc)
    return (vec, x.new_empty(labels.shape, dtype=acc), vec.clone(), vec.clone(), x.new_empty(rows, dtype=torch.int64), norms)


@torch.library.custom_op("lafs_kernels::margin_softmax_backward", mutates_args=())
def _backward_op(
    grad_lse: torch.Tensor,
    grad_target: Optional[torch.Tensor],
    grad_logit_sum: Optional[torch.Tensor],
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    norms: torch.Tensor,
    s: float,
    m1: float,
    m2: float,
    m3: float,
    easy_margin: bool,
    straight_through: bool,
    chunk_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of x [B, D] and weight [C, D], recomputed chunk by chunk; norms [C] from the forward."""
    margin = Margin(s, m1, m2, m3, easy_margin, straight_through)
    grads = (grad_lse, grad_target, grad_logit_sum)
    return _backward_grads(grads, x, weight, labels, lse, norms, margin, chunk_size, _engine(backend, x.device))


@_backward_op.register_fake
def _backward_fake(grad_lse, grad_target, grad_logit_sum, x, weight, *args):
    return torch.empty_like(x), torch.empty_like(weight)


_PARAMS = (
    "s", "m1", "m2", "m3", "easy_margin", "straight_through", "check_labels", "need_logit_sum", "chunk_size", "backend",
)


def _setup_context(ctx, inputs, output):
    x, weight, labels = inputs[:3]
    ctx.params = dict(zip(_PARAMS, inputs[3:]))
    ctx.set_materialize_grads(False)  # unused outputs (logit_sum without smoothing) cost no pass over W
    ctx.save_for_backward(x, weight, labels, output[0], output[5])


def _backward(ctx, grad_lse, grad_target, grad_logit_sum, _grad_best, _grad_argmax, _grad_norms):
    x, weight, labels, lse, norms = ctx.saved_tensors
    p = ctx.params
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
    grad_x, grad_weight = _backward_op(
        grad_lse, grad_target, grad_logit_sum, x, weight, labels, lse, norms,
        p["s"], p["m1"], p["m2"], p["m3"], p["easy_margin"], p["straight_through"], p["chunk_size"], p["backend"],
    )
    return (grad_x, grad_weight) + (None,) * (1 + len(_PARAMS))


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def local_row_stats(
    x, weight, labels, margin: Margin, *, chunk_size: int, backend: str, check_labels: bool, need_logit_sum: bool = True
) -> RowStats:
    """RowStats of x [B, D] against the classes of weight [C, D]; labels [B, T].  Without
    ``need_logit_sum`` (no label smoothing) the logit sums may be left at zero."""
    if backend == "torch":
        if check_labels and not torch.compiler.is_compiling():
            check_label_range(labels, weight.shape[0])
        return _torch_stats(x, weight, labels, margin)
    return RowStats(*_forward_op(x, weight, labels, *margin, check_labels, need_logit_sum, chunk_size, backend)[:5])


# ----------------------------------------------------------------------------- class-sharded (model parallel)


def _world(group) -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def all_gather_no_grad(tensor: torch.Tensor, group) -> torch.Tensor:
    """[*S] on every rank -> [world, *S] (rank order)."""
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(_world(group)[1])]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


class GatherFromRanks(torch.autograd.Function):
    """[*S] -> [world, *S].  Backward keeps this rank's slice only: the loss built from the
    gathered tensor is the same on every rank, so each rank already holds the full gradient."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return all_gather_no_grad(tensor, group)

    @staticmethod
    def backward(ctx, grad):
        return grad[_world(ctx.group)[0]], None


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


def sharded_row_stats(
    x, weight, local_labels, class_start, margin: Margin, *, chunk_size, backend, group, need_argmax,
    need_logit_sum: bool = True,
) -> RowStats:
    """RowStats over all ranks' classes: x [B, D] (same on every rank), this rank's
    centres weight [C_r, D], local_labels [B, T] = global label - class_start (outside
    [0, C_r) means "on another rank"), class_start int or 0-d tensor.  The argmax is global.

    No host synchronisation: per-row statistics are gathered ([world, B, T + 2] numbers)
    and combined; the softmax max and sum are the log-sum-exp of the ranks' lse.
    """
    stats = local_row_stats(
        SumGradAcrossRanks.apply(x, group), weight, local_labels, margin,
        chunk_size=chunk_size, backend=backend, check_labels=False, need_logit_sum=need_logit_sum,
    )
    packed = torch.cat([stats.lse[:, None], stats.target_logit, stats.logit_sum[:, None]], 1)
    gathered = GatherFromRanks.apply(packed, group)  # [world, B, T + 2]
    best_cos, argmax = stats.best_cos, stats.argmax
    if need_argmax:
        all_best = all_gather_no_grad(stats.best_cos, group)
        all_arg = all_gather_no_grad(stats.argmax + class_start, group)
        winner = all_best.argmax(0, keepdim=True)
        best_cos, argmax = all_best.gather(0, winner)[0], all_arg.gather(0, winner)[0]
    return RowStats(
        lse=torch.logsumexp(gathered[..., 0], 0),
        target_logit=gathered[..., 1:-1].sum(0),
        logit_sum=gathered[..., -1].sum(0),
        best_cos=best_cos,
        argmax=argmax,
    )


# ----------------------------------------------------------------------------- public function


def soft_target_loss(stats: RowStats, label_weights, label_smoothing: float, num_classes, reduction: str):
    """Cross-entropy against (1 - eps) * sum_t w_t onehot(y_t) + eps / C from per-row statistics.

    label_weights [B, T]; num_classes int or 0-d tensor -> loss (scalar, or [B] for "none").
    """
    weights = label_weights.to(stats.lse.dtype)
    loss = weights.sum(1) * stats.lse - (weights * stats.target_logit).sum(1)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss + label_smoothing * (stats.lse - stats.logit_sum / num_classes)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _validate(embeddings, weight, labels, label_weights, label_smoothing, reduction, margin_grad):
    name = "margin_softmax_cross_entropy"
    if embeddings.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"{name}: embeddings must be [B, D] and weight [C, D]; got {tuple(embeddings.shape)}, {tuple(weight.shape)}")
    if embeddings.shape[1] != weight.shape[1]:
        raise ValueError(f"{name}: embedding size {embeddings.shape[1]} != weight's {weight.shape[1]} (weight is [C, D])")
    if not embeddings.is_floating_point() or embeddings.dtype != weight.dtype:
        raise TypeError(f"{name}: embeddings and weight need the same floating dtype; got {embeddings.dtype}, {weight.dtype}")
    if embeddings.device != weight.device or labels.device != embeddings.device:
        raise ValueError(f"{name}: embeddings, weight and labels must be on one device; got {embeddings.device}, {weight.device}, {labels.device}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{name}: labels must be int64; got {labels.dtype}")
    if labels.dim() not in (1, 2) or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"{name}: labels must be [B] or [B, T] with B={embeddings.shape[0]}; got {tuple(labels.shape)}")
    if labels.dim() == 2 and (label_weights is None or label_weights.shape != labels.shape):
        got = None if label_weights is None else tuple(label_weights.shape)
        raise ValueError(f"{name}: labels [B, T] need label_weights of the same shape {tuple(labels.shape)}; got {got}")
    if labels.dim() == 1 and label_weights is not None:
        raise ValueError(f"{name}: label_weights go with labels [B, T]; labels here are [B]")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if margin_grad not in MARGIN_GRADS:
        raise ValueError(f"{name}: margin_grad must be one of {MARGIN_GRADS}; got {margin_grad!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{name}: label_smoothing must be in [0, 1); got {label_smoothing}")


def margin_softmax_cross_entropy(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    s: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.4,
    label_weights: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    margin_grad: str = "exact",
    return_argmax: bool = False,
    chunk_size: Optional[int] = None,
    process_group=None,
    backend: Optional[str] = None,
    easy_margin: bool = False,
    check_labels: bool = True,
):
    """CosFace / ArcFace / combined-margin softmax cross-entropy, never forming the [B, C] logits.

    Args:
        embeddings: ``[B, D]`` float32 / float16 / bfloat16 / float64 (need not be normalised).
        weight: ``[C, D]`` class centres, same dtype (need not be normalised).  With
            ``process_group`` this rank's shard ``[C_r, D]``; shards are contiguous in rank order.
        labels: ``[B]`` int64 class ids in ``[0, C)``, or ``[B, T]`` with ``label_weights``.
        s, m1, m2, m3: target logit ``s * (cos(m1*theta + m2) - m3)``, other logits ``s * cos``.
            CosFace: ``m3=0.4``; ArcFace: ``m2=0.5, m3=0`` (fallback ``cos - sin(pi-m2)*m2``
            when ``m1*theta + m2 > pi``).
        label_weights: ``[B, T]`` weights of the T targets (mixup: ``[lam, 1-lam]``).
        label_smoothing: eps of the target ``(1-eps)*y + eps/C``.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (``[B]``).
        margin_grad: ``"exact"`` (derivative of the margin, theta clamped to
            ``[THETA_EPS, pi-THETA_EPS]``) or ``"straight_through"`` (insightface: margin without gradient).
        return_argmax: also return ``[B]`` int64, the class of the largest plain cosine
            (training accuracy), found in the same pass over W.
        chunk_size: classes per block (default ``DEFAULT_CHUNK`` of the device).
        process_group: a ``torch.distributed`` group whose ranks hold shards of W; embeddings
            and labels must be the whole batch on every rank.  The loss is the same on every
            rank and the gradient of ``embeddings`` is the full one (summed over shards).
        backend: ``"torch"`` | ``"chunked"`` | ``"triton"``; default: best for the device
            (``LAFS_KERNELS_BACKEND`` overrides).
        easy_margin: use the margin only where ``cos > 0`` (ArcFace's option).
        check_labels: check the label range on the host (one device sync) and raise ValueError;
            ``False`` skips it (labels out of range then simply have no target).  The ``torch``
            backend skips it inside ``torch.compile``; the other backends check inside their op.

    Returns:
        loss (float32 for half inputs, else the input dtype): scalar, or ``[B]`` with
        ``reduction="none"``; ``(loss, argmax [B])`` with ``return_argmax``.

    Memory: O(B*chunk + B*D + B*T*D + C) beyond W and its gradient.
    """
    _validate(embeddings, weight, labels, label_weights, label_smoothing, reduction, margin_grad)
    if labels.dim() == 1:
        labels = labels[:, None]
        label_weights = torch.ones(labels.shape, dtype=accumulation_dtype(embeddings.dtype), device=labels.device)
    margin = Margin(float(s), float(m1), float(m2), float(m3), bool(easy_margin), margin_grad == "straight_through")
    call = _dispatch.call_of(embeddings, requires_grad=embeddings.requires_grad or weight.requires_grad)
    name = BACKENDS.select(call, backend)
    chunk = int(chunk_size or DEFAULT_CHUNK.get(embeddings.device.type, DEFAULT_CHUNK["cpu"]))
    if chunk <= 0:
        raise ValueError(f"margin_softmax_cross_entropy: chunk_size must be positive; got {chunk_size}")
    if process_group is None:
        stats = local_row_stats(
            embeddings, weight, labels, margin,
            chunk_size=chunk, backend=name, check_labels=check_labels, need_logit_sum=bool(label_smoothing),
        )
        num_classes = weight.shape[0]
    else:
        rank, _ = _world(process_group)
        sizes = all_gather_no_grad(torch.tensor(weight.shape[0], device=labels.device), process_group)
        class_start, num_classes = sizes[:rank].sum(), sizes.sum()
        if check_labels:
            check_label_range(labels, num_classes)
        stats = sharded_row_stats(
            embeddings, weight, labels - class_start, class_start, margin,
            chunk_size=chunk, backend=name, group=process_group, need_argmax=return_argmax,
            need_logit_sum=bool(label_smoothing),
        )
    loss = soft_target_loss(stats, label_weights, label_smoothing, num_classes, reduction)
    return (loss, stats.argmax) if return_argmax else loss
