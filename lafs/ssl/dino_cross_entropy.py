"""DINO's cross-entropy between the teacher's targets and the student's crops.

Over ``V`` student crops and ``T`` teacher (global) crops of ``B`` images, rows crop-major::

    L = 1 / (P B) * sum_{i < T} sum_{v != i} sum_b  -q_i[b] . log_softmax(s_v[b] / tau)      P = T V - T pairs

``pairwise_dino_cross_entropy`` computes it as the released DINO / LAFS script does: a log-softmax copy
of every student row, then one ``[B, out_dim]`` product per pair (18 for 2 + 8 crops), each kept for
the backward pass.  ``dino_cross_entropy`` gives the same value keeping only the student logits and the
targets: each crop's log-probabilities are made one crop at a time and meet every teacher crop in one
batched dot product, and the backward pass makes them again.  The gradient for crop ``v`` is
``(M_v p_v - Q_v) / (P B tau)`` with ``p_v = softmax(s_v / tau)``, ``Q_v = sum_{i != v} q_i`` and
``M_v = sum_{i != v} sum_c q_i[c]`` (1 per teacher crop up to rounding).

Shapes: student ``[V * B, out_dim]`` (float, the gradient's dtype), targets ``[T * B, out_dim]``
probabilities (no gradient), 1 <= T <= V, V >= 2.  Returns a 0-dim tensor in the student's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _shapes(student: Tensor, targets: Tensor, ncrops: int) -> tuple[int, int]:
    """(teacher crops T, images B), or ValueError naming the mismatch."""
    if student.dim() != 2 or targets.dim() != 2 or student.shape[1] != targets.shape[1]:
        raise ValueError(
            f"dino_cross_entropy: student [V*B, K] and targets [T*B, K] must share K; got "
            f"{tuple(student.shape)} and {tuple(targets.shape)}"
        )
    if ncrops < 2 or student.shape[0] % ncrops:
        raise ValueError(f"dino_cross_entropy: {student.shape[0]} student rows are not {ncrops} (>= 2) crops")
    batch = student.shape[0] // ncrops
    teachers, rest = divmod(targets.shape[0], batch) if batch else (0, 1)
    if rest or not 1 <= teachers <= ncrops:
        raise ValueError(
            f"dino_cross_entropy: {targets.shape[0]} target rows are not 1..{ncrops} crops of {batch} images"
        )
    return teachers, batch


def pairwise_dino_cross_entropy(student: Tensor, targets: Tensor, ncrops: int, student_temp: float) -> Tensor:
    """The released script's form: one ``[B, out_dim]`` product per (teacher crop, student crop) pair."""
    teachers, _ = _shapes(student, targets, ncrops)
    student_logp = F.log_softmax(student / student_temp, dim=-1).chunk(ncrops)
    total, pairs = student.new_zeros(()), 0
    for i, q in enumerate(targets.chunk(teachers)):
        for v, logp in enumerate(student_logp):
            if v == i:  # a crop is never its own target
                continue
            total = total + torch.sum(-q * logp, dim=-1).mean()
            pairs += 1
    return total / pairs


def _sum_except(rows: Tensor, skip: int) -> Tensor:
    """``sum_{j != skip} rows[j]`` over the first dimension of ``rows``, summed, not the total minus row
    ``skip``: no cancellation."""
    return rows[torch.arange(rows.shape[0], device=rows.device) != skip].sum(0)


class _DINOCrossEntropy(torch.autograd.Function):
    # log p_v comes from log_softmax, once per crop in each pass (not kept): through lse - x instead, a row
    # of large logits (x ~ 300) loses ulp(300) ~ 3e-5 in every probability (50x plain float32's gradient
    # error in tests).  Pairs are summed per pair, not through the crops' sum, which cost ~2e-7 of the loss.
    @staticmethod
    def forward(ctx, student: Tensor, targets: Tensor, ncrops: int, student_temp: float) -> Tensor:
        teachers, batch = _shapes(student, targets, ncrops)
        s = student.view(ncrops, batch, -1)
        q = targets.to(student.dtype).view(teachers, batch, -1)
        q_by_image = q.transpose(0, 1).contiguous()  # [B, T, K]: the batched dot products' operand
        per_pair = s.new_empty(ncrops, batch, teachers)  # q_i . log p_v per image
        for v in range(ncrops):
            log_p = F.log_softmax(s[v] / student_temp, dim=-1)  # [B, K]
            torch.bmm(q_by_image, log_p.unsqueeze(-1), out=per_pair[v].unsqueeze(-1))
        own_crop = torch.arange(teachers, device=s.device)
        per_pair[own_crop, :, own_crop] = 0  # a crop is never its own target
        pairs = teachers * ncrops - teachers
        ctx.save_for_backward(student, q)
        ctx.settings = (ncrops, student_temp, pairs)
        return -per_pair.sum() / (pairs * batch)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor):
        student, q = ctx.saved_tensors
        ncrops, student_temp, pairs = ctx.settings
        teachers, batch = q.shape[0], q.shape[1]
        s = student.view(ncrops, batch, -1)
        scale = grad_loss / (pairs * batch * student_temp)
        q_mass = q.sum(dim=-1)  # [T, B], 1 up to rounding
        scaled_all = q.sum(0).mul_(-scale)  # -scale * sum_i q_i: [B, K]
        grad = torch.empty_like(s)
        for v in range(ncrops):
            own = v < teachers  # a teacher crop is not its own target
            scaled_targets = _sum_except(q, v).mul_(-scale) if own else scaled_all
            mass = _sum_except(q_mass, v) if own else q_mass.sum(0)  # [B]
            p = torch.exp_(F.log_softmax(s[v] / student_temp, dim=-1))
            torch.addcmul(scaled_targets, p, (mass * scale)[:, None], out=grad[v])
        return grad.view_as(student), None, None, None


def dino_cross_entropy(student: Tensor, targets: Tensor, ncrops: int, student_temp: float) -> Tensor:
    """The loss of the module docstring without per-pair copies; the gradient flows to ``student`` only."""
    return _DINOCrossEntropy.apply(student, targets.detach(), ncrops, student_temp)
