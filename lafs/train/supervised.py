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
from .checkpoints import ResumeError
from .config import ConfigError
from .data import build_train_set, build_val_sets
from .distributed import all_reduce_sum
from .heads import OriginalPathModel, ShardedHead, build_margin_head, centre_parameter
from .optim import clip_grad_norm_global, landmark_warmup, param_groups, set_lr, warmup_cosine
from .precision import autocast, autocast_dtype
from .stage import Stage
from .validation import verify_sets


class SupervisedStage(Stage):
    name = "supervised"

    def build(self) -> None:
        cfg = self.cfg
        self.train_set = build_train_set(cfg)
        self.val_sets = build_val_sets(cfg)
        self.model = self.build_model().to(self.device)
        set_landmark_dropout(self.model.landmark_cnn, cfg.model.landmark_dropout)
        if cfg.train.channels_last and not cfg.train.original_path:  # the original code runs NCHW
            self.model.landmark_cnn.to(memory_format=torch.channels_last)
        self.num_classes = int(self.train_set.num_classes)
        self.head = build_margin_head(cfg, self.model.embedding_dim, self.num_classes, self.dist).to(self.device)
        # The original path swaps in the per-landmark grid_sample loop; the weights are the same PartFViT.
        self.forward_model = OriginalPathModel(self.model) if cfg.train.original_path else self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = DistributedDataParallel(self.forward_model, device_ids=ids)
        groups = param_groups(
            self.model,
            weight_decay=cfg.optim.weight_decay,
            landmark_weight_decay=cfg.optim.landmark_weight_decay,
            layer_decay=cfg.optim.layer_decay,
            head=self.head,
            landmark_lr_scale=cfg.optim.landmark_lr_scale,
        )
        # PyTorch's fused AdamW: the same update up to float rounding, one kernel for every parameter; the
        # original path keeps the default multi-tensor AdamW, as the released code runs.
        self.optimizer = torch.optim.AdamW(
            groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), fused=not cfg.train.original_path
        )
        self.sharded = isinstance(self.head, ShardedHead)
        head_ids = {id(p) for p in self.head.parameters()}
        self.replicated_params = [p for g in groups for p in g["params"] if not (self.sharded and id(p) in head_ids)]
        self.sharded_params = list(self.head.parameters()) if self.sharded else []
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
        if cfg.train.frozen_batch_norm:
            freeze_batch_norms(self.model)
        self.head.train()
        accum = len(micro_batches)
        # Right predictions and labelled images, counted on the device: one host read per step, not per micro-batch.
        losses, counts = [], torch.zeros(2, dtype=torch.float64, device=self.device)
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
            if argmax is not None:  # the original path's and the fused heads' argmax, Partial FC's too
                primary = labels if labels.dim() == 1 else labels[:, 0]
                counts[0] += (argmax == primary).sum()
                counts[1] += primary.numel()
        loss = torch.stack(losses).mean()
        if not torch.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            return {"loss": float(loss)}
        correct, seen = all_reduce_sum(counts, self.dist).tolist()  # the global batch's accuracy, as the loss is
        accuracy = {"acc": correct / seen} if seen else {}
        self.scaler.unscale_(self.optimizer)
        # One norm over the whole model, Partial FC shards included, the same on every process.
        grad_norm = clip_grad_norm_global(self.replicated_params, self.sharded_params, cfg.optim.clip_grad, self.dist)
        if not torch.isfinite(grad_norm):
            if not self.scaler.is_enabled():
                # A finite loss can still carry NaN gradients (e.g. a NaN image whose landmarks the
                # gather zeroes): never let them reach the weights.
                self.optimizer.zero_grad(set_to_none=True)
                return {"loss": float(loss), "grad_norm": float(grad_norm)}
            # float16: an overflow in any process's shard skips the step (and lowers the scale) in all.
            # (GradScaler keeps no cross-process flag; its per-optimizer record is what step/update read.)
            record = self.scaler._per_optimizer_states[id(self.optimizer)]["found_inf_per_device"]
            for found_inf in record.values():
                found_inf.fill_(1.0)
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
        return verify_sets(
            model, self.val_sets, batch_size=self.cfg.val.batch_size, device=self.device, amp_dtype=self.amp_dtype
        )

    def _centre_index(self) -> tuple[str, int]:
        """(name of the class-centre parameter in the head, its index in the optimizer's state)."""
        centres = centre_parameter(self.head)
        name = next(n for n, p in self.head.named_parameters() if p is centres)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        return name, next(i for i, p in enumerate(params) if p is centres)

    def state_dict(self) -> dict:
        """The replicated part: model, optimizer without the class centres' rows, scaler."""
        optimizer = self.optimizer.state_dict()
        index = self._centre_index()[1]
        optimizer["state"] = {k: v for k, v in optimizer["state"].items() if k != index}
        return {"model": model_to_dict(self.model), "optimizer": optimizer, "scaler": self.scaler.state_dict()}

    def shard_state(self) -> dict:
        """This process's class centres and their optimizer state (see :mod:`lafs.train.shards`)."""
        name, index = self._centre_index()
        entry = self.optimizer.state_dict()["state"].get(index)
        start = self.head.loss.class_start if self.sharded else 0
        return {
            "rank": self.dist.rank if self.sharded else 0,
            "world_size": self.dist.world_size if self.sharded else 1,
            "class_start": start,
            "num_classes": self.num_classes,
            "state": {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()},
            "optimizer": {}
            if entry is None
            else {name: {k: v.cpu().clone() if torch.is_tensor(v) else v for k, v in entry.items()}},
        }

    def shard_row_keys(self) -> dict:
        """Which shard entries hold one row per class (:func:`lafs.train.shards.reshard`)."""
        name = self._centre_index()[0]
        return {"state": [name], "optimizer": [name]}

    def load_state_dict(self, state: dict, shard: dict | None = None) -> None:
        from .weights import load_model_weights

        load_model_weights(self.model, state["model"], what="--resume checkpoint")
        if shard is None:
            raise ResumeError("--resume: the checkpoint holds no class centres (no 'head' entry)")
        name, index = self._centre_index()
        start = self.head.loss.class_start if self.sharded else 0
        if shard["class_start"] != start or shard["num_classes"] != self.num_classes:
            raise ResumeError(
                f"--resume: the class-centre shard holds classes from {shard['class_start']} of "
                f"{shard['num_classes']}; this process needs them from {start} of {self.num_classes}"
            )
        self.head.load_state_dict(shard["state"])
        optimizer = dict(state["optimizer"])
        optimizer["state"] = {
            **optimizer["state"],
            **({index: shard["optimizer"][name]} if name in shard["optimizer"] else {}),
        }
        self.optimizer.load_state_dict(optimizer)
        self.scaler.load_state_dict(state["scaler"])

    def finish(self, summary: dict) -> dict:
        if self.cfg.train.plots:
            plots.curves(self.run.read_log(), self.run.path / "curves.png", title=self.name)
        summary["landmark_tracking"] = landmark_report.report(
            self.model, self.cfg, self.run, self.val_sets[0].sample_images(), step=summary["steps"], device=self.device
        )
        summary["num_classes"] = self.num_classes
        summary["train_images"] = len(self.train_set)
        return summary


def set_landmark_dropout(landmark_cnn: torch.nn.Module, p: float) -> None:
    """Set the rate of the landmark CNN's dropout (its output Dropout(0.5)); 0 switches it off."""
    for module in landmark_cnn.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p


def freeze_batch_norms(model: torch.nn.Module) -> None:
    """Batch norms normalise with their running statistics (eval mode) and leave them unchanged;
    their scale and shift still train. Every image is then processed alone, however the batch is split."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
