"""Stage 1: supervised Part fViT with a margin softmax (CosFace s=64 m=0.4 by default).

The landmark CNN trains end to end through the landmark gradient of the fused
gather; the loss is ``lafs_kernels.nn.CosFace`` / ``ArcFace`` on one process and
``PartialFC`` (class centres sharded over the processes) under torchrun.
"""
from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms import v2

from lafs.models import create_model
from lafs.models.checkpoint import model_to_dict

from . import landmark_report, plots
from .config import ConfigError
from .data import build_train_set, build_val_sets
from .heads import OriginalPathModel, build_margin_head
from .loop import Stage, autocast, autocast_dtype
from .optim import landmark_warmup, param_groups, set_lr, warmup_cosine
from .validation import verify_sets


class SupervisedStage(Stage):
    name = "supervised"

    def build(self) -> None:
        cfg = self.cfg
        self.train_set = build_train_set(cfg)
        self.val_sets = build_val_sets(cfg)
        self.model = self.build_model().to(self.device)
        if cfg.train.channels_last and not cfg.train.original_path:  # the original code runs NCHW
            self.model.landmark_cnn.to(memory_format=torch.channels_last)
        self.num_classes = int(self.train_set.num_classes)
        self.head = build_margin_head(cfg, self.model.embedding_dim, self.num_classes, self.dist).to(self.device)
        # The original path swaps in the per-landmark grid_sample loop; the weights are the same PartFViT.
        self.forward_model = OriginalPathModel(self.model) if cfg.train.original_path else self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = DistributedDataParallel(self.forward_model, device_ids=ids)
        groups = param_groups(self.model, weight_decay=cfg.optim.weight_decay,
                              landmark_weight_decay=cfg.optim.landmark_weight_decay,
                              layer_decay=cfg.optim.layer_decay, head=self.head,
                              landmark_lr_scale=cfg.optim.landmark_lr_scale)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
        self.amp_dtype = autocast_dtype(cfg.train.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def build_model(self):
        """A fresh model of ``cfg.model`` (the fine-tuning stage loads weights into it)."""
        try:
            return create_model(self.cfg.model.name, **self.cfg.model.overrides)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model: {exc}") from exc

    def transform(self):
        """A horizontal flip with probability ``aug.flip`` (image float32 [3,112,112] in and out), as
        insightface trains."""
        flip = self.cfg.aug.flip
        return v2.RandomHorizontalFlip(p=flip) if flip > 0 else None

    def setup_schedules(self) -> None:
        o = self.cfg.optim
        self.lr_schedule = warmup_cosine(o.lr, o.min_lr, self.total_steps, self.warmup_steps)
        frozen = int(round(o.landmark_warmup_epochs * self.steps_per_epoch))
        self.landmark_factor = landmark_warmup(self.total_steps, frozen, self.warmup_steps)

    def current_lr(self, step: int) -> float:
        return float(self.lr_schedule[min(step, len(self.lr_schedule) - 1)])

    def targets(self, images: torch.Tensor, labels: torch.Tensor, step: int, micro: int):
        """(images, labels [B] or [B, T], label_weights None or [B, T]); fine-tuning mixes here."""
        return images, labels, None

    def train_step(self, micro_batches: list, step: int) -> dict:
        cfg = self.cfg
        set_lr(self.optimizer, self.current_lr(step), self.landmark_factor[min(step, self.total_steps - 1)])
        self.forward_model.train()
        self.head.train()
        accum = len(micro_batches)
        losses, correct, seen = [], 0, 0
        for i, (images, labels) in enumerate(micro_batches):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            images, labels, weights = self.targets(images, labels, step, i)
            sync = i == accum - 1 or not self.dist.enabled
            context = self.forward_model.no_sync() if not sync else contextlib.nullcontext()
            with context:
                with autocast(self.amp_dtype, self.device):
                    embeddings = self.forward_model(images)
                loss, argmax = self.head(embeddings.float(), labels, label_weights=weights)
                self.scaler.scale(loss / accum).backward()
            losses.append(loss.detach())
            if argmax is not None:  # Partial FC (several processes) gives no argmax
                primary = labels if labels.dim() == 1 else labels[:, 0]
                correct += int((argmax == primary).sum())
                seen += primary.numel()
        loss = torch.stack(losses).mean()
        if not torch.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            return {"loss": float(loss)}
        accuracy = {"acc": correct / seen} if seen else {}
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad or float("inf"))
        if not torch.isfinite(grad_norm) and not self.scaler.is_enabled():
            # A finite loss can still carry NaN gradients (e.g. a NaN image whose landmarks the
            # gather zeroes): never let them reach the weights. (float16's scaler skips such steps itself.)
            self.optimizer.zero_grad(set_to_none=True)
            return {"loss": float(loss), "grad_norm": float(grad_norm)}
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {"loss": float(loss), **accuracy}
        if torch.isfinite(grad_norm):  # float16: an overflow step the scaler skipped reports no norm
            metrics["grad_norm"] = float(grad_norm)
        return metrics

    def validate(self) -> dict:
        """Verification on every configured set; ``accuracy`` is their mean (main process only)."""
        if not self.dist.is_main:
            return {}
        model = self.forward_model.module if self.dist.enabled else self.forward_model
        return verify_sets(model, self.val_sets, batch_size=self.cfg.val.batch_size, device=self.device,
                           amp_dtype=self.amp_dtype)

    def state_dict(self) -> dict:
        return {"model": model_to_dict(self.model), "head": self.head.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        from .weights import load_model_weights

        load_model_weights(self.model, state["model"], what="--resume checkpoint")
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])

    def finish(self, summary: dict) -> dict:
        if self.cfg.train.plots:
            plots.curves(self.run.read_log(), self.run.path / "curves.png", title=self.name)
        summary["landmark_tracking"] = landmark_report.report(
            self.model, self.cfg, self.run, self.val_sets[0].sample_images(), step=summary["steps"], device=self.device)
        summary["num_classes"] = self.num_classes
        summary["train_images"] = len(self.train_set)
        return summary
