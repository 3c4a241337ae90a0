"""DINO's cross-entropy between the teacher's targets and the student's crops.

Over ``V`` student crops and ``T`` teacher (global) crops of ``B`` images, rows crop-major::

    L = 1 / (P B) * sum_{i < T} sum_{v != i} sum_b  -q_i[b] . log_softmax(s_v[b] / tau)      P = T V - T pairs

``pairwise_dino_cross_entropy`` computes it as the released DINO / LAFS script does: a log-softmax copy
of every student row, then one ``[B, out_dim]`` product per pair (18 for 2 + 8 crops), each kept for
the backward pass.  ``dino_cross_entropy`` gives the same value keeping only the student logits and the
targets: the crops' log-probabilities are made a chunk of crops at a time and meet every teacher crop in
one batched dot product, and the backward pass makes them again.  The gradient for crop ``v`` is
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
    ``skip``: no cancellation.  The kept rows' indices come from the host (a boolean mask would make a
    GPU wait for its count)."""
    kept = [j for j in range(rows.shape[0]) if j != skip]
    return rows.index_select(0, torch.tensor(kept, dtype=torch.long, device=rows.device)).sum(0)


# Logits per pass: the passes' temporaries stay near 16 MB of float32 whatever the batch and out_dim, and
# small problems (the default run's 4,096 outputs) take a few passes instead of one per crop.
CHUNK_ELEMENTS = 1 << 22


def _crop_chunks(ncrops: int, teachers: int, crop_elements: int) -> list[tuple[int, int]]:
    """Crop ranges [start, stop) of one pass each: each teacher crop alone (its targets leave itself out),
    the other crops grouped up to ``CHUNK_ELEMENTS`` logits."""
    per_chunk = max(1, CHUNK_ELEMENTS // max(1, crop_elements))
    chunks = [(v, v + 1) for v in range(teachers)]
    return chunks + [(v, min(v + per_chunk, ncrops)) for v in range(teachers, ncrops, per_chunk)]


class _DINOCrossEntropy(torch.autograd.Function):
    # log p comes from log_softmax, a chunk of crops per pass (not kept): through lse - x instead, a row of
    # large logits (x ~ 300) loses ulp(300) ~ 3e-5 in every probability (50x plain float32's gradient error
    # in tests).  Pairs are summed per pair, not through the crops' sum, which cost ~2e-7 of the loss.
    @staticmethod
    def forward(ctx, student: Tensor, targets: Tensor, ncrops: int, student_temp: float) -> Tensor:
        teachers, batch = _shapes(student, targets, ncrops)
        s = student.view(ncrops, batch, -1)
        q = targets.to(student.dtype).view(teachers, batch, -1)
        per_pair = s.new_empty(ncrops, batch, teachers)  # q_i . log p_v per image
        for start, stop in _crop_chunks(ncrops, teachers, s[0].numel()):
            log_p = F.log_softmax(s[start:stop] / student_temp, dim=-1)  # [crops, B, K]
            per_pair[start:stop] = torch.einsum("vbk,tbk->vbt", log_p, q)
        per_pair[:teachers].diagonal(dim1=0, dim2=2).zero_()  # a crop is never its own target
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
        # per pass: -scale * (the targets of its crops) [B, K] and scale * (their mass) [B, 1]; a teacher crop
        # (a pass of its own) is not its own target, the other crops take every teacher crop's
        all_targets = (q.sum(0).mul_(-scale), q_mass.sum(0).mul_(scale)[:, None])
        grad = torch.empty_like(s)
        for start, stop in _crop_chunks(ncrops, teachers, s[0].numel()):
            targets_v, mass_v = all_targets
            if start < teachers:
                targets_v = _sum_except(q, start).mul_(-scale)
                mass_v = _sum_except(q_mass, start).mul_(scale)[:, None]
            p = F.log_softmax(s[start:stop] / student_temp, dim=-1).exp_()
            torch.addcmul(targets_v, p, mass_v, out=grad[start:stop])
        return grad.view_as(student), None, None, None


def dino_cross_entropy(student: Tensor, targets: Tensor, ncrops: int, student_temp: float) -> Tensor:
    """The loss of the module docstring without per-pair copies; the gradient flows to ``student`` only."""
    return _DINOCrossEntropy.apply(student, targets.detach(), ncrops, student_temp)
