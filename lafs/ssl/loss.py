"""The DINO self-distillation loss with teacher centring and sharpening."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .dino_cross_entropy import dino_cross_entropy, pairwise_dino_cross_entropy
from .schedules import teacher_temp_schedule


class DINOLoss(nn.Module):
    """Cross-entropy between sharpened, centred teacher targets and student predictions.

    ``forward(student_output [ncrops*B, out_dim], teacher_output [T*B, out_dim], epoch)``:
    rows are crop-major (crop 0 of every image, then crop 1, ...); the teacher sees
    only the first ``T`` crops (the global ones, T = 2 in DINO / LAFS).

    - student: ``log_softmax(s / student_temp)`` per crop;
    - teacher: ``softmax((t - center) / teacher_temp(epoch))`` per global crop, no gradient;
    - loss: mean over the batch of ``sum(-q_i * log p_v)`` for every pair (teacher crop i,
      student crop v) with ``v != i``, averaged over the ``T * ncrops - T`` pairs;
    - then ``center <- m * center + (1 - m) * mean(t)`` (the batch mean of the raw
      teacher logits, averaged over all ranks when ``torch.distributed`` is initialised).

    The teacher temperature warms up linearly from ``warmup_teacher_temp`` over
    ``warmup_teacher_temp_epochs`` epochs, then stays at ``teacher_temp``.
    ``nepochs``, when given, bounds the epochs the loss accepts.
    ``fused=True`` computes the pairs' sum without a ``[B, out_dim]`` copy per pair
    (``lafs.ssl.dino_cross_entropy``); ``False`` runs the released script's per-pair loop.
    Computed in float32 for float32 and lower-precision inputs (float64 stays float64).
    """

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        nepochs: Optional[int] = None,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        fused: bool = True,
    ):
        super().__init__()
        if ncrops < 2:
            raise ValueError(f"DINOLoss needs at least 2 crops, got ncrops={ncrops}")
        self.out_dim = out_dim
        self.ncrops = ncrops
        self.warmup_teacher_temp = warmup_teacher_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.nepochs = nepochs
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.fused = fused
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temperature(self, epoch: int) -> float:
        if epoch < 0 or (self.nepochs is not None and epoch >= self.nepochs):
            raise ValueError(f"epoch {epoch} is outside the {self.nepochs} epochs DINOLoss was built for")
        schedule = teacher_temp_schedule(
            self.warmup_teacher_temp, self.teacher_temp, self.warmup_teacher_temp_epochs, epoch + 1
        )
        return float(schedule[epoch])

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        self._check(student_output, teacher_output)
        dtype = torch.promote_types(student_output.dtype, torch.float32)
        teacher_raw = teacher_output.detach().to(dtype)
        targets = F.softmax((teacher_raw - self.center) / self.teacher_temperature(epoch), dim=-1)
        cross_entropy = dino_cross_entropy if self.fused else pairwise_dino_cross_entropy
        loss = cross_entropy(student_output.to(dtype), targets, self.ncrops, self.student_temp)
        self.update_center(teacher_raw)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the batch mean of the raw teacher logits ``[T*B, out_dim]`` (all ranks)."""
        batch_sum = teacher_output.float().sum(dim=0, keepdim=True)
        count = teacher_output.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            count *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1.0 - self.center_momentum)

    def _check(self, student_output: torch.Tensor, teacher_output: torch.Tensor) -> None:
        """Validate shapes, in the module's terms (the cross-entropy checks its own arguments too)."""
        for name, t in (("student_output", student_output), ("teacher_output", teacher_output)):
            if t.dim() != 2 or t.shape[1] != self.out_dim:
                raise ValueError(f"DINOLoss: {name} must be [rows, {self.out_dim}], got {tuple(t.shape)}")
        if student_output.shape[0] % self.ncrops:
            raise ValueError(
                f"DINOLoss: student_output has {student_output.shape[0]} rows, not a multiple of ncrops={self.ncrops}"
            )
        batch = student_output.shape[0] // self.ncrops
        n_teacher, rest = divmod(teacher_output.shape[0], batch)
        if rest or not 1 <= n_teacher <= self.ncrops:
            raise ValueError(
                f"DINOLoss: teacher_output has {teacher_output.shape[0]} rows; expected a multiple (1..{self.ncrops}) "
                f"of the batch size {batch}"
            )
