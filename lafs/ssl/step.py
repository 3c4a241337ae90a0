"""One LAFS / DINO pretraining step, and the state that resumes it exactly.

>>> trainer = DINOTrainer(student_backbone, teacher_backbone, MultiViewBuilder(landmark_cnn),
...                       DINOSettings(epochs=100, iters_per_epoch=len(loader), batch_size=64))
>>> for epoch in range(start_epoch, settings.epochs):
...     for i, (images, _) in enumerate(loader):
...         stats = trainer.train_step(images, epoch * len(loader) + i, epoch)   # loss, lr, wd, momentum, teacher_temp
>>> torch.save({"dino": trainer.state_dict(), "epoch": epoch + 1}, path)   # trainer.load_state_dict(...) resumes
>>> trainer.teacher.backbone                                # the PartTransformer fine-tuning starts from

The caller owns the epoch loop, data and checkpoint files; the trainer owns the
models, optimizer, schedules (arrays indexed by global step) and the DINO loss.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .ema import ema_update
from .head import DINOHead
from .loss import DINOLoss
from .multicrop import MultiCropModel
from .optim import (
    DECAY_GROUP,
    cancel_last_layer_gradients,
    clip_gradients_per_parameter,
    param_groups_for_weight_decay,
)
from .schedules import cosine_schedule
from .views import MultiViewBuilder

_AMP_DTYPES = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class DINOSettings:
    """Hyper-parameters of LAFS pretraining (defaults: the released LAFS script, output 65,536).

    epochs, iters_per_epoch: length of the run (the schedules have epochs * iters_per_epoch steps).
    batch_size: images per step on this rank; the peak learning rate is
      ``lr * batch_size * world_size / 256``.
    out_dim, hidden_dim, bottleneck_dim, norm_last_layer: DINO head (out_dim up to 100,000 in the paper).
    lr, min_lr, warmup_epochs: learning rate per 256 images, its final value, linear warmup length
      (may be fractional for short runs), then cosine.
    weight_decay -> weight_decay_end: cosine schedule, on weights only (not biases / norms).
    momentum_teacher: teacher EMA momentum, cosine schedule up to 1.
    warmup_teacher_temp -> teacher_temp over warmup_teacher_temp_epochs, then constant; student_temp.
    center_momentum: EMA of the teacher centre.
    clip_grad: per-parameter gradient norm limit (0 turns clipping off).
    betas: AdamW's betas.
    freeze_last_layer: epochs during which the head's last layer is not updated.
    amp_dtype: autocast dtype on CUDA ("bfloat16", "float16" with a GradScaler, or None for
      float32); the CPU always runs float32.
    fused_loss: the DINO cross-entropy without a [B, out_dim] copy per crop pair
      (``lafs.ssl.dino_cross_entropy``); False: the released script's per-pair loop.
    fused_optimizer: PyTorch's fused AdamW (one kernel over all parameters: the same update up to float
      rounding); False: its default multi-tensor AdamW, as the released script runs.
    """

    epochs: int
    iters_per_epoch: int
    batch_size: int
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    warmup_teacher_temp: float = 0.07
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    student_temp: float = 0.1
    center_momentum: float = 0.9
    clip_grad: float = 3.0
    betas: tuple = (0.9, 0.999)
    freeze_last_layer: int = 1
    amp_dtype: Optional[str] = "bfloat16"
    fused_loss: bool = True
    fused_optimizer: bool = True

    def __post_init__(self):
        if self.amp_dtype not in _AMP_DTYPES:
            raise ValueError(f"amp_dtype must be one of {list(_AMP_DTYPES)}, got {self.amp_dtype!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @classmethod
    def from_config(cls, cfg, *, iters_per_epoch: int, amp_dtype: Optional[str]) -> DINOSettings:
        """The settings of a ``lafs.train`` pretraining configuration (its ``optim`` and ``dino`` sections, as
        ``lafs.train.config.schema.PRETRAIN`` declares them) for a run of ``iters_per_epoch`` steps per epoch;
        ``train.original_path`` keeps the released script's per-pair loss."""
        o, d = cfg.optim, cfg.dino
        return cls(
            epochs=int(o.epochs),
            iters_per_epoch=iters_per_epoch,
            batch_size=o.batch_size,
            out_dim=d.out_dim,
            hidden_dim=d.hidden_dim,
            bottleneck_dim=d.bottleneck_dim,
            norm_last_layer=d.norm_last_layer,
            lr=o.lr,
            min_lr=o.min_lr,
            warmup_epochs=o.warmup_epochs,
            weight_decay=o.weight_decay,
            weight_decay_end=d.weight_decay_end,
            momentum_teacher=d.momentum_teacher,
            warmup_teacher_temp=d.warmup_teacher_temp,
            teacher_temp=d.teacher_temp,
            warmup_teacher_temp_epochs=int(d.warmup_teacher_temp_epochs),
            student_temp=d.student_temp,
            center_momentum=d.center_momentum,
            clip_grad=o.clip_grad,
            betas=tuple(o.betas),
            freeze_last_layer=int(d.freeze_last_layer_epochs),
            amp_dtype=amp_dtype,
            fused_loss=not cfg.train.original_path,
            fused_optimizer=not cfg.train.original_path,
        )


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class DINOTrainer:
    """Student and teacher (backbone + DINO head), optimizer, schedules and loss of LAFS pretraining.

    Args:
      student_backbone, teacher_backbone: two instances of the same architecture
        (e.g. ``lafs.models.PartTransformer``; ``forward(tokens, index) -> [N, dim]`` with a
        ``dim`` attribute).  The teacher starts as a copy of the student, never gets
        gradients and runs in eval mode (no dropout or drop path; the released script's teacher keeps
        them on, a difference this code keeps on both paths: its targets are the model's, not a noisy draw).
      views: the :class:`MultiViewBuilder` (it holds the frozen landmark CNN).
      settings: :class:`DINOSettings`.
      device: where to train (default: the student's device).
    With ``torch.distributed`` initialised the student is wrapped in DistributedDataParallel.
    """

    def __init__(
        self,
        student_backbone: nn.Module,
        teacher_backbone: nn.Module,
        views: MultiViewBuilder,
        settings: DINOSettings,
        device: Optional[torch.device] = None,
    ):
        self.settings = s = settings
        device = torch.device(device) if device is not None else next(student_backbone.parameters()).device
        self.device = device

        def head() -> DINOHead:
            return DINOHead(student_backbone.dim, s.out_dim, s.hidden_dim, s.bottleneck_dim, s.norm_last_layer)

        self.student = MultiCropModel(student_backbone, head()).to(device)
        self.teacher = MultiCropModel(teacher_backbone, head()).to(device)
        self.views = views.to(device)
        self.loss = DINOLoss(
            s.out_dim,
            views.crops_per_image,
            s.warmup_teacher_temp,
            s.teacher_temp,
            s.warmup_teacher_temp_epochs,
            s.epochs,
            s.student_temp,
            s.center_momentum,
            fused=s.fused_loss,
        ).to(device)
        self.student_forward: nn.Module = self.student
        if _world_size() > 1:
            device_ids = None  # CPU (gloo): DDP takes no device ids
            if device.type == "cuda":
                device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
            # DDP broadcasts rank 0's student to every rank here ...
            self.student_forward = nn.parallel.DistributedDataParallel(self.student, device_ids=device_ids)
        # ... so the teacher, copied afterwards, starts the same on every rank and its EMA stays so.
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False).eval()

        self.optimizer = torch.optim.AdamW(
            param_groups_for_weight_decay(self.student), betas=tuple(s.betas), fused=s.fused_optimizer
        )
        peak_lr = s.lr * s.batch_size * _world_size() / 256.0
        self.lr_schedule = cosine_schedule(peak_lr, s.min_lr, s.epochs, s.iters_per_epoch, s.warmup_epochs)
        self.wd_schedule = cosine_schedule(s.weight_decay, s.weight_decay_end, s.epochs, s.iters_per_epoch)
        self.momentum_schedule = cosine_schedule(s.momentum_teacher, 1.0, s.epochs, s.iters_per_epoch)

        self.amp_dtype = _AMP_DTYPES[s.amp_dtype] if device.type == "cuda" else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)

    @property
    def total_steps(self) -> int:
        return len(self.lr_schedule)

    def train_step(self, images: torch.Tensor, global_step: int, epoch: int) -> dict[str, float]:
        """One optimisation step on ``images [B, 3, H, W]`` in [-1, 1]; returns the step's statistics.

        Views, student forward on every view group, teacher forward on the global group,
        DINO loss (the returned value is the mean over ranks), backward, per-parameter clipping,
        last-layer freeze, AdamW step with the scheduled lr / weight decay, then the teacher EMA.
        Raises FloatingPointError on a non-finite loss (before any weight changes; on every rank).
        """
        if not 0 <= global_step < self.total_steps:
            raise ValueError(f"global_step {global_step} is outside the schedule of {self.total_steps} steps")
        s = self.settings
        lr, wd, momentum = (float(x[global_step]) for x in (self.lr_schedule, self.wd_schedule, self.momentum_schedule))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group["name"] == DECAY_GROUP:
                group["weight_decay"] = wd

        self.student.train()
        self.views.train()
        groups = self.views(images.to(self.device, non_blocking=True))
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            with torch.no_grad():
                teacher_out = self.teacher(groups[:1])  # the teacher sees the global views only
            student_out = self.student_forward(groups)
            loss = self.loss(student_out, teacher_out, epoch)
        loss_value = self._mean_over_ranks(loss.detach())
        if not math.isfinite(loss_value):  # the mean: every rank stops, or none does
            raise FloatingPointError(f"DINO loss is {loss_value} at step {global_step} (epoch {epoch}); stopping")

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if s.clip_grad:
            clip_gradients_per_parameter(self.student, s.clip_grad)
        cancel_last_layer_gradients(self.student.head, epoch, s.freeze_last_layer)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        ema_update(self.teacher, self.student, momentum)
        return {
            "loss": loss_value,
            "lr": lr,
            "wd": wd,
            "momentum": momentum,
            "teacher_temp": self.loss.teacher_temperature(epoch),
        }

    @staticmethod
    def _mean_over_ranks(value: torch.Tensor) -> float:
        """The loss of the global batch: the mean of every rank's (their batches are equal in size)."""
        if _world_size() > 1:
            value = value.float().clone()
            dist.all_reduce(value)
            value /= _world_size()
        return value.item()

    def state_dict(self) -> dict:
        """Everything needed to resume bitwise: models, optimizer, scaler, loss centre, random states."""
        rng = {"torch": torch.get_rng_state(), "views": self.views.generator.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "dino_loss": self.loss.state_dict(),
            "rng": rng,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (also restores the global torch random state)."""
        missing = {"student", "teacher", "optimizer", "scaler", "dino_loss", "rng"} - set(state)
        if missing:
            raise KeyError(f"DINOTrainer state lacks {sorted(missing)} (not written by DINOTrainer.state_dict?)")
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.loss.load_state_dict(state["dino_loss"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.views.generator.set_state(rng["views"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
