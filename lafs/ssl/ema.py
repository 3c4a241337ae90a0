"""Exponential moving average of the student's parameters into the teacher."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``t <- momentum * t + (1 - momentum) * s`` for every parameter pair (buffers untouched).

    Teacher and student must have the same parameters in the same order (the same
    architecture); the update is in place and records no autograd history.
    """
    teacher_params = list(teacher.parameters())
    student_params = list(student.parameters())
    if len(teacher_params) != len(student_params):
        raise ValueError(f"ema_update: teacher has {len(teacher_params)} parameters, student {len(student_params)}")
    for i, (t, s) in enumerate(zip(teacher_params, student_params)):
        if t.shape != s.shape:
            raise ValueError(
                f"ema_update: parameter {i} has shape {tuple(t.shape)} in teacher, {tuple(s.shape)} in student"
            )
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, [s.detach() for s in student_params], alpha=1.0 - momentum)
